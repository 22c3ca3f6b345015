from esparse.pipeline import ablation_table_step, step_logging

with step_logging(snakemake.log[0]):
    ablation_table_step(list(snakemake.input), dict(snakemake.params.configured), snakemake.output.table,
                        snakemake.output.choice)
