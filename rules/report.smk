# The last rules: the report (HTML + Markdown + figures, then the results manifest) and the audit.
# Include after every rule that writes a table: the report reads whichever tables `rule all` asks for.
import os

REPORT_REPO_DIR = os.path.dirname(str(workflow.current_basedir))  # this file is <repo>/rules/report.smk
REPORT_GPU_DIR = os.path.join(REPORT_REPO_DIR, "reports", "gpu")
REPORT_REFERENCE_DIR = os.path.join(REPORT_REPO_DIR, "reports", "reference")


def report_tables(wildcards):
    """The tidy tables this configuration produces: those under RESULTS/tables/ that `rule all` asks for."""
    prefix = f"{RESULTS}/tables/"
    try:
        targets = [str(f) for f in workflow.get_rule("all").input]
    except Exception:  # no `rule all`: the perplexity table is always produced
        targets = []
    return sorted({f for f in targets if f.startswith(prefix)} | {f"{RESULTS}/tables/wikitext_ppl.csv"})


def report_records(wildcards):
    """The result JSONs and pruned model directories the report reads provenance and shuffle data from."""
    records = [f"{RESULTS}/ppl/{model}/{method}/{pattern}.json"
               for model in MODELS for method, pattern in method_pattern_pairs()]
    records += [f"{RESULTS}/pruned/{model}/{method}/{pattern}"
                for model in MODELS for method, pattern in method_pattern_pairs() if method != "dense"]
    if PRUNING_METHODS:
        records += [f"{RESULTS}/calibration/{model}/calibration.json" for model in MODELS]
    return records


def committed_gpu_tables(wildcards):
    """Committed GPU measurements (reports/gpu/*_h200.csv) shown beside this run's tables, if present."""
    return sorted(os.path.join(REPORT_GPU_DIR, name) for name in os.listdir(REPORT_GPU_DIR)
                  if name.endswith("_h200.csv")) if os.path.isdir(REPORT_GPU_DIR) else []


def audit_reference():
    """The committed reference run is a `default`-preset run: compare against it only for that preset."""
    info = os.path.join(REPORT_REFERENCE_DIR, "REFERENCE.json")
    return REPORT_REFERENCE_DIR if config["preset"] == "default" and os.path.isfile(info) else None


rule report:
    """The run report (self-contained HTML, Markdown + PNG figures) and the sha256 manifest of the results."""
    input:
        tables=report_tables,
        records=report_records,
        gpu_tables=committed_gpu_tables,
    output:
        html=report(f"{RESULTS}/report/report.html", caption="../workflow/report/report_html.rst",
                    category="Report"),
        md=report(f"{RESULTS}/report/report.md", caption="../workflow/report/report_md.rst", category="Report"),
        figures=report(directory(f"{RESULTS}/report/figures"), patterns=["{name}.png"],
                       caption="../workflow/report/figures.rst", category="Figures"),
        manifest=report(f"{RESULTS}/MANIFEST.sha256", caption="../workflow/report/manifest.rst",
                        category="Provenance"),
    params:
        results=RESULTS,
        gpu_dir=REPORT_GPU_DIR,
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
        results=RESULTS,
        resources=RESOURCES,
        mirror=MIRROR,
        rerun="auto",
        windows=2,
        against=audit_reference(),
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
