from esparse.pipeline import kernel_build_step, step_logging

with step_logging(snakemake.log[0], snakemake.threads, gpus=snakemake.resources.get("gpu", 0)):
    kernel_build_step(snakemake.input[0], snakemake.params.out_dir, snakemake.params.token_buckets,
                      snakemake.params.device)
