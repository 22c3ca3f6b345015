rule kernel_build:
    """Pack a 2:4-pruned model's weights and autotune the sparse kernels on this machine's device."""
    input:
        f"{RESULTS}/pruned/{{model}}/{{method}}/2of4",
    output:
        plan=report(f"{RESULTS}/kernels/{{model}}/{{method}}/2of4/plan.json", caption="../workflow/report/kernel_plan.rst",
                    category="Kernel plans", subcategory="{model}", labels={"method": "{method}"}),
        packed=f"{RESULTS}/kernels/{{model}}/{{method}}/2of4/packed.safetensors",
    params:
        out_dir=lambda wc, output: str(Path(output.plan).parent),
        token_buckets=config["kernels"]["token_buckets"],
        device=DEVICE,
    log:
        f"{RESULTS}/logs/kernel_build/{{model}}/{{method}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/kernel_build/{{model}}/{{method}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=1 if DEVICE == "cuda" else 0,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/kernel_build.py"
