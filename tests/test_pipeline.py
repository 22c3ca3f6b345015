"""The Snakemake workflow end to end: lint, a `smoke` run on SmolLM2, up-to-date re-run, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from esparse.io import read_json

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.pipeline


def snakemake(*args, results: Path, mirror: Path, check=True, config=()):
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "2", "--config", "preset=smoke",
           f"data_mirror={mirror}", f"results_dir={results}", *config]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_mirror):
    results = tmp_path_factory.mktemp("smoke") / "results"
    snakemake(results=results, mirror=data_mirror)
    return results


def test_lint_is_clean(tmp_path, data_mirror):
    proc = snakemake("--lint", results=tmp_path / "results", mirror=data_mirror, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_smoke_run_produces_the_table(smoke_run):
    table = pd.read_csv(smoke_run / "tables" / "wikitext_ppl.csv")
    assert list(table.columns[:7]) == ["model", "method", "pattern", "seqlen", "windows", "windows_available", "ppl"]
    assert set(table["method"]) == {"dense", "magnitude", "wanda", "sparsegpt", "esparse"}
    assert (table["seqlen"] == 256).all() and (table["windows"] == 4).all()
    # smoke evaluates only the first 4 windows; the table says how many the stream holds.
    assert (table["windows_available"] > table["windows"]).all()
    assert table["ppl"].between(1, 1e6).all()
    pruned = table[table["method"] != "dense"]
    assert (pruned["achieved_sparsity"].round(6) == 0.5).all()
    assert (pruned["prune_seconds"] > 0).all() and table.loc[table["method"] == "dense", "prune_seconds"].isna().all()
    dense = read_json(smoke_run / "ppl" / "smollm2-135m" / "dense" / "dense.json")
    for key in ("code", "config_sha256", "software", "hardware", "inputs"):
        assert key in dense["provenance"]
    assert dense["provenance"]["inputs"]["eval_tokens"] == dense["stream_sha256"]
    prune = read_json(smoke_run / "pruned" / "smollm2-135m" / "esparse" / "2of4" / "prune.json")
    assert all(layer["mask_check"] for layer in prune["layers"])
    assert len(prune["layers"]) == 30 * 7


def test_snakemake_report_collects_the_annotated_outputs(smoke_run, data_mirror, tmp_path):
    import zipfile

    archive = tmp_path / "snakemake_report.zip"
    snakemake(f"--report={archive}", results=smoke_run, mirror=data_mirror)
    with zipfile.ZipFile(archive) as bundle:
        names = bundle.namelist()
    for expected in ("wikitext_ppl.csv", "zeroshot.csv", "ablation.csv", "report.html", "audit.txt", "plan.json"):
        assert any(name.endswith(expected) for name in names), (expected, names[:40])


def test_profiling_without_cuda_records_what_was_not_measured(smoke_run):
    latency = pd.read_csv(smoke_run / "tables" / "latency.csv")
    assert set(latency["target"]) == {"smollm2-135m", "llama-7b", "llama-13b"}
    assert latency["status"].str.startswith("not measured: ").all() and latency["median_ms"].isna().all()
    real = latency[latency["target"] == "smollm2-135m"]
    assert set(zip(real["method"], real["shuffle"])) == {("dense", False), ("wanda", False), ("esparse", True)}


def test_second_invocation_has_nothing_to_do(smoke_run, data_mirror):
    proc = snakemake("--dry-run", results=smoke_run, mirror=data_mirror)
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("override, message", [
    ("preset=nope", "unknown preset 'nope'"),
    ("models=[nomodel]", "unknown model 'nomodel'"),
    ("calibration={nsamples: 2.5}", "calibration.nsamples: 2.5 is not of type 'integer'"),
    ("calibration={seqlen: 100000}", "calibration.seqlen 100000 exceeds the context length 8192"),
])
def test_bad_input_stops_before_any_output(tmp_path, data_mirror, override, message):
    results = tmp_path / "results"
    proc = snakemake(results=results, mirror=data_mirror, check=False, config=[override])
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert not results.exists()


def test_corrupt_mirror_stops_before_any_output(tmp_path, data_mirror):
    import shutil

    mirror = tmp_path / "mirror"
    shutil.copytree(data_mirror, mirror)
    target = mirror / "c4" / "c4-train.00000-of-01024.head1000.json"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:-10])
    results = tmp_path / "results"
    proc = snakemake(results=results, mirror=mirror, check=False)
    assert proc.returncode != 0
    assert "c4-train.00000-of-01024.head1000.json is corrupt" in proc.stderr + proc.stdout
    assert not results.exists()
