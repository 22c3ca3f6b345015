from esparse.pipeline import profile_step, step_logging

with step_logging(snakemake.log[0], snakemake.threads, gpus=snakemake.resources.get("gpu", 0)):
    profile_step(snakemake.wildcards.target, dict(snakemake.input.items()), snakemake.params.settings,
                 snakemake.params.esparse_shuffle, snakemake.params.device, snakemake.output[0],
                 snakemake.config, dict(snakemake.wildcards.items()))
