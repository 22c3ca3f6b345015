"""Packed 2:4 format: exact round trip, canonical form, validation (CPU, property-based)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esparse.errors import ConfigError
from esparse_kernels.pack import (
    Packed24,
    is_24,
    meta_words,
    pack_24,
    random_24_weight,
    reference_linear,
    rel_frobenius_error,
    reorder_rows,
    unpack_24,
    unpack_24_permuted,
)

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _random_case(seed: int, n: int, groups: int, dtype: torch.dtype, with_perm: bool, drop: float):
    """Weight, a mask keeping <= 2 of every 4 permuted columns (some groups fewer), permutation."""
    gen = torch.Generator().manual_seed(seed)
    k = 4 * groups
    w, mask, perm = random_24_weight(n, k, dtype, "cpu", gen, with_perm)
    if drop > 0:  # remove some kept entries: groups with 1 or 0 kept values must round-trip too
        mask = mask & (torch.rand(n, k, generator=gen) >= drop)
    dense_unmasked = torch.randn(n, k, generator=gen).to(dtype)  # values outside the mask must vanish
    weight = torch.where(mask, w, dense_unmasked)
    return weight, mask, perm


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 9), groups=st.integers(1, 21),
       dtype=st.sampled_from(DTYPES), with_perm=st.booleans(), drop=st.sampled_from([0.0, 0.3, 1.0]))
def test_round_trip_is_exact(seed, n, groups, dtype, with_perm, drop):
    weight, mask, perm = _random_case(seed, n, groups, dtype, with_perm, drop)
    packed = pack_24(weight, mask, perm)
    k = 4 * groups
    assert packed.values.shape == (n, k // 2) and packed.values.dtype == dtype
    assert packed.meta.shape == (n, meta_words(k)) and packed.meta.dtype == torch.int32
    expected = torch.where(mask, weight, torch.zeros((), dtype=dtype))
    assert torch.equal(unpack_24(packed), expected)
    # the permuted unpack is the same matrix with columns in permuted order
    permuted = unpack_24_permuted(packed)
    cols = perm if perm is not None else torch.arange(k)
    assert torch.equal(permuted, expected[:, cols])
    # packing is canonical: repacking the unpacked weight gives identical tensors
    again = pack_24(unpack_24(packed), mask, perm)
    assert torch.equal(again.values, packed.values) and torch.equal(again.meta, packed.meta)
    # state-dict round trip
    restored = Packed24.from_state_dict(packed.state_dict(prefix="layer."), prefix="layer.")
    assert torch.equal(unpack_24(restored), expected)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), groups=st.integers(1, 12))
def test_in_group_positions_are_increasing_and_distinct(seed, n, groups):
    weight, mask, perm = _random_case(seed, n, groups, torch.float16, True, 0.3)
    packed = pack_24(weight, mask, perm)
    m64 = packed.meta.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(m64 >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(n, -1)[:, :groups]
    lo, hi = nibbles & 3, nibbles >> 2
    assert bool((lo < hi).all())


def test_size_is_0_5625_of_dense():
    w, mask, perm = random_24_weight(64, 4096, torch.float16, "cpu", torch.Generator().manual_seed(0))
    packed = pack_24(w, mask, perm)
    assert packed.nbytes(include_perm=False) == int(0.5625 * w.numel() * 2)


def test_mask_none_keeps_nonzeros():
    w, mask, _ = random_24_weight(8, 32, torch.float16, "cpu", torch.Generator().manual_seed(1), with_perm=False)
    assert torch.equal(unpack_24(pack_24(w)), w)


def test_invalid_inputs_raise_config_error():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(4, 8, generator=gen).half()
    three = torch.zeros(4, 8, dtype=torch.bool)
    three[:, :3] = True
    with pytest.raises(ConfigError, match="not 2:4"):
        pack_24(w, three)
    with pytest.raises(ConfigError, match="divisible by 4"):
        pack_24(torch.randn(4, 6).half())
    with pytest.raises(ConfigError, match="not a permutation"):
        pack_24(w, None, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]))
    with pytest.raises(ConfigError, match="shape"):
        pack_24(w, None, torch.arange(7))
    with pytest.raises(ConfigError, match="dtype"):
        pack_24(w.to(torch.int8))


def test_is_24_respects_the_permutation():
    gen = torch.Generator().manual_seed(3)
    _, mask, perm = random_24_weight(16, 64, torch.float16, "cpu", gen)
    assert is_24(mask, perm)
    # in the original order a random permutation almost surely breaks the groups
    assert not is_24(mask) or torch.equal(perm, torch.arange(64))
    assert not is_24(torch.ones(2, 8, dtype=torch.bool))


def test_reference_linear_matches_dense_and_error_metric():
    gen = torch.Generator().manual_seed(4)
    w, mask, perm = random_24_weight(24, 96, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm)
    x = torch.randn(5, 96, generator=gen).half()
    ref = reference_linear(x, packed)
    direct = x.double() @ w.double().t()
    assert rel_frobenius_error(ref, direct) < 1e-12
    nan_out = ref.clone()
    nan_out[0, 0] = float("nan")
    assert rel_frobenius_error(nan_out, ref) == float("inf")


# -- Hopper metadata layout (one copy shared by the CUTLASS prefill GEMM and the CUDA decode kernel) --

from esparse_kernels.pack import (  # noqa: E402
    SM90_PAD_WORD,
    meta_from_sm90,
    meta_to_sm90,
    sm90_meta_shape,
    sm90_word_index,
)


def test_sm90_word_index_matches_cutlass_atom_by_hand():
    """Offsets worked out from Sm90GemmSparseConfig::TensorEAtom_16bit (make_ordered_layout of
    ((8,2,4),(16,2,4)) with steps ((3,1,5),(0,4,2)): strides in logical elements ((128,16,2048),
    (1,1024,32)), 16 logical elements per 16-bit word)."""
    def at(row, word, rows_aligned=128):
        return int(sm90_word_index(torch.tensor(row), torch.tensor(word), rows_aligned))

    assert at(0, 0) == 0
    assert at(8, 0) == 1        # rows r and r + 8 share a 32-bit pair
    assert at(0, 2) == 2        # words 0, 2, 4, 6 of a row: stride 32 elements = 2 words
    assert at(1, 0) == 8        # next row: 128 elements
    assert at(0, 1) == 64       # odd words: 1024 elements
    assert at(16, 0) == 128     # rows 16..63 in steps of 16: 2048 elements
    assert at(64, 0) == 512     # next atom along the rows (1 KiB)
    assert at(0, 8) == 128 * 8  # next atom along the columns: rows_aligned * 128 / 16
    assert at(63, 7) == 1 + 6 + 56 + 64 + 384


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 200), words=st.integers(1, 40))
def test_sm90_word_index_is_a_bijection_onto_the_padded_tensor(rows, words):
    rows_aligned, cols_aligned = sm90_meta_shape(rows, 16 * words)
    r = torch.arange(rows_aligned).unsqueeze(1)
    w = torch.arange(cols_aligned // 16).unsqueeze(0)
    index = sm90_word_index(r, w, rows_aligned).reshape(-1)
    assert torch.equal(index.sort().values, torch.arange(rows_aligned * cols_aligned // 16))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 150), words=st.integers(1, 20), drop=st.sampled_from([0.0, 0.5]))
def test_sm90_meta_round_trip_and_padding(seed, n, words, drop):
    k = 16 * words  # K % 32 == 16 too: the last int32 word then has an unused (zero) high half
    weight, mask, perm = _random_case(seed, n, k // 4, torch.float16, True, drop)
    packed = pack_24(weight, mask, perm)
    e = meta_to_sm90(packed.meta, k)
    rows_aligned, cols_aligned = sm90_meta_shape(n, k)
    assert e.dtype == torch.uint8 and e.numel() == rows_aligned * cols_aligned // 8
    assert torch.equal(meta_from_sm90(e, n, k), packed.meta)
    # every word outside the weight is the padding code, every word inside one of the row's words
    index = sm90_word_index(torch.arange(n).unsqueeze(1), torch.arange(words).unsqueeze(0), rows_aligned)
    halves = e.view(torch.int16).to(torch.int64) & 0xFFFF
    outside = torch.ones(halves.numel(), dtype=torch.bool)
    outside[index.reshape(-1)] = False
    assert bool((halves[outside] == SM90_PAD_WORD).all())


def test_sm90_meta_rejects_bad_shapes():
    packed = pack_24(*random_24_weight(8, 40, torch.float16, "cpu", torch.Generator().manual_seed(0)))
    with pytest.raises(ConfigError, match="in_features % 16"):
        meta_to_sm90(packed.meta, 40)
    with pytest.raises(ConfigError, match="int32"):
        meta_to_sm90(packed.meta.to(torch.int64), 40)
    with pytest.raises(ConfigError, match="at least"):
        meta_from_sm90(torch.zeros(10, dtype=torch.uint8), 8, 64)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), groups=st.integers(1, 12), with_perm=st.booleans())
def test_reorder_rows_moves_whole_rows_and_keeps_the_column_permutation(seed, n, groups, with_perm):
    weight, mask, perm = _random_case(seed, n, groups, torch.float16, with_perm, 0.3)
    packed = pack_24(weight, mask, perm)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed ^ 0x5A5A))
    moved = reorder_rows(packed, order)
    assert torch.equal(unpack_24(moved), unpack_24(packed)[order])
    assert moved.perm is packed.perm and moved.shape == packed.shape
    # it is canonical: the same as packing the reordered weight
    again = pack_24(weight[order], mask[order], perm)
    assert torch.equal(again.values, moved.values) and torch.equal(again.meta, moved.meta)


def test_reorder_rows_rejects_what_is_not_a_row_permutation():
    packed = pack_24(*random_24_weight(6, 16, torch.float16, "cpu", torch.Generator().manual_seed(1)))
    with pytest.raises(ConfigError, match=r"shape \[6\]"):
        reorder_rows(packed, torch.arange(5))
    with pytest.raises(ConfigError, match="not a permutation"):
        reorder_rows(packed, torch.tensor([0, 1, 2, 3, 4, 4]))
