# The last rules: the report (HTML + Markdown + figures, then the results manifest) and the audit.
# Include after every other rule: the report reads whatever results `rule all` asks for.
import glob
import os

REPORT_REPO_DIR = os.path.dirname(str(workflow.current_basedir))  # this file is <repo>/rules/report.smk
REPORT_GPU_DIR = os.path.join(REPORT_REPO_DIR, "reports", "gpu")
REPORT_REFERENCE_DIR = os.path.join(REPORT_REPO_DIR, "reports", "reference")
# The report's and the audit's own outputs, left out of the report's inputs (rule all may list them).
REPORT_OWN_OUTPUTS = (f"{RESULTS}/report/", f"{RESULTS}/audit/", f"{RESULTS}/MANIFEST.sha256")
# Result JSONs and pruned model directories the report reads provenance and shuffle efficacy from.
REPORT_RECORDS = (
    [f"{RESULTS}/ppl/{model}/{method}/{pattern}.json" for model in MODELS for method, pattern in method_pattern_pairs()]
    + [f"{RESULTS}/pruned/{model}/{method}/{pattern}"
       for model in MODELS for method, pattern in method_pattern_pairs() if method != "dense"]
    + ([f"{RESULTS}/calibration/{model}/calibration.json" for model in MODELS] if PRUNING_METHODS else [])
)
# The committed references are `default`-preset CPU runs, one per CPU model (esparse.audit.choose_reference
# picks this machine's): the audit compares against them for that preset only.
AUDIT_REFERENCE = (REPORT_REFERENCE_DIR if config["preset"] == "default"
                   and (glob.glob(os.path.join(REPORT_REFERENCE_DIR, "REFERENCE.json"))
                        or glob.glob(os.path.join(REPORT_REFERENCE_DIR, "*", "REFERENCE.json"))) else None)


rule report:
    """The run report (self-contained HTML, Markdown + PNG figures) and the sha256 manifest of the results."""
    input:
        # Every result `rule all` asks for (tables, kernel plans, ...); rule all is parsed after this file.
        results=lambda wildcards: sorted(
            {str(f) for f in (workflow.get_rule("all").input if workflow.is_rule("all") else [])
             if str(f).startswith(f"{RESULTS}/") and not str(f).startswith(REPORT_OWN_OUTPUTS)}
            | {f"{RESULTS}/tables/wikitext_ppl.csv"}
        ),
        records=REPORT_RECORDS,
        gpu_tables=sorted(glob.glob(os.path.join(REPORT_GPU_DIR, "*_h200.csv"))),
    output:
        html=report(f"{RESULTS}/report/report.html", caption="../workflow/report/report_html.rst",
                    category="Report"),
        md=report(f"{RESULTS}/report/report.md", caption="../workflow/report/report_md.rst", category="Report"),
        figures=report(directory(f"{RESULTS}/report/figures"), patterns=["{name}.png"],
                       caption="../workflow/report/figures.rst", category="Figures"),
        manifest=report(f"{RESULTS}/MANIFEST.sha256", caption="../workflow/report/manifest.rst",
                        category="Provenance"),
    params:
        results=lambda wildcards, output: os.path.dirname(output.manifest),
        gpu_dir=lambda wildcards: REPORT_GPU_DIR,  # committed GPU tables, read when present
    log:
        f"{RESULTS}/logs/report/report.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/report.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=20,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/report.py"


rule audit:
    """Re-verify the finished run: manifest, recorded checksums, two re-run perplexities, the reference."""
    input:
        manifest=f"{RESULTS}/MANIFEST.sha256",
        html=f"{RESULTS}/report/report.html",
    output:
        report(f"{RESULTS}/audit/audit.txt", caption="../workflow/report/audit.rst", category="Provenance"),
    params:
        results=lambda wildcards, input: os.path.dirname(input.manifest),
        resources=RESOURCES,
        mirror=MIRROR,
        rerun="auto",
        windows=2,
        against=AUDIT_REFERENCE,
    log:
        f"{RESULTS}/logs/audit/audit.log",
    benchmark:
        f"{RESULTS}/benchmarks/audit/audit.tsv"
    threads: config["threads"]
    resources:
        mem_mb=6000,
        runtime=60,
    conda:
        RULE_ENV
    script:
        "../workflow/scripts/audit.py"
