"""Zero-shot evaluation: generated mirror tasks are lm-eval's own tasks with only the data swapped."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from esparse import zeroshot
from esparse.errors import ConfigError, DataError

# Record counts per the data README (what lm-eval evaluates: the test split if the task has one).
README_COUNTS = {
    "piqa": 1838,
    "logiqa": 651,
    "winogrande": 1267,
    "openbookqa": 500,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "sciq": 1000,
    "rte": 277,
    "boolq_mirror": 3270,
    "hellaswag_mirror": 10042,
}
DATA_KEYS = {
    "include", "task", "dataset_path", "dataset_name", "dataset_kwargs",
    "training_split", "validation_split", "test_split", "metadata", "tag",
}

# The first evaluated record of each task, written out by hand in the Hugging Face Hub schema the
# upstream lm-eval task reads (field names and types from the data sets' Hub cards / builders).
HUB_FIRST_RECORD = {
    "piqa": {
        "goal": "How do I ready a guinea pig cage for it's new occupants?",
        "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
                "you will also need to supply it with a water bottle and a food dish.",
        "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
                "you will also need to supply it with a water bottle and a food dish.",
        "label": 0,
    },
    "logiqa": {  # EleutherAI/logiqa's builder puts a space after every "." and strips
        "label": "a",
        "context": "In the planning of a new district in a township, it was decided to build a special community "
                   "in the southeast, northwest, centered on the citizen park. These four communities are "
                   "designated as cultural area, leisure area, commercial area and administrative service area. "
                   "It is known that the administrative service area is southwest of the cultural area, and the "
                   "cultural area is southeast of the leisure area.",
        "question": "Based on the above statement, which of the following can be derived?",
        "options": [
            "Civic Park is north of the administrative service area",
            "The leisure area is southwest of the cultural area",
            "The cultural district is in the northeast of the business district",
            "The business district is southeast of the leisure area",
        ],
    },
    "winogrande": {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    },
    "openbookqa": {
        "id": "8-343",
        "question_stem": "A person wants to start saving money so that they can afford a nice vacation at the end "
                         "of the year. After looking over their budget and expenses, they decide the best way to "
                         "save money is to",
        "choices": {
            "text": ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
                     "have lunch with friends"],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "B",
    },
    "arc_easy": {
        "id": "Mercury_417466",
        "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
        "choices": {
            "text": ["Sunlight is the source of energy for nearly all ecosystems.",
                     "Most ecosystems are found on land instead of in water.",
                     "Carbon dioxide is more available than other gases.",
                     "The producers in all ecosystems are plants."],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "A",
    },
    "arc_challenge": {
        "id": "Mercury_7175875",
        "question": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the "
                    "most likely effect of this increase in rotation?",
        "choices": {
            "text": ["Planetary density will decrease.", "Planetary years will become longer.",
                     "Planetary days will become shorter.", "Planetary gravity will become stronger."],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "C",
    },
    "sciq": {
        "question": "Compounds that are capable of accepting electrons, such as o 2 or f2, are called what?",
        "distractor3": "residues",
        "distractor1": "antioxidants",
        "distractor2": "Oxygen",
        "correct_answer": "oxidants",
        "support": "Oxidants and Reductants Compounds that are capable of accepting electrons, such as O 2 or F2, "
                   "are calledoxidants (or oxidizing agents) because they can oxidize other compounds. In the "
                   "process of accepting electrons, an oxidant is reduced. Compounds that are capable of donating "
                   "electrons, such as sodium metal or cyclohexane (C6H12), are calledreductants (or reducing "
                   "agents) because they can cause the reduction of another compound. In the process of donating "
                   "electrons, a reductant is oxidized. These relationships are summarized in Equation 3.30: "
                   "Equation 3.30 Saylor URL: http://www. saylor. org/books.",
    },
    "rte": {
        "sentence1": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                     "according to the Christopher Reeve Foundation.",
        "sentence2": "Christopher Reeve had an accident.",
        "label": 1,
        "idx": 0,
    },
    "boolq": {  # the Hub passage starts with the Wikipedia title, which the mirror lost
        "question": "does ethanol take more energy make that produces",
        "passage": "Ethanol fuel -- All biomass goes through at least some of these steps: it needs to be grown, "
                   "collected, dried, fermented, distilled, and burned. All of these steps require resources and "
                   "an infrastructure. The total amount of energy input into the process compared to the energy "
                   "released by burning the resulting ethanol fuel is known as the energy balance (or ``energy "
                   "returned on energy invested''). Figures compiled in a 2007 report by National Geographic "
                   "Magazine point to modest results for corn ethanol produced in the US: one unit of fossil-fuel "
                   "energy is required to create 1.3 energy units from the resulting ethanol. The energy balance "
                   "for sugarcane ethanol produced in Brazil is more favorable, with one unit of fossil-fuel energy "
                   "required to create 8 from the ethanol. Energy balance estimates are not easily produced, thus "
                   "numerous such reports have been generated that are contradictory. For instance, a separate "
                   "survey reports that production of ethanol from sugarcane, which requires a tropical climate to "
                   "grow productively, returns from 8 to 9 units of energy for each unit expended, as compared to "
                   "corn, which only returns about 1.34 units of fuel energy for each unit of energy expended. A "
                   "2006 University of California Berkeley study, after analyzing six separate studies, concluded "
                   "that producing ethanol from corn uses much less petroleum than producing gasoline.",
        "idx": 0,
        "label": 0,
    },
    "hellaswag": {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
        "source_id": "activitynet~v_-JhWjGDPHMY",
        "split": "val",
        "split_type": "indomain",
        "label": "3",
    },
}


@pytest.fixture(scope="session")
def mirror_tasks(tmp_path_factory, data_mirror):
    """All mirror tasks generated once, and one TaskManager that sees them (its index takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    tasks_dir = tmp_path_factory.mktemp("lmeval_tasks")
    prepared = zeroshot.prepare_mirror_tasks(list(zeroshot.MIRROR_TASKS), data_mirror, tasks_dir)
    manager = TaskManager(include_path=str(tasks_dir))
    return SimpleNamespace(dir=tasks_dir, prepared={p.task: p for p in prepared}, manager=manager)


@pytest.fixture(scope="session")
def loaded_mirror_tasks(mirror_tasks):
    return mirror_tasks.manager.load(sorted(mirror_tasks.prepared))["tasks"]


def _upstream_task(upstream: str, record: dict):
    """lm-eval's own task config, unchanged, reading one hand-built Hub record instead of the Hub."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(zeroshot.upstream_yaml_path(upstream), resolve_func=True, recursive=True)
    # every split the upstream config names holds the record, so its config needs no change
    splits = {config.get(key) for key in ("training_split", "validation_split", "test_split")} - {None}
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {split: datasets.Dataset.from_list([record]) for split in splits})
    return ConfigurableTask(config=config)


# ------------------------------------------------------------------------------ task names


def test_task_sets_expand_in_order_without_duplicates():
    assert zeroshot.resolve_task_names("paper") == ["hellaswag", "openbookqa", "piqa", "sciq", "logiqa"]
    wanda = zeroshot.resolve_task_names(["wanda"])
    assert wanda == ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    assert zeroshot.resolve_task_names(["paper", "wanda"])[:5] == list(zeroshot.PAPER_TASKS)
    assert len(zeroshot.resolve_task_names(["paper", "wanda"])) == 10
    assert zeroshot.resolve_task_names("piqa, mmlu,piqa") == ["piqa", "mmlu"]
    with pytest.raises(ConfigError, match="no zero-shot tasks"):
        zeroshot.resolve_task_names(" , ")


def test_upstream_yaml_table_points_at_each_task():
    from lm_eval.tasks._yaml_loader import load_yaml

    for task in zeroshot.MIRROR_TASKS:
        cfg = load_yaml(zeroshot.upstream_yaml_path(task), resolve_func=False)
        assert cfg["task"] == task


def test_unknown_task_is_a_clear_error_online():
    manager = SimpleNamespace(all_tasks=["piqa", "sciq", "hellaswag"])
    with pytest.raises(ConfigError, match=r"unknown zero-shot task 'piqaa'.*Did you mean piqa.*paper=.*TaskManager"):
        zeroshot.check_task_names(["sciq", "piqaa"], manager)
    # evaluate_zeroshot checks names before touching the model
    with pytest.raises(ConfigError, match="'no_such_task'"):
        zeroshot.evaluate_zeroshot(None, None, ["no_such_task"], None, task_manager=manager)


def test_unknown_task_is_a_clear_error_with_mirror(tmp_path, data_mirror):
    with pytest.raises(ConfigError, match=r"'mmlu' has no copy in the offline data mirror.*piqa.*unset data_mirror"):
        zeroshot.prepare_mirror_tasks(["piqa", "mmlu"], data_mirror, tmp_path)
    assert not any(tmp_path.iterdir()), "nothing is written before all names are checked"


def test_missing_mirror_file_is_a_clear_error(tmp_path, data_mirror):
    mirror = tmp_path / "mirror"
    for entry in data_mirror.iterdir():
        if entry.is_dir():
            (mirror / entry.name).mkdir(parents=True)
            for item in entry.iterdir():
                if item.name != "valid-labels.lst":
                    os.symlink(item, mirror / entry.name / item.name)
        else:
            os.symlink(entry, mirror / entry.name)
    with pytest.raises(DataError, match=r"valid-labels\.lst is missing"):
        zeroshot.prepare_mirror_tasks(["piqa"], mirror, tmp_path / "tasks")
    with pytest.raises(DataError, match="nowhere"):
        zeroshot.prepare_mirror_tasks(["piqa"], tmp_path / "nowhere", tmp_path / "tasks")


# ------------------------------------------------------------------------------ generated configs


def test_generated_configs_override_only_the_data_source(mirror_tasks):
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    assert set(mirror_tasks.prepared) == set(README_COUNTS)
    for name, prepared in mirror_tasks.prepared.items():
        raw = yaml.safe_load(Path(prepared.config_path).read_text())
        assert set(raw) <= DATA_KEYS, name
        assert raw["dataset_path"] == "parquet" and raw["dataset_name"] is None
        merged = load_yaml(prepared.config_path, resolve_func=False)
        upstream = load_yaml(zeroshot.upstream_yaml_path(prepared.upstream), resolve_func=False)
        for key in set(upstream) | set(merged):
            if key not in DATA_KEYS:
                assert merged.get(key) == upstream.get(key), (name, key)
        assert merged["metadata"]["version"] == upstream["metadata"]["version"]
        assert merged["metadata"]["esparse_data_source"] == prepared.source


def test_approximate_mirror_tasks_never_carry_the_upstream_name(mirror_tasks):
    sources = {name: p.source for name, p in mirror_tasks.prepared.items()}
    assert sources.pop("hellaswag_mirror") == "mirror-approx"
    assert sources.pop("boolq_mirror") == "mirror-approx"
    assert set(sources.values()) == {"mirror"}
    assert all(p.task == p.upstream for p in mirror_tasks.prepared.values() if p.source == "mirror")
    # the upstream names still resolve to lm-eval's own (Hub) configs
    index = mirror_tasks.manager.task_index
    assert Path(index["hellaswag"].yaml_path) == zeroshot.upstream_yaml_path("hellaswag")
    assert Path(index["boolq"].yaml_path) == zeroshot.upstream_yaml_path("boolq")


def test_generated_configs_resolve_in_task_manager(mirror_tasks, loaded_mirror_tasks):
    index = mirror_tasks.manager.task_index
    for name, prepared in mirror_tasks.prepared.items():
        assert name in mirror_tasks.manager.all_subtasks
        assert Path(index[name].yaml_path) == Path(prepared.config_path)
    for name, task in loaded_mirror_tasks.items():
        assert len(task.eval_docs) == README_COUNTS[name] == mirror_tasks.prepared[name].n_records, name
        assert task.config.dataset_path == "parquet"


@pytest.mark.parametrize("name", sorted(README_COUNTS))
def test_documents_match_upstream_task_on_hand_built_hub_records(name, mirror_tasks, loaded_mirror_tasks):
    prepared = mirror_tasks.prepared[name]
    mirrored = loaded_mirror_tasks[name]
    upstream = _upstream_task(prepared.upstream, HUB_FIRST_RECORD[prepared.upstream])
    mine, theirs = mirrored.eval_docs[0], upstream.eval_docs[0]
    assert mirrored.doc_to_choice(mine) == upstream.doc_to_choice(theirs)
    assert mirrored.doc_to_target(mine) == upstream.doc_to_target(theirs)
    text, expected = mirrored.doc_to_text(mine), upstream.doc_to_text(theirs)
    if name == "boolq_mirror":  # known loss (data README): the passage's "Title -- " prefix
        assert expected == "Ethanol fuel -- " + text
    elif name == "hellaswag_mirror":  # known loss: ctx_b is not capitalised ("he" for lm-eval's "He")
        assert expected == "Roof shingle removal: A man is sitting on a roof. He"
        assert text == "Roof shingle removal: A man is sitting on a roof. he"
    else:
        assert text == expected
        assert dict(mine) == HUB_FIRST_RECORD[name]


# ------------------------------------------------------------------------------ evaluation


def test_limit_groups_and_parsing():
    names = ["piqa", "hellaswag_mirror", "rte"]
    aliases = {"hellaswag": "hellaswag_mirror"}
    assert zeroshot._limit_groups(names, 5, aliases) == [(5, names)]
    assert zeroshot._limit_groups(names, {"hellaswag": 2, "piqa": 2}, aliases) == [
        (2, ["piqa", "hellaswag_mirror"]), (None, ["rte"])]
    with pytest.raises(ConfigError, match="'sciq'"):
        zeroshot._limit_groups(names, {"sciq": 3}, aliases)
    with pytest.raises(ConfigError, match="positive"):
        zeroshot._limit_groups(names, 0, aliases)
    assert zeroshot._parse_limit(["50"]) == 50
    assert zeroshot._parse_limit(["piqa=10", "sciq=none"]) == {"piqa": 10, "sciq": None}
    assert zeroshot._parse_limit(None) is None


def test_tidy_rows_from_lm_eval_results():
    results = {
        "results": {
            "piqa": {"alias": "piqa", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
                     "acc_norm_stderr,none": 0.2},
            "rte": {"alias": "rte", "acc,none": 1.0, "acc_stderr,none": "N/A"},
        },
        "n-samples": {"piqa": {"original": 1838, "effective": 4}, "rte": {"original": 277, "effective": 1}},
        "esparse": {"tasks": {"piqa": {"source": "mirror"}}},
    }
    rows = zeroshot.tidy_rows(results, "m", "wanda", "2:4")
    assert [(r["task"], r["metric"], r["value"], r["stderr"], r["n"], r["source"]) for r in rows] == [
        ("piqa", "acc", 0.5, 0.1, 4, "mirror"),
        ("piqa", "acc_norm", 0.25, 0.2, 4, "mirror"),
        ("rte", "acc", 1.0, None, 1, "hub"),
    ]
    assert all(tuple(r) == zeroshot.TIDY_COLUMNS for r in rows)


def test_evaluate_zeroshot_end_to_end_on_tiny_model(tmp_path, mirror_tasks, tiny_model_dirs, data_mirror):
    """Saved tiny LLaMA -> run_zeroshot (which calls evaluate_zeroshot) on 2 tasks, limit 4."""
    out_json = tmp_path / "zs" / "dense.json"
    results = zeroshot.run_zeroshot(
        tiny_model_dirs["llama"], out_json, ["piqa", "hellaswag"], data_mirror, limit=4, batch_size=4,
        tasks_dir=mirror_tasks.dir, task_manager=mirror_tasks.manager, method="dense", pattern="dense",
        model_name="tiny-llama",
    )
    assert json.loads(out_json.read_text()) == results
    assert set(results["results"]) == {"piqa", "hellaswag_mirror"}
    for task, total in (("piqa", 1838), ("hellaswag_mirror", 10042)):
        assert results["n-samples"][task] == {"original": total, "effective": 4}
        metrics = results["results"][task]
        assert 0.0 <= metrics["acc,none"] <= 1.0 and 0.0 <= metrics["acc_norm,none"] <= 1.0
        assert results["configs"][task]["dataset_path"] == "parquet"
        assert len(results["task_hashes"][task]) == 64
    assert results["config"]["limit"] == 4
    assert results["versions"]["piqa"] == 1.0
    assert "samples" not in results
    assert results["esparse"]["tasks"]["hellaswag_mirror"]["source"] == "mirror-approx"
    assert results["esparse"]["tasks"]["piqa"]["dataset_source"]["files"]

    with open(out_json.with_suffix(".csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["task"], r["metric"], r["source"], r["n"]) for r in rows] == [
        ("hellaswag_mirror", "acc", "mirror-approx", "4"),
        ("hellaswag_mirror", "acc_norm", "mirror-approx", "4"),
        ("piqa", "acc", "mirror", "4"),
        ("piqa", "acc_norm", "mirror", "4"),
    ]
    assert {r["model"] for r in rows} == {"tiny-llama"}


def test_per_task_limits_in_memory_model(mirror_tasks, tiny_model_dirs, data_mirror):
    from esparse.models import load_model

    model, tokenizer = load_model(tiny_model_dirs["llama"])
    results = zeroshot.evaluate_zeroshot(
        model, tokenizer, ["rte", "winogrande"], data_mirror, limit={"rte": 3, "winogrande": 2},
        batch_size=2, device="cpu", seed=0, tasks_dir=mirror_tasks.dir, task_manager=mirror_tasks.manager,
        keep_samples=True,
    )
    assert results["n-samples"]["rte"]["effective"] == 3
    assert results["n-samples"]["winogrande"]["effective"] == 2
    assert results["config"]["limit"] == {"rte": 3, "winogrande": 2}
    assert [s["doc_id"] for s in results["samples"]["rte"]] == [0, 1, 2]
    assert results["config"]["random_seed"] == 0
    assert set(results["task_hashes"]) == {"rte", "winogrande"}
    json.dumps(results)


def test_hub_tasks_record_their_hub_coordinates():
    piqa = zeroshot._hub_task("piqa")
    assert (piqa.task, piqa.source) == ("piqa", "hub")
    assert piqa.dataset_source["hub_id"] == "baber/piqa"
    assert zeroshot._hub_task("mmlu").dataset_source == {}


def test_task_manager_without_the_generated_configs_is_refused(tmp_path, data_mirror):
    upstream_only = SimpleNamespace(
        task_index={"piqa": SimpleNamespace(yaml_path=zeroshot.upstream_yaml_path("piqa"))},
        all_tasks=["piqa"],
    )
    with pytest.raises(ConfigError, match=r"does not resolve \['piqa'\] to the generated mirror configs"):
        zeroshot.evaluate_zeroshot(None, None, ["piqa"], data_mirror, tasks_dir=tmp_path, task_manager=upstream_only)
