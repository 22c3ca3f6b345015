rule perplexity:
    """WikiText-2 perplexity (Wanda/SparseGPT protocol) of the dense or a pruned model."""
    input:
        model=evaluated_model_dir,
    output:
        report(f"{RESULTS}/ppl/{{model}}/{{method}}/{{pattern}}.json", caption="../workflow/report/ppl_record.rst",
               category="Perplexity records", subcategory="{model}", labels={"method": "{method}", "pattern": "{pattern}"}),
    params:
        dataset=config["perplexity"]["dataset"],
        seqlen=config["perplexity"]["seqlen"],
        max_windows=config["perplexity"]["max_windows"],
        mirror=MIRROR,
        device=DEVICE,
        dtype=config["dtype"],
    log:
        f"{RESULTS}/logs/perplexity/{{model}}/{{method}}/{{pattern}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/perplexity/{{model}}/{{method}}/{{pattern}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=6000,
        runtime=120,
        gpu=GPUS_PER_JOB,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/perplexity.py"


rule ppl_table:
    """Tidy table of every WikiText-2 perplexity."""
    input:
        ppl=[
            f"{RESULTS}/ppl/{model}/{method}/{pattern}.json"
            for model in MODELS
            for method, pattern in method_pattern_pairs()
        ],
        # pruning time and memory come from the pruned models' own records
        pruned=[
            f"{RESULTS}/pruned/{model}/{method}/{pattern}"
            for model in MODELS
            for method, pattern in method_pattern_pairs()
            if method != "dense"
        ],
    output:
        report(f"{RESULTS}/tables/wikitext_ppl.csv", caption="../workflow/report/wikitext_ppl.rst", category="Tables"),
    log:
        f"{RESULTS}/logs/tables/wikitext_ppl.log",
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/ppl_table.py"
