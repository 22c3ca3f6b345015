from esparse.pipeline import step_logging, zeroshot_step

with step_logging(snakemake.log[0], snakemake.threads, gpus=snakemake.resources.get("gpu", 0)):
    zeroshot_step(snakemake.input.model, snakemake.params.tasks, snakemake.params.mirror, snakemake.params.limit,
                  snakemake.params.batch_size, snakemake.params.device, snakemake.params.dtype,
                  snakemake.output.json, snakemake.output.csv, snakemake.output.tasks, snakemake.config,
                  dict(snakemake.wildcards))
