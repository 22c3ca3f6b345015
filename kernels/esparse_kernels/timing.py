"""GPU timing: CUDA-graph replay of a rotation of calls over distinct buffers, CUDA-event medians.

Every candidate is timed the same way: ``calls[i]`` works on the i-th copy of the weights and inputs,
the copies together span more than ``ROTATION_FACTOR`` x the L2 size (up to ``MAX_SETS`` copies:
below ~0.5 MB per copy the rotation covers less than 4.5x L2; such calls are launch-bound anyway), one
CUDA graph replays all of them in order, and the per-call time is the replay time / len(calls). The
median over ``reps`` replays is reported with the 10th and 90th percentiles.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

ROTATION_FACTOR = 4.5
MAX_SETS = 256


@dataclass(frozen=True)
class Timing:
    median_us: float
    p10_us: float
    p90_us: float
    reps: int
    sets: int
    graph: bool

    def to_dict(self) -> dict:
        return {
            "median_us": self.median_us, "p10_us": self.p10_us, "p90_us": self.p90_us,
            "reps": self.reps, "sets": self.sets, "graph": self.graph,
        }


def l2_bytes(device: torch.device | str | None = None) -> int:
    if device is not None and torch.device(device).type != "cuda":
        return 1 << 20  # CPU dry runs (interpreter): a token rotation, nothing is measured for real
    props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def rotation_sets(set_bytes: int, l2: int, factor: float = ROTATION_FACTOR, cap: int = MAX_SETS) -> int:
    """Number of distinct buffer sets so that together they exceed factor x L2 (at least 1, at most cap)."""
    return max(1, min(cap, math.ceil(factor * l2 / max(set_bytes, 1))))


def _quantile(sorted_vals: list[float], q: float) -> float:
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def time_calls(calls: Sequence[Callable[[], object]], reps: int = 20, warmup: int = 2,
               use_graph: bool = True) -> Timing:
    """Median per-call time in microseconds of running all `calls` back to back (see module doc).

    Without CUDA (interpreter dry runs) it falls back to host timing; such numbers mean nothing.
    """
    if not torch.cuda.is_available():
        return _time_host(calls, reps)
    stream = torch.cuda.current_stream()
    for call in calls:  # compile, create handles, fill caching allocator pools
        call()
    torch.cuda.synchronize()
    graph = None
    if use_graph:
        try:
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for call in calls:  # a warm run on the capture stream, as torch recommends
                    call()
            stream.wait_stream(side)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                for call in calls:
                    call()
            torch.cuda.synchronize()
        except Exception:  # a backend that cannot be captured is timed eagerly instead
            graph = None
            torch.cuda.synchronize()

    def run_once() -> None:
        if graph is not None:
            graph.replay()
        else:
            for call in calls:
                call()

    for _ in range(warmup):
        run_once()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record(stream)
        run_once()
        ends[i].record(stream)
    torch.cuda.synchronize()
    per_call = sorted(s.elapsed_time(e) * 1000.0 / len(calls) for s, e in zip(starts, ends))
    captured = graph is not None
    del graph
    return Timing(
        median_us=statistics.median(per_call), p10_us=_quantile(per_call, 0.1), p90_us=_quantile(per_call, 0.9),
        reps=reps, sets=len(calls), graph=captured,
    )


def _time_host(calls: Sequence[Callable[[], object]], reps: int) -> Timing:
    import time

    for call in calls:
        call()
    per_call = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for call in calls:
            call()
        per_call.append((time.perf_counter() - t0) * 1e6 / len(calls))
    per_call.sort()
    return Timing(statistics.median(per_call), _quantile(per_call, 0.1), _quantile(per_call, 0.9), reps,
                  len(calls), False)
