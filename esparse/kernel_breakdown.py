"""Where a CUDA-graph decode step spends its GPU time: kernel times from a profiler trace, by category.

The whole-model ratio (dense step / 2:4 step) is bounded by what the step spends outside its linear
layers (attention, norms, RoPE, SiLU, the activation gathers): those kernels are the same for both
models. This module turns the kernel events of a `torch.profiler` trace of `replays` graph replays
into per-step times per kernel and per category, plus the busy time (the union of the kernels'
intervals), so that the step's median minus the busy time shows the GPU's idle gaps.

`summarize_kernels` is a pure function of the trace events (Chrome-trace dicts with `name`, `ts`
and `dur` in microseconds); `profile_graph_kernels` records them on the GPU.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

# first match wins: the 2:4 kernels and attention before the dense GEMMs (CUTLASS's sparse GEMM and
# PyTorch's memory-efficient attention have "cutlass" in their names too)
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("2:4 GEMM, decode kernel", r"sp24_mma_kernel"),
    ("2:4 GEMM, CUTLASS", r"cutlass.*Sparse|Sparse.*cutlass"),
    ("2:4 GEMM, Triton", r"_sp24_(gemv|dot)_kernel"),
    ("2:4 decompression", r"_sp24_decompress_kernel"),
    ("activation gather (permutation)", r"sp24_stage_kernel|permute_columns_kernel"),
    ("attention", r"flash|fmha|attention|attn|sdpa|softmax"),
    ("dense GEMM", r"gemm|gemv|nvjet|xmma|cublas|cutlass|splitKreduce"),
    ("norm, RoPE, SiLU (fused Triton)", r"_add_rms_norm_kernel|_rope_cache_kernel|_silu_mul_kernel"),
    ("other", r""),
)
_PATTERNS = tuple((category, re.compile(pattern, re.IGNORECASE)) for category, pattern in KERNEL_CATEGORIES)


def classify_kernel(name: str) -> str:
    """The category of a kernel name (KERNEL_CATEGORIES, first match)."""
    for category, pattern in _PATTERNS:
        if pattern.search(name):
            return category
    raise AssertionError("the last category matches every name")


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize_kernels(events: list[dict], replays: int) -> dict:
    """Per-step kernel times of `replays` replays of one graph, from Chrome-trace kernel events.

    Returns {"replays", "kernel_us_per_step" (sum of kernel durations), "busy_us_per_step" (union of
    their intervals: kernels that overlap, as with programmatic launch, count once), "categories":
    [{category, us_per_step, share}], "kernels": [{name, category, calls_per_step, us_per_step}]},
    both lists longest first."""
    if replays < 1:
        raise ValueError(f"replays must be >= 1, got {replays}")
    if not events:
        raise ValueError("no kernel events in the trace: was the profiler recording CUDA activity?")
    per_name: dict[str, list[float]] = defaultdict(list)
    intervals = []
    for event in events:
        duration = float(event["dur"])
        per_name[event["name"]].append(duration)
        intervals.append((float(event["ts"]), float(event["ts"]) + duration))
    kernels = [{"name": name, "category": classify_kernel(name), "calls_per_step": len(durations) / replays,
                "us_per_step": sum(durations) / replays} for name, durations in per_name.items()]
    kernels.sort(key=lambda k: -k["us_per_step"])
    kernel_us = sum(k["us_per_step"] for k in kernels)
    by_category: dict[str, float] = defaultdict(float)
    for k in kernels:
        by_category[k["category"]] += k["us_per_step"]
    categories = [{"category": c, "us_per_step": us, "share": us / kernel_us}
                  for c, us in sorted(by_category.items(), key=lambda item: -item[1])]
    return {"replays": replays, "kernel_us_per_step": kernel_us, "busy_us_per_step": _union_length(intervals) / replays,
            "categories": categories, "kernels": kernels}


def kernel_events(trace: dict) -> list[dict]:
    """The GPU kernel events of a Chrome trace written by torch.profiler."""
    return [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and e.get("ph") == "X"]


def profile_graph_kernels(replay, replays: int = 20) -> dict:
    """Record `replays` calls of `replay` (a CUDA graph's replay, warmed up) with torch.profiler and
    summarize their kernels (summarize_kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return summarize_kernels(kernel_events(trace), replays)


BREAKDOWN_COLUMNS = ["target", "weights", "method", "pattern", "shuffle", "batch", "context", "step_median_ms",
                     "busy_ms", "kernel_ms", "category", "category_ms", "share"]


def breakdown_rows(records: list[dict]) -> list[dict]:
    """Tidy rows (BREAKDOWN_COLUMNS) of the `decode_breakdown` entries of profile records: one per decode
    case and kernel category; a case whose trace failed gives one row with category "not recorded: ..."."""
    rows = []
    for record in records:
        for case in record.get("decode_breakdown", []):
            base = {k: case.get(k) for k in BREAKDOWN_COLUMNS[:8]}
            summary = case.get("breakdown")
            if summary is None:
                rows.append({**base, "category": f"not recorded: {case.get('breakdown_error', 'no trace')}"})
                continue
            totals = {"busy_ms": summary["busy_us_per_step"] / 1e3, "kernel_ms": summary["kernel_us_per_step"] / 1e3}
            rows += [{**base, **totals, "category": c["category"], "category_ms": c["us_per_step"] / 1e3,
                      "share": c["share"]} for c in summary["categories"]]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Write the kernel breakdowns of profile records (python -m esparse.profiling --breakdown) as one CSV:
    python -m esparse.kernel_breakdown profile_llama-7b.json ... --out breakdown.csv"""
    import argparse

    import pandas as pd

    from .io import atomic_path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("records", nargs="+", help="profile JSON files")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    records = [json.loads(Path(path).read_text()) for path in args.records]
    rows = breakdown_rows(records)
    if not rows:
        raise SystemExit(f"no decode_breakdown in {', '.join(args.records)}: profile with --breakdown")
    with atomic_path(args.out) as tmp:  # a complete table or none
        pd.DataFrame(rows, columns=BREAKDOWN_COLUMNS).to_csv(tmp, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
