# GPU latency and memory of whole models (esparse/profiling.py): one job per target, then two tables.
rule profiling:
    """Prefill (time to first token) and CUDA-graph decode latency and GPU memory of one target."""
    input:
        unpack(profile_inputs),
    output:
        f"{RESULTS}/profile/{{target}}.json",
    params:
        settings=PROFILE,
        esparse_shuffle=config["method_settings"]["esparse"].get("shuffle", "global+local"),
        device=DEVICE,
    log:
        f"{RESULTS}/logs/profile/{{target}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/profile/{{target}}.tsv"
    threads: config["threads"]
    resources:
        mem_mb=32000 if DEVICE == "cuda" else 2000,
        runtime=120 if DEVICE == "cuda" else 10,
        gpu=1 if DEVICE == "cuda" else 0,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/profile.py"


rule profiling_tables:
    """Tidy latency and memory tables over every profiled target."""
    input:
        [f"{RESULTS}/profile/{target}.json" for target in PROFILE["targets"]],
    output:
        latency=report(f"{RESULTS}/tables/latency.csv", caption="../workflow/report/latency.rst", category="Tables"),
        memory=report(f"{RESULTS}/tables/memory.csv", caption="../workflow/report/memory.rst", category="Tables"),
    log:
        f"{RESULTS}/logs/tables/profile.log",
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/profile_tables.py"
