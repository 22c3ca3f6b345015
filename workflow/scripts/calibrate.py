from esparse.pipeline import calibrate_step, step_logging

with step_logging(snakemake.log[0], snakemake.threads):
    calibrate_step(snakemake.input.model, snakemake.params.dataset, snakemake.params.mirror,
                   snakemake.params.nsamples, snakemake.params.seqlen, snakemake.params.seed,
                   snakemake.output.tokens, snakemake.output.info, snakemake.config, dict(snakemake.wildcards))
