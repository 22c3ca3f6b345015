"""Mask selection (N:M and unstructured) with an explicit tie-break, and the mask checker.

Tie-break, identical on every device: among equal scores the LOWER column index is kept. It does
not rely on how sort/topk order equal elements: the k-th largest *value* of a row (unaffected by
ties) is found first, every score strictly above it is kept, and the remaining slots go to the
scores equal to it in increasing index order (an integer cumsum, exact everywhere).
"""

from __future__ import annotations

import torch

from esparse.errors import DataError
from esparse.pruning.pattern import SparsityPattern, check_layer_width


class MaskPatternError(DataError):
    """A mask (or a permutation) does not satisfy the sparsity pattern it claims."""


def _check_scores(score: torch.Tensor) -> None:
    if score.dim() != 2:
        raise ValueError(f"expected a 2-D score [C_out, C_in], got shape {tuple(score.shape)}")
    if score.is_floating_point() and torch.isnan(score).any():
        raise ValueError("scores contain NaN; a mask cannot be chosen")


_NETWORK_MAX_WIDTH = 16  # up to this group width a min/max sorting network beats topk/sort by ~10x


def _merge_exchange_comparators(width: int) -> list[tuple[int, int]]:
    """Batcher's merge-exchange sorting network for any width (Knuth, TAOCP 5.2.2, Algorithm M):
    comparator (i, j), i < j, puts the larger value at i."""
    comparators = []
    top = 1 << max(0, (width - 1).bit_length() - 1)
    p = top
    while p > 0:
        q, r, d = top, 0, p
        while True:
            comparators.extend((i, i + d) for i in range(width - d) if i & p == r)
            if q == p:
                break
            d, q, r = q - p, q // 2, p
        p //= 2
    return comparators


_SELECTION_NETWORKS: dict[tuple[int, int], list[tuple[int, int, bool, bool]]] = {}


def _selection_network(width: int, count: int) -> list[tuple[int, int, bool, bool]]:
    """The comparators of the sorting network that the `count` largest outputs depend on, each with
    which of its two outputs (max to i, min to j) is used later."""
    key = (width, count)
    if key not in _SELECTION_NETWORKS:
        live = set(range(count))
        kept = []
        for i, j in reversed(_merge_exchange_comparators(width)):
            want_max, want_min = i in live, j in live
            if want_max or want_min:
                kept.append((i, j, want_max, want_min))
                live |= {i, j}
        _SELECTION_NETWORKS[key] = kept[::-1]
    return _SELECTION_NETWORKS[key]


def descending_values(values: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The `count` largest values along the last dim, largest first, as tensors of shape values.shape[:-1].

    Values only, so how ties are ordered cannot matter. Small widths use a min/max sorting network
    cut down to the comparators the `count` largest outputs need (exact, identical on every device).
    """
    width = values.shape[-1]
    if not 1 <= count <= width:
        raise ValueError(f"cannot take the {count} largest of {width} values")
    if width <= _NETWORK_MAX_WIDTH:
        lanes = list(values.unbind(-1))
        for i, j, want_max, want_min in _selection_network(width, count):
            upper, lower = lanes[i], lanes[j]
            if want_max:
                lanes[i] = torch.maximum(upper, lower)
            if want_min:
                lanes[j] = torch.minimum(upper, lower)
        return lanes[:count]
    return list(torch.topk(values, count, dim=-1, largest=True, sorted=True).values.unbind(-1))


def keep_top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping the k largest entries along the last dim; ties: lower index wins."""
    length = score.shape[-1]
    if not 0 <= k <= length:
        raise ValueError(f"cannot keep {k} of {length} entries")
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k == length:
        return torch.ones_like(score, dtype=torch.bool)
    if length <= _NETWORK_MAX_WIDTH:
        threshold = descending_values(score, k)[k - 1].unsqueeze(-1)
    else:  # the k-th largest is the (length - k + 1)-th smallest; selection, not a sort
        threshold = torch.kthvalue(score, length - k + 1, dim=-1, keepdim=True).values
    greater = score > threshold
    equal = score == threshold
    slots_left = k - greater.sum(dim=-1, keepdim=True)
    order_among_equal = torch.cumsum(equal.to(torch.int32), dim=-1)
    return greater | (equal & (order_among_equal <= slots_left))


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n best of every m consecutive columns of every row (ties: lower column wins)."""
    _check_scores(score)
    rows, cols = score.shape
    if cols % m != 0:
        raise ValueError(f"N:M mask: M = {m} does not divide the width {cols}")
    grouped = score.reshape(rows, cols // m, m)
    return keep_top_k(grouped, n).reshape(rows, cols)


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the best (1 - sparsity) of every row (Wanda's per-row convention; ties: lower column wins)."""
    _check_scores(score)
    pruned = SparsityPattern.unstructured(sparsity).pruned_per_row(score.shape[1])
    return keep_top_k(score, score.shape[1] - pruned)


def select_mask(score: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """Mask (True = keep) for `pattern`, column groups taken in the score's own column order."""
    _check_scores(score)
    check_layer_width(pattern, score.shape[1])
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m)
    return unstructured_mask(score, pattern.sparsity)


def check_permutation(perm: torch.Tensor, size: int) -> None:
    """Raise MaskPatternError unless `perm` is a 1-D integer permutation of range(size)."""
    if perm.dim() != 1 or perm.numel() != size:
        raise MaskPatternError(f"permutation has shape {tuple(perm.shape)}, expected [{size}]")
    if perm.dtype.is_floating_point or perm.dtype == torch.bool or perm.is_complex():
        raise MaskPatternError(f"permutation must hold integers, got dtype {perm.dtype}")
    seen = torch.zeros(size, dtype=torch.bool, device=perm.device)
    if size and (perm.min() < 0 or perm.max() >= size):
        raise MaskPatternError(f"permutation entries must lie in [0, {size}), got range [{int(perm.min())}, {int(perm.max())}]")
    seen[perm.long()] = True
    if not bool(seen.all()):
        raise MaskPatternError(f"permutation of size {size} repeats entries (misses {int((~seen).sum())} columns)")


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv such that inv[perm[j]] = j."""
    inverse = torch.empty_like(perm, dtype=torch.long)
    inverse[perm.long()] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def unpermute_mask(permuted_mask: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Bring a mask chosen on W[:, perm] back to the original column order (mask[:, perm] = permuted_mask)."""
    mask = torch.empty_like(permuted_mask)
    mask[:, perm.long()] = permuted_mask
    return mask


def check_mask(
    mask: torch.Tensor,
    pattern: SparsityPattern,
    perm: torch.Tensor | None = None,
    *,
    scope: str = "row",
    weight: torch.Tensor | None = None,
) -> dict:
    """Assert that `mask` (True = kept, original column order) obeys `pattern`; return its sparsity.

    N:M: every row has exactly N kept in every group of M consecutive columns of mask[:, perm]
    (perm[j] = original column placed at position j; identity when None).
    Unstructured, scope "row": every row prunes exactly pattern.pruned_per_row(C_in) (Wanda);
    scope "layer": the layer prunes exactly pattern.pruned_total(C_out * C_in) (SparseGPT's
    per-block selection). When `weight` is given it must be zero wherever the mask prunes.
    Raises MaskPatternError naming the first violation.
    """
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise MaskPatternError(f"mask must be a 2-D bool tensor, got dtype {mask.dtype}, shape {tuple(mask.shape)}")
    if scope not in ("row", "layer"):
        raise ValueError(f"scope must be 'row' or 'layer', got {scope!r}")
    rows, cols = mask.shape
    try:
        check_layer_width(pattern, cols)
    except Exception as error:  # re-raise as a mask error: the mask does not fit its pattern
        raise MaskPatternError(str(error)) from error
    ordered = mask
    if perm is not None:
        check_permutation(perm, cols)
        ordered = mask[:, perm.long()]
    kept_per_row = mask.sum(dim=1)
    if pattern.is_nm:
        kept_per_group = ordered.reshape(rows, cols // pattern.m, pattern.m).sum(dim=2)
        bad = kept_per_group != pattern.n
        if bool(bad.any()):
            row, group = (int(v) for v in torch.nonzero(bad)[0])
            raise MaskPatternError(
                f"mask violates {pattern.label}: row {row}, group {group} (positions {group * pattern.m}.."
                f"{group * pattern.m + pattern.m - 1}{' after perm' if perm is not None else ''}) keeps "
                f"{int(kept_per_group[row, group])} of {pattern.m}, expected exactly {pattern.n}"
            )
    elif scope == "row":
        expected = cols - pattern.pruned_per_row(cols)
        bad_rows = torch.nonzero(kept_per_row != expected)
        if bad_rows.numel():
            row = int(bad_rows[0, 0])
            raise MaskPatternError(
                f"mask violates {pattern.label} (per row): row {row} keeps {int(kept_per_row[row])} of {cols}, "
                f"expected exactly {expected}"
            )
    else:
        expected_pruned = pattern.pruned_total(rows * cols)
        pruned = rows * cols - int(kept_per_row.sum())
        if pruned != expected_pruned:
            raise MaskPatternError(
                f"mask violates {pattern.label} (per layer): prunes {pruned} of {rows * cols}, expected exactly {expected_pruned}"
            )
    if weight is not None:
        if tuple(weight.shape) != (rows, cols):
            raise MaskPatternError(f"weight shape {tuple(weight.shape)} does not match mask shape {(rows, cols)}")
        nonzero_pruned = int(((weight != 0) & ~mask.to(weight.device)).sum())
        if nonzero_pruned:
            raise MaskPatternError(f"weight has {nonzero_pruned} non-zero entries where the mask prunes")
    kept = int(kept_per_row.sum())
    total = rows * cols
    row_sparsity = 1.0 - kept_per_row.to(torch.float64) / cols
    return {
        "pattern": pattern.label,
        "scope": "row" if pattern.is_nm else scope,
        "rows": rows,
        "cols": cols,
        "kept": kept,
        "total": total,
        "sparsity": (total - kept) / total if total else 0.0,
        "min_row_sparsity": float(row_sparsity.min()) if rows else 0.0,
        "max_row_sparsity": float(row_sparsity.max()) if rows else 0.0,
        "permuted": perm is not None,
    }
