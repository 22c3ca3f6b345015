"""N:M and unstructured mask selection, the explicit tie-break, and the mask checker."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esparse.errors import DataError
from esparse.pruning.masks import (
    MaskPatternError,
    check_mask,
    check_permutation,
    descending_values,
    invert_permutation,
    keep_top_k,
    nm_mask,
    select_mask,
    unpermute_mask,
    unstructured_mask,
)
from esparse.pruning.pattern import SparsityPattern

NM_PATTERNS = [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (6, 8), (8, 16), (16, 32)]  # 16:32 exercises topk


def _scores(rows: int, cols: int, seed: int, kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "quantized":  # 16 distinct values, like 4-bit weights: ties everywhere
        return torch.randint(0, 16, (rows, cols), generator=generator).to(torch.float64) * 0.125
    if kind == "binary":
        return torch.randint(0, 2, (rows, cols), generator=generator).to(torch.float32)
    return torch.rand(rows, cols, generator=generator, dtype=torch.float64)


def _reference_keep(row_values: list[float], k: int) -> set[int]:
    """Plain-Python rule: sort by (score descending, index ascending), keep the first k."""
    order = sorted(range(len(row_values)), key=lambda j: (-row_values[j], j))
    return set(order[:k])


@settings(max_examples=60, deadline=None)
@given(
    nm=st.sampled_from(NM_PATTERNS),
    rows=st.integers(1, 9),
    groups=st.integers(1, 9),
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["quantized", "binary", "continuous"]),
)
def test_nm_mask_valid_and_matches_reference_tie_break(nm, rows, groups, seed, kind):
    n, m = nm
    score = _scores(rows, groups * m, seed, kind)
    mask = nm_mask(score, n, m)
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert (mask.reshape(rows, groups, m).sum(dim=2) == n).all()
    for r in range(rows):
        for g in range(groups):
            values = score[r, g * m : (g + 1) * m].tolist()
            expected = _reference_keep(values, n)
            got = {j for j in range(m) if mask[r, g * m + j]}
            assert got == expected
    report = check_mask(mask, SparsityPattern.nm(n, m))
    assert report["sparsity"] == pytest.approx(1 - n / m)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 7),
    cols=st.integers(2, 70),
    percent=st.integers(1, 99),
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(["quantized", "binary", "continuous"]),
)
def test_unstructured_exact_per_row_and_reference_tie_break(rows, cols, percent, seed, kind):
    pattern = SparsityPattern.unstructured(percent / 100)
    score = _scores(rows, cols, seed, kind)
    mask = unstructured_mask(score, pattern.sparsity)
    keep = cols - pattern.pruned_per_row(cols)
    assert (mask.sum(dim=1) == keep).all()
    for r in range(rows):
        assert {j for j in range(cols) if mask[r, j]} == _reference_keep(score[r].tolist(), keep)
    check_mask(mask, pattern)


def test_all_equal_scores_keep_lowest_indices():
    score = torch.ones(3, 16)
    assert nm_mask(score, 2, 4).reshape(3, 4, 4)[..., :2].all()
    assert not nm_mask(score, 2, 4).reshape(3, 4, 4)[..., 2:].any()
    mask = unstructured_mask(score, 0.5)
    assert mask[:, :8].all() and not mask[:, 8:].any()
    # negative zero equals zero: the lower index still wins
    signed_zeros = torch.tensor([[-0.0, 0.0, -0.0, 0.0]])
    assert nm_mask(signed_zeros, 2, 4).tolist() == [[True, True, False, False]]


@settings(max_examples=30, deadline=None)
@given(nm=st.sampled_from(NM_PATTERNS), rows=st.integers(2, 8), groups=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_tie_break_is_equivariant_and_layout_independent(nm, rows, groups, seed):
    n, m = nm
    pattern = SparsityPattern.nm(n, m)
    score = _scores(rows, groups * m, seed, "quantized")
    mask = select_mask(score, pattern)
    generator = torch.Generator().manual_seed(seed)
    # permuting rows or whole groups permutes the mask the same way
    row_perm = torch.randperm(rows, generator=generator)
    assert torch.equal(select_mask(score[row_perm], pattern), mask[row_perm])
    group_perm = torch.randperm(groups, generator=generator)
    column_perm = (group_perm.unsqueeze(1) * m + torch.arange(m)).reshape(-1)
    assert torch.equal(select_mask(score[:, column_perm], pattern), mask[:, column_perm])
    # equal values in another layout or dtype give the same mask
    assert torch.equal(select_mask(score.t().contiguous().t(), pattern), mask)
    assert torch.equal(select_mask(score.to(torch.float32), pattern), mask)
    # determinism: bit-identical on repeat
    assert torch.equal(select_mask(score.clone(), pattern), mask)


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 40), count=st.integers(1, 40), seed=st.integers(0, 1000))
def test_descending_values_match_sort(width, count, seed):
    count = min(count, width)
    values = _scores(5, width, seed, "quantized")
    expected = torch.sort(values, dim=-1, descending=True).values[:, :count]
    got = torch.stack(descending_values(values, count), dim=-1)
    assert torch.equal(got, expected)


def test_keep_top_k_edges_and_nan():
    score = torch.rand(2, 5)
    assert not keep_top_k(score, 0).any()
    assert keep_top_k(score, 5).all()
    with pytest.raises(ValueError):
        keep_top_k(score, 6)
    with pytest.raises(ValueError, match="NaN"):
        nm_mask(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), 2, 4)


def test_select_mask_rejects_bad_width():
    from esparse.errors import ConfigError

    with pytest.raises(ConfigError, match="does not divide"):
        select_mask(torch.rand(2, 10), SparsityPattern.nm(2, 4))


@settings(max_examples=30, deadline=None)
@given(nm=st.sampled_from(NM_PATTERNS[:7]), rows=st.integers(1, 6), groups=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_permuted_mask_round_trip_and_checker(nm, rows, groups, seed):
    n, m = nm
    cols = groups * m
    pattern = SparsityPattern.nm(n, m)
    score = _scores(rows, cols, seed, "continuous")
    perm = torch.randperm(cols, generator=torch.Generator().manual_seed(seed))
    permuted_mask = select_mask(score[:, perm], pattern)
    mask = unpermute_mask(permuted_mask, perm)
    assert torch.equal(mask[:, perm], permuted_mask)
    assert torch.equal(invert_permutation(perm)[perm], torch.arange(cols))
    report = check_mask(mask, pattern, perm)
    assert report["permuted"] and report["sparsity"] == pytest.approx(1 - n / m)


def test_checker_reports_violations():
    pattern = SparsityPattern.nm(2, 4)
    mask = nm_mask(torch.rand(4, 8), 2, 4)
    broken = mask.clone()
    broken[1, 5] = ~broken[1, 5]
    with pytest.raises(MaskPatternError, match="row 1, group 1"):
        check_mask(broken, pattern)
    assert issubclass(MaskPatternError, DataError)
    with pytest.raises(MaskPatternError, match="bool"):
        check_mask(mask.to(torch.uint8), pattern)
    with pytest.raises(MaskPatternError, match="does not divide"):
        check_mask(torch.ones(2, 6, dtype=torch.bool), pattern)
    # a mask valid in original order is (generally) invalid under a permutation
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    all_first = torch.tensor([[True, True, False, False] * 2])
    check_mask(all_first, pattern)
    with pytest.raises(MaskPatternError, match="after perm"):
        check_mask(all_first, pattern, perm)
    with pytest.raises(MaskPatternError, match="repeats"):
        check_permutation(torch.tensor([0, 0, 1, 2]), 4)
    with pytest.raises(MaskPatternError, match="range"):
        check_permutation(torch.tensor([0, 1, 2, 4]), 4)
    # unstructured, per row and per layer
    unstructured = SparsityPattern.unstructured(0.5)
    uneven = torch.tensor([[True, True, True, False], [True, False, False, False]])
    with pytest.raises(MaskPatternError, match="row 0 keeps 3"):
        check_mask(uneven, unstructured)
    assert check_mask(uneven, unstructured, scope="layer")["sparsity"] == 0.5
    with pytest.raises(MaskPatternError, match="per layer"):
        check_mask(torch.ones(2, 4, dtype=torch.bool), unstructured, scope="layer")
    # weights must be zero where pruned
    weight = torch.rand(4, 8) + 0.1
    with pytest.raises(MaskPatternError, match="non-zero"):
        check_mask(mask, pattern, weight=weight)
    check_mask(mask, pattern, weight=weight * mask)
