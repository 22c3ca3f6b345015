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
