from esparse.pipeline import prune_step, step_logging

with step_logging(snakemake.log[0], snakemake.threads, gpus=snakemake.resources.get("gpu", 0)):
    prune_step(snakemake.input.model, snakemake.input.calibration, snakemake.wildcards.method,
               snakemake.params.pattern, dict(snakemake.params.settings), snakemake.output[0],
               snakemake.params.device, snakemake.params.dtype, snakemake.config, dict(snakemake.wildcards))
