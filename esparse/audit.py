"""Reproducibility audit of a results directory.

    esparse audit RESULTS_DIR [--against REFERENCE_DIR] [--rerun SUBSET] [--windows N]
                              [--resources-dir DIR] [--data-mirror DIR] [--out FILE] [--verbose]
    esparse reference RESULTS_DIR OUT_DIR        # export tables + provenance as a reference

What is checked, each as one row of a pass/fail table (exit status 1 on any FAIL):
1. manifest: every file under RESULTS_DIR against `MANIFEST.sha256` (written by the report rule
   after the report): a changed, missing or unlisted file fails and is named. Excluded, because
   they are written after the manifest: the manifest itself, `audit/`, the logs and benchmarks
   of the report and audit jobs, and Snakemake's `.snakemake_timestamp` markers.
2. checksum: every checksum a result JSON records is recomputed from the file it names:
   calibration tokens (file and tensor), masks and permutations (file, and the tensors in pruning
   order), pruned and dense model weights (also those a zero-shot result names), tokenizers,
   calibration tokens used by pruning and by the ablation, the packed weights and masks file of
   every kernel build plan, and (with --data-mirror) the data mirror files each dataset was read from.
3. consistency: the tidy tables (perplexity, zero-shot, ablation) agree with the JSONs they came from;
   a perplexity record's masks digest equals its pruning record's; the eval-token digest of
   provenance equals the stream's.
4. rerun (--rerun, default `auto`: dense and one pruned model): WikiText-2 perplexity of the
   saved model directories on the first --windows windows, on CPU with the recorded thread count;
   the token stream's sha256 must equal the recorded one and every window's NLL must match the
   recorded `nll_per_window` within the relative tolerance below.
5. reference (--against DIR, e.g. reports/reference/): the run's tables and digests against a
   committed reference run (made by `esparse reference`), whose own files are first checked
   against its REFERENCE.json. DIR may hold one reference per CPU model (subdirectories): the one
   exported on this run's CPU model is used, else the newest (`choose_reference`).

Tolerances (printed with every audit):
- checksums and the manifest: sha256 identical.
- rerun perplexity: relative 1e-4 per window when the record was made on CPU (the re-run is on
  CPU with the same thread count: float32 sums in the same order, so differences are rounding at
  most); 1e-3 when the record was made on another device type.
- reference, same CPU model (the `cpu` string of provenance): perplexity relative 1e-4; zero-shot
  accuracy absolute 1e-9 (identical counts); other float columns relative 1e-4; masks,
  permutations and pruned weights sha256 identical.
- reference, other CPU model: perplexity relative 1e-3; zero-shot accuracy absolute 0.01; other
  floats relative 1e-3; differing masks/permutations/pruned weights digests are reported as WARN
  (float reductions in another order may flip near-tied scores), not FAIL. A pruned model whose
  masks differ is another pruning outcome, not a reproduction: its perplexity and table rows are
  reported as WARN with the relative difference (E-Sparse and SparseGPT 2:4 on SmolLM2 moved by
  up to 20 % between two CPU models); models with the reference's masks must agree as above.
- always identical: calibration tokens, evaluation token streams, dense model weights, table
  keys (model, method, pattern, task, metric), seqlen and window counts, data sources.
- never compared: wall-clock timings and memory use (columns named *seconds*, *time*, *_s, *_ms,
  *_us, *memory*, *nvml*, *resident*).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .errors import ConfigError, DataError, EsparseError
from .io import atomic_path, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.sha256"
REFERENCE_INFO = "REFERENCE.json"
# Written after the manifest (by the report and audit jobs, or by Snakemake once a job ends).
MANIFEST_EXCLUDED_DIRS = ("audit", "logs/report", "logs/audit", "benchmarks/report", "benchmarks/audit")
MANIFEST_EXCLUDED_NAMES = (MANIFEST_NAME, ".snakemake_timestamp")

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"


@dataclass(frozen=True)
class Tolerances:
    rerun_ppl_rtol: float = 1e-4
    rerun_ppl_rtol_other_device: float = 1e-3
    ref_ppl_rtol_same_cpu: float = 1e-4
    ref_ppl_rtol_other_cpu: float = 1e-3
    ref_acc_atol_same_cpu: float = 1e-9
    ref_acc_atol_other_cpu: float = 0.01
    ref_float_rtol_same_cpu: float = 1e-4
    ref_float_rtol_other_cpu: float = 1e-3

    def rows(self) -> list[tuple[str, str]]:
        return [
            ("manifest, recorded checksums", "sha256 identical"),
            ("rerun perplexity (record made on CPU)", f"per-window NLL relative {self.rerun_ppl_rtol:g}"),
            ("rerun perplexity (record made on another device)", f"relative {self.rerun_ppl_rtol_other_device:g}"),
            ("reference, same CPU model", f"ppl rel {self.ref_ppl_rtol_same_cpu:g}; accuracy abs "
                                          f"{self.ref_acc_atol_same_cpu:g}; other floats rel "
                                          f"{self.ref_float_rtol_same_cpu:g}; masks/perms/weights sha identical"),
            ("reference, other CPU model", f"ppl rel {self.ref_ppl_rtol_other_cpu:g}; accuracy abs "
                                           f"{self.ref_acc_atol_other_cpu:g}; other floats rel "
                                           f"{self.ref_float_rtol_other_cpu:g}; masks/perms/weights sha: WARN, and "
                                           "then that model's ppl and table rows: WARN"),
            ("reference, always", "calibration tokens, eval token streams, dense weights, table keys, "
                                  "seqlen/windows, data sources identical"),
            ("reference, never compared", "wall-clock timings and memory use"),
        ]


@dataclass
class Check:
    kind: str  # manifest | checksum | consistency | rerun | reference
    subject: str  # the file or record checked
    status: str  # PASS | FAIL | WARN
    detail: str = ""


@dataclass
class AuditResult:
    results_dir: Path
    checks: list[Check] = field(default_factory=list)
    tolerances: Tolerances = field(default_factory=Tolerances)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.checks)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ manifest


def _excluded(rel: str) -> bool:
    if Path(rel).name in MANIFEST_EXCLUDED_NAMES:
        return True
    return any(rel == d or rel.startswith(d + "/") for d in MANIFEST_EXCLUDED_DIRS)


def manifest_files(results_dir: str | os.PathLike) -> list[str]:
    """Every regular file under `results_dir` that the manifest covers (relative POSIX paths)."""
    root = Path(results_dir)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if not _excluded(rel) and path.is_file():
                if "\n" in rel:
                    raise DataError(f"file name {rel!r} contains a newline; the manifest cannot list it")
                out.append(rel)
    return sorted(out)


def write_manifest(results_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """Write `sha256  relpath` lines (the `sha256sum -c` format) for every covered file."""
    root = Path(results_dir)
    target = Path(path) if path is not None else root / MANIFEST_NAME
    lines = [f"{sha256_file(root / rel)}  {rel}\n" for rel in manifest_files(root)]
    with atomic_path(target) as tmp:
        tmp.write_text("".join(lines))
    return target


def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    entries: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not rel:
            raise DataError(f"{path} line {number} is not '<sha256>  <path>': {line[:120]!r}")
        entries[rel] = digest
    return entries


def _cached_sha256(path: Path, cache: dict[Path, str] | None) -> str:
    """sha256 of a file, computed once per audit (weights are hashed by several checks)."""
    if cache is None:
        return sha256_file(path)
    key = path.resolve()
    if key not in cache:
        cache[key] = sha256_file(path)
    return cache[key]


def check_manifest(results_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                   hashes: dict[Path, str] | None = None) -> list[Check]:
    root = Path(results_dir)
    manifest_path = Path(path) if path is not None else root / MANIFEST_NAME
    label = _rel(manifest_path, root)
    if not manifest_path.is_file():
        return [Check("manifest", label, FAIL, "manifest missing: run the report rule (or `esparse report`) first")]
    try:
        listed = read_manifest(manifest_path)
    except (DataError, UnicodeDecodeError) as error:
        return [Check("manifest", label, FAIL, f"unreadable: {error}")]
    checks = []
    present = set(manifest_files(root))
    for rel, digest in sorted(listed.items()):
        if rel not in present:
            checks.append(Check("manifest", rel, FAIL, "listed in the manifest but missing"))
            continue
        actual = _cached_sha256(root / rel, hashes)
        checks.append(Check("manifest", rel, PASS if actual == digest else FAIL,
                            "sha256 matches" if actual == digest else f"modified: sha256 {actual[:16]}..., "
                                                                      f"manifest {digest[:16]}..."))
    for rel in sorted(present - set(listed)):
        checks.append(Check("manifest", rel, FAIL, "present but not in the manifest (added after the report)"))
    return checks


# ------------------------------------------------------------------------------ recorded checksums


class _Auditor:
    """Recomputes recorded checksums; every finding becomes a Check naming the file."""

    def __init__(self, results_dir: Path, resources_dir: Path | None, data_mirror: Path | None,
                 hashes: dict[Path, str] | None = None):
        self.root = results_dir
        self.resources = resources_dir
        self.mirror = data_mirror
        self.checks: list[Check] = []
        self._file_cache: dict[Path, str] = {} if hashes is None else hashes
        self._mirror_warned: set[str] = set()

    def add(self, kind: str, subject: str, ok: bool | None, detail: str) -> None:
        status = WARN if ok is None else (PASS if ok else FAIL)
        self.checks.append(Check(kind, subject, status, detail))

    def label(self, path: Path) -> str:
        if self.resources is not None:
            try:
                return "resources:" + path.relative_to(self.resources).as_posix()
            except ValueError:
                pass
        return _rel(path, self.root)

    def sha(self, path: Path) -> str:
        return _cached_sha256(path, self._file_cache)

    def file(self, path: Path, expected: Any, what: str, record: str) -> None:
        if not isinstance(expected, str):
            return
        label = self.label(path)
        if not path.is_file():
            self.add("checksum", label, False, f"{what} recorded by {record} is missing")
            return
        actual = self.sha(path)
        self.add("checksum", label, actual == expected,
                 f"{what} (recorded by {record})" if actual == expected else
                 f"{what} modified: sha256 {actual[:16]}..., recorded by {record} {expected[:16]}...")

    def files(self, folder: Path, expected: Any, what: str, record: str) -> None:
        if isinstance(expected, dict):
            for name, digest in sorted(expected.items()):
                self.file(folder / name, digest, what, record)

    def model_dir(self, model: str) -> Path | None:
        return None if self.resources is None else self.resources / "models" / model

    def load_json(self, path: Path) -> dict | None:
        try:
            payload = read_json(path)
        except (ValueError, UnicodeDecodeError) as error:
            self.add("checksum", self.label(path), False, f"not valid JSON: {error}")
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("provenance"), dict):
            self.add("checksum", self.label(path), False, "not a result record (no provenance block)")
            return None
        return payload

    def dataset(self, record: dict, label: str, key: str = "dataset") -> None:
        source = record.get(key)
        if not isinstance(source, dict) or not source.get("files"):
            return
        if self.mirror is None:
            key = str(source.get("dataset"))
            if key not in self._mirror_warned:
                self._mirror_warned.add(key)
                self.add("checksum", f"data:{key}", None, "mirror files not checked: no --data-mirror given")
            return
        for relpath, digest in sorted(source["files"].items()):
            path = self.mirror / relpath
            if not path.is_file():
                self.add("checksum", f"mirror:{relpath}", False, f"data file recorded by {label} is missing")
                continue
            actual = self.sha(path)
            self.add("checksum", f"mirror:{relpath}", actual == digest,
                     f"data file (recorded by {label})" if actual == digest else
                     f"data file modified: sha256 {actual[:16]}..., recorded by {label} {digest[:16]}...")

    def model_inputs(self, inputs: dict, model: str, label: str) -> None:
        folder = self.model_dir(model)
        weights, tokenizer = inputs.get("model_weights"), inputs.get("tokenizer")
        if folder is None:
            if weights or tokenizer:
                self.add("checksum", f"resources:models/{model}", False,
                         f"model files recorded by {label} not checked: no --resources-dir")
            return
        self.files(folder, weights, "model weights", label)
        self.file(folder / "tokenizer.json", tokenizer, "tokenizer", label)

    # --- the record kinds ---------------------------------------------------------------------

    def calibration(self, path: Path) -> None:
        label = self.label(path)
        record = self.load_json(path)
        if record is None:
            return
        model = path.parent.name
        tokens = path.parent / "tokens.safetensors"
        self.file(tokens, record.get("file_sha256"), "calibration tokens file", label)
        if isinstance(record.get("tokens_sha256"), str) and tokens.is_file():
            from .io import sha256_tensor

            try:
                actual = sha256_tensor(_load_safetensors(tokens)["tokens"])
            except (DataError, KeyError) as error:
                self.add("checksum", self.label(tokens), False, f"cannot read the tokens tensor: {error}")
            else:
                self.add("checksum", self.label(tokens) + "#tokens", actual == record["tokens_sha256"],
                         "calibration tokens tensor" if actual == record["tokens_sha256"] else
                         f"calibration tokens tensor differs from {label}")
        self.model_inputs(record["provenance"].get("inputs", {}), model, label)
        self.dataset(record, label)

    def prune(self, path: Path) -> None:
        label = self.label(path)
        record = self.load_json(path)
        if record is None:
            return
        folder = path.parent
        model = folder.parent.parent.name
        sparsity = folder / "sparsity.safetensors"
        self.file(sparsity, record.get("sparsity_file_sha256"), "masks/permutations file", label)
        self.files(folder, record.get("weights_sha256"), "pruned weights", label)
        if sparsity.is_file():
            self._mask_tensors(sparsity, record, label)
        inputs = record["provenance"].get("inputs", {})
        self.model_inputs(inputs, model, label)
        self.file(self.root / "calibration" / model / "tokens.safetensors", inputs.get("calibration_tokens"),
                  "calibration tokens", label)

    def _mask_tensors(self, sparsity: Path, record: dict, label: str) -> None:
        import torch

        from .io import sha256_tensor

        names = [layer.get("name") for layer in record.get("layers", [])]
        try:
            tensors = _load_safetensors(sparsity)
        except DataError as error:
            self.add("checksum", self.label(sparsity), False, str(error))
            return
        for suffix, key, what in ((".mask", "masks_sha256", "masks"), (".perm", "perms_sha256", "permutations")):
            expected = record.get(key)
            if not isinstance(expected, str):
                continue
            parts = [tensors[f"{n}{suffix}"].flatten() for n in names if f"{n}{suffix}" in tensors]
            actual = sha256_tensor(torch.cat(parts)) if parts else None
            self.add("checksum", f"{self.label(sparsity)}#{what}", actual == expected,
                     f"{what} in pruning order" if actual == expected else f"{what} differ from {label}")

    def perplexity(self, path: Path) -> dict | None:
        label = self.label(path)
        record = self.load_json(path)
        if record is None:
            return None
        parts = path.relative_to(self.root).parts  # ppl/<model>/<method>/<pattern>.json
        model, method, pattern = parts[1], parts[2], Path(parts[3]).stem
        inputs = record["provenance"].get("inputs", {})
        if method == "dense":
            self.model_inputs(inputs, model, label)
        else:
            folder = self.root / "pruned" / model / method / pattern
            self.files(folder, inputs.get("model_weights"), "pruned weights", label)
            self.file(folder / "tokenizer.json", inputs.get("tokenizer"), "tokenizer", label)
            prune_path = folder / "prune.json"
            if prune_path.is_file():
                try:
                    prune_masks = read_json(prune_path).get("masks_sha256")
                except ValueError:
                    prune_masks = None  # reported by the prune.json check
                self.add("consistency", label, record.get("masks_sha256") == prune_masks,
                         "masks digest equals the pruning record's" if record.get("masks_sha256") == prune_masks
                         else f"masks digest differs from {self.label(prune_path)}")
        if "stream_sha256" in record:
            same = inputs.get("eval_tokens") == record["stream_sha256"]
            self.add("consistency", label, same, "provenance eval_tokens equals stream_sha256" if same else
                     "provenance eval_tokens differs from stream_sha256")
        self.dataset(record, label)
        return record

    def zeroshot(self, path: Path) -> None:
        """An lm-eval result JSON: its provenance (under "esparse") names the weights it evaluated."""
        label = self.label(path)
        try:
            payload = read_json(path)
        except (ValueError, UnicodeDecodeError) as error:
            self.add("checksum", label, False, f"not valid JSON: {error}")
            return
        provenance = ((payload.get("esparse") or {}).get("provenance") if isinstance(payload, dict) else None)
        if not isinstance(provenance, dict):
            self.add("checksum", label, False, "no provenance block under 'esparse'")
            return
        parts = path.relative_to(self.root).parts  # zeroshot/<model>/<method>/<pattern>.json
        model, method, pattern = parts[1], parts[2], Path(parts[3]).stem
        inputs = provenance.get("inputs", {})
        if method == "dense":
            folder = self.model_dir(model)
            if folder is not None:
                self.files(folder, inputs.get("model_weights"), "model weights", label)
        else:
            folder = self.root / "pruned" / model / method / pattern
            self.files(folder, inputs.get("model_weights"), "pruned weights", label)
            prune_path = folder / "prune.json"
            if prune_path.is_file() and inputs.get("masks_sha256") is not None:
                try:
                    prune_masks = read_json(prune_path).get("masks_sha256")
                except ValueError:
                    prune_masks = None
                same = inputs.get("masks_sha256") == prune_masks
                self.add("consistency", label, same, "masks digest equals the pruning record's" if same
                         else f"masks digest differs from {self.label(prune_path)}")

    def kernel_plan(self, path: Path) -> None:
        """A kernel build plan records the packed file and the masks file it packed."""
        label = self.label(path)
        try:
            plan = read_json(path)
        except (ValueError, UnicodeDecodeError) as error:
            self.add("checksum", label, False, f"not valid JSON: {error}")
            return
        model, method, pattern = path.parent.relative_to(self.root / "kernels").parts
        self.file(path.parent / str(plan.get("packed_file", "packed.safetensors")), plan.get("packed_sha256"),
                  "packed 2:4 weights", label)
        self.file(self.root / "pruned" / model / method / pattern / "sparsity.safetensors",
                  (plan.get("inputs") or {}).get("sparsity.safetensors"), "masks/permutations file", label)

    def ablation(self, path: Path) -> dict | None:
        label = self.label(path)
        record = self.load_json(path)
        if record is None:
            return None
        model = path.parent.name
        inputs = record["provenance"].get("inputs", {})
        self.file(self.root / "calibration" / model / "tokens.safetensors", inputs.get("calibration_tokens"),
                  "calibration tokens", label)
        self.dataset(record, label, "heldout_dataset")
        return record

    def zeroshot_table(self) -> None:
        """Every row of tables/zeroshot.csv equals the metric in the lm-eval result JSON it came from."""
        import pandas as pd

        path = self.root / "tables" / "zeroshot.csv"
        if not path.is_file():
            return
        try:
            table = pd.read_csv(path, dtype={"model": str, "method": str, "pattern": str, "task": str, "metric": str})
            rows = table.to_dict("records")
        except (ValueError, KeyError, pd.errors.ParserError) as error:
            self.add("consistency", self.label(path), False, f"unreadable: {error}")
            return
        problems, results = [], {}
        for row in rows:
            key = (row["model"], row["method"], row["pattern"])
            if key not in results:
                source = self.root / "zeroshot" / key[0] / key[1] / f"{key[2]}.json"
                try:
                    results[key] = read_json(source).get("results", {}) if source.is_file() else None
                except (ValueError, UnicodeDecodeError):
                    results[key] = None
            recorded = (results[key] or {}).get(row["task"], {}).get(f"{row['metric']},none")
            if results[key] is None:
                problems.append(f"no readable result JSON for {'/'.join(key)}")
            elif not _close(row["value"], recorded, 1e-12, 0.0):
                problems.append(f"{'/'.join(key)} {row['task']} {row['metric']}: {row['value']!r} != {recorded!r}")
        self.add("consistency", self.label(path), not problems,
                 f"{len(rows)} rows equal their lm-eval results" if not problems else "; ".join(problems[:5]))

    def ablation_table(self, records: dict[str, dict]) -> None:
        import pandas as pd

        path = self.root / "tables" / "ablation.csv"
        if not path.is_file():
            return
        try:
            rows = {str(r["variant"]): r for r in pd.read_csv(path).to_dict("records")}
        except (ValueError, KeyError, pd.errors.ParserError) as error:
            self.add("consistency", self.label(path), False, f"unreadable: {error}")
            return
        problems = []
        for variant in sorted(set(records) | set(rows)):
            if variant not in rows or variant not in records:
                problems.append(f"variant {variant} is in only one of the table and the records")
                continue
            for column, key in (("heldout_ppl", "heldout_ppl"), ("masks_sha256", "masks_sha256"),
                                ("seqlen", "seqlen"), ("windows", "windows")):
                if column in rows[variant] and not _close(rows[variant][column], records[variant].get(key), 1e-12, 0.0):
                    problems.append(f"{variant} {column} {rows[variant][column]!r} != record {records[variant].get(key)!r}")
        self.add("consistency", self.label(path), not problems,
                 f"{len(rows)} rows equal their ablation records" if not problems else "; ".join(problems[:5]))

    def ppl_table(self, records: dict[tuple[str, str, str], dict]) -> None:
        import pandas as pd

        path = self.root / "tables" / "wikitext_ppl.csv"
        if not path.is_file():
            if records:
                self.add("consistency", self.label(path), False, "missing although perplexity records exist")
            return
        try:
            table = pd.read_csv(path, dtype={"model": str, "method": str, "pattern": str})
            rows = {(r["model"], r["method"], r["pattern"]): r for r in table.to_dict("records")}
        except (ValueError, KeyError, pd.errors.ParserError) as error:
            self.add("consistency", self.label(path), False, f"unreadable: {error}")
            return
        problems = []
        for key in sorted(set(records) | set(rows)):
            if key not in rows:
                problems.append(f"no row for {'/'.join(key)}")
                continue
            if key not in records:
                problems.append(f"row {'/'.join(key)} has no perplexity record")
                continue
            row, record = rows[key], records[key]
            for column in ("ppl", "seqlen", "windows", "windows_available", "achieved_sparsity"):
                if column in row and column in record and not _close(row[column], record[column], 1e-12, 0.0):
                    problems.append(f"{'/'.join(key)} {column} {row[column]!r} != record {record[column]!r}")
        self.add("consistency", self.label(path), not problems,
                 f"{len(rows)} rows equal their perplexity records" if not problems else "; ".join(problems[:5]))


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise DataError(f"{path} is not a readable safetensors file: {error}") from error


def _close(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=atol)
    return a == b


def check_recorded(results_dir: str | os.PathLike, resources_dir: str | os.PathLike | None = None,
                   data_mirror: str | os.PathLike | None = None, hashes: dict[Path, str] | None = None) -> list[Check]:
    """Recompute every checksum the result JSONs record and check the tables against the JSONs."""
    root = Path(results_dir)
    auditor = _Auditor(root, Path(resources_dir) if resources_dir else None,
                       Path(data_mirror) if data_mirror else None, hashes)
    for path in sorted(root.glob("calibration/*/calibration.json")):
        auditor.calibration(path)
    for path in sorted(root.glob("pruned/*/*/*/prune.json")):
        auditor.prune(path)
    ppl_records = {}
    for path in sorted(root.glob("ppl/*/*/*.json")):
        record = auditor.perplexity(path)
        if record is not None:
            parts = path.relative_to(root).parts
            ppl_records[(parts[1], parts[2], Path(parts[3]).stem)] = record
    auditor.ppl_table(ppl_records)
    for path in sorted(root.glob("zeroshot/*/*/*.json")):
        auditor.zeroshot(path)
    auditor.zeroshot_table()
    for path in sorted(root.glob("kernels/*/*/*/plan.json")):
        auditor.kernel_plan(path)
    ablation_records = {}
    for path in sorted(root.glob("ablation/*/*.json")):
        record = auditor.ablation(path)
        if record is not None:
            ablation_records[path.stem] = record
    if ablation_records or (root / "tables" / "ablation.csv").is_file():
        auditor.ablation_table(ablation_records)
    if not auditor.checks:
        auditor.add("checksum", str(root), False, "no result records found (calibration, prune or ppl JSONs)")
    return auditor.checks


# ------------------------------------------------------------------------------ re-running perplexity


def ppl_records(results_dir: Path) -> dict[tuple[str, str, str], Path]:
    out = {}
    for path in sorted(results_dir.glob("ppl/*/*/*.json")):
        parts = path.relative_to(results_dir).parts
        out[(parts[1], parts[2], Path(parts[3]).stem)] = path
    return out


def select_reruns(spec: str, available: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """`auto` (dense + one pruned model: E-Sparse 2:4 if there), `all`, `none`, or a comma list of
    `method/pattern` or `model/method/pattern` (e.g. `dense/dense,esparse/2of4`)."""
    available = sorted(available)
    spec = (spec or "none").strip()
    if spec == "none":
        return []
    if spec == "all":
        return available
    if spec == "auto":
        if not available:
            return []
        model = available[0][0]
        mine = [k for k in available if k[0] == model]
        chosen = [k for k in mine if k[1] == "dense"][:1]
        pruned = [k for k in mine if k[1] != "dense"]
        preferred = [k for k in pruned if k[1] == "esparse" and k[2] == "2of4"]
        chosen += (preferred or pruned)[:1]
        return chosen
    chosen = []
    for item in (part.strip() for part in spec.split(",") if part.strip()):
        fields = item.split("/")
        if len(fields) == 2:
            matches = [k for k in available if k[1:] == tuple(fields)]
        elif len(fields) == 3:
            matches = [k for k in available if k == tuple(fields)]
        else:
            matches = []
        if not matches:
            names = ", ".join("/".join(k) for k in available) or "none"
            raise ConfigError(f"--rerun {item!r} names no perplexity record; available: {names} "
                              "(or auto, all, none)")
        chosen += [m for m in matches if m not in chosen]
    return chosen


def rerun_perplexity(results_dir: str | os.PathLike, selection: list[tuple[str, str, str]], windows: int,
                     resources_dir: str | os.PathLike | None, data_mirror: str | os.PathLike | None,
                     tolerances: Tolerances = Tolerances()) -> list[Check]:
    """Re-run WikiText-2 perplexity of saved models on the first `windows` windows; compare per window."""
    import torch

    from .data import load_records
    from .io import sha256_tensor
    from .models import load_model
    from .perplexity import perplexity, token_stream

    root = Path(results_dir)
    paths = ppl_records(root)
    checks = []
    streams: dict[tuple[str, str], Any] = {}
    for key in selection:
        model, method, pattern = key
        label = _rel(paths[key], root)
        try:
            record = read_json(paths[key])
        except ValueError as error:
            checks.append(Check("rerun", label, FAIL, f"not valid JSON: {error}"))
            continue
        if method == "dense":
            if resources_dir is None:
                checks.append(Check("rerun", label, FAIL, "cannot re-run the dense model: no --resources-dir"))
                continue
            model_dir = Path(resources_dir) / "models" / model
        else:
            model_dir = root / "pruned" / model / method / pattern
        provenance = record.get("provenance", {})
        source = record.get("dataset") or {}
        mirror = data_mirror if str(source.get("source", "hub")).startswith("mirror") else None
        if str(source.get("source", "hub")).startswith("mirror") and data_mirror is None:
            checks.append(Check("rerun", label, FAIL, "the record was evaluated on a data mirror: pass --data-mirror"))
            continue
        recorded_device = str(provenance.get("device", "cpu"))
        rtol = tolerances.rerun_ppl_rtol if recorded_device == "cpu" else tolerances.rerun_ppl_rtol_other_device
        threads = (provenance.get("hardware") or {}).get("torch_threads")
        previous_threads = torch.get_num_threads()
        try:
            if threads:
                torch.set_num_threads(int(threads))
            loaded, tokenizer = load_model(model_dir, dtype=provenance.get("dtype", "float32"), device="cpu")
            stream_key = (str(source.get("dataset", "wikitext2")), str(sha256_file(model_dir / "tokenizer.json")))
            if stream_key not in streams:
                rows = load_records(stream_key[0], mirror)["text"]
                streams[stream_key] = token_stream(list(rows), tokenizer, stream_key[0])
            tokens = streams[stream_key]
            digest = sha256_tensor(tokens)
            same_stream = digest == record.get("stream_sha256")
            checks.append(Check("rerun", f"{label}#eval_tokens", PASS if same_stream else FAIL,
                                "evaluation token stream re-tokenized: sha256 matches" if same_stream else
                                f"re-tokenized stream sha256 {digest[:16]}... != recorded "
                                f"{str(record.get('stream_sha256'))[:16]}..."))
            count = min(int(windows), int(record["windows"]))
            result = perplexity(loaded, tokens, int(record["seqlen"]), count, device="cpu", progress=False)
        except (EsparseError, OSError, KeyError, ValueError) as error:
            checks.append(Check("rerun", label, FAIL, f"could not re-run: {error}"))
            continue
        finally:
            torch.set_num_threads(previous_threads)
        recorded = list(record.get("nll_per_window", []))[:count]
        fresh = result["nll_per_window"]
        if len(recorded) != count:
            checks.append(Check("rerun", label, FAIL, f"record has {len(recorded)} per-window NLLs, needed {count}"))
            continue
        worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(fresh, recorded))
        seqlen = int(record["seqlen"])
        recorded_ppl = math.exp(sum(recorded) / (count * seqlen))
        ok = worst <= rtol
        detail = (f"{count} of {record['windows']} windows at seqlen {seqlen}: ppl {result['ppl']:.6f} vs recorded "
                  f"{recorded_ppl:.6f}; max per-window relative difference {worst:.2e} (tolerance {rtol:g})")
        if count == int(record["windows"]):
            ok = ok and math.isclose(result["ppl"], float(record["ppl"]), rel_tol=rtol)
        checks.append(Check("rerun", label, PASS if ok else FAIL, detail))
    return checks


# ------------------------------------------------------------------------------ reference runs


def _reference_files(results_dir: Path) -> list[str]:
    """Tables and provenance of a run: tables/*.csv and every result JSON (no model weights)."""
    out = list(results_dir.glob("tables/*.csv")) + list(results_dir.glob("tables/*.json"))
    out += list(results_dir.glob("calibration/*/calibration.json"))
    out += list(results_dir.glob("ablation/*/*.json")) + list(results_dir.glob("zeroshot/*/*/*.json"))
    out += list(results_dir.glob("kernels/*/*/*/plan.json"))
    out += list(results_dir.glob("pruned/*/*/*/prune.json"))
    out += list(results_dir.glob("ppl/*/*/*.json"))
    return sorted({_rel(p, results_dir) for p in out})


def export_reference(results_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a run's tables and result JSONs to `out_dir` with a REFERENCE.json listing their sha256."""
    root, out = Path(results_dir), Path(out_dir)
    files = _reference_files(root)
    if not files:
        raise DataError(f"{root} has no tables or result JSONs to export")
    out.mkdir(parents=True, exist_ok=True)
    for rel in files:
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, target)
    sample = next((read_json(root / rel) for rel in files if rel.endswith(".json")), {})
    provenance = sample.get("provenance", {}) if isinstance(sample, dict) else {}
    write_json(out / REFERENCE_INFO, {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "exported_from": str(root.resolve()),
        "note": "tables and provenance of a run, no model weights; checked by `esparse audit --against`",
        "code": provenance.get("code"), "hardware": provenance.get("hardware"),
        "software": provenance.get("software"),
        "files": {rel: sha256_file(out / rel) for rel in files},
    })
    return out / REFERENCE_INFO


def _diverged_cells(root: Path, ref: Path) -> frozenset:
    """(model, method, pattern) of the pruned models whose masks digest differs from the reference's."""
    cells = set()
    for ref_json in ref.glob("ppl/*/*/*.json"):
        ours_path = root / _rel(ref_json, ref)
        try:
            theirs = read_json(ref_json)
            ours = read_json(ours_path) if ours_path.is_file() else {}
        except ValueError:
            continue  # reported by the record checks
        if theirs.get("masks_sha256") and ours.get("masks_sha256") != theirs.get("masks_sha256"):
            cells.add(tuple(str(theirs.get(c)) for c in CELL_COLUMNS))
    return frozenset(cells)


def _cpu_of(directory: Path) -> str | None:
    for path in sorted(directory.glob("ppl/*/*/*.json")) + sorted(directory.glob("pruned/*/*/*/prune.json")):
        try:
            return read_json(path)["provenance"]["hardware"]["cpu"]
        except (ValueError, KeyError, TypeError):
            continue
    return None


TABLE_KEYS = {
    "wikitext_ppl.csv": ["model", "method", "pattern"],
    "zeroshot.csv": ["model", "method", "pattern", "task", "metric"],
    "ablation.csv": ["variant"],
    "latency.csv": ["target", "weights", "method", "pattern", "shuffle", "phase", "batch", "length"],
    "memory.csv": ["target", "weights", "method", "pattern", "shuffle", "batch", "context"],
}


def _is_timing(column: str) -> bool:
    """Wall-clock and memory-use measurements differ between any two runs: never compared."""
    name = column.lower()
    return ("seconds" in name or name.endswith(("_s", "_ms", "_us")) or "time" in name
            or "memory" in name or "nvml" in name or "resident" in name)


CELL_COLUMNS = ("model", "method", "pattern")  # one pruned model: the unit whose masks can diverge


def _compare_table(name: str, ours, ref, same_cpu: bool, tol: Tolerances,
                   diverged: frozenset = frozenset()) -> tuple[list[str], list[str]]:
    """Differences between two tidy tables beyond tolerance, as sentences: (problems, notes).

    `diverged`: (model, method, pattern) cells whose masks differ from the reference's, which another
    CPU model may cause (near-tied scores flip). Their rows describe a different pruning outcome, not a
    reproduction, so their differences are notes (WARN, with the relative difference), not problems."""
    import pandas as pd

    missing = [c for c in ref.columns if c not in ours.columns]
    if missing:
        return [f"columns of the reference missing from this run: {missing}"], []
    problems, notes = [], []
    added = [c for c in ours.columns if c not in ref.columns]
    if added:  # a column added since the reference was exported: nothing to compare it with
        notes.append(f"columns not in the reference (added since it was exported), not compared: {added}")
    floats = [c for c in ref.columns if pd.api.types.is_float_dtype(ref[c])]
    keys = TABLE_KEYS.get(name) or [c for c in ref.columns if c not in floats]
    ours_rows = {tuple(str(v) for v in r[keys]): r for _, r in ours.iterrows()}
    ref_rows = {tuple(str(v) for v in r[keys]): r for _, r in ref.iterrows()}
    for key in sorted(set(ref_rows) - set(ours_rows)):
        problems.append(f"row {'/'.join(key)} missing")
    for key in sorted(set(ours_rows) - set(ref_rows)):
        problems.append(f"row {'/'.join(key)} not in the reference")
    has_cells = all(c in ref.columns for c in CELL_COLUMNS)
    for key in sorted(set(ours_rows) & set(ref_rows)):
        a, b = ours_rows[key], ref_rows[key]
        cell_diverged = has_cells and tuple(str(a[c]) for c in CELL_COLUMNS) in diverged
        for column in ref.columns:
            if column in keys or _is_timing(str(column)):
                continue
            x, y = a[column], b[column]
            if column == "ppl":
                rtol, atol = (tol.ref_ppl_rtol_same_cpu if same_cpu else tol.ref_ppl_rtol_other_cpu), 0.0
            elif name == "zeroshot.csv" and column == "value":
                rtol, atol = 0.0, (tol.ref_acc_atol_same_cpu if same_cpu else tol.ref_acc_atol_other_cpu)
            elif name == "zeroshot.csv" and column == "stderr":
                continue  # follows from value and n
            elif column in floats:
                rtol, atol = (tol.ref_float_rtol_same_cpu if same_cpu else tol.ref_float_rtol_other_cpu), 1e-12
            else:
                rtol = atol = None
            if column.endswith("sha256") and not same_cpu:
                continue  # digests of masks: compared (as WARN) through the JSON records
            if rtol is None:
                if not (pd.isna(x) and pd.isna(y)) and x != y:
                    problems.append(f"{'/'.join(key)} {column}: {x!r} vs reference {y!r}")
            elif not (pd.isna(x) and pd.isna(y)) and not _close(float(x), float(y), rtol, atol):
                if cell_diverged:
                    change = (f"{float(x) - float(y):+.3g} absolute" if name == "zeroshot.csv"
                              else _relative(float(x), float(y)))
                    notes.append(f"{'/'.join(key)} {column}: {float(x):.6g} vs reference {float(y):.6g} "
                                 f"({change}; masks differ: another CPU model's outcome)")
                else:
                    problems.append(f"{'/'.join(key)} {column}: {x!r} vs reference {y!r} (rel {rtol:g}, abs {atol:g})")
    return problems, notes


def _relative(ours: float, theirs: float) -> str:
    return f"{(ours - theirs) / abs(theirs):+.2%}" if theirs else f"{ours - theirs:+.3g} absolute"


def _joined(sentences: list[str], shown: int = 4) -> str:
    return "; ".join(sentences[:shown]) + (f" (+{len(sentences) - shown} more)" if len(sentences) > shown else "")


def choose_reference(reference_dir: str | os.PathLike, cpu: str | None) -> tuple[Path | None, str]:
    """The reference to compare with, and why it was chosen.

    `reference_dir` is one exported reference (it holds REFERENCE.json) or a set of them, one per
    subdirectory, each exported on another CPU model: float reductions differ between CPU models, and
    near-tied scores then flip masks, so each model gets its own reference. From a set, the member
    exported on `cpu` is chosen, else the newest (compared with the other-CPU tolerances).
    Returns (None, reason) when the directory is neither."""
    ref = Path(reference_dir)
    if (ref / REFERENCE_INFO).is_file():
        return ref, ""
    members = []
    for info_path in sorted(ref.glob(f"*/{REFERENCE_INFO}")):
        try:
            info = read_json(info_path)
        except ValueError as error:
            return None, f"{info_path} is not valid JSON: {error}"
        members.append((str(info.get("created_utc", "")), (info.get("hardware") or {}).get("cpu"), info_path.parent))
    if not members:
        return None, f"not a reference directory: no {REFERENCE_INFO} in {ref} or in its subdirectories"
    listed = ", ".join(f"{m[2].name} ({m[1]})" for m in members)
    same = [m for m in members if cpu is not None and m[1] == cpu]
    if same:
        chosen = max(same)
        return chosen[2], f"{chosen[2].name}: exported on this run's CPU model ({cpu}); the set holds {listed}"
    chosen = max(members)
    return chosen[2], (f"{chosen[2].name}, the newest: no reference was exported on this run's CPU model ({cpu}); "
                       f"the set holds {listed}")


def compare_to_reference(results_dir: str | os.PathLike, reference_dir: str | os.PathLike,
                         tolerances: Tolerances = Tolerances()) -> list[Check]:
    import pandas as pd

    root = Path(results_dir)
    checks: list[Check] = []
    ref, why = choose_reference(reference_dir, _cpu_of(root))
    if ref is None:
        return [Check("reference", str(reference_dir), FAIL, why)]
    if why:
        checks.append(Check("reference", "choice", PASS, why))
    info = read_json(ref / REFERENCE_INFO)
    for rel, digest in sorted(info.get("files", {}).items()):
        path = ref / rel
        actual = sha256_file(path) if path.is_file() else None
        if actual != digest:
            checks.append(Check("reference", f"reference:{rel}", FAIL,
                                "missing from the reference" if actual is None else
                                "reference file modified since export (sha256 differs from REFERENCE.json)"))
    ref_cpu, our_cpu = (info.get("hardware") or {}).get("cpu") or _cpu_of(ref), _cpu_of(root)
    same_cpu = ref_cpu is not None and ref_cpu == our_cpu
    checks.append(Check("reference", "hardware", PASS if same_cpu else WARN,
                        f"same CPU model ({our_cpu}): same-CPU tolerances" if same_cpu else
                        f"CPU {our_cpu!r} vs reference {ref_cpu!r}: other-CPU tolerances"))
    ours_sw = {}
    for path in sorted(root.glob("ppl/*/*/*.json"))[:1]:
        ours_sw = read_json(path).get("provenance", {}).get("software", {})
    for package in ("torch", "transformers"):
        ref_version = (info.get("software") or {}).get(package)
        if ours_sw and ref_version and ours_sw.get(package) != ref_version:
            checks.append(Check("reference", f"software:{package}", WARN,
                                f"{ours_sw.get(package)} vs reference {ref_version}"))
    diverged = frozenset() if same_cpu else _diverged_cells(root, ref)
    for ref_table in sorted(ref.glob("tables/*.csv")):
        rel = _rel(ref_table, ref)
        ours = root / rel
        if not ours.is_file():
            checks.append(Check("reference", rel, FAIL, "table of the reference missing from this run"))
            continue
        problems, notes = _compare_table(ref_table.name, pd.read_csv(ours), pd.read_csv(ref_table), same_cpu,
                                         tolerances, diverged)
        if problems:
            checks.append(Check("reference", rel, FAIL, _joined(problems)))
        elif notes:
            checks.append(Check("reference", rel, WARN, "agrees within tolerance; " + _joined(notes)))
        else:
            checks.append(Check("reference", rel, PASS, "agrees with the reference within tolerance"))
    digest_rules = {
        "calibration.json": [("tokens_sha256", True), ("file_sha256", True)],
        "prune.json": [("masks_sha256", False), ("perms_sha256", False), ("weights_sha256", False),
                       ("pattern", True), ("method", True)],
        "ppl": [("stream_sha256", True), ("seqlen", True), ("windows", True), ("masks_sha256", False)],
    }
    for ref_json in sorted(ref.rglob("*.json")):
        rel = _rel(ref_json, ref)
        if rel == REFERENCE_INFO:
            continue
        kind = "ppl" if rel.startswith("ppl/") else ref_json.name
        if kind not in digest_rules:
            continue
        ours_path = root / rel
        if not ours_path.is_file():
            checks.append(Check("reference", rel, FAIL, "record of the reference missing from this run"))
            continue
        try:
            ours, theirs = read_json(ours_path), read_json(ref_json)
        except ValueError as error:
            checks.append(Check("reference", rel, FAIL, f"not valid JSON: {error}"))
            continue
        hard, soft = [], []
        for key, always in digest_rules[kind]:
            if ours.get(key) != theirs.get(key):
                (hard if always or same_cpu else soft).append(key)
        ours_source, their_source = (ours.get("dataset") or {}).get("source"), (theirs.get("dataset") or {}).get("source")
        if ours_source != their_source:
            hard.append(f"data source ({ours_source} vs {their_source})")
        ours_inputs, their_inputs = ours["provenance"].get("inputs", {}), theirs["provenance"].get("inputs", {})
        if kind in ("calibration.json", "prune.json") or rel.startswith("ppl/") and "/dense/" in rel:
            if ours_inputs.get("model_weights") != their_inputs.get("model_weights"):
                hard.append("dense model weights")
        if kind == "ppl" and "ppl" in theirs:
            rtol = tolerances.ref_ppl_rtol_same_cpu if same_cpu else tolerances.ref_ppl_rtol_other_cpu
            ours_ppl, their_ppl = float(ours.get("ppl", float("nan"))), float(theirs["ppl"])
            if not _close(ours_ppl, their_ppl, rtol, 0.0):
                if "masks_sha256" in soft:  # another CPU model pruned differently: not a reproduction
                    soft.append(f"ppl {ours_ppl:.6g} vs {their_ppl:.6g} ({_relative(ours_ppl, their_ppl)})")
                else:
                    hard.append(f"ppl {ours.get('ppl')} vs {theirs['ppl']} (rel {rtol:g})")
        status = FAIL if hard else (WARN if soft else PASS)
        detail = ("differs: " + ", ".join(hard + soft)) if hard or soft else "digests and protocol identical"
        checks.append(Check("reference", rel, status, detail))
    return checks


# ------------------------------------------------------------------------------ the audit


def audit(results_dir: str | os.PathLike, against: str | os.PathLike | None = None, rerun: str = "auto",
          windows: int = 2, resources_dir: str | os.PathLike | None = None,
          data_mirror: str | os.PathLike | None = None, manifest: str | os.PathLike | None = None,
          tolerances: Tolerances = Tolerances()) -> AuditResult:
    root = Path(results_dir)
    if not root.is_dir():
        raise DataError(f"results directory {root} does not exist")
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise ConfigError(f"--windows must be a positive integer, got {windows!r}")
    if resources_dir is not None and not Path(resources_dir).is_dir():
        raise ConfigError(f"--resources-dir {resources_dir} is not a directory")
    if data_mirror is not None and not (Path(data_mirror) / "SHA256SUMS").is_file():
        raise ConfigError(f"--data-mirror {data_mirror} is not a data mirror (no SHA256SUMS)")
    selection = select_reruns(rerun, ppl_records(root))
    result = AuditResult(root, tolerances=tolerances)
    hashes: dict[Path, str] = {}
    result.checks += check_manifest(root, manifest, hashes)
    result.checks += check_recorded(root, resources_dir, data_mirror, hashes)
    if selection:
        result.checks += rerun_perplexity(root, selection, windows, resources_dir, data_mirror, tolerances)
    if against is not None:
        result.checks += compare_to_reference(root, against, tolerances)
    return result


def format_result(result: AuditResult, verbose: bool = False) -> str:
    """Tolerances, the pass/fail table (passing rows folded per kind unless verbose), the verdict."""
    from tabulate import tabulate

    lines = [f"audit of {result.results_dir}", "", "tolerances:",
             tabulate(result.tolerances.rows(), headers=["what", "tolerance"], tablefmt="simple"), ""]
    rows = []
    kinds = list(dict.fromkeys(c.kind for c in result.checks))
    for kind in kinds:
        mine = [c for c in result.checks if c.kind == kind]
        shown = mine if verbose else [c for c in mine if c.status != PASS]
        rows += [(c.status, c.kind, c.subject, c.detail) for c in shown]
        passed = sum(c.status == PASS for c in mine)
        if not verbose and passed:
            rows.append((PASS, kind, f"({passed} checks)", "all other checks of this kind passed"))
    lines.append(tabulate(rows, headers=["status", "kind", "subject", "detail"], tablefmt="simple",
                          maxcolwidths=[None, None, 70, 90]))
    failures = result.failures
    counts = ", ".join(f"{s}: {sum(c.status == s for c in result.checks)}" for s in (PASS, WARN, FAIL))
    lines.append("")
    if result.ok:
        lines.append(f"AUDIT PASSED ({counts})")
    else:
        named = sorted(dict.fromkeys(c.subject for c in failures))
        lines.append(f"AUDIT FAILED ({counts}): " + (", ".join(named[:20]) or "nothing was checked")
                     + (f" and {len(named) - 20} more" if len(named) > 20 else ""))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ command line


def configure_parser(parser) -> None:
    parser.add_argument("results_dir", help="the results directory of a run")
    parser.add_argument("--against", default=None, help="a reference directory (e.g. reports/reference/)")
    parser.add_argument("--rerun", default="auto",
                        help="perplexities to re-run: auto (dense + one pruned), all, none, or a comma list of "
                             "method/pattern or model/method/pattern (default auto)")
    parser.add_argument("--windows", type=int, default=2, help="windows per re-run (default 2)")
    parser.add_argument("--resources-dir", default="resources",
                        help="where the prepared (dense) models are: RESOURCES/models/<model> (default ./resources)")
    parser.add_argument("--data-mirror", default=os.environ.get("ESPARSE_DATA_MIRROR"),
                        help="offline data mirror the run read (default $ESPARSE_DATA_MIRROR)")
    parser.add_argument("--manifest", default=None, help="manifest to check (default RESULTS_DIR/MANIFEST.sha256)")
    parser.add_argument("--out", default=None, help="also write the full table to this file")
    parser.add_argument("--verbose", action="store_true", help="print every check, not only failures")


def run_cli(args) -> int:
    resources = args.resources_dir if args.resources_dir and Path(args.resources_dir).is_dir() else None
    result = audit(args.results_dir, against=args.against, rerun=args.rerun, windows=args.windows,
                   resources_dir=resources, data_mirror=args.data_mirror, manifest=args.manifest)
    print(format_result(result, verbose=args.verbose), end="")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(format_result(result, verbose=True))
    return 0 if result.ok else 1


def configure_reference_parser(parser) -> None:
    parser.add_argument("results_dir", help="the results directory of a finished run")
    parser.add_argument("out_dir", help="where to write the reference (e.g. reports/reference)")


def run_reference_cli(args) -> int:
    path = export_reference(args.results_dir, args.out_dir)
    print(f"wrote {path} ({len(read_json(path)['files'])} files)")
    return 0
