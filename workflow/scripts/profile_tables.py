from esparse.pipeline import profile_tables_step, step_logging

with step_logging(snakemake.log[0], 1):
    profile_tables_step(list(snakemake.input), snakemake.output.latency, snakemake.output.memory)
