"""Data layer: mirror loaders give the Hub's records and schemas; checksums guard every mirror file."""

from __future__ import annotations

import bz2
import datetime
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pandas as pd
import pytest

from esparse import data
from esparse.errors import ConfigError, DataError

# Expected Hub schemas, written out independently of esparse.data: "string"/"int32"/... is a Value,
# [x] a list of x, {..} a struct, ("class", names) a ClassLabel. Key order is the Hub's column order.
S = "string"
CHOICES = {"text": [S], "label": [S]}
HUB = {  # name: (split, records per the mirror README, features)
    "wikitext2": ("test", 4358, {"text": S}),
    "c4_calibration": ("train", 1000, {"text": S, "timestamp": "timestamp[s]", "url": S}),
    "c4_heldout": ("train", 1000, {"text": S, "timestamp": "timestamp[s]", "url": S}),
    "piqa": ("validation", 1838, {"goal": S, "sol1": S, "sol2": S, "label": ("class", ["0", "1"])}),
    "logiqa": ("test", 651, {"label": S, "context": S, "question": S, "options": [S]}),
    "winogrande": ("validation", 1267, {"sentence": S, "option1": S, "option2": S, "answer": S}),
    "openbookqa": ("test", 500, {"id": S, "question_stem": S, "choices": CHOICES, "answerKey": S}),
    "arc_easy": ("test", 2376, {"id": S, "question": S, "choices": CHOICES, "answerKey": S}),
    "arc_challenge": ("test", 1172, {"id": S, "question": S, "choices": CHOICES, "answerKey": S}),
    "sciq": ("test", 1000, {"question": S, "distractor3": S, "distractor1": S, "distractor2": S,
                            "correct_answer": S, "support": S}),
    "rte": ("validation", 277, {"sentence1": S, "sentence2": S,
                                "label": ("class", ["entailment", "not_entailment"]), "idx": "int32"}),
    "boolq": ("validation", 3270, {"question": S, "passage": S, "idx": "int32",
                                   "label": ("class", ["False", "True"])}),
    "hellaswag": ("validation", 10042, {"ind": "int32", "activity_label": S, "ctx_a": S, "ctx_b": S, "ctx": S,
                                        "endings": [S], "source_id": S, "split": S, "split_type": S,
                                        "label": S}),
}
APPROXIMATE = {"boolq", "hellaswag", "c4_heldout"}


def _feature(spec):
    if isinstance(spec, str):
        return datasets.Value(spec)
    if isinstance(spec, list):
        return datasets.List(_feature(spec[0]))
    if isinstance(spec, tuple):
        return datasets.ClassLabel(names=spec[1])
    return {key: _feature(value) for key, value in spec.items()}


@pytest.fixture(scope="module")
def loaded(data_mirror):
    return {name: data.load_records(name, data_mirror) for name in HUB}


def test_registry_covers_every_mirror_data_set():
    assert data.dataset_names() == list(HUB)


@pytest.mark.parametrize("name", list(HUB))
def test_counts_split_and_schema_equal_the_hub(loaded, name):
    split, records, fields = HUB[name]
    dataset = loaded[name]
    assert dataset.num_rows == records
    assert str(dataset.split) == split
    assert list(dataset.features) == list(fields)
    assert dataset.features == datasets.Features({key: _feature(value) for key, value in fields.items()})


def test_wikitext_rows_are_the_hub_rows(loaded, data_mirror):
    rows = loaded["wikitext2"]["text"]
    assert len(rows) == 4358
    assert rows[:4] == ["", " = Robert Boulter = \n", "",
                        rows[3]] and rows[3].startswith(" Robert Boulter is an English film , television")
    assert rows[-1] == "" and rows[-2].endswith("Ed Taylor , Ed Parker , and Eddie Pelkey . \n")
    for row in rows:  # one line each: blank lines are "", every other line keeps its "\n"
        assert row == "" or (row.endswith("\n") and "\n" not in row[:-1] and row.strip())
    raw_lines = (data_mirror / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8").split("\n")[:-1]
    assert [row for row in rows if row] == [line + "\n" for line in raw_lines if line.strip()]
    assert sum(row == "" for row in rows) == sum(not line.strip() for line in raw_lines)


# (index, field, value) spot checks taken from the raw mirror files and the Hub data set cards.
SPOT_CHECKS = {
    "c4_calibration": [(0, "url", "https://klyq.com/beginners-bbq-class-taking-place-in-missoula/"),
                       (0, "timestamp", datetime.datetime(2019, 4, 25, 12, 57, 54)),
                       (-1, "url", "https://www.paytmmoney.com/mutual-funds/scheme/"
                                   "sbi-magnum-gilt-fund-direct-dividend-quarterly-dividend/inf200k01sg5")],
    "c4_heldout": [(0, "url", "https://www.game-pal.com/signup")],
    "piqa": [(0, "goal", "How do I ready a guinea pig cage for it's new occupants?"), (0, "label", 0),
             (1, "label", 1), (-1, "goal", "Where can I buy a tennis ball"), (-1, "label", 0)],
    "logiqa": [(0, "label", "a"),
               (0, "context", "In the planning of a new district in a township, it was decided to build a special "
                              "community in the southeast, northwest, centered on the citizen park. These four "
                              "communities are designated as cultural area, leisure area, commercial area and "
                              "administrative service area. It is known that the administrative service area is "
                              "southwest of the cultural area, and the cultural area is southeast of the leisure "
                              "area."),
               (0, "options", ["Civic Park is north of the administrative service area",
                               "The leisure area is southwest of the cultural area",
                               "The cultural district is in the northeast of the business district",
                               "The business district is southeast of the leisure area"]),
               (-1, "label", "d"), (-1, "question", "Which of the following must be true?"),
               (-1, "options", ["H was a member of the committee in the first year.",
                                "F was a member of the committee in the second year.",
                                "I have been a member of the committee for two years.",
                                "Z was a member of the committee the following year."])],
    "winogrande": [(0, "sentence", "Sarah was a much better surgeon than Maria so _ always got the easier cases."),
                   (0, "answer", "2"), (1, "answer", "1"), (-1, "option1", "black car"), (-1, "answer", "2")],
    "openbookqa": [(0, "id", "8-343"), (0, "answerKey", "B"),
                   (0, "choices", {"text": ["make more phone calls", "quit eating lunch out",
                                            "buy less with monopoly money", "have lunch with friends"],
                                   "label": ["A", "B", "C", "D"]}),
                   (-1, "id", "7-7"),
                   (-1, "question_stem", "Some animals use a liquid coming from their skin to adjust to")],
    "arc_easy": [(0, "id", "Mercury_417466"), (0, "answerKey", "A"), (-1, "id", "VASoL_2009_5_34"),
                 (-1, "choices", {"text": ["Roots", "Stems", "Leaves", "Flowers"],
                                  "label": ["A", "B", "C", "D"]})],
    "arc_challenge": [(0, "id", "Mercury_7175875"), (0, "answerKey", "C"),
                      (-1, "id", "MEA_2013_8_15"), (-1, "choices", {
                          "text": ["the floor", "the pull of gravity", "the air friction on the ball",
                                   "the person that throws the ball"], "label": ["A", "B", "C", "D"]})],
    "sciq": [(0, "correct_answer", "oxidants"), (0, "distractor3", "residues"),
             (-1, "correct_answer", "sulfur dioxide (so2)"), (-1, "distractor1", "formaldehyde")],
    "rte": [(0, "sentence2", "Christopher Reeve had an accident."), (0, "label", 1), (0, "idx", 0),
            (1, "label", 0), (-1, "idx", 276)],
    "boolq": [(0, "question", "does ethanol take more energy make that produces"), (0, "label", 0),
              (0, "idx", 0), (-1, "question", "will there be a season 5 of shadowhunters"), (-1, "label", 0),
              (-1, "idx", 3269)],
    "hellaswag": [(0, "activity_label", "Roof shingle removal"), (0, "ctx", "A man is sitting on a roof. he"),
                  (0, "label", "3"), (0, "endings", ["is using wrap to wrap a pair of skis.",
                                                     "is ripping level tiles off.", "is holding a rubik's cube.",
                                                     "starts pulling up roofing on a roof."]),
                  (1, "ctx", "A lady walks to a barbell. She bends down and grabs the pole. the lady"),
                  (-1, "activity_label", "Family Life"), (-1, "label", "2"), (-1, "ind", 10041)],
}


@pytest.mark.parametrize("name", list(SPOT_CHECKS))
def test_known_records(loaded, name):
    dataset = loaded[name]
    for index, field, value in SPOT_CHECKS[name]:
        assert dataset[index % dataset.num_rows][field] == value, (name, index, field)


def test_boolq_passages_are_the_prompt_minus_its_frame(loaded, data_mirror):
    raw = [json.loads(line) for line in (data_mirror / "boolq" / "boolq.jsonl").read_text().splitlines()]
    dataset = loaded["boolq"]
    for record, row in zip(raw, dataset):
        assert record["query"] == f"Passage: {row['passage']}\nQuestion: {row['question']}?"
        assert row["label"] == record["gold"]
    # one passage itself contains "\nQuestion: "; the split must use the last one
    assert any("\nQuestion: " in passage for passage in dataset["passage"])


def test_rte_parquet_equals_the_glue_tsv(loaded, data_mirror):
    tsv = pd.read_csv(data_mirror / "rte" / "dev.tsv", sep="\t", keep_default_na=False)
    mirror = loaded["rte"].to_pandas().astype({"idx": "int64"})
    assert mirror.equals(tsv[["sentence1", "sentence2", "label", "idx"]])


# lm-eval's own task definitions, fed the mirror records in place of the Hub download.
LM_EVAL_TASKS = {"piqa": "piqa/piqa.yaml", "logiqa": "logiqa/logiqa.yaml", "winogrande": "winogrande/default.yaml",
                 "openbookqa": "openbookqa/openbookqa.yaml", "arc_easy": "arc/arc_easy.yaml",
                 "arc_challenge": "arc/arc_challenge.yaml", "sciq": "sciq/sciq.yaml",
                 "rte": "glue/rte/default.yaml", "boolq": "super_glue/boolq/default.yaml",
                 "hellaswag": "hellaswag/hellaswag.yaml"}


@pytest.mark.parametrize("name", list(LM_EVAL_TASKS))
def test_lm_eval_task_reads_every_mirror_record(loaded, name):
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    dataset = loaded[name]
    split = str(dataset.split)
    config = load_yaml(Path(lm_eval.tasks.__file__).parent / LM_EVAL_TASKS[name])
    config["custom_dataset"] = lambda **_: datasets.DatasetDict({split: dataset})
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        config[key] = None
    config["test_split" if split == "test" else "validation_split"] = split
    task = ConfigurableTask(config=config)
    docs = task.eval_docs
    assert len(docs) == dataset.num_rows
    for doc in docs:
        text, choices, target = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        gold = target if isinstance(target, int) else text  # winogrande puts the gold index in doc_to_text
        assert choices and all(isinstance(choice, str) for choice in choices)
        assert isinstance(gold, int) and 0 <= gold < len(choices), (name, doc)


# ---------------------------------------------------------------------------------------------
# Provenance


def test_dataset_source_records_mirror_hashes(data_mirror):
    pinned = {}
    for line in (data_mirror / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        pinned[name.removeprefix("./")] = digest
    for name in HUB:
        source = data.dataset_source(name, data_mirror)
        assert source["dataset"] == name
        assert source["source"] == ("mirror-approx" if name in APPROXIMATE else "mirror")
        assert source["split"] == HUB[name][0]
        assert source["files"] and all(pinned[path] == digest for path, digest in source["files"].items())
        assert bool(source["note"]) == (name in APPROXIMATE or name == "c4_calibration")


def test_dataset_source_for_the_hub():
    source = data.dataset_source("c4_calibration")
    assert source["source"] == "hub" and "files" not in source
    assert (source["hub_id"], source["split"]) == ("allenai/c4", "train")
    assert source["hub_data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert (data.dataset_source("wikitext2")["hub_id"], data.dataset_source("wikitext2")["hub_config"]) == (
        "wikitext", "wikitext-2-raw-v1")


# ---------------------------------------------------------------------------------------------
# Bad inputs


def test_unknown_name_lists_the_known_ones(data_mirror):
    calls = (lambda: data.load_records("wikitext103", data_mirror), lambda: data.dataset_source("wikitext103"))
    for call in calls:
        with pytest.raises(ConfigError, match="wikitext103") as info:
            call()
        assert all(name in str(info.value) for name in HUB)


@pytest.fixture
def mirror_copy(data_mirror, tmp_path):
    root = tmp_path / "mirror"
    shutil.copytree(data_mirror, root)
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)  # the shared mirror is read-only
    return root


def _repin(root: Path) -> None:
    lines = [f"{hashlib.sha256(path.read_bytes()).hexdigest()}  ./{path.relative_to(root)}"
             for path in sorted(root.rglob("*")) if path.is_file() and path.name != "SHA256SUMS"]
    (root / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def test_corrupted_file_is_named_with_both_hashes(mirror_copy):
    assert data.load_records("piqa", mirror_copy).num_rows == 1838  # hashes cached for the good files
    target = mirror_copy / "piqa" / "valid.jsonl"
    expected = hashlib.sha256(target.read_bytes()).hexdigest()
    content = bytearray(target.read_bytes())
    content[100] ^= 0x01
    target.write_bytes(bytes(content))
    with pytest.raises(DataError, match="piqa/valid.jsonl") as info:
        data.load_records("piqa", mirror_copy)
    assert expected in str(info.value) and hashlib.sha256(bytes(content)).hexdigest() in str(info.value)
    with pytest.raises(DataError, match="piqa/valid.jsonl"):
        data.dataset_source("piqa", mirror_copy)


def test_missing_file_is_named(mirror_copy):
    (mirror_copy / "wikitext-2-raw-v1" / "wiki.test.raw").unlink()
    with pytest.raises(DataError, match="wikitext-2-raw-v1/wiki.test.raw.*missing"):
        data.load_records("wikitext2", mirror_copy)


def test_unlisted_file_is_refused(mirror_copy):
    sums = mirror_copy / "SHA256SUMS"
    lines = sums.read_text().splitlines(keepends=True)
    sums.write_text("".join(line for line in lines if "sciq/test.json" not in line))
    with pytest.raises(DataError, match="sciq/test.json is not listed"):
        data.load_records("sciq", mirror_copy)


def test_missing_checksum_file(mirror_copy):
    (mirror_copy / "SHA256SUMS").unlink()
    with pytest.raises(DataError, match="SHA256SUMS is missing"):
        data.load_records("rte", mirror_copy)


def test_missing_mirror_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_records("rte", tmp_path / "no-such-mirror")


def test_label_file_disagreeing_with_records(mirror_copy):
    labels = mirror_copy / "winogrande" / "dev-labels.lst"
    values = labels.read_text().split()
    values[0] = "1" if values[0] == "2" else "2"
    labels.write_text("\n".join(values) + "\n")
    _repin(mirror_copy)
    with pytest.raises(DataError, match="dev-labels.lst disagrees"):
        data.load_records("winogrande", mirror_copy)


def test_wrong_layout_is_a_data_error(mirror_copy):
    (mirror_copy / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(
        bz2.compress(b"no label separator here\n0\na\nb\nc\nd\n"))
    _repin(mirror_copy)
    with pytest.raises(DataError, match="hellaswag_val_full.txt.bz2"):
        data.load_records("hellaswag", mirror_copy)


# ---------------------------------------------------------------------------------------------
# Hub path (unreachable here): the call must reach datasets.load_dataset and fail, not fake data.

_HUB_PROBE = textwrap.dedent("""
    import json, datasets
    from esparse import data
    calls = []
    real = datasets.load_dataset
    def spy(*args, **kwargs):
        calls.append({"args": list(args), "kwargs": kwargs})
        return real(*args, **kwargs)
    datasets.load_dataset = spy
    outcome = {}
    for name in ("wikitext2", "c4_calibration"):
        try:
            data.load_records(name)
            outcome[name] = "loaded"
        except Exception as exc:
            outcome[name] = [type(exc).__name__, type(exc.__cause__).__name__, str(exc)]
    print(json.dumps({"calls": calls, "outcome": outcome}))
""")


def test_hub_path_calls_load_dataset_and_fails_offline(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", _HUB_PROBE], env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["calls"] == [
        {"args": ["wikitext", "wikitext-2-raw-v1"], "kwargs": {"split": "test"}},
        {"args": ["allenai/c4", None],
         "kwargs": {"split": "train", "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}},
    ]
    for name, (error, cause, message) in report["outcome"].items():
        assert error == "DataError" and cause not in ("NoneType", "DataError"), (name, cause)
        assert "data_mirror" in message
