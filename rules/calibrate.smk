rule calibrate:
    """Draw the calibration token windows (Wanda/SparseGPT C4 protocol)."""
    input:
        model=f"{RESOURCES}/models/{{model}}",
    output:
        tokens=f"{RESULTS}/calibration/{{model}}/tokens.safetensors",
        info=f"{RESULTS}/calibration/{{model}}/calibration.json",
    params:
        dataset=config["calibration"]["dataset"],
        nsamples=config["calibration"]["nsamples"],
        seqlen=config["calibration"]["seqlen"],
        seed=config["calibration"]["seed"],
        mirror=MIRROR,
    log:
        f"{RESULTS}/logs/calibrate/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/calibrate/{{model}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=4000,
        runtime=20,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/calibrate.py"
