from esparse.pipeline import prepare_model_step, step_logging

with step_logging(snakemake.log[0], snakemake.threads):
    prepare_model_step(snakemake.params.ref, snakemake.output[0], snakemake.params.cache, snakemake.params.dtype)
