rule prune:
    """Prune one model with one method at one pattern, block by block."""
    input:
        model=f"{RESOURCES}/models/{{model}}",
        calibration=f"{RESULTS}/calibration/{{model}}/tokens.safetensors",
    output:
        directory(f"{RESULTS}/pruned/{{model}}/{{method}}/{{pattern}}"),
    params:
        pattern=pattern_text,
        settings=lambda wc: config["method_settings"].get(wc.method, {}),
        device=DEVICE,
        dtype=config["dtype"],
    log:
        f"{RESULTS}/logs/prune/{{model}}/{{method}}/{{pattern}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/prune/{{model}}/{{method}}/{{pattern}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPUS_PER_JOB,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/prune.py"
