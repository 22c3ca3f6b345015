ABLATION = config["ablation"]
ABLATION_VARIANTS = ablation_variants(ABLATION, config["method_settings"]["esparse"])


rule ablation_variant:
    """Prune with one E-Sparse variant and measure perplexity on the held-apart C4 documents."""
    input:
        model=f"{RESOURCES}/models/{{model}}",
        calibration=f"{RESULTS}/calibration/{{model}}/tokens.safetensors",
    output:
        f"{RESULTS}/ablation/{{model}}/{{variant}}.json",
    params:
        settings=lambda wc: ABLATION_VARIANTS[wc.variant],
        pattern=ABLATION["pattern"],
        dataset=ABLATION["dataset"],
        seqlen=ABLATION["seqlen"],
        max_windows=ABLATION["max_windows"],
        mirror=MIRROR,
        device=DEVICE,
        dtype=config["dtype"],
    log:
        f"{RESULTS}/logs/ablation/{{model}}/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/ablation/{{model}}/{{variant}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS_PER_JOB,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/ablation_variant.py"


rule ablation_table:
    """The ablation table and the alpha/bins choice made on held-apart perplexity."""
    input:
        [f"{RESULTS}/ablation/{model}/{variant}.json" for model in MODELS for variant in ABLATION_VARIANTS],
    output:
        table=report(f"{RESULTS}/tables/ablation.csv", caption="../workflow/report/ablation.rst", category="Tables"),
        choice=f"{RESULTS}/tables/ablation_choice.json",
    params:
        configured=config["method_settings"]["esparse"],
    log:
        f"{RESULTS}/logs/tables/ablation.log",
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/ablation_table.py"
