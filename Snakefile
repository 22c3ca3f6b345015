# esparse-bench: E-Sparse and its baselines as a dependency-tracked workflow.
# Run: snakemake --cores 2 [--config preset=smoke|default|paper data_mirror=PATH]
from snakemake.utils import min_version

min_version("9.0")


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/calibrate.smk"
include: "rules/prune.smk"
include: "rules/perplexity.smk"


rule all:
    input:
        ppl_table=f"{RESULTS}/tables/wikitext_ppl.csv",
    default_target: True
