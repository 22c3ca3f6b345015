"""The report and audit rules end to end: a `smoke` run on SmolLM2, its report in headless Chromium,
`snakemake --report`, and the audit rule (untouched: passes; one flipped byte: fails naming the file)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from esparse import audit
from test_audit import flip_byte
from test_report import png_size, render_in_chromium

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.pipeline, pytest.mark.slow]


def snakefile(tmp: Path) -> Path:
    """The repository's Snakefile, with rules/report.smk included if the Snakefile does not include it yet."""
    main = REPO / "Snakefile"
    if "rules/report.smk" in main.read_text():
        return main
    wrapper = tmp / "Snakefile"
    wrapper.write_text(f'include: "{main}"\ninclude: "{REPO / "rules" / "report.smk"}"\n')
    return wrapper


def snakemake(*args, snakefile: Path, results: Path, mirror: Path, check: bool = True):
    cmd = [sys.executable, "-m", "snakemake", *args, "-s", str(snakefile), "-d", str(REPO), "--cores", "2",
           "--config", "preset=smoke", f"data_mirror={mirror}", f"results_dir={results}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_mirror):
    """A `smoke` run up to the audit. ESPARSE_SMOKE_RESULTS=DIR reuses (and completes) an earlier smoke
    run's results directory instead of running every step again."""
    tmp = tmp_path_factory.mktemp("report_smoke")
    results = Path(os.environ["ESPARSE_SMOKE_RESULTS"]) if os.environ.get("ESPARSE_SMOKE_RESULTS") else tmp / "results"
    sf = snakefile(tmp)
    snakemake("audit", snakefile=sf, results=results, mirror=data_mirror)
    return {"results": results, "snakefile": sf, "tmp": tmp, "mirror": data_mirror}


def test_smoke_report_renders_in_chromium(smoke, tmp_path):
    results = smoke["results"]
    screenshot = tmp_path / "smoke.png"
    seen = render_in_chromium(results / "report" / "report.html", screenshot)
    assert seen["errors"] == []
    assert len(seen["images"]) >= 2 and all(i["width"] > 0 and i["height"] > 0 for i in seen["images"])
    width, height = png_size(screenshot.read_bytes())
    assert width >= 1000 and height > 3000
    for method in ("magnitude", "wanda", "sparsegpt", "esparse"):
        assert method in seen["text"]
    md = (results / "report" / "report.md").read_text()
    assert "smollm2-135m" in md and "seqlen 256, 4 of" in md
    assert "tables/zeroshot.csv" in md  # present or named as not run, never silently missing


def test_audit_rule_passed_and_wrote_its_table(smoke):
    text = (smoke["results"] / "audit" / "audit.txt").read_text()
    assert "AUDIT PASSED" in text
    assert "rerun" in text and "ppl/smollm2-135m/dense/dense.json" in text


def test_snakemake_report_zip(smoke):
    out = smoke["tmp"] / "snakemake_report.zip"
    snakemake("audit", "--report", str(out), snakefile=smoke["snakefile"], results=smoke["results"],
              mirror=smoke["mirror"])
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    stored = {Path(n).name for n in names if "/data/raw/" in n}  # the archive keeps file names only
    assert {"report.html", "report.md", "MANIFEST.sha256", "audit.txt", "wikitext_ppl.png"} <= stored, stored
    assert any(n.endswith("report.html") and "/data/raw/" not in n for n in names)  # Snakemake's own page


def test_flipped_byte_fails_the_audit_rule(smoke, tmp_path):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(smoke["results"], results, symlinks=True)
    target = results / "pruned" / "smollm2-135m" / "esparse" / "2of4" / "sparsity.safetensors"
    flip_byte(target)
    result = audit.audit(results, rerun="none", resources_dir=REPO / "resources", data_mirror=smoke["mirror"])
    assert "pruned/smollm2-135m/esparse/2of4/sparsity.safetensors" in {c.subject for c in result.failures}
