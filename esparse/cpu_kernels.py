"""CPU kernels compiled with numba: per-channel histograms, and the channel shuffle's local search
and N:M kept scores.

They replace chains of eager torch operations whose every step is a pass over a large temporary;
on the 2-core CPU this suite is checked on, those passes were most of E-Sparse's extra time over
Wanda's. They give the torch paths' results exactly (the reported float kept scores up to the order
of their sums), and the torch paths remain for GPUs and where numba is missing (tests compare them).

## Histograms

`esparse.stats.channel_bin_index` + `torch.bincount` make five elementwise passes over a float64
copy of every chunk and then a bincount that scans its input twice more (for its minimum and
maximum) before counting: on a 2-core CPU that was 245 ms of E-Sparse's statistics per SmolLM2
block, against 61 ms for everything Wanda needs. Here each value is read once and counted at once.

The bin of a value is computed with the very same float64 arithmetic as `channel_bin_index`:
floor((x - lo) / w) clamped into [0, K - 1], with the caller's w (infinite for a constant channel),
so the counts are identical to the torch path's (tests compare the two). Counts are integers, so
splitting the rows over threads cannot change them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Optional: without numba the CPU paths stay on torch (the same results, slower). Found without
# importing it: numba and the compiled code are loaded on a kernel's first call (cpu_kernels_jit).
AVAILABLE = importlib.util.find_spec("numba") is not None
"""True where numba is installed: the CPU paths of esparse.stats and esparse.pruning.shuffle use it."""


def _jit():
    """The compiled loops (esparse.cpu_kernels_jit), imported on first use."""
    from esparse import cpu_kernels_jit

    return cpu_kernels_jit


def describe() -> str:
    """Which implementation the CPU paths use, for the pruning summary."""
    if AVAILABLE:
        return f"numba {importlib.metadata.version('numba')} (esparse.cpu_kernels)"
    return "torch operations (numba not installed)"


# Below this many values per thread a second thread costs more than it saves.
_MIN_VALUES_PER_THREAD = 1 << 16

# The quotient (x - lo) / w is first estimated as (x - lo) * (1 / w), which vectorises (a float64
# division costs several times a multiply). Estimate and correctly rounded quotient q differ by at
# most 1.5 * 2^-52 * q, under 4e-10 for q up to MAX_BINS, below this margin; so wherever the
# estimate is farther than the margin from an integer, its floor is the floor of the division. The
# few values within the margin, and any estimate that is not finite (a constant channel, where
# 1 / w = 0, or a width too small for its reciprocal), are divided exactly. Beyond [0, MAX_BINS]
# both are clamped to the same edge bin.
_NEAR_INTEGER = 1e-9
MAX_BINS = 1 << 20


_executor: ThreadPoolExecutor | None = None


def _pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads of these kernels (created once; grown when more are asked for)."""
    global _executor
    if _executor is None or _executor._max_workers < workers:
        if _executor is not None:
            _executor.shutdown(wait=True)
        _executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="esparse-cpu-kernels")
    return _executor


def _require_numba() -> None:
    if not AVAILABLE:
        raise RuntimeError("esparse.cpu_kernels needs numba; install it (envs/requirements-cpu.txt)")


def _split_over_threads(kernel, items: int, values_per_item: int, inputs: tuple, outputs: tuple) -> None:
    """Run kernel(*inputs, first, last, *outputs) over item ranges [first, last) that split `items`
    over torch's thread count: one range here, the others on the pool's threads."""
    threads = max(1, min(torch.get_num_threads(), items, items * values_per_item // _MIN_VALUES_PER_THREAD))
    bounds = [items * t // threads for t in range(threads + 1)]
    jobs = [_pool(threads).submit(kernel, *inputs, bounds[t], bounds[t + 1], *outputs) for t in range(1, threads)]
    kernel(*inputs, bounds[0], bounds[1], *outputs)
    for job in jobs:
        job.result()


def _integer_blocks(values: torch.Tensor, n: int, m: int) -> np.ndarray:
    """The shuffle's [K, R, B] float64 CPU block values as a numpy array, checked."""
    _require_numba()
    if values.dtype != torch.float64 or values.device.type != "cpu" or values.dim() != 3:
        raise ValueError(f"values must be a float64 [K, R, B] CPU tensor, got {values.dtype} {tuple(values.shape)} "
                         f"on {values.device}")
    width = values.shape[2]
    if width % m != 0 or not 1 <= n < m:
        raise ValueError(f"need 1 <= n < m and m dividing the block width {width}, got n={n}, m={m}")
    return values.contiguous().numpy()


def _count_share(count_rows, batches: list[np.ndarray], share: int, shares: int, lo, width, inverse, bins: int,
                 counts: np.ndarray) -> None:
    """Count rows [share/shares, (share+1)/shares) of every batch into `counts`."""
    for values in batches:
        rows = values.shape[0]
        start, stop = rows * share // shares, rows * (share + 1) // shares
        if stop > start:
            count_rows(values[start:stop], lo, width, inverse, bins, counts)


def count_into(counts: torch.Tensor, batches: list[torch.Tensor], lo: torch.Tensor, safe_width: torch.Tensor,
               bins: int) -> None:
    """Add the bin counts of every batch in `batches` (tokens x channels, CPU) to `counts`
    ([P, channels * bins] int64: one row per thread, which the caller sums).

    `lo` and `safe_width` are float64 [channels]; `safe_width` is infinite for constant channels (as
    in `channel_bin_index`). Give many batches at once: each call hands work to the other threads
    once, and on a small CPU the threads torch's last operation left spinning slow the first
    milliseconds of every call (counting batch by batch was measured no faster on 2 threads than on 1).
    """
    _require_numba()
    if not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be in [1, {MAX_BINS}] for the compiled histogram, got {bins}")
    if not batches:
        return
    channels = batches[0].shape[-1]
    if counts.dtype != torch.int64 or counts.dim() != 2 or counts.shape[1] != channels * bins:
        raise ValueError(f"counts must be int64 [threads, {channels * bins}], got {counts.dtype} {tuple(counts.shape)}")
    arrays = []
    for x in batches:
        if x.shape[-1] != channels:
            raise ValueError(f"every batch must have {channels} channels, got shape {tuple(x.shape)}")
        flat = x.detach().reshape(-1, channels)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.to(torch.float32)  # exact for float16 and bfloat16
        arrays.append(flat.contiguous().numpy())
    lo_np = lo.detach().to("cpu", torch.float64).contiguous().numpy()
    width_np = safe_width.detach().to("cpu", torch.float64).contiguous().numpy()
    with np.errstate(over="ignore"):  # an infinite reciprocal only sends its channel to the exact path
        inverse_np = 1.0 / width_np  # 0 for a constant channel (w = inf): the exact path too
    counts_np = counts.numpy()
    values = sum(a.size for a in arrays)
    shares = max(1, min(counts.shape[0], values // _MIN_VALUES_PER_THREAD))
    # Shares 1.. go to worker threads, share 0 runs here.
    count_rows = _jit().count_rows  # loaded here, before any worker thread needs it
    jobs = [_pool(counts.shape[0]).submit(_count_share, count_rows, arrays, share, shares, lo_np, width_np, inverse_np,
                                          bins, counts_np[share])
            for share in range(1, shares)]
    _count_share(count_rows, arrays, 0, shares, lo_np, width_np, inverse_np, bins, counts_np[0])
    for job in jobs:
        job.result()


# ---- channel shuffle: swap gains --------------------------------------------------------------------
# The gain of every swap inside every block, as `esparse.pruning.shuffle._block_swap_gains` defines
# it, row by row: per row one pass over the block's B values per group instead of a dozen
# [K, G, rows, B] temporaries. The values are integers (the shuffle's fixed-point grid) whose sums stay
# below 2^53, so every sum is exact and the result equals the torch path's bit for bit.


def block_swap_gains(values: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`esparse.pruning.shuffle._block_swap_gains` on the CPU, blocks split over torch's thread count.

    values: float64 [K, R, B], integer-valued, on the CPU. Returns gain [K, B, B] (-inf where not a
    candidate) and the kept score of every group [K, B / m].
    """
    array = _integer_blocks(values, n, m)
    blocks, rows, width = array.shape
    gain = np.empty((blocks, width, width), np.float64)
    group_kept = np.empty((blocks, width // m), np.float64)
    _split_over_threads(_jit().swap_gains_blocks, blocks, rows * width, (array, n, m), (gain, group_kept))
    return torch.from_numpy(gain), torch.from_numpy(group_kept)


def local_search(values: torch.Tensor, n: int, m: int, max_passes: int, rel_tol: float,
                 screen_rel_tol: float) -> tuple[torch.Tensor, int, int, float]:
    """`esparse.pruning.shuffle._local_search` on the CPU, blocks split over torch's thread count:
    the same order, passes, swaps and gain (all decisions are on exact integer sums, and ties go to
    the first maximum in row-major order, as torch.max's do)."""
    array = _integer_blocks(values, n, m)
    blocks, rows, width = array.shape
    if width // m < 2 or max_passes == 0:
        return torch.arange(width).repeat(blocks, 1), 0, 0, 0.0
    order = np.empty((blocks, width), np.int64)
    passes_run = np.zeros(blocks, np.int64)
    swaps = np.zeros(blocks, np.int64)
    gains = np.zeros(blocks, np.float64)
    _split_over_threads(_jit().local_search_blocks, blocks, rows * width, (array, n, m, max_passes, rel_tol, screen_rel_tol),
                        (order, passes_run, swaps, gains))
    total_gain = sum(gains.tolist())  # integer-valued: exact in any order
    return torch.from_numpy(order), int(passes_run.max()), int(swaps.sum()), total_gain


# ---- channel shuffle: N:M kept score --------------------------------------------------------------


def nm_kept_score(score: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """Total score kept by the N:M mask of score[:, perm] (float64 CPU `score`): the sum over rows of
    each row's kept score, rows split over threads and their sums added in row order, so the result
    does not depend on the thread count."""
    _require_numba()
    rows, columns = score.shape
    if columns % m != 0 or not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m and m dividing the width {columns}, got n={n}, m={m}")
    array = score.detach().to(torch.float64).contiguous().numpy()
    order = np.arange(columns, dtype=np.int64) if perm is None else perm.detach().to("cpu", torch.int64).contiguous().numpy()
    row_kept = np.empty(rows, np.float64)
    _split_over_threads(_jit().kept_score_rows, rows, columns, (array, order, n, m), (row_kept,))
    return sum(row_kept.tolist())  # left to right, in row order
