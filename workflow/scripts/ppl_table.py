from esparse.pipeline import ppl_table_step, step_logging

with step_logging(snakemake.log[0]):
    ppl_table_step(list(snakemake.input.ppl), snakemake.output[0], list(snakemake.input.pruned))
