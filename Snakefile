# esparse-bench: E-Sparse and its baselines as a dependency-tracked workflow.
# Run: snakemake --cores 2 [--config preset=smoke|default|paper data_mirror=PATH]
from snakemake.utils import min_version

min_version("9.0")


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/calibrate.smk"
include: "rules/prune.smk"
include: "rules/perplexity.smk"
include: "rules/ablation.smk"
include: "rules/zeroshot.smk"
include: "rules/kernels.smk"
include: "rules/profile.smk"
include: "rules/report.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        ppl_table=f"{RESULTS}/tables/wikitext_ppl.csv",
        report=f"{RESULTS}/report/report.html",
        audit=f"{RESULTS}/audit/audit.txt",
        zeroshot=[f"{RESULTS}/tables/zeroshot.csv"] if config["zeroshot"]["enabled"] else [],
        kernels=[
            f"{RESULTS}/kernels/{model}/{method}/2of4/plan.json"
            for model in MODELS
            for method in PRUNING_METHODS
            if config["kernels"]["enabled"] and "2of4" in PATTERNS
        ],
        ablation=[f"{RESULTS}/tables/ablation.csv"] if config["ablation"]["enabled"] else [],
        profiling=([f"{RESULTS}/tables/latency.csv", f"{RESULTS}/tables/memory.csv"]
                   if config["profiling"]["enabled"] else []),
    default_target: True
