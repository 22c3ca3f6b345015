"""The numba-compiled loops behind `esparse.cpu_kernels` (imported only when a kernel first runs:
numba and the compiled code take about 130 MiB of memory, which a Wanda or SparseGPT job need not pay).

Compiled functions are cached by numba next to this file (or in its user cache directory); each
docstring of `esparse.cpu_kernels` says what its loop computes and why it equals the torch path.
"""

import numba
import numpy as np

from esparse.cpu_kernels import _NEAR_INTEGER


@numba.njit(nogil=True, cache=True, boundscheck=False)
def count_rows(x, lo, width, inverse, bins, counts):
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


@numba.njit(nogil=True, cache=True, boundscheck=False)
def top_values(row, start, m, top):
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
def one_block_gains(block, n, m, gain, group_kept, above, kept_gain, loss, nth, next_after, kept_list,
                     top):
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
            top_values(row, g * m, m, top)
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
def gain_scratch(rows, width, n, m):
    groups = width // m
    return (np.empty((groups, width), np.float64), np.empty((width, width), np.float64),
            np.empty(width, np.float64), np.empty(groups, np.float64), np.empty(groups, np.float64),
            np.empty(width, np.int64), np.empty(n + 1, np.float64))

@numba.njit(nogil=True, cache=True, boundscheck=False)
def swap_gains_blocks(values, n, m, first, last, gain, group_kept):
    _, rows, width = values.shape
    above, kept_gain, loss, nth, next_after, kept_list, top = gain_scratch(rows, width, n, m)
    for k in range(first, last):
        one_block_gains(values[k], n, m, gain[k], group_kept[k], above, kept_gain, loss, nth, next_after,
                         kept_list, top)

@numba.njit(nogil=True, cache=True, boundscheck=False)
def local_search_blocks(values, n, m, max_passes, rel_tol, screen_rel_tol, first, last, order, passes_run,
                         swaps, gains):
    """`esparse.pruning.shuffle._local_search` block by block (its docstring and code say what a
    pass does); blocks are independent, so each runs its own passes to the same decisions."""
    _, rows, width = values.shape
    groups = width // m
    above, kept_gain, loss, nth, next_after, kept_list, top = gain_scratch(rows, width, n, m)
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
            one_block_gains(ordered, n, m, gain, group_kept, above, kept_gain, loss, nth, next_after,
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
                    top_values(pair, 0, m, top_n)
                    for q in range(n):
                        after_a += top_n[q]
                    top_values(pair, m, m, top_n)
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


@numba.njit(nogil=True, cache=True, boundscheck=False)
def kept_score_rows(score, perm, n, m, first, last, row_kept):
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
