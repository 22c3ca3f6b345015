"""The reproducibility audit: an untouched run passes; one flipped byte anywhere fails and is named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from esparse import audit
from esparse.audit import MANIFEST_NAME, FAIL, PASS, WARN
from esparse.errors import ConfigError, DataError
from esparse.io import read_json, write_json
from test_report import copy_run, finish_run, tiny_run

# Recorded inputs and outputs of the tiny run: (where, path); "results" files are covered by the
# manifest and by the JSON records, "resources" files (the prepared dense model) by the records.
TAMPER_TARGETS = [
    ("results", "calibration/tiny/tokens.safetensors"),
    ("results", "calibration/tiny/calibration.json"),
    ("results", "pruned/tiny/esparse/2of4/sparsity.safetensors"),
    ("results", "pruned/tiny/esparse/2of4/model.safetensors"),
    ("results", "pruned/tiny/esparse/2of4/prune.json"),
    ("results", "pruned/tiny/magnitude/2of4/tokenizer.json"),
    ("results", "kernels/tiny/esparse/2of4/packed.safetensors"),
    ("results", "ablation/tiny/entropy-norm_global-local_a1_k32.json"),
    ("results", "tables/ablation.csv"),
    ("results", "ppl/tiny/dense/dense.json"),
    ("results", "ppl/tiny/wanda/unstructured50.json"),
    ("results", "tables/wikitext_ppl.csv"),
    ("results", "report/report.html"),
    ("results", "report/report.md"),
    ("results", "report/figures/wikitext_ppl.png"),
    ("resources", "models/tiny/model.safetensors"),
    ("resources", "models/tiny/tokenizer.json"),
]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_mirror):
    run = copy_run(tiny_run(tmp_path_factory, data_mirror), tmp_path_factory.mktemp("audited") / "run")
    return finish_run(run, gpu_dir=None)


@pytest.fixture()
def fresh(finished, tmp_path):
    """A private copy of the finished run, free to tamper with."""
    return copy_run(finished, tmp_path / "run")


def run_audit(run: dict, mirror: Path, **kwargs) -> audit.AuditResult:
    kwargs.setdefault("rerun", "none")
    return audit.audit(run["results"], resources_dir=run["resources"], data_mirror=mirror, **kwargs)


def failed_subjects(result: audit.AuditResult) -> set[str]:
    return {c.subject for c in result.failures}


def test_untouched_run_passes_with_reruns(finished, data_mirror):
    result = run_audit(finished, data_mirror, rerun="all", windows=2)
    text = audit.format_result(result)
    assert result.ok, text
    assert "AUDIT PASSED" in text
    kinds = {c.kind for c in result.checks}
    assert kinds == {"manifest", "checksum", "consistency", "rerun"}
    reruns = [c for c in result.checks if c.kind == "rerun" and "#" not in c.subject]
    assert len(reruns) == 4 and all("max per-window relative difference" in c.detail for c in reruns)
    assert not [c for c in result.checks if c.status == WARN]


@pytest.mark.parametrize("where, rel", TAMPER_TARGETS)
def test_one_flipped_byte_fails_and_names_the_file(fresh, data_mirror, where, rel):
    flip_byte(fresh[where] / rel)
    result = run_audit(fresh, data_mirror)
    assert not result.ok
    label = rel if where == "results" else f"resources:{rel}"
    named = failed_subjects(result)
    assert any(s == label or s.startswith(label + "#") for s in named), named
    assert label in audit.format_result(result).splitlines()[-1]


def test_a_flipped_byte_in_the_data_mirror_is_named(fresh, data_mirror, tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(data_mirror, mirror)
    flip_byte(mirror / "wikitext-2-raw-v1" / "wiki.test.raw")
    result = run_audit(fresh, mirror)
    assert "mirror:wikitext-2-raw-v1/wiki.test.raw" in failed_subjects(result)


def test_flipped_manifest_or_added_or_removed_file_fails(fresh, data_mirror):
    results = fresh["results"]
    (results / "tables" / "extra.csv").write_text("a,b\n1,2\n")
    (results / "report" / "report.md").unlink()
    result = run_audit(fresh, data_mirror)
    named = failed_subjects(result)
    assert {"tables/extra.csv", "report/report.md"} <= named
    flip_byte(results / MANIFEST_NAME, offset=0)
    assert not run_audit(fresh, data_mirror).ok


def test_missing_manifest_fails(fresh, data_mirror):
    (fresh["results"] / MANIFEST_NAME).unlink()
    result = run_audit(fresh, data_mirror)
    assert MANIFEST_NAME in failed_subjects(result)


def test_files_written_after_the_manifest_are_not_flagged(fresh, data_mirror):
    results = fresh["results"]
    for rel in ("audit/audit.txt", "logs/report/report.log", "benchmarks/audit/audit.tsv",
                "pruned/tiny/esparse/2of4/.snakemake_timestamp"):
        (results / rel).parent.mkdir(parents=True, exist_ok=True)
        (results / rel).write_text("written later\n")
    assert run_audit(fresh, data_mirror).ok


def test_rerun_catches_a_recorded_value_that_does_not_reproduce(fresh, data_mirror):
    """Edit a recorded per-window NLL consistently (record, then manifest): only the re-run can notice."""
    path = fresh["results"] / "ppl" / "tiny" / "esparse" / "2of4.json"
    record = read_json(path)
    record["nll_per_window"][1] *= 1.001
    write_json(path, record)
    audit.write_manifest(fresh["results"])
    quiet = run_audit(fresh, data_mirror, rerun="none")
    assert quiet.ok, audit.format_result(quiet)
    result = run_audit(fresh, data_mirror, rerun="esparse/2of4", windows=2)
    assert "ppl/tiny/esparse/2of4.json" in failed_subjects(result)


def test_rerun_needs_the_mirror_the_record_was_made_from(finished):
    result = audit.audit(finished["results"], resources_dir=finished["resources"], data_mirror=None,
                         rerun="dense/dense")
    failure = [c for c in result.failures if c.kind == "rerun"]
    assert failure and "--data-mirror" in failure[0].detail
    assert any(c.status == WARN and "no --data-mirror" in c.detail for c in result.checks)


def test_table_row_that_disagrees_with_its_record_is_caught(fresh, data_mirror):
    path = fresh["results"] / "tables" / "wikitext_ppl.csv"
    table = pd.read_csv(path)
    table.loc[table["method"] == "magnitude", "ppl"] *= 0.9
    table.to_csv(path, index=False)
    audit.write_manifest(fresh["results"])
    result = run_audit(fresh, data_mirror)
    assert "tables/wikitext_ppl.csv" in {c.subject for c in result.failures if c.kind == "consistency"}


def test_against_reference(finished, data_mirror, tmp_path):
    reference = tmp_path / "reference"
    info = audit.export_reference(finished["results"], reference)
    exported = read_json(info)["files"]
    assert "tables/wikitext_ppl.csv" in exported and "pruned/tiny/esparse/2of4/prune.json" in exported
    assert not list(reference.rglob("*.safetensors"))
    result = run_audit(finished, data_mirror, against=reference)
    assert result.ok, audit.format_result(result, verbose=True)
    assert any(c.kind == "reference" and c.subject == "hardware" and c.status == PASS for c in result.checks)

    # A reference that disagrees beyond tolerance (and whose REFERENCE.json is updated to match).
    table = pd.read_csv(reference / "tables" / "wikitext_ppl.csv")
    table.loc[table["method"] == "esparse", "ppl"] *= 1 + 1e-3
    table.to_csv(reference / "tables" / "wikitext_ppl.csv", index=False)
    meta = read_json(info)
    meta["files"]["tables/wikitext_ppl.csv"] = audit.sha256_file(reference / "tables" / "wikitext_ppl.csv")
    write_json(info, meta)
    result = run_audit(finished, data_mirror, against=reference)
    assert "tables/wikitext_ppl.csv" in {c.subject for c in result.failures if c.kind == "reference"}

    # A reference edited after export is caught by its own checksums.
    flip_byte(reference / "ppl" / "tiny" / "dense" / "dense.json")
    result = run_audit(finished, data_mirror, against=reference)
    assert "reference:ppl/tiny/dense/dense.json" in failed_subjects(result)


def test_reference_from_another_cpu_uses_looser_tolerances(finished, data_mirror, tmp_path):
    reference = tmp_path / "reference"
    info = audit.export_reference(finished["results"], reference)
    meta = read_json(info)
    meta["hardware"]["cpu"] = "Some Other CPU"
    path = reference / "pruned" / "tiny" / "esparse" / "2of4" / "prune.json"
    record = read_json(path)
    record["masks_sha256"] = "0" * 64
    write_json(path, record)
    table = pd.read_csv(reference / "tables" / "wikitext_ppl.csv")
    table.loc[table["method"] == "esparse", "ppl"] *= 1 + 5e-4  # within 1e-3, beyond 1e-4
    table.to_csv(reference / "tables" / "wikitext_ppl.csv", index=False)
    for rel in ("pruned/tiny/esparse/2of4/prune.json", "tables/wikitext_ppl.csv"):
        meta["files"][rel] = audit.sha256_file(reference / rel)
    write_json(info, meta)
    result = run_audit(finished, data_mirror, against=reference)
    assert result.ok, audit.format_result(result, verbose=True)
    warned = {c.subject for c in result.checks if c.status == WARN}
    assert {"hardware", "pruned/tiny/esparse/2of4/prune.json"} <= warned


def _edit_reference(reference: Path, rel: str, edit) -> None:
    """Edit one file of an exported reference and keep its REFERENCE.json true to it."""
    info = reference / "REFERENCE.json"
    path = reference / rel
    if rel.endswith(".csv"):
        table = pd.read_csv(path)
        edit(table)
        table.to_csv(path, index=False)
    else:
        record = read_json(path)
        edit(record)
        write_json(path, record)
    if path != info:
        meta = read_json(info)
        meta["files"][rel] = audit.sha256_file(path)
        write_json(info, meta)


def test_other_cpu_cells_with_other_masks_warn_and_cells_with_the_same_masks_must_agree(finished, data_mirror,
                                                                                        tmp_path):
    """On another CPU model a pruned model whose masks differ is another pruning outcome: its perplexity
    and zero-shot rows are reported (WARN, with the relative difference), never compared as a
    reproduction. A model with the reference's masks must still agree within the other-CPU tolerance."""
    reference = tmp_path / "reference"
    audit.export_reference(finished["results"], reference)
    _edit_reference(reference, "REFERENCE.json", lambda meta: meta["hardware"].update(cpu="Some Other CPU"))
    other = "0" * 64

    def diverge(record):
        record["masks_sha256"], record["ppl"] = other, record["ppl"] * 1.2
    _edit_reference(reference, "ppl/tiny/esparse/2of4.json", diverge)

    def table_edit(table):
        row = (table["method"] == "esparse") & (table["pattern"] == "2of4")
        table.loc[row, "ppl"] *= 1.2
        table.loc[row, "masks_sha256"] = other
    _edit_reference(reference, "tables/wikitext_ppl.csv", table_edit)
    result = run_audit(finished, data_mirror, against=reference)
    assert result.ok, audit.format_result(result, verbose=True)
    warned = {c.subject: c.detail for c in result.checks if c.status == WARN}
    assert "ppl/tiny/esparse/2of4.json" in warned and "-16.67%" in warned["ppl/tiny/esparse/2of4.json"]
    assert "tiny/esparse/2of4 ppl" in warned["tables/wikitext_ppl.csv"]

    # The same 20 % on a model whose masks equal the reference's is a failure.
    def magnitude_edit(table):
        table.loc[(table["method"] == "magnitude") & (table["pattern"] == "2of4"), "ppl"] *= 1.2
    _edit_reference(reference, "tables/wikitext_ppl.csv", magnitude_edit)
    result = run_audit(finished, data_mirror, against=reference)
    assert "tables/wikitext_ppl.csv" in failed_subjects(result)
    assert "tiny/magnitude/2of4 ppl" in next(c.detail for c in result.failures if c.subject == "tables/wikitext_ppl.csv")


def test_a_reference_set_gives_the_member_of_this_cpu_model(finished, data_mirror, tmp_path):
    references = tmp_path / "references"
    for name, cpu, created in (("this-cpu", None, "2026-01-01T00:00:00+00:00"),
                               ("other-cpu", "Some Other CPU", "2026-02-01T00:00:00+00:00")):
        audit.export_reference(finished["results"], references / name)

        def stamp(meta, cpu=cpu, created=created):
            meta["created_utc"] = created
            if cpu:
                meta["hardware"]["cpu"] = cpu
        _edit_reference(references / name, "REFERENCE.json", stamp)
    ours = audit._cpu_of(Path(finished["results"]))
    chosen, why = audit.choose_reference(references, ours)
    assert chosen == references / "this-cpu" and "this run's CPU model" in why
    result = run_audit(finished, data_mirror, against=references)
    assert result.ok and any(c.subject == "hardware" and c.status == PASS for c in result.checks)
    # No member of this CPU model: the newest, with the other-CPU tolerances (a WARN names it).
    chosen, why = audit.choose_reference(references, "A Third CPU")
    assert chosen == references / "other-cpu" and "the newest" in why
    assert audit.choose_reference(tmp_path, ours)[0] is None
    result = run_audit(finished, data_mirror, against=tmp_path)
    assert any("not a reference directory" in c.detail for c in result.failures)


def test_table_columns_added_since_the_reference_warn_and_lost_columns_fail():
    ref = pd.DataFrame({"target": ["a"], "batch": [1], "linear_weight_bytes": [10.0], "status": ["ok"]})
    ours = ref.assign(workspace_bytes=[float("nan")])
    problems, notes = audit._compare_table("toy.csv", ours, ref, True, audit.Tolerances())
    assert problems == [] and "workspace_bytes" in notes[0]
    problems, _ = audit._compare_table("toy.csv", ref, ours, True, audit.Tolerances())
    assert "missing from this run: ['workspace_bytes']" in problems[0]
    # Column order is not a difference; values still are.
    problems, notes = audit._compare_table("toy.csv", ref[list(reversed(ref.columns))], ref, True, audit.Tolerances())
    assert problems == [] and notes == []
    problems, _ = audit._compare_table("toy.csv", ref.assign(linear_weight_bytes=[11.0]), ref, True,
                                       audit.Tolerances())
    assert "linear_weight_bytes" in problems[0]


def test_select_reruns():
    available = [("m", "dense", "dense"), ("m", "esparse", "2of4"), ("m", "magnitude", "2of4")]
    assert audit.select_reruns("auto", available) == [("m", "dense", "dense"), ("m", "esparse", "2of4")]
    assert audit.select_reruns("none", available) == []
    assert audit.select_reruns("all", available) == sorted(available)
    assert audit.select_reruns("magnitude/2of4,m/dense/dense", available) == [available[2], available[0]]
    with pytest.raises(ConfigError, match="'wanda/2of4' names no perplexity record"):
        audit.select_reruns("wanda/2of4", available)


def test_manifest_format_errors_are_named(tmp_path):
    path = tmp_path / MANIFEST_NAME
    path.write_text("not-a-digest  file\n")
    with pytest.raises(DataError, match="line 1"):
        audit.read_manifest(path)


def test_cli_exit_status(finished, fresh, data_mirror, capsys):
    from esparse.cli import main

    common = ["--resources-dir", str(finished["resources"]), "--data-mirror", str(data_mirror), "--rerun", "none"]
    assert main(["audit", str(finished["results"]), *common]) == 0
    assert "AUDIT PASSED" in capsys.readouterr().out
    flip_byte(fresh["results"] / "tables" / "wikitext_ppl.csv")
    out_file = fresh["root"] / "audit.txt"
    assert main(["audit", str(fresh["results"]), *common, "--out", str(out_file)]) == 1
    out = capsys.readouterr().out
    assert "AUDIT FAILED" in out and "tables/wikitext_ppl.csv" in out
    assert FAIL in out_file.read_text()
    assert main(["audit", str(fresh["results"]), "--windows", "0"]) == 2
