"""CPU kernels compiled with numba: per-channel histograms and the channel shuffle's swap gains.

Both replace chains of eager torch operations whose every step is a pass over a large temporary;
on the 2-core CPU this suite is checked on, those passes were most of E-Sparse's extra time over
Wanda's. Both give exactly the torch path's results, which remains the path on GPUs and where
numba is missing (tests compare the two).

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

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # optional: without numba the statistics use the torch path (same counts, slower)
    import numba
except ImportError:  # pragma: no cover - exercised where numba is not installed (the GPU machine)
    numba = None

AVAILABLE = numba is not None
"""True where numba is installed: the CPU paths of esparse.stats and esparse.pruning.shuffle use it."""


def describe() -> str:
    """Which implementation the CPU paths use, for the pruning summary."""
    if AVAILABLE:
        return f"numba {numba.__version__} (esparse.cpu_kernels)"
    return "torch operations (numba not installed)"


# Below this many values per thread a second thread costs more than it saves.
_MIN_VALUES_PER_THREAD = 1 << 16

# The quotient (x - lo) / w is first estimated as (x - lo) * (1 / w), which vectorises (a float64
# division costs several times a multiply). Both are within 2 ulp of the exact quotient, far below
# this margin for any bin number below 2^30, so wherever the estimate is farther than the margin from
# an integer its floor is the floor of the correctly rounded division; the few values within the
# margin (and every value of a constant channel, where 1 / w = 0) are divided exactly.
_NEAR_INTEGER = 1e-9

if AVAILABLE:

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _count_rows(x, lo, width, inverse, bins, counts):  # pragma: no cover - compiled; tested through count_into
        rows, channels = x.shape
        top = np.float64(bins - 1)
        index = np.empty(channels, np.int64)
        near = np.empty(channels, np.bool_)
        for t in range(rows):
            for c in range(channels):  # vectorised: estimate, floor, clamp
                estimate = (np.float64(x[t, c]) - lo[c]) * inverse[c]
                below = np.floor(estimate)
                near[c] = (estimate - below < _NEAR_INTEGER) | (below + 1.0 - estimate < _NEAR_INTEGER)
                index[c] = np.int64(min(max(below, 0.0), top))
            for c in range(channels):  # scattered increments; the exact division where the estimate is unsafe
                k = index[c]
                if near[c]:
                    k = np.int64(min(max((np.float64(x[t, c]) - lo[c]) / width[c], 0.0), top))
                counts[c * bins + k] += 1

_executor: ThreadPoolExecutor | None = None


def _pool(workers: int) -> ThreadPoolExecutor:
    """The worker threads of these kernels (created once; grown when more are asked for)."""
    global _executor
    if _executor is None or _executor._max_workers < workers:
        if _executor is not None:
            _executor.shutdown(wait=True)
        _executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="esparse-cpu-kernels")
    return _executor


def _count_share(batches: list[np.ndarray], share: int, shares: int, lo, width, inverse, bins: int,
                 counts: np.ndarray) -> None:
    """Count rows [share/shares, (share+1)/shares) of every batch into `counts`."""
    for values in batches:
        rows = values.shape[0]
        start, stop = rows * share // shares, rows * (share + 1) // shares
        if stop > start:
            _count_rows(values[start:stop], lo, width, inverse, bins, counts)


def count_into(counts: torch.Tensor, batches: list[torch.Tensor], lo: torch.Tensor, safe_width: torch.Tensor,
               bins: int) -> None:
    """Add the bin counts of every batch in `batches` (tokens x channels, CPU) to `counts`
    ([P, channels * bins] int64: one row per thread, which the caller sums).

    `lo` and `safe_width` are float64 [channels]; `safe_width` is infinite for constant channels (as
    in `channel_bin_index`). Give many batches at once: each call hands work to the other threads
    once, and on a small CPU the threads torch's last operation left spinning slow the first
    milliseconds of every call (counting batch by batch was measured no faster on 2 threads than on 1).
    """
    if not AVAILABLE:
        raise RuntimeError("esparse.cpu_kernels needs numba; install it (envs/requirements-cpu.txt)")
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
    inverse_np = 1.0 / width_np  # 0 for a constant channel (w = inf): always the exact path
    counts_np = counts.numpy()
    values = sum(a.size for a in arrays)
    shares = max(1, min(counts.shape[0], values // _MIN_VALUES_PER_THREAD))
    # Shares 1.. go to worker threads, share 0 runs here.
    jobs = [_pool(counts.shape[0]).submit(_count_share, arrays, share, shares, lo_np, width_np, inverse_np, bins,
                                          counts_np[share])
            for share in range(1, shares)]
    _count_share(arrays, 0, shares, lo_np, width_np, inverse_np, bins, counts_np[0])
    for job in jobs:
        job.result()


# ---- channel shuffle: swap gains --------------------------------------------------------------------
# The gain of every swap inside every block, as `esparse.pruning.shuffle._block_swap_gains` defines
# it, row by row: per row one pass over the block's B values per group instead of a dozen
# [K, G, rows, B] temporaries. The values are integers (the shuffle's fixed-point grid) whose sums stay
# below 2^53, so every sum is exact and the result equals the torch path's bit for bit.

if AVAILABLE:

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _swap_gains_blocks(values, n, m, first, last, gain, group_kept):  # pragma: no cover - compiled
        # Branch-free where the data decides (which values are kept is a coin flip per value): the
        # top values by compare-exchange, the kept channels compacted into a list by index arithmetic.
        _, rows, width = values.shape
        groups = width // m
        above = np.empty((groups, width), np.float64)  # sum_i relu(s_ib - nth_gi)
        kept_gain = np.empty((width, width), np.float64)  # sum_i kept_ai * relu(min(s_ib, nth_gi) - next_gi)
        loss = np.empty(width, np.float64)
        nth = np.empty(groups, np.float64)
        next_after = np.empty(groups, np.float64)
        kept_list = np.empty(width, np.int64)
        top = np.empty(n + 1, np.float64)
        for k in range(first, last):
            above[:] = 0.0
            kept_gain[:] = 0.0
            loss[:] = 0.0
            group_kept[k, :] = 0.0
            for i in range(rows):
                row = values[k, i]
                kept_count = 0
                for g in range(groups):
                    # the n + 1 largest of the group, largest first: each value sinks through the list
                    top[:] = -np.inf
                    for j in range(m):
                        value = row[g * m + j]
                        for q in range(n + 1):
                            larger = max(top[q], value)
                            value = min(top[q], value)
                            top[q] = larger
                    kept_sum = 0.0
                    for j in range(n):
                        kept_sum += top[j]
                    group_kept[k, g] += kept_sum
                    nth[g] = top[n - 1]
                    next_after[g] = top[n]
                    for j in range(m):
                        a = g * m + j
                        # kept (above next): loss next - s < 0; otherwise next - s >= 0 and no loss
                        loss[a] += min(next_after[g] - row[a], 0.0)
                        kept_list[kept_count] = a
                        kept_count += np.int64(row[a] > next_after[g])
                for g in range(groups):
                    threshold = nth[g]
                    for b in range(width):
                        above[g, b] += max(row[b] - threshold, 0.0)
                for t in range(kept_count):
                    a = kept_list[t]
                    g = a // m
                    high, low = nth[g], next_after[g]
                    for b in range(width):
                        kept_gain[a, b] += max(min(row[b], high) - low, 0.0)
            for a in range(width):
                group_a = a // m
                for b in range(width):
                    group_b = b // m
                    if group_a >= group_b:
                        gain[k, a, b] = -np.inf
                    else:
                        gain[k, a, b] = (loss[a] + loss[b]) + (above[group_a, b] + kept_gain[a, b]) \
                            + (above[group_b, a] + kept_gain[b, a])


def block_swap_gains(values: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`esparse.pruning.shuffle._block_swap_gains` on the CPU, blocks split over torch's thread count.

    values: float64 [K, R, B], integer-valued, on the CPU. Returns gain [K, B, B] (-inf where not a
    candidate) and the kept score of every group [K, B / m].
    """
    if not AVAILABLE:
        raise RuntimeError("esparse.cpu_kernels needs numba; install it (envs/requirements-cpu.txt)")
    if values.dtype != torch.float64 or values.device.type != "cpu" or values.dim() != 3:
        raise ValueError(f"values must be a float64 [K, R, B] CPU tensor, got {values.dtype} {tuple(values.shape)} "
                         f"on {values.device}")
    blocks, rows, width = values.shape
    if width % m != 0 or not 1 <= n < m:
        raise ValueError(f"need 1 <= n < m and m dividing the block width {width}, got n={n}, m={m}")
    array = values.contiguous().numpy()
    gain = np.empty((blocks, width, width), np.float64)
    group_kept = np.empty((blocks, width // m), np.float64)
    threads = max(1, min(torch.get_num_threads(), blocks, blocks * rows * width // _MIN_VALUES_PER_THREAD))
    bounds = [blocks * t // threads for t in range(threads + 1)]
    jobs = [_pool(threads).submit(_swap_gains_blocks, array, n, m, bounds[t], bounds[t + 1], gain, group_kept)
            for t in range(1, threads)]
    _swap_gains_blocks(array, n, m, bounds[0], bounds[1], gain, group_kept)
    for job in jobs:
        job.result()
    return torch.from_numpy(gain), torch.from_numpy(group_kept)


# ---- channel shuffle: N:M kept score --------------------------------------------------------------

if AVAILABLE:

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _kept_score_rows(score, perm, n, m, first, last, row_kept):  # pragma: no cover - compiled
        columns = score.shape[1]
        top = np.empty(n, np.float64)
        for i in range(first, last):
            row = score[i]
            total = 0.0
            for start in range(0, columns, m):
                top[:] = -np.inf
                for j in range(start, start + m):
                    value = row[perm[j]]
                    for q in range(n):  # the n largest of the group, by compare-exchange
                        larger = max(top[q], value)
                        value = min(top[q], value)
                        top[q] = larger
                for q in range(n):
                    total += top[q]
            row_kept[i] = total


def nm_kept_score(score: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """Total score kept by the N:M mask of score[:, perm] (float64 CPU `score`): the sum over rows of
    each row's kept score, rows split over threads and their sums added in row order, so the result
    does not depend on the thread count."""
    if not AVAILABLE:
        raise RuntimeError("esparse.cpu_kernels needs numba; install it (envs/requirements-cpu.txt)")
    rows, columns = score.shape
    if columns % m != 0 or not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m and m dividing the width {columns}, got n={n}, m={m}")
    array = score.detach().to(torch.float64).contiguous().numpy()
    order = np.arange(columns, dtype=np.int64) if perm is None else perm.detach().to("cpu", torch.int64).contiguous().numpy()
    row_kept = np.empty(rows, np.float64)
    threads = max(1, min(torch.get_num_threads(), rows, rows * columns // _MIN_VALUES_PER_THREAD))
    bounds = [rows * t // threads for t in range(threads + 1)]
    jobs = [_pool(threads).submit(_kept_score_rows, array, order, n, m, bounds[t], bounds[t + 1], row_kept)
            for t in range(1, threads)]
    _kept_score_rows(array, order, n, m, bounds[0], bounds[1], row_kept)
    for job in jobs:
        job.result()
    total = 0.0
    for value in row_kept.tolist():  # in row order
        total += value
    return total
