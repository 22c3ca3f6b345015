rule zeroshot:
    """lm-eval zero-shot tasks on the dense or a pruned model (Hub tasks, or mirror-backed copies)."""
    input:
        model=evaluated_model_dir,
    output:
        json=f"{RESULTS}/zeroshot/{{model}}/{{method}}/{{pattern}}.json",
        csv=f"{RESULTS}/zeroshot/{{model}}/{{method}}/{{pattern}}.csv",
        tasks=directory(f"{RESULTS}/zeroshot/{{model}}/{{method}}/{{pattern}}.tasks"),
    params:
        tasks=config["zeroshot"]["tasks"],
        limit=config["zeroshot"]["limit"],
        batch_size=config["zeroshot"]["batch_size"],
        mirror=MIRROR,
        device=DEVICE,
        dtype=config["dtype"],
    log:
        f"{RESULTS}/logs/zeroshot/{{model}}/{{method}}/{{pattern}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/zeroshot/{{model}}/{{method}}/{{pattern}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1 if DEVICE == "cuda" else 0,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/zeroshot.py"


rule zeroshot_table:
    """Tidy table of every zero-shot accuracy: model, method, pattern, task, metric, value, stderr, n, source."""
    input:
        [
            f"{RESULTS}/zeroshot/{model}/{method}/{pattern}.csv"
            for model in MODELS
            for method, pattern in method_pattern_pairs()
        ],
    output:
        report(f"{RESULTS}/tables/zeroshot.csv", caption="../workflow/report/zeroshot.rst", category="Tables"),
    log:
        f"{RESULTS}/logs/tables/zeroshot.log",
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/concat_tables.py"
