from pathlib import Path

from esparse.audit import write_manifest
from esparse.pipeline import step_logging
from esparse.report import build_report

with step_logging(snakemake.log[0], snakemake.threads):
    # build_report writes figures/ next to the Markdown report: the rule's `figures` output.
    assert Path(snakemake.output.figures) == Path(snakemake.output.md).parent / "figures"
    build_report(snakemake.params.results, snakemake.output.html, snakemake.output.md,
                 gpu_dir=snakemake.params.gpu_dir, config=snakemake.config)
    # Last: the manifest covers every result file, the report included.
    write_manifest(snakemake.params.results, snakemake.output.manifest)
