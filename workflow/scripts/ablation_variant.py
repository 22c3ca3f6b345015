from esparse.pipeline import ablation_step, step_logging

with step_logging(snakemake.log[0], snakemake.threads, gpus=snakemake.resources.get("gpu", 0)):
    ablation_step(snakemake.input.model, snakemake.input.calibration, dict(snakemake.params.settings),
                  snakemake.params.pattern, snakemake.params.dataset, snakemake.params.mirror,
                  snakemake.params.seqlen, snakemake.params.max_windows, snakemake.params.device,
                  snakemake.params.dtype, snakemake.output[0], snakemake.config, dict(snakemake.wildcards))
