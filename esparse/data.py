"""Data layer: every data set of the offline mirror, loaded from the Hugging Face Hub or the mirror.

`load_records(name)` calls `datasets.load_dataset` exactly as lm-eval / Wanda do. `load_records(name,
mirror)` reads the mirror's files instead (each verified against the mirror's `SHA256SUMS` first) and
returns a `datasets.Dataset` with the Hub data set's fields, feature types, split name and record order,
so the rest of the pipeline cannot tell the two sources apart. `dataset_source` describes the source for
results provenance.

Schemas are the Hub's (from the data sets' cards / loading scripts, and what lm-eval 0.4.13's task for
each set reads). Known differences and uncertainties, per data set:

- `c4_calibration`: the mirror holds documents 0-999 of the shard, exactly; the Hub path yields the whole
  shard (356,317 documents), so a calibration draw over the mirror differs from the paper's draw.
  `timestamp` is `timestamp[s]`: `allenai/c4` is plain json.gz, and the `datasets` JSON builder infers
  that type from its ISO-8601 strings (the retired `c4` script declared it a string).
- `c4_heldout`: genuine C4 `en` train documents from an unnamed other shard; no Hub path yields those
  records. Online, train shard 00001 stands in (also disjoint from shard 00000). Marked approximate.
- `piqa`: lm-eval reads `baber/piqa`, a parquet re-upload whose card states `label` is 0/1 but does not
  state its feature type; the original `piqa` data set declared `ClassLabel(names=["0", "1"])`, used here.
  Either way rows hold the integer 0/1 that lm-eval's `doc_to_target: label` needs.
- `boolq`: rebuilt from a third-party prompt layout (`"Passage: <p>\nQuestion: <q>?"`, gold 0 = no).
  The Hub's `passage` starts with the Wikipedia title and " -- "; the title is lost here. `question` is
  recovered exactly (the layout appended "?", which is stripped), `idx` is the row position (the Hub's
  validation `idx` runs 0..3269 in the same order), `label` 1 = yes = "True".
- `hellaswag`: rebuilt from a pre-processed 6-lines-per-item file. Each item's first line is lm-eval's
  `activity_label + ": " + ctx` after bracket clean-up but with `ctx_b` not capitalised; the split of
  `ctx` into `ctx_a`/`ctx_b` is lost, so `ctx_a` = `ctx` = the text after the first ": ", `ctx_b` = "".
  The endings are already cleaned. `ind` is the row position (not the Hub's `ind`), `source_id` and
  `split_type` are "" (unknown), `split` is "val", `label` the gold index as a string (Hub type).
  A task built on this is close to, not identical with, lm-eval's `hellaswag`: report it apart.
"""

from __future__ import annotations

import bz2
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import datasets
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from esparse.errors import ConfigError, DataError
from esparse.io import sha256_file

CHECKSUM_FILE = "SHA256SUMS"

_STRING = datasets.Value("string")
_STRINGS = datasets.List(_STRING)
_CHOICES = {"text": _STRINGS, "label": _STRINGS}  # Hub form of a Sequence of {text, label} dicts


def _features(**fields: Any) -> datasets.Features:
    return datasets.Features(fields)


# Converted data is either a pyarrow table or a list of records (dicts keyed by Hub field name).
Converted = pa.Table | list[dict[str, Any]]
Converter = Callable[[list[Path], datasets.Features], Converted]


@dataclass(frozen=True)
class DatasetSpec:
    """One data set: where the Hub keeps it, which mirror files hold it, and how to convert them."""

    name: str
    hub_id: str
    hub_config: str | None
    split: str
    features: datasets.Features
    mirror_files: tuple[str, ...]  # paths relative to the mirror root, as listed in SHA256SUMS
    convert: Converter
    records: int  # record count of the mirror copy (the mirror README)
    exact: bool = True  # the mirror yields the Hub's records themselves
    note: str = ""
    hub_data_files: Mapping[str, str] | None = None


# ---------------------------------------------------------------------------------------------
# Converters: one per mirror layout. Each returns records in file order, which is the Hub order.


def _text_lines(paths: list[Path], features: datasets.Features) -> Converted:
    """One row per line, as the Hub `wikitext` builder: whitespace-only lines become ""."""
    with open(paths[0], encoding="utf-8") as handle:  # text mode: same line splitting as the Hub
        return [{"text": line if line.strip() else ""} for line in handle]


def _json_lines(paths: list[Path], features: datasets.Features, *, label_field: str | None = None) -> Converted:
    """JSON lines in the Hub's field names; a second file, if given, holds `label_field`, one per line.

    Parsed by pyarrow's JSON reader against the Hub schema (as the `datasets` JSON builder does), so
    types such as C4's `timestamp[s]` come out the same. Fields the Hub does not have are dropped.
    """
    schema = features.arrow_schema
    options = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    try:
        table = pa_json.read_json(paths[0], parse_options=options)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{paths[0]}: not JSON lines in the expected layout ({exc})") from exc
    if label_field is None:
        return table
    to_value = int if isinstance(features[label_field], datasets.ClassLabel) else str
    labels = [to_value(line.strip()) for line in paths[1].read_text(encoding="utf-8").split()]
    if len(labels) != table.num_rows:
        raise DataError(f"{paths[1]} has {len(labels)} labels for {table.num_rows} records in {paths[0]}")
    in_records = table.column(label_field)
    if in_records.null_count == 0 and in_records.to_pylist() != labels:
        raise DataError(f"{paths[1]} disagrees with the '{label_field}' values in {paths[0]}")
    column = pa.array(labels, type=schema.field(label_field).type)
    return table.set_column(table.schema.get_field_index(label_field), label_field, column)


def _json_array(paths: list[Path], features: datasets.Features) -> Converted:
    """A JSON list of records already in the Hub layout (ARC-Easy, SciQ)."""
    return json.loads(paths[0].read_text(encoding="utf-8"))


def _ai2_question_layout(paths: list[Path], features: datasets.Features, *, stem_field: str) -> Converted:
    """AllenAI's original layout: `question: {stem, choices: [{text, label}]}` per JSON line."""
    records = []
    for line in paths[0].read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        question = item["question"]
        records.append({
            "id": item["id"],
            stem_field: question["stem"],
            "choices": {
                "text": [choice["text"] for choice in question["choices"]],
                "label": [choice["label"] for choice in question["choices"]],
            },
            "answerKey": item["answerKey"],
        })
    return records


def _logiqa_blocks(paths: list[Path], features: datasets.Features) -> Converted:
    """The authors' text layout, parsed as the Hub builder `EleutherAI/logiqa` does.

    Items are separated by blank lines: answer letter, context, question, then options "A." ... "D.".
    The builder puts a space after every "." (the release glues sentences together) and strips.
    """
    def normalize(text: str) -> str:
        return text.replace(".", ". ").strip()

    records = []
    for block in paths[0].read_text(encoding="utf-8").strip().split("\n\n"):
        lines = block.split("\n")
        records.append({
            "label": lines[0].strip(),
            "context": normalize(lines[1]),
            "question": normalize(lines[2]),
            "options": [normalize(option[2:]) for option in lines[3:]],
        })
    return records


def _hf_parquet(paths: list[Path], features: datasets.Features) -> Converted:
    """A parquet file written by `datasets` (Hub parquet); its embedded feature types must match."""
    table = pq.read_table(paths[0])
    embedded = datasets.Features.from_arrow_schema(table.schema)
    if embedded != features:
        raise DataError(f"{paths[0]}: features {embedded} differ from the Hub schema {features}")
    return table


_PASSAGE, _QUESTION = "Passage: ", "\nQuestion: "


def _passage_question_prompt(paths: list[Path], features: datasets.Features) -> Converted:
    """BoolQ as `{"query": "Passage: <p>\\nQuestion: <q>?", "gold": 0|1}` lines (0 = no)."""
    records = []
    for index, line in enumerate(paths[0].read_text(encoding="utf-8").splitlines()):
        item = json.loads(line)
        query = item["query"]
        split_at = query.rfind(_QUESTION)  # a passage may itself contain "\nQuestion: "
        if not query.startswith(_PASSAGE) or split_at < 0 or not query.endswith("?"):
            raise DataError(f"{paths[0]} line {index + 1}: not a 'Passage: ...\\nQuestion: ...?' query")
        records.append({
            "question": query[split_at + len(_QUESTION) : -1],
            "passage": query[len(_PASSAGE) : split_at],
            "idx": index,
            "label": int(item["gold"]),
        })
    return records


_HELLASWAG_LINES = 6  # context, gold index, four endings


def _six_line_items(paths: list[Path], features: datasets.Features) -> Converted:
    """HellaSwag pre-processed into 6 lines per item; see the module docstring for what is lost."""
    with bz2.open(paths[0], "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % _HELLASWAG_LINES:
        raise DataError(f"{paths[0]}: {len(lines)} lines is not a multiple of {_HELLASWAG_LINES}")
    records = []
    for index in range(0, len(lines), _HELLASWAG_LINES):
        context, gold, *endings = lines[index : index + _HELLASWAG_LINES]
        activity_label, sep, ctx = context.partition(": ")
        if not sep or gold not in {"0", "1", "2", "3"}:
            raise DataError(f"{paths[0]} line {index + 1}: not a 'label: context' / gold-index item")
        records.append({
            "ind": index // _HELLASWAG_LINES,
            "activity_label": activity_label,
            "ctx_a": ctx,
            "ctx_b": "",
            "ctx": ctx,
            "endings": endings,
            "source_id": "",
            "split": "val",
            "split_type": "",
            "label": gold,
        })
    return records


# ---------------------------------------------------------------------------------------------
# Registry (Hub schemas; see the module docstring for where the mirror falls short).

_C4_FEATURES = _features(text=_STRING, timestamp=datasets.Value("timestamp[s]"), url=_STRING)
_ARC_FEATURES = _features(id=_STRING, question=_STRING, choices=_CHOICES, answerKey=_STRING)


DATASETS: Mapping[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("wikitext2", "wikitext", "wikitext-2-raw-v1", "test", _features(text=_STRING),
          ("wikitext-2-raw-v1/wiki.test.raw",), _text_lines, 4358),
    DatasetSpec("c4_calibration", "allenai/c4", None, "train", _C4_FEATURES,
          ("c4/c4-train.00000-of-01024.head1000.json",), _json_lines, 1000,
          hub_data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
          note="mirror holds documents 0-999 of the 356,317 in en/c4-train.00000-of-01024; "
               "calibration draws over them differ from draws over the whole shard"),
    DatasetSpec("c4_heldout", "allenai/c4", None, "train", _C4_FEATURES,
          ("c4/c4-train.other-shard.1000.json",), _json_lines, 1000, exact=False,
          hub_data_files={"train": "en/c4-train.00001-of-01024.json.gz"},
          note="mirror holds 1000 C4 en train documents of an unnamed shard other than 00000; "
               "online, train shard 00001 stands in"),
    DatasetSpec("piqa", "baber/piqa", None, "validation",
          _features(goal=_STRING, sol1=_STRING, sol2=_STRING, label=datasets.ClassLabel(names=["0", "1"])),
          ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
          functools.partial(_json_lines, label_field="label"), 1838),
    DatasetSpec("logiqa", "EleutherAI/logiqa", "logiqa", "test",
          _features(label=_STRING, context=_STRING, question=_STRING, options=_STRINGS),
          ("logiqa/Test.txt",), _logiqa_blocks, 651),
    DatasetSpec("winogrande", "allenai/winogrande", "winogrande_xl", "validation",
          _features(sentence=_STRING, option1=_STRING, option2=_STRING, answer=_STRING),
          ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
          functools.partial(_json_lines, label_field="answer"), 1267),
    DatasetSpec("openbookqa", "allenai/openbookqa", "main", "test",
          _features(id=_STRING, question_stem=_STRING, choices=_CHOICES, answerKey=_STRING),
          ("openbookqa/test.jsonl",), functools.partial(_ai2_question_layout, stem_field="question_stem"), 500),
    DatasetSpec("arc_easy", "allenai/ai2_arc", "ARC-Easy", "test", _ARC_FEATURES,
          ("arc_easy/test.json",), _json_array, 2376),
    DatasetSpec("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", _ARC_FEATURES,
          ("arc_challenge/ARC-Challenge-Test.jsonl",),
          functools.partial(_ai2_question_layout, stem_field="question"), 1172),
    DatasetSpec("sciq", "allenai/sciq", None, "test",
          _features(question=_STRING, distractor3=_STRING, distractor1=_STRING, distractor2=_STRING,
                    correct_answer=_STRING, support=_STRING),
          ("sciq/test.json",), _json_array, 1000),
    DatasetSpec("rte", "nyu-mll/glue", "rte", "validation",
          _features(sentence1=_STRING, sentence2=_STRING,
                    label=datasets.ClassLabel(names=["entailment", "not_entailment"]),
                    idx=datasets.Value("int32")),
          ("rte/validation.parquet",), _hf_parquet, 277),
    DatasetSpec("boolq", "aps/super_glue", "boolq", "validation",
          _features(question=_STRING, passage=_STRING, idx=datasets.Value("int32"),
                    label=datasets.ClassLabel(names=["False", "True"])),
          ("boolq/boolq.jsonl",), _passage_question_prompt, 3270, exact=False,
          note="rebuilt from a third-party 'Passage/Question' prompt layout: passages lack the "
               "Hub's 'Title -- ' prefix"),
    DatasetSpec("hellaswag", "Rowan/hellaswag", None, "validation",
          _features(ind=datasets.Value("int32"), activity_label=_STRING, ctx_a=_STRING, ctx_b=_STRING,
                    ctx=_STRING, endings=_STRINGS, source_id=_STRING, split=_STRING, split_type=_STRING,
                    label=_STRING),
          ("hellaswag/hellaswag_val_full.txt.bz2",), _six_line_items, 10042, exact=False,
          note="rebuilt from a pre-processed 6-line layout: ctx_a/ctx_b split, ind, source_id and "
               "split_type are lost; close to, not identical with, lm-eval's hellaswag"),
)}


def dataset_names() -> list[str]:
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}") from None


# ---------------------------------------------------------------------------------------------
# Mirror verification

_HASH_CACHE: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: hash each file once


def resolve_mirror(mirror: str | os.PathLike) -> Path:
    root = Path(mirror).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data mirror directory {root} does not exist (data_mirror={str(mirror)!r})")
    return root


def read_checksums(mirror: str | os.PathLike) -> dict[str, str]:
    """Parse the mirror's `SHA256SUMS` (`<hex>  ./<relpath>` lines) into {relpath: sha256}."""
    root = resolve_mirror(mirror)
    sums_path = root / CHECKSUM_FILE
    if not sums_path.is_file():
        raise DataError(f"{sums_path} is missing: the data mirror must pin its files with {CHECKSUM_FILE}")
    sums: dict[str, str] = {}
    for number, line in enumerate(sums_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name.strip().lstrip("*")  # "*" marks binary mode in sha256sum output
        if len(digest) != 64 or not name:
            raise DataError(f"{sums_path} line {number} is not '<sha256>  <path>': {line!r}")
        sums[name.removeprefix("./")] = digest.lower()
    return sums


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]


def verify_mirror_file(mirror: str | os.PathLike, relpath: str) -> Path:
    """Return the path of `relpath` in the mirror after checking it against `SHA256SUMS`."""
    root = resolve_mirror(mirror)
    expected = read_checksums(root).get(relpath)
    if expected is None:
        raise DataError(f"mirror file {relpath} is not listed in {root / CHECKSUM_FILE}")
    path = root / relpath
    if not path.is_file():
        raise DataError(f"mirror file {path} is missing (listed in {root / CHECKSUM_FILE})")
    actual = _file_sha256(path)
    if actual != expected:
        raise DataError(f"mirror file {path} is corrupt: sha256 {actual}, expected {expected}")
    return path


# ---------------------------------------------------------------------------------------------
# Loading


def _load_from_hub(spec: DatasetSpec) -> datasets.Dataset:
    kwargs: dict[str, Any] = {"split": spec.split}
    if spec.hub_data_files is not None:
        kwargs["data_files"] = dict(spec.hub_data_files)
    try:
        return datasets.load_dataset(spec.hub_id, spec.hub_config, **kwargs)
    except Exception as exc:  # datasets raises many types here (connection, offline mode, not found)
        raise DataError(
            f"could not load data set {spec.name!r} from the Hugging Face Hub "
            f"({spec.hub_id}, config {spec.hub_config}, split {spec.split}): {type(exc).__name__}: {exc}. "
            "Without Hub access, set data_mirror=PATH to an offline mirror."
        ) from exc


def _load_from_mirror(spec: DatasetSpec, mirror: str | os.PathLike) -> datasets.Dataset:
    paths = [verify_mirror_file(mirror, relpath) for relpath in spec.mirror_files]
    try:
        converted = spec.convert(paths, spec.features)
    except (KeyError, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{spec.name}: mirror files {spec.mirror_files} do not have the expected layout "
                        f"({type(exc).__name__}: {exc})") from exc
    split = datasets.Split(spec.split)
    if isinstance(converted, pa.Table):
        table = converted.select(list(spec.features)).cast(spec.features.arrow_schema)
        dataset = datasets.Dataset(InMemoryTable(table),
                                   info=datasets.DatasetInfo(features=spec.features), split=split)
    else:
        rows = [{field: record[field] for field in spec.features} for record in converted]
        dataset = datasets.Dataset.from_list(rows, features=spec.features, split=split)
    if dataset.num_rows != spec.records:
        raise DataError(f"{spec.name}: mirror files {spec.mirror_files} gave {dataset.num_rows} records, "
                        f"expected {spec.records}")
    return dataset


def load_records(name: str, mirror: str | os.PathLike | None = None) -> datasets.Dataset:
    """The records of data set `name`: from the Hub when `mirror` is None, else from the mirror dir."""
    spec = get_spec(name)
    if mirror is None:
        return _load_from_hub(spec)
    return _load_from_mirror(spec, mirror)


def dataset_source(name: str, mirror: str | os.PathLike | None = None) -> dict[str, Any]:
    """Provenance of `load_records(name, mirror)`: source kind, Hub coordinates, mirror file hashes."""
    spec = get_spec(name)
    source: dict[str, Any] = {
        "dataset": spec.name,
        "source": "hub",
        "hub_id": spec.hub_id,
        "hub_config": spec.hub_config,
        "hub_data_files": dict(spec.hub_data_files) if spec.hub_data_files else None,
        "split": spec.split,
        "note": "",
    }
    if mirror is not None:
        source["source"] = "mirror" if spec.exact else "mirror-approx"
        source["files"] = {relpath: _file_sha256(verify_mirror_file(mirror, relpath))
                           for relpath in spec.mirror_files}
        source["note"] = spec.note
    return source
