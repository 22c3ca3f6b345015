from esparse.pipeline import ppl_table_step, step_logging

with step_logging(snakemake.log[0]):
    ppl_table_step(list(snakemake.input), snakemake.output[0])
