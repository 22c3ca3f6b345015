"""Pruning time of E-Sparse against Wanda, measured in one process (issue 3's budget: at most 1.5x).

    esparse prune-bench --model resources/models/smollm2-135m \
        --calibration results/calibration/smollm2-135m/tokens.safetensors \
        --patterns 2:4,4:8,unstructured50 --repeats 3 --out results/prune_bench.json

For every pattern, each repeat prunes the same loaded model (weights restored between runs) with
Wanda and then with E-Sparse, with the configuration's method settings, the same calibration tokens,
device and thread count. The pairs alternate so that a drifting machine slows both methods of a
pair alike; the ratio quoted is the median of the per-pair ratios. The mask digests are those of the
pipeline's pruning records (`masks_sha256`): equal across repeats (determinism) and, for the
pipeline's own calibration file, equal to its `prune.json`. Timings are the driver's own
(`summary.seconds`: statistics, scores, shuffle, masks and block forwards; not model loading).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from . import cpu_kernels
from .errors import ConfigError
from .io import sha256_tensor, write_json

BUDGET = 1.5
METHODS = ("wanda", "esparse")


def run_prune_benchmark(model_dir: str, calibration: str, patterns: list[str], repeats: int,
                        settings: dict[str, dict], dtype: str = "float32", device: str = "cpu",
                        threads: int | None = None, max_blocks: int | None = None, report=print) -> dict:
    from .models import load_model
    from .pipeline import load_calibration_tokens
    from .pruning.driver import prune_model
    from .pruning.methods import build_method
    from .pruning.pattern import SparsityPattern

    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    parsed = [SparsityPattern.parse(text) for text in patterns]
    methods = {name: build_method(name, settings.get(name, {})) for name in METHODS}
    if threads is not None:
        torch.set_num_threads(threads)
    tokens = load_calibration_tokens(calibration)
    model, _ = load_model(model_dir, dtype=dtype, device="cpu")
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rows = []
    for pattern in parsed:
        for repeat in range(repeats):
            pair = {}
            for name, method in methods.items():
                model.load_state_dict(original)
                outcome = prune_model(model, method, pattern, tokens, device=device, progress=False,
                                      max_blocks=max_blocks)
                pair[name] = outcome
                rows.append({
                    "pattern": pattern.label, "repeat": repeat, "method": name,
                    "seconds": outcome.summary["seconds"],
                    "masks_sha256": sha256_tensor(torch.cat([m.flatten() for m in outcome.masks.values()])),
                })
            ratio = pair["esparse"].summary["seconds"] / pair["wanda"].summary["seconds"]
            report(f"{pattern.label} repeat {repeat}: wanda {pair['wanda'].summary['seconds']:.2f} s, "
                   f"esparse {pair['esparse'].summary['seconds']:.2f} s, ratio {ratio:.3f}")
    summary = []
    for pattern in parsed:
        mine = [row for row in rows if row["pattern"] == pattern.label]
        seconds = {name: [row["seconds"] for row in mine if row["method"] == name] for name in METHODS}
        ratios = [e / w for w, e in zip(seconds["wanda"], seconds["esparse"])]
        digests = {name: sorted({row["masks_sha256"] for row in mine if row["method"] == name}) for name in METHODS}
        summary.append({
            "pattern": pattern.label,
            "wanda_median_seconds": statistics.median(seconds["wanda"]),
            "esparse_median_seconds": statistics.median(seconds["esparse"]),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "within_budget": statistics.median(ratios) <= BUDGET,
            "masks_identical_across_repeats": all(len(values) == 1 for values in digests.values()),
        })
    return {
        "what": "E-Sparse / Wanda pruning time, pairs alternating in one process",
        "budget": BUDGET,
        "model": str(model_dir),
        "calibration": str(calibration),
        "calibration_tokens": list(tokens.shape),
        "settings": {name: method.settings() for name, method in methods.items()},
        "device": device,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "max_blocks": max_blocks,
        "repeats": repeats,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"machine": platform.machine(), "processor": platform.processor(), "cpus": _cpu_count()},
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "cpu_kernels": cpu_kernels.describe()},
        "summary": summary,
        "runs": rows,
    }


def _cpu_count() -> int | None:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a prepared HF model directory (resources/models/NAME)")
    parser.add_argument("--calibration", required=True, help="tokens.safetensors written by the calibrate rule")
    parser.add_argument("--patterns", default="2:4,4:8,unstructured50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=None, help="prune only the first blocks (a quicker look)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: the configuration's dtype")
    parser.add_argument("--threads", type=int, default=None, help="default: the configuration's threads")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="configuration overrides, as snakemake --config (e.g. preset=default)")
    parser.add_argument("--out", required=True, help="JSON file to write")


def run_cli(args: argparse.Namespace) -> int:
    from .config import parse_assignments, resolve_config

    config = resolve_config(parse_assignments(args.config, "--config", "preset=default"))
    settings = {name: config["method_settings"].get(name, {}) for name in METHODS}
    record = run_prune_benchmark(args.model, args.calibration, [p.strip() for p in args.patterns.split(",") if p.strip()],
                                 args.repeats, settings, dtype=args.dtype or config["dtype"], device=args.device,
                                 threads=args.threads or config["threads"], max_blocks=args.blocks)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    for row in record["summary"]:
        verdict = "within" if row["within_budget"] else "OVER"
        print(f"{row['pattern']}: E-Sparse / Wanda = {row['ratio_median']:.3f} median "
              f"({row['ratio_min']:.3f}-{row['ratio_max']:.3f}); wanda {row['wanda_median_seconds']:.1f} s, "
              f"esparse {row['esparse_median_seconds']:.1f} s; {verdict} the {BUDGET}x budget; "
              f"masks identical across repeats: {row['masks_identical_across_repeats']}")
    print(json.dumps({"out": args.out}))
    return 0
