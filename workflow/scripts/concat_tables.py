from esparse.pipeline import concat_tables_step, step_logging

with step_logging(snakemake.log[0]):
    concat_tables_step(list(snakemake.input), snakemake.output[0])
