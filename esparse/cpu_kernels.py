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
# division costs several times a multiply). Estimate and correctly rounded quotient q differ by at
# most 1.5 * 2^-52 * q, under 4e-10 for q up to MAX_BINS, below this margin; so wherever the
# estimate is farther than the margin from an integer, its floor is the floor of the division. The
# few values within the margin, and any estimate that is not finite (a constant channel, where
# 1 / w = 0, or a width too small for its reciprocal), are divided exactly. Beyond [0, MAX_BINS]
# both are clamped to the same edge bin.
_NEAR_INTEGER = 1e-9
MAX_BINS = 1 << 20

if AVAILABLE:

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _count_rows(x, lo, width, inverse, bins, counts):  # pragma: no cover - compiled; tested through count_into
        rows, channels = x.shape
        top = np.float64(bins - 1)
        index = np.empty(channels, np.int64)
        safe = np.empty(channels, np.bool_)
        for t in range(rows):
            for c in range(channels):  # vectorised: estimate, floor, clamp
                estimate = (np.float64(x[t, c]) - lo[c]) * inverse[c]
                below = np.floor(estimate)
                # False for NaN and infinite estimates too (their comparisons are False)
                safe[c] = (estimate - below >= _NEAR_INTEGER) & (below + 1.0 - estimate >= _NEAR_INTEGER)
                index[c] = np.int64(min(max(below, 0.0), top)) if safe[c] else 0
            for c in range(channels):  # scattered increments; the exact division where the estimate is unsafe
                k = index[c]
                if not safe[c]:
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
    def _top_values(row, start, m, top):  # pragma: no cover - compiled
        """The len(top) largest of row[start:start + m], largest first, by compare-exchange (no
        data-dependent branches: which values win is a coin flip per value)."""
        top[:] = -np.inf
        for j in range(start, start + m):
            value = row[j]
            for q in range(top.shape[0]):
                larger = max(top[q], value)
                value = min(top[q], value)
                top[q] = larger

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _one_block_gains(block, n, m, gain, group_kept, above, kept_gain, loss, nth, next_after, kept_list,
                         top):  # pragma: no cover - compiled
        """gain [B, B] and group_kept [G] of one block [R, B]; the rest are scratch arrays."""
        rows, width = block.shape
        groups = width // m
        above[:] = 0.0  # sum_i relu(s_ib - nth_gi)
        kept_gain[:] = 0.0  # sum_i kept_ai * relu(min(s_ib, nth_gi) - next_gi)
        loss[:] = 0.0
        group_kept[:] = 0.0
        for i in range(rows):
            row = block[i]
            kept_count = 0
            for g in range(groups):
                _top_values(row, g * m, m, top)
                kept_sum = 0.0
                for j in range(n):
                    kept_sum += top[j]
                group_kept[g] += kept_sum
                nth[g] = top[n - 1]
                next_after[g] = top[n]
                for j in range(m):
                    a = g * m + j
                    # kept (above next): loss next - s < 0; otherwise next - s >= 0 and no loss
                    loss[a] += min(next_after[g] - row[a], 0.0)
                    kept_list[kept_count] = a  # compacted by index arithmetic, not a branch
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
                    gain[a, b] = -np.inf
                else:
                    gain[a, b] = (loss[a] + loss[b]) + (above[group_a, b] + kept_gain[a, b]) \
                        + (above[group_b, a] + kept_gain[b, a])

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _gain_scratch(rows, width, n, m):  # pragma: no cover - compiled
        groups = width // m
        return (np.empty((groups, width), np.float64), np.empty((width, width), np.float64),
                np.empty(width, np.float64), np.empty(groups, np.float64), np.empty(groups, np.float64),
                np.empty(width, np.int64), np.empty(n + 1, np.float64))

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _swap_gains_blocks(values, n, m, first, last, gain, group_kept):  # pragma: no cover - compiled
        _, rows, width = values.shape
        above, kept_gain, loss, nth, next_after, kept_list, top = _gain_scratch(rows, width, n, m)
        for k in range(first, last):
            _one_block_gains(values[k], n, m, gain[k], group_kept[k], above, kept_gain, loss, nth, next_after,
                             kept_list, top)

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _local_search_blocks(values, n, m, max_passes, rel_tol, screen_rel_tol, first, last, order, passes_run,
                             swaps, gains):  # pragma: no cover - compiled
        """`esparse.pruning.shuffle._local_search` block by block (its docstring and code say what a
        pass does); blocks are independent, so each runs its own passes to the same decisions."""
        _, rows, width = values.shape
        groups = width // m
        above, kept_gain, loss, nth, next_after, kept_list, top = _gain_scratch(rows, width, n, m)
        gain = np.empty((width, width), np.float64)
        group_kept = np.empty(groups, np.float64)
        ordered = np.empty((rows, width), np.float64)
        pair = np.empty(2 * m, np.float64)
        top_n = np.empty(n, np.float64)
        for k in range(first, last):
            for position in range(width):
                order[k, position] = position
            passes_run[k] = 0
            swaps[k] = 0
            gains[k] = 0.0
            for _ in range(max_passes):
                # the block's values in its order at the start of this pass: a swap masks both its
                # groups for the rest of the pass, so every later candidate reads groups still in it
                for i in range(rows):
                    for position in range(width):
                        ordered[i, position] = values[k, i, order[k, position]]
                _one_block_gains(ordered, n, m, gain, group_kept, above, kept_gain, loss, nth, next_after,
                                 kept_list, top)
                total = 0.0
                for g in range(groups):
                    total += group_kept[g]
                screen_tolerance = screen_rel_tol * abs(total)
                passes_run[k] += 1
                applied = 0
                for _step in range(groups):  # at most one swap per step
                    best = -np.inf
                    best_a = 0
                    best_b = 0
                    for a in range(width):  # the first maximum in row-major order, as torch.max
                        for b in range(width):
                            if gain[a, b] > best:
                                best = gain[a, b]
                                best_a = a
                                best_b = b
                    if not best > screen_tolerance:
                        break
                    group_a, group_b = best_a // m, best_b // m
                    # exact re-check of the swap on its two groups
                    before = group_kept[group_a] + group_kept[group_b]
                    after_a = 0.0
                    after_b = 0.0
                    for i in range(rows):
                        for j in range(m):
                            pair[j] = ordered[i, group_a * m + j]
                            pair[m + j] = ordered[i, group_b * m + j]
                        slot_a, slot_b = best_a % m, m + best_b % m
                        pair[slot_a], pair[slot_b] = pair[slot_b], pair[slot_a]
                        _top_values(pair, 0, m, top_n)
                        for q in range(n):
                            after_a += top_n[q]
                        _top_values(pair, m, m, top_n)
                        for q in range(n):
                            after_b += top_n[q]
                    after = after_a + after_b
                    if not (after - before) > rel_tol * abs(before):
                        gain[best_a, best_b] = -np.inf
                        continue
                    gains[k] += after - before
                    group_kept[group_a] = after_a
                    group_kept[group_b] = after_b
                    moved = order[k, best_a]
                    order[k, best_a] = order[k, best_b]
                    order[k, best_b] = moved
                    applied += 1
                    for a in range(width):  # both groups leave the candidates for this pass
                        touched_a = a // m == group_a or a // m == group_b
                        for b in range(width):
                            if touched_a or b // m == group_a or b // m == group_b:
                                gain[a, b] = -np.inf
                swaps[k] += applied
                if applied == 0:
                    break


def block_swap_gains(values: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`esparse.pruning.shuffle._block_swap_gains` on the CPU, blocks split over torch's thread count.

    values: float64 [K, R, B], integer-valued, on the CPU. Returns gain [K, B, B] (-inf where not a
    candidate) and the kept score of every group [K, B / m].
    """
    array = _integer_blocks(values, n, m)
    blocks, rows, width = array.shape
    gain = np.empty((blocks, width, width), np.float64)
    group_kept = np.empty((blocks, width // m), np.float64)
    _split_over_threads(_swap_gains_blocks, blocks, rows * width, (array, n, m), (gain, group_kept))
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
    _split_over_threads(_local_search_blocks, blocks, rows * width, (array, n, m, max_passes, rel_tol, screen_rel_tol),
                        (order, passes_run, swaps, gains))
    total_gain = 0.0
    for value in gains.tolist():  # in block order (integer-valued: exact in any order anyway)
        total_gain += value
    return torch.from_numpy(order), int(passes_run.max()), int(swaps.sum()), total_gain


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
    _require_numba()
    rows, columns = score.shape
    if columns % m != 0 or not 1 <= n <= m:
        raise ValueError(f"need 1 <= n <= m and m dividing the width {columns}, got n={n}, m={m}")
    array = score.detach().to(torch.float64).contiguous().numpy()
    order = np.arange(columns, dtype=np.int64) if perm is None else perm.detach().to("cpu", torch.int64).contiguous().numpy()
    row_kept = np.empty(rows, np.float64)
    _split_over_threads(_kept_score_rows, rows, columns, (array, order, n, m), (row_kept,))
    total = 0.0
    for value in row_kept.tolist():  # in row order
        total += value
    return total
