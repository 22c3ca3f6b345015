"""Zero-shot evaluation with upstream lm-evaluation-harness tasks, from the Hub or the offline mirror.

Online (no mirror) the upstream task configs run unchanged. With a mirror, every task gets a
generated YAML config that `include`s the upstream one and overrides only where the data come
from: the mirror's records, converted to the Hub schema by `esparse.data.load_records`, are
saved as parquet next to the config and loaded with `datasets`' packaged parquet builder.
Prompts, choices, targets and metrics therefore stay lm-eval's own. Where the mirror cannot
reproduce the Hub records exactly (data README: hellaswag, boolq) the generated task is named
`<task>_mirror`, so it is never reported under the upstream name.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from esparse.errors import ConfigError, DataError
from esparse.io import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

PAPER_TASKS: tuple[str, ...] = ("hellaswag", "openbookqa", "piqa", "sciq", "logiqa")
WANDA_TASKS: tuple[str, ...] = (
    "boolq",
    "rte",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)
TASK_SETS: dict[str, tuple[str, ...]] = {"paper": PAPER_TASKS, "wanda": WANDA_TASKS}

# Suffix of generated tasks whose mirror data only approximate the Hub records.
APPROX_SUFFIX = "_mirror"

# Upstream task -> its YAML inside lm_eval/tasks (checked against lm-eval's TaskManager index in
# the tests; looked up in the index if a future lm-eval moves a file).
UPSTREAM_YAML: dict[str, str] = {
    "piqa": "piqa/piqa.yaml",
    "logiqa": "logiqa/logiqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "sciq": "sciq/sciq.yaml",
    "rte": "glue/rte/default.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}
MIRROR_TASKS: tuple[str, ...] = tuple(UPSTREAM_YAML)

TIDY_METRICS: tuple[str, ...] = ("acc", "acc_norm")
TIDY_COLUMNS: tuple[str, ...] = (
    "model",
    "method",
    "pattern",
    "task",
    "metric",
    "value",
    "stderr",
    "n",
    "source",
)


# ------------------------------------------------------------------------------ task names


def resolve_task_names(tasks: str | Sequence[str]) -> list[str]:
    """Expand task-set names (`paper`, `wanda`) and comma lists into task names, first occurrence kept."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"task names must be strings, got {item!r}")
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            for name in TASK_SETS.get(part, (part,)):
                if name not in names:
                    names.append(name)
    if not names:
        raise ConfigError(f"no zero-shot tasks given ({tasks!r}); use a set {sorted(TASK_SETS)} or lm-eval task names")
    return names


def _unknown_task_error(name: str, known: Sequence[str], mirror: bool) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    if mirror:
        return ConfigError(
            f"zero-shot task {name!r} has no copy in the offline data mirror.{hint} "
            f"With data_mirror set, the allowed tasks are {', '.join(MIRROR_TASKS)} "
            f"(sets: {', '.join(f'{k}={list(v)}' for k, v in TASK_SETS.items())}); "
            "unset data_mirror to run other lm-eval tasks from the Hugging Face Hub."
        )
    return ConfigError(
        f"unknown zero-shot task {name!r}.{hint} Allowed: the sets "
        f"{', '.join(f'{k}={list(v)}' for k, v in TASK_SETS.items())}, or any task, group or tag "
        "that lm-eval's TaskManager lists (`lm_eval ls tasks`)."
    )


def check_task_names(names: Sequence[str], task_manager: Any) -> None:
    """Raise ConfigError for any name lm-eval's TaskManager does not know."""
    known = set(task_manager.all_tasks)
    for name in names:
        if name not in known:
            raise _unknown_task_error(name, sorted(known), mirror=False)


# ------------------------------------------------------------------------- mirror task configs


def _lm_eval_tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def upstream_yaml_path(task: str) -> Path:
    """The YAML file that defines lm-eval's own `task`."""
    path = _lm_eval_tasks_root() / UPSTREAM_YAML[task]
    if path.is_file():
        return path
    from lm_eval.tasks import TaskManager

    entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ConfigError(f"lm-eval {_lm_eval_version()} has no YAML config for task {task!r}")
    return Path(entry.yaml_path)


def _lm_eval_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")


def _eval_split(upstream_cfg: Mapping[str, Any], task: str) -> str:
    """The split lm-eval evaluates: the test split when the task defines one, else validation."""
    split = upstream_cfg.get("test_split") or upstream_cfg.get("validation_split")
    if not split:
        raise ConfigError(f"lm-eval task {task!r} defines neither a test nor a validation split")
    return split


@dataclass
class PreparedTask:
    """One task as lm-eval will run it, with where its data come from."""

    requested: str
    task: str
    upstream: str
    source: str
    split: str | None = None
    n_records: int | None = None
    config_path: str | None = None
    data_file: str | None = None
    data_sha256: str | None = None
    dataset_source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "task": self.task,
            "upstream": self.upstream,
            "source": self.source,
            "split": self.split,
            "n_records": self.n_records,
            "config_path": self.config_path,
            "data_file": self.data_file,
            "data_sha256": self.data_sha256,
            "dataset_source": self.dataset_source,
        }


def _hub_task(name: str) -> PreparedTask:
    """An upstream task run unchanged from the Hub; Hub coordinates recorded where esparse.data knows them."""
    info: dict[str, Any] = {}
    if name in UPSTREAM_YAML:
        from esparse.data import dataset_source

        info = _jsonable(dataset_source(name, None))
    return PreparedTask(requested=name, task=name, upstream=name, source="hub", dataset_source=info)


def _mirror_upstream_name(name: str) -> str | None:
    if name in UPSTREAM_YAML:
        return name
    if name.endswith(APPROX_SUFFIX) and name[: -len(APPROX_SUFFIX)] in UPSTREAM_YAML:
        return name[: -len(APPROX_SUFFIX)]
    return None


def prepare_mirror_tasks(
    names: Sequence[str], mirror: str | os.PathLike, tasks_dir: str | os.PathLike
) -> list[PreparedTask]:
    """Write one lm-eval task config + parquet file per task under `tasks_dir`, reading the mirror.

    Each config includes the upstream YAML and overrides only the data source: `dataset_path`
    (parquet), `dataset_name`, `dataset_kwargs` (the parquet file), and the split keys (the
    mirror holds only the split lm-eval evaluates, so the others are set to null; zero-shot
    never draws few-shot examples).
    """
    from esparse.data import dataset_source, load_records

    mirror_path = Path(mirror)
    if not mirror_path.is_dir():
        raise DataError(f"data mirror {str(mirror_path)!r} is not a directory (set data_mirror to the mirror folder)")
    upstream_names = []
    for name in names:
        upstream = _mirror_upstream_name(name)
        if upstream is None:
            raise _unknown_task_error(name, MIRROR_TASKS, mirror=True)
        if upstream not in upstream_names:
            upstream_names.append(upstream)

    from lm_eval.tasks._yaml_loader import load_yaml

    out_root = Path(tasks_dir).resolve()
    prepared: list[PreparedTask] = []
    for upstream in upstream_names:
        source_info = dict(dataset_source(upstream, mirror_path))
        source = source_info.get("source")
        if source not in ("mirror", "mirror-approx"):
            raise DataError(f"esparse.data reports source {source!r} for {upstream!r} from mirror {str(mirror_path)!r}")
        task_name = upstream if source == "mirror" else upstream + APPROX_SUFFIX
        include = upstream_yaml_path(upstream)
        upstream_cfg = load_yaml(include, resolve_func=False, recursive=True)
        split = _eval_split(upstream_cfg, upstream)

        records = load_records(upstream, mirror_path)
        if len(records) == 0:
            raise DataError(f"mirror records for {upstream!r} are empty ({str(mirror_path)!r})")
        task_dir = out_root / task_name
        task_dir.mkdir(parents=True, exist_ok=True)
        data_file = task_dir / f"{split}.parquet"
        with atomic_path(data_file) as tmp:
            records.to_parquet(str(tmp))
        data_sha = sha256_file(data_file)

        metadata = dict(upstream_cfg.get("metadata") or {})
        metadata.update(
            {
                "esparse_data_source": source,
                "esparse_upstream_task": upstream,
                "esparse_data_sha256": data_sha,
            }
        )
        overrides: dict[str, Any] = {
            "include": str(include),
            "task": task_name,
            "dataset_path": "parquet",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {split: str(data_file)}},
            "training_split": None,
            "validation_split": split if upstream_cfg.get("validation_split") == split else None,
            "test_split": split if upstream_cfg.get("test_split") == split else None,
            "metadata": metadata,
        }
        if task_name != upstream:
            # An approximate copy must not join the upstream task's tag groups either.
            overrides["tag"] = None
        header = (
            f"# Generated by esparse.zeroshot: lm-eval {_lm_eval_version()} task {upstream!r} "
            f"with its data read from the offline mirror ({source}).\n"
            "# Everything except the data source is inherited from the included upstream YAML.\n"
        )
        config_path = task_dir / f"{task_name}.yaml"
        with atomic_path(config_path) as tmp:
            tmp.write_text(header + yaml.safe_dump(overrides, sort_keys=False))

        prepared.append(
            PreparedTask(
                requested=upstream,
                task=task_name,
                upstream=upstream,
                source=source,
                split=split,
                n_records=len(records),
                config_path=str(config_path),
                data_file=str(data_file),
                data_sha256=data_sha,
                dataset_source=_jsonable(source_info),
            )
        )
    return prepared


# ------------------------------------------------------------------------------ evaluation


def _jsonable(payload: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(payload, default=handle_non_serializable, ensure_ascii=False))


def task_hashes(samples: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, str]:
    """Per-task hash over logged samples, computed as lm-eval's EvaluationTracker does."""
    from lm_eval.utils import hash_string

    return {
        task: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in rows))
        for task, rows in samples.items()
    }


def _limit_groups(
    task_names: Sequence[str], limit: int | Mapping[str, int | None] | None, aliases: Mapping[str, str]
) -> list[tuple[int | None, list[str]]]:
    """Group lm-eval task names by their document limit (lm-eval takes one limit per call)."""
    if limit is None or isinstance(limit, int):
        if isinstance(limit, bool) or (isinstance(limit, int) and limit <= 0):
            raise ConfigError(f"zero-shot limit must be a positive integer or null, got {limit!r}")
        return [(limit, list(task_names))]
    if not isinstance(limit, Mapping):
        raise ConfigError(f"zero-shot limit must be null, an integer or a per-task mapping, got {limit!r}")
    per_task: dict[str, int | None] = {}
    for key, value in limit.items():
        task = aliases.get(key, key)
        if task not in task_names:
            raise ConfigError(f"zero-shot limit names task {key!r}, which is not among the tasks run: {list(task_names)}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(f"zero-shot limit for {key!r} must be a positive integer or null, got {value!r}")
        per_task[task] = value
    groups: dict[int | None, list[str]] = {}
    for task in task_names:
        groups.setdefault(per_task.get(task), []).append(task)
    return list(groups.items())


# Top-level keys of lm-eval's result that are dicts keyed by task name (merged across calls).
_PER_TASK_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "samples")


def _merge_results(parts: list[dict[str, Any]], limits: dict[str, int | None]) -> dict[str, Any]:
    merged = dict(parts[0])
    for part in parts[1:]:
        for key in _PER_TASK_KEYS:
            if key in part:
                merged.setdefault(key, {}).update(part[key])
    if len(parts) > 1:
        merged["config"] = dict(merged["config"], limit=limits)
    return merged


def _indexes_config(task_manager: Any, task: str, config_path: str | None) -> bool:
    """Whether `task_manager` resolves `task` to the generated config (not lm-eval's Hub one)."""
    entry = task_manager.task_index.get(task)
    if entry is None or entry.yaml_path is None or config_path is None:
        return False
    return Path(entry.yaml_path).resolve() == Path(config_path).resolve()


@contextlib.contextmanager
def _tasks_directory(tasks_dir: str | os.PathLike | None) -> Iterator[Path]:
    if tasks_dir is not None:
        path = Path(tasks_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="esparse-lmeval-tasks-") as tmp:
            yield Path(tmp)


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str],
    mirror: str | os.PathLike | None,
    limit: int | Mapping[str, int | None] | None = None,
    batch_size: int | str = 8,
    device: str | None = None,
    seed: int | None = None,
    tasks_dir: str | os.PathLike | None = None,
    keep_samples: bool = False,
    task_manager: Any = None,
) -> dict[str, Any]:
    """Run lm-eval on an in-memory causal LM; return lm-eval's result dict (JSON-serialisable).

    `tasks`: set names (`paper`, `wanda`) and/or lm-eval task names. `mirror`: the offline data
    folder, or None for the Hub. `limit`: documents per task (lm-eval's first-N semantics), one
    integer or a per-task mapping. `seed`: None keeps lm-eval's default seeds, an integer sets all
    four (python, numpy, torch, few-shot). `tasks_dir`: where generated mirror task configs go
    (a temporary folder if None). The result adds `task_hashes` (as lm-eval's tracker computes
    them) and `esparse` (data source per task, limits); per-document `samples` are dropped unless
    `keep_samples`.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = resolve_task_names(tasks)
    with _tasks_directory(tasks_dir) as generated_dir:
        if mirror is not None:
            prepared = prepare_mirror_tasks(names, mirror, generated_dir)
            if task_manager is None:
                task_manager = TaskManager(include_path=str(generated_dir))
            missing = [p.task for p in prepared if not _indexes_config(task_manager, p.task, p.config_path)]
            if missing:
                raise ConfigError(
                    f"the TaskManager does not resolve {missing} to the generated mirror configs; "
                    f"pass task_manager=None or one built with include_path={str(generated_dir)!r}"
                )
        else:
            if task_manager is None:
                task_manager = TaskManager()
            check_task_names(names, task_manager)
            prepared = [_hub_task(n) for n in names]

        run_names = [p.task for p in prepared]
        aliases = {p.requested: p.task for p in prepared}
        groups = _limit_groups(run_names, limit, aliases)

        if device is not None:
            model.to(device)
        model.eval()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        seeds: dict[str, Any] = {}
        if seed is not None:
            seeds = dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)

        parts = []
        for group_limit, group_tasks in groups:
            part = lm_eval.simple_evaluate(
                model=lm,
                tasks=group_tasks,
                task_manager=task_manager,
                limit=group_limit,
                batch_size=batch_size,
                device=device,
                log_samples=True,
                **seeds,
            )
            parts.append(part)
        limits = {task: group_limit for group_limit, group_tasks in groups for task in group_tasks}
        results = _merge_results(parts, limits)

        samples = results.pop("samples", {}) or {}
        results["task_hashes"] = task_hashes(samples)
        if keep_samples:
            results["samples"] = samples
        results["esparse"] = {
            "requested_tasks": tasks if isinstance(tasks, str) else list(tasks),
            "mirror": str(Path(mirror).resolve()) if mirror is not None else None,
            "tasks_dir": str(generated_dir) if tasks_dir is not None else None,
            "limit": limits,
            "tasks": {p.task: p.to_json() for p in prepared},
        }
        return _jsonable(results)


# ------------------------------------------------------------------------------ tidy table


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def tidy_rows(results: Mapping[str, Any], model: str, method: str, pattern: str) -> list[dict[str, Any]]:
    """One row per (task, metric) for acc and acc_norm, with the data source of each task."""
    sources = {t: info.get("source", "hub") for t, info in results.get("esparse", {}).get("tasks", {}).items()}
    n_samples = results.get("n-samples", {})
    rows = []
    for task in sorted(results.get("results", {})):
        metrics = results["results"][task]
        for metric in TIDY_METRICS:
            key = f"{metric},none"
            if key not in metrics:
                continue
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "pattern": pattern,
                    "task": task,
                    "metric": metric,
                    "value": _number_or_none(metrics[key]),
                    "stderr": _number_or_none(metrics.get(f"{metric}_stderr,none")),
                    "n": (n_samples.get(task) or {}).get("effective"),
                    "source": sources.get(task, "hub"),
                }
            )
    return rows


def write_tidy_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(TIDY_COLUMNS))
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in TIDY_COLUMNS})


# ------------------------------------------------------------------------------ entry point


def run_zeroshot(
    model_dir: str | os.PathLike,
    out_json: str | os.PathLike,
    tasks: str | Sequence[str],
    mirror: str | os.PathLike | None,
    limit: int | Mapping[str, int | None] | None = None,
    batch_size: int | str = 8,
    device: str | None = "cpu",
    seed: int | None = None,
    out_csv: str | os.PathLike | None = None,
    tasks_dir: str | os.PathLike | None = None,
    model_name: str | None = None,
    method: str = "dense",
    pattern: str = "dense",
    dtype: str = "float32",
    task_manager: Any = None,
    provenance_block: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load `model_dir`, evaluate, write lm-eval's JSON to `out_json` and the tidy CSV beside it.

    Generated mirror task configs go to `tasks_dir` (default: `<out_json stem>.tasks/` next to
    `out_json`); the CSV defaults to `out_json` with suffix `.csv`.
    """
    out_json = Path(out_json)
    if tasks_dir is None and mirror is not None:
        tasks_dir = out_json.with_name(out_json.stem + ".tasks")
    from esparse.models import load_model

    model, tokenizer = load_model(model_dir, dtype=dtype, device=device or "cpu")
    results = evaluate_zeroshot(
        model,
        tokenizer,
        tasks,
        mirror,
        limit=limit,
        batch_size=batch_size,
        device=device,
        seed=seed,
        tasks_dir=tasks_dir,
        task_manager=task_manager,
    )
    results["esparse"]["model_dir"] = str(Path(model_dir).resolve())
    if provenance_block is not None:
        results["esparse"]["provenance"] = dict(provenance_block)
    write_json(out_json, results)
    rows = tidy_rows(results, model_name or Path(model_dir).name, method, pattern)
    write_tidy_csv(out_csv if out_csv is not None else out_json.with_suffix(".csv"), rows)
    return results


def _parse_limit(values: Sequence[str] | None) -> int | dict[str, int | None] | None:
    """`--limit 50` -> 50; `--limit piqa=100 --limit sciq=none` -> per-task mapping."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return None if values[0].lower() in ("none", "null") else int(values[0])
    per_task: dict[str, int | None] = {}
    for value in values:
        task, sep, count = value.partition("=")
        if not sep:
            raise ConfigError(f"--limit {value!r}: give one integer, or task=N pairs")
        per_task[task.strip()] = None if count.lower() in ("none", "null") else int(count)
    return per_task


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lm-eval zero-shot evaluation of a saved model")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True, help="lm-eval result JSON to write")
    parser.add_argument("--csv", default=None, help="tidy CSV (default: --out with .csv)")
    parser.add_argument("--tasks", nargs="+", default=["paper"], help="task sets (paper, wanda) or lm-eval task names")
    parser.add_argument("--mirror", default=None, help="offline data mirror folder (omit to use the Hub)")
    parser.add_argument("--limit", nargs="*", default=None, help="N, or task=N pairs")
    parser.add_argument("--batch-size", default="8")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tasks-dir", default=None)
    parser.add_argument("--model-name", default=None)
    parser.add_argument("--method", default="dense")
    parser.add_argument("--pattern", default="dense")
    args = parser.parse_args(argv)
    batch_size: int | str = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
    run_zeroshot(
        args.model_dir,
        args.out,
        args.tasks,
        args.mirror,
        limit=_parse_limit(args.limit),
        batch_size=batch_size,
        device=args.device,
        seed=args.seed,
        out_csv=args.csv,
        tasks_dir=args.tasks_dir,
        model_name=args.model_name,
        method=args.method,
        pattern=args.pattern,
        dtype=args.dtype,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
