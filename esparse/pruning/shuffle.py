"""E-Sparse channel shuffle: permute input columns so that N:M selection keeps more score.

Convention (as in the pruned-model layout): perm[j] = original input column placed at position j.
N:M groups are the contiguous M-column groups of score[:, perm]; a mask chosen there is brought
back to the original order with `masks.unpermute_mask`, and (W*mask)[:, perm] @ x[perm] == (W*mask) @ x.

Global naive shuffle: rank columns by their column sum of the score and deal them zig-zag over the
C_in/M groups (ranks 0..G-1 to groups 0..G-1, ranks G..2G-1 to groups G-1..0, ...), so every group
gets one channel from every band of the ranking. It is a heuristic and can keep less score than no
shuffle; `channel_shuffle(keep_best=True)` then keeps the better of the two and says which.

Local block shuffle: positions are cut into blocks of B consecutive positions (B a multiple of M;
a shorter last block when B does not divide C_in). One *pass* computes, in every block at once,
the gain of every swap of two channels in different groups, then applies the best improving swaps
on pairwise-disjoint group pairs (each group in at most one swap per pass, so gains add up).
Passes repeat until no swap helps or `max_passes` is reached. Gains are screened for the whole
block and every swap is re-checked exactly on its two groups before it is applied, so each
applied swap raises the kept score: the search is monotone.

Swap gain, per row i: with R = group of a without a, nth/next = N-th/(N+1)-th largest of the full
group, keep(R + {v}) = keep(group) + loss_a + max(0, v - t_a), where a kept channel (value > next)
has t_a = next and loss_a = next - s_ia, and any other has t_a = nth and loss_a = 0 (ties give the
same numbers either way). Hence gain(a, b) = L_a + L_b + Q[a, b] + Q[b, a] with L = summed losses and
Q[a, b] = sum_i relu(s_ib - nth_gi) + sum_i kept_ai * (relu(s_ib - next_gi) - relu(s_ib - nth_gi)):
elementwise work R*B*G per block (not R*B*B), the kept-weighted sum a batched matmul.

Determinism: every decision is made on the scores rounded to an integer grid (float64 values
holding integers, `fixed_point_scores`), whose sums are exact in any order. Reductions whose order
depends on threads, vectorisation or memory alignment therefore cannot change a choice, and the
permutation is bit-identical across runs, thread counts and devices. The reported kept scores and
efficacy are computed on the original scores.

On a CPU with numba installed, the local search and the kept-score counts run as compiled loops
(`esparse.cpu_kernels`), making the same decisions; the torch code here is the GPU's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esparse import cpu_kernels
from esparse.pruning.masks import check_permutation, descending_values

SHUFFLE_MODES = ("none", "global", "global+local")
# Rows per chunk of the gain computation: [K, G, rows, B] float64 temporaries of 4 MiB on a CPU (the
# fastest of 2^15..2^20 elements on 2 cores); on a GPU every chunk costs a dozen kernel launches, so
# chunks are as large as a few hundred MiB allow.
_CHUNK_ELEMENTS = {"cpu": 1 << 19}
_CHUNK_ELEMENTS_OTHER = 1 << 25
_SCREEN_REL_TOL = 1e-6  # screening threshold: smaller relative gains are negligible
_FIXED_POINT_BITS = 24  # grid resolution relative to the largest score (float32-like precision)
_EXACT_FLOAT64_SUM = 2 ** 53


def fixed_point_scores(score: torch.Tensor) -> torch.Tensor:
    """`score` rounded to integers on a grid of max|score| / 2^24 (float64): all sums over the whole
    matrix stay below 2^53, so they are exact whatever the summation order."""
    values = score.detach().to(torch.float64)
    peak = values.abs().max()
    if peak == 0:
        return torch.zeros_like(values)
    bits = _FIXED_POINT_BITS
    while bits > 8 and values.numel() * 2.0 ** bits >= _EXACT_FLOAT64_SUM:
        bits -= 1
    return torch.round(values * (2.0 ** bits / peak))


def _sum_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """t0 + t1 + ... in that order (a fixed order keeps float sums reproducible)."""
    total = tensors[0]
    for value in tensors[1:]:
        total = total + value
    return total


def _group_top_sum(grouped: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of the n largest values along the last dim."""
    return _sum_of(descending_values(grouped, n))


def nm_kept_score(score: torch.Tensor, n: int, m: int, perm: torch.Tensor | None = None) -> float:
    """Total score kept by the N:M mask of score[:, perm] (float64 sum; ties do not change it)."""
    rows, cols = score.shape
    if cols % m != 0:
        raise ValueError(f"M = {m} does not divide the width {cols}")
    if score.device.type == "cpu" and cpu_kernels.AVAILABLE:
        return cpu_kernels.nm_kept_score(score, n, m, perm)
    ordered = score if perm is None else score[:, perm.to(score.device).long()]
    grouped = ordered.to(torch.float64).reshape(rows, cols // m, m)
    return float(_group_top_sum(grouped, n).sum())


def global_naive_shuffle(score: torch.Tensor, m: int) -> torch.Tensor:
    """Zig-zag deal of the columns, ranked by column score sum, over the C_in / M groups (CPU LongTensor)."""
    cols = score.shape[1]
    if cols % m != 0:
        raise ValueError(f"global shuffle: M = {m} does not divide the width {cols}")
    groups = cols // m
    importance = score.detach().to(torch.float64).sum(dim=0).cpu()
    if not torch.isfinite(importance).all():
        raise ValueError("global shuffle: column scores are not finite")
    importance = torch.where(importance == 0, torch.zeros_like(importance), importance)  # -0.0 -> +0.0
    # Stable descending sort: equal importance keeps the lower column first.
    ranking = torch.argsort(importance, descending=True, stable=True)
    band = torch.arange(m).unsqueeze(0)  # [1, m]: which band of G consecutive ranks
    group = torch.arange(groups).unsqueeze(1)  # [G, 1]
    slot = torch.where(band % 2 == 0, group, groups - 1 - group)  # zig-zag within each band
    return ranking[band * groups + slot].reshape(-1)


def _block_swap_gains(values: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gain of swapping positions a, b (a's group < b's group) in every block (module docstring).

    values: [K, R, B] block scores in the current order, integer-valued. Returns gain [K, B, B]
    (-inf where not a candidate) and the kept score of every group [K, G]. Every term is a sum
    over rows, so rows are processed in chunks small enough to stay in cache.
    """
    blocks, rows, width = values.shape
    groups = width // m
    dtype, device = values.dtype, values.device
    loss = torch.zeros(blocks, width, dtype=dtype, device=device)
    gain_in = torch.zeros(blocks, groups, m, width, dtype=dtype, device=device)
    group_kept = torch.zeros(blocks, groups, dtype=dtype, device=device)
    chunk = min(rows, max(1, _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_OTHER) // max(1, blocks * groups * width)))
    # Broadcast results written into contiguous buffers: left to allocate its own output, a
    # broadcast sub/minimum here takes a strided layout that was measured 7x slower on the CPU and
    # that the matmul below then copies.
    over_nth_buffer = torch.empty(blocks * groups * chunk * width, dtype=dtype, device=device)
    extra_buffer = torch.empty_like(over_nth_buffer)
    for start in range(0, rows, chunk):
        part = values[:, start : start + chunk, :]  # [K, r, B]
        grouped = part.reshape(blocks, -1, groups, m)
        top = descending_values(grouped, n + 1)
        nth, next_after = top[n - 1], top[n]  # [K, r, G]
        group_kept += _sum_of(top[:n]).sum(dim=1)
        kept = grouped > next_after.unsqueeze(-1)
        # loss_a = next - s_a for kept a (negative), 0 otherwise (next - s_a >= 0 there)
        loss += (next_after.unsqueeze(-1) - grouped).clamp_(max=0).sum(dim=1).reshape(blocks, width)
        incoming = part.unsqueeze(1)  # [K, 1, r, B]
        nth_t = nth.transpose(1, 2).unsqueeze(-1)  # [K, G, r, 1]
        next_t = next_after.transpose(1, 2).unsqueeze(-1)
        shape = (blocks, groups, part.shape[1], width)
        size = blocks * groups * part.shape[1] * width
        over_nth = torch.sub(incoming, nth_t, out=over_nth_buffer[:size].view(shape)).clamp_(min=0)  # [K, G, r, B]
        # relu(s - next) - relu(s - nth) == relu(min(s, nth) - next), as next <= nth
        extra = torch.minimum(incoming, nth_t, out=extra_buffer[:size].view(shape)).sub_(next_t).clamp_(min=0)
        gain_in += over_nth.sum(dim=2, keepdim=True)
        gain_in += torch.matmul(kept.permute(0, 2, 3, 1).to(dtype), extra)
    gain_in = gain_in.reshape(blocks, width, width)
    gain = loss.unsqueeze(2) + loss.unsqueeze(1) + gain_in + gain_in.transpose(1, 2)
    position_group = torch.arange(width, device=device) // m
    not_candidate = position_group.unsqueeze(1) >= position_group.unsqueeze(0)
    return gain.masked_fill_(not_candidate, float("-inf")), group_kept


def _local_search(values: torch.Tensor, n: int, m: int, max_passes: int, rel_tol: float) -> tuple[torch.Tensor, int, int, float]:
    """Local search inside K equal blocks at once: compiled on a CPU with numba
    (`esparse.cpu_kernels.local_search`, the same decisions block by block), else with torch.

    values: float64 [K, R, B], integer-valued: the score of each block, block-local column b at b.
    Returns order [K, B] (block-local column at each position), passes run, swaps applied and the
    total exact gain of the applied swaps (an integer, as the values are).
    """
    if values.device.type == "cpu" and cpu_kernels.AVAILABLE:
        return cpu_kernels.local_search(values, n, m, max_passes, rel_tol, _SCREEN_REL_TOL)
    blocks, rows, width = values.shape
    device = values.device
    groups = width // m
    order = torch.arange(width, device=device).repeat(blocks, 1)
    if groups < 2 or max_passes == 0:
        return order, 0, 0, 0.0
    position_group = torch.arange(width, device=device) // m
    group_positions = torch.arange(width, device=device).reshape(groups, m)
    row_index = torch.arange(rows, device=device).view(1, rows, 1)
    passes = swaps = 0
    total_gain = torch.zeros((), dtype=values.dtype, device=device)
    # Blocks are searched independently; a block whose last pass applied no swap has no improving
    # swap left (its gains did not change), so later passes only recompute the blocks still moving.
    active = torch.arange(blocks, device=device)
    for _ in range(max_passes):
        block_order = order[active]
        live = active.numel()
        # The blocks' values in their order at the start of this pass. A swap masks both its
        # groups for the rest of the pass, so every later candidate reads groups still in this order.
        if passes == 0:  # every block, in its starting order
            ordered = values
        else:
            moving = values if live == blocks else values[active]
            ordered = moving.gather(2, block_order.unsqueeze(1).expand(live, rows, width))
        # group_kept: exact kept score of every group [live, G] (integer-valued float64, so the sum
        # of two groups equals their joint sum exactly); updated as swaps are applied.
        gain, group_kept = _block_swap_gains(ordered, n, m)
        screen_tolerance = _SCREEN_REL_TOL * group_kept.sum(dim=1).abs()
        passes += 1
        applied = torch.zeros(live, dtype=torch.int64, device=device)
        for _ in range(groups):  # each step: at most one swap per block
            best, flat_index = gain.reshape(live, -1).max(dim=1)
            candidate = best > screen_tolerance
            if not bool(candidate.any()):
                break
            idx = torch.nonzero(candidate).squeeze(1)
            a, b = flat_index[idx] // width, flat_index[idx] % width
            group_a, group_b = a // m, b // m
            # Exact float64 re-check of each candidate on its two groups.
            before_positions = torch.cat([group_positions[group_a], group_positions[group_b]], dim=1)
            after_positions = before_positions.clone()
            pick = torch.arange(idx.numel(), device=device)
            slot_a, slot_b = a % m, m + b % m
            after_positions[pick, slot_a] = before_positions[pick, slot_b]
            after_positions[pick, slot_b] = before_positions[pick, slot_a]
            before = group_kept[idx, group_a] + group_kept[idx, group_b]
            # Only the two groups of each candidate are read (indexing ordered[idx] first would copy whole blocks).
            after_values = ordered[idx.view(-1, 1, 1), row_index, after_positions.unsqueeze(1)]
            after_groups = _group_top_sum(after_values.reshape(-1, rows, 2, m), n).sum(dim=1)
            after = after_groups.sum(dim=1)
            accept = (after - before) > rel_tol * before.abs()
            gain[idx[~accept], a[~accept], b[~accept]] = float("-inf")
            if not bool(accept.any()):
                continue
            total_gain += (after - before)[accept].sum()
            group_kept[idx[accept], group_a[accept]] = after_groups[accept, 0]
            group_kept[idx[accept], group_b[accept]] = after_groups[accept, 1]
            idx, a, b = idx[accept], a[accept], b[accept]
            moved = block_order[idx, a].clone()
            block_order[idx, a] = block_order[idx, b]
            block_order[idx, b] = moved
            applied[idx] += 1
            touched = torch.zeros(live, width, dtype=torch.bool, device=device)
            touched[idx] = (position_group.unsqueeze(0) == (a // m).unsqueeze(1)) | (
                position_group.unsqueeze(0) == (b // m).unsqueeze(1)
            )
            gain.masked_fill_(touched.unsqueeze(2) | touched.unsqueeze(1), float("-inf"))
        order[active] = block_order
        swaps += int(applied.sum())
        active = active[applied > 0]
        if active.numel() == 0:
            break
    return order, passes, swaps, float(total_gain)


def local_block_shuffle(
    score: torch.Tensor,
    n: int,
    m: int,
    perm: torch.Tensor | None = None,
    *,
    block_size: int = 32,
    max_passes: int = 2,
    rel_tol: float = 1e-12,
) -> tuple[torch.Tensor, dict]:
    """Refine `perm` (identity when None) by swaps between groups inside blocks of `block_size` positions.

    Returns the new permutation (CPU LongTensor) and {"passes": most passes any block ran,
    "swaps": swaps applied, "gain": N:M kept score gained, exact for integer-valued scores}.
    """
    rows, cols = score.shape
    if cols % m != 0:
        raise ValueError(f"local shuffle: M = {m} does not divide the width {cols}")
    if block_size < m or block_size % m != 0:
        raise ValueError(f"local shuffle: block size {block_size} must be a positive multiple of M = {m}")
    if max_passes < 0:
        raise ValueError(f"local shuffle: max_passes must be >= 0, got {max_passes}")
    perm = torch.arange(cols) if perm is None else perm.detach().cpu().long()
    check_permutation(perm, cols)
    source = score.detach().to(torch.float64)
    device_perm = perm.to(score.device)
    width = min(block_size, cols)
    full_blocks, tail = divmod(cols, width)
    spans = [(0, full_blocks, width)] if full_blocks else []
    if tail:
        spans.append((full_blocks * width, 1, tail))
    new_perm = perm.clone()
    info = {"passes": 0, "swaps": 0, "gain": 0.0}
    for start, count, size in spans:
        stop = start + count * size
        # [K, R, B]: block k's columns in the current order, gathered in one copy
        index = device_perm[start:stop].view(count, 1, size).expand(count, rows, size)
        blocks = source.unsqueeze(0).expand(count, rows, cols).gather(2, index)
        order, passes, swaps, gain = _local_search(blocks, n, m, max_passes, rel_tol)
        new_perm[start:stop] = perm[start:stop].reshape(count, size).gather(1, order.cpu()).reshape(-1)
        info["passes"] = max(info["passes"], passes)
        info["swaps"] += swaps
        info["gain"] += gain
    return new_perm, info


@dataclass
class ShuffleResult:
    perm: torch.Tensor  # CPU LongTensor [C_in]; perm[j] = original column at position j
    chosen: str  # the candidate kept: "identity", "global", "global+local" or "identity+local"
    kept_score: float  # N:M kept score with `perm`
    baseline_kept_score: float  # N:M kept score without shuffle
    candidates: dict  # kept score of every candidate tried
    local: dict | None  # settings, start, passes and swaps of the local search

    @property
    def efficacy(self) -> float:
        """Kept score with shuffle / kept score without (1.0 when nothing is kept either way)."""
        if self.baseline_kept_score == 0:
            return 1.0
        return self.kept_score / self.baseline_kept_score

    def info(self) -> dict:
        return {
            "chosen": self.chosen,
            "efficacy": self.efficacy,
            "kept_score": self.kept_score,
            "baseline_kept_score": self.baseline_kept_score,
            "candidates": dict(self.candidates),
            "local": None if self.local is None else dict(self.local),
        }


def channel_shuffle(
    score: torch.Tensor,
    n: int,
    m: int,
    mode: str = "global+local",
    *,
    block_size: int = 32,
    max_passes: int = 2,
    keep_best: bool = True,
) -> ShuffleResult:
    """Channel shuffle of `score` [C_out, C_in] for an N:M mask.

    keep_best: the zig-zag deal can keep less score than no shuffle; then the identity is kept
    and the local search starts from it. Without keep_best the last stage's order is used as is.
    """
    if mode not in SHUFFLE_MODES:
        raise ValueError(f"shuffle mode {mode!r} is not one of {SHUFFLE_MODES}")
    if score.dim() != 2:
        raise ValueError(f"expected a 2-D score [C_out, C_in], got shape {tuple(score.shape)}")
    if not torch.isfinite(score).all():
        raise ValueError("channel shuffle: scores are not finite")
    cols = score.shape[1]
    grid = fixed_point_scores(score)  # decisions on exact integer sums (module docstring)
    identity = torch.arange(cols)
    candidates = {"identity": (identity, nm_kept_score(grid, n, m))}
    current = "identity"
    local_info = None
    if mode in ("global", "global+local"):
        global_perm = global_naive_shuffle(grid, m)
        candidates["global"] = (global_perm, nm_kept_score(grid, n, m, global_perm))
        if not keep_best or candidates["global"][1] > candidates["identity"][1]:
            current = "global"
    if mode == "global+local":
        start = current
        local_perm, local_info = local_block_shuffle(
            grid, n, m, candidates[start][0], block_size=block_size, max_passes=max_passes
        )
        local_info = {**local_info, "start": start, "block_size": block_size, "max_passes": max_passes}
        name = f"{start}+local"
        # Integer grid: the start's kept score plus the applied swaps' exact gains is exact.
        candidates[name] = (local_perm, candidates[start][1] + local_info["gain"])
        if not keep_best or candidates[name][1] >= candidates[start][1]:
            current = name
    perm = candidates[current][0]
    reported = {name: nm_kept_score(score, n, m, p) for name, (p, _) in candidates.items()}  # original scores
    return ShuffleResult(
        perm=perm,
        chosen=current,
        kept_score=reported[current],
        baseline_kept_score=reported["identity"],
        candidates=reported,
        local=local_info,
    )
