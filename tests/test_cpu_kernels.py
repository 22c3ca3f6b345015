"""The numba CPU kernels give exactly the torch paths' results (histograms, swap gains, kept scores)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esparse import cpu_kernels
from esparse.pruning import shuffle
from esparse.stats import StatsAccumulator, channel_histogram, safe_bin_width

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")


@pytest.fixture
def threads():
    """Run a test with torch's thread count set, and restore it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _compiled_counts(batches, lo, hi, bins, workers=2):
    counts = torch.zeros(workers, lo.numel() * bins, dtype=torch.int64)
    cpu_kernels.count_into(counts, batches, lo, safe_bin_width(lo, hi, bins), bins)
    return counts.sum(dim=0).reshape(lo.numel(), bins)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 300), channels=st.integers(1, 40),
       bins=st.sampled_from([2, 3, 16, 64, 256, 1000]), workers=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_histogram_equals_the_torch_path(seed, rows, channels, bins, workers, dtype):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, channels, generator=generator) * torch.rand(channels, generator=generator) * 10).to(dtype)
    x[:, 0] = 0.75  # a constant channel
    lo, hi = x.amin(0).to(torch.float64), x.amax(0).to(torch.float64)
    expected = channel_histogram(x, lo, hi, bins)
    split = [x[: rows // 3], x[rows // 3:]]  # several batches counted in one call
    assert torch.equal(_compiled_counts(split, lo, hi, bins, workers), expected)


@pytest.mark.parametrize("bins", [4, 10, 256])
def test_histogram_values_on_bin_edges_land_where_the_division_puts_them(bins):
    """Values at lo + k * w, and one ulp either side, are where the multiply-first estimate is
    unsafe: they must be counted like floor((x - lo) / w) (the torch path) all the same."""
    lo_value, hi_value = -1.7, 3.1
    width = (hi_value - lo_value) / bins
    edges = torch.tensor([lo_value + k * width for k in range(bins + 1)], dtype=torch.float64)
    values = torch.cat([edges, torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    values = values.clamp(lo_value, hi_value)
    x = torch.stack([values, values * 0.5 + 0.2, torch.full_like(values, 2.0)], dim=1)  # last: constant
    lo, hi = x.amin(0), x.amax(0)
    assert torch.equal(_compiled_counts([x], lo, hi, bins), channel_histogram(x, lo, hi, bins))


def test_histogram_of_ranges_too_narrow_for_a_finite_reciprocal():
    """float64 channels whose bin width is subnormal (1 / w overflows): every value divided exactly."""
    x = torch.tensor([[0.0, 1.0], [3e-310, 1.5], [7e-310, 2.0], [1e-309, 2.5]], dtype=torch.float64)
    lo, hi = x.amin(0), x.amax(0)
    assert torch.isinf(1.0 / safe_bin_width(lo, hi, 16)[0])
    assert torch.equal(_compiled_counts([x], lo, hi, 16), channel_histogram(x, lo, hi, 16))


def test_histogram_counts_values_outside_the_range_in_the_edge_bins():
    x = torch.tensor([[-5.0], [0.0], [0.5], [1.0], [7.0]])
    lo, hi = torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    counts = _compiled_counts([x], lo, hi, 4)
    assert counts.tolist() == [[2, 0, 1, 2]]
    assert torch.equal(counts, channel_histogram(x, lo, hi, 4))


def test_histogram_argument_errors():
    x = torch.randn(4, 3)
    lo, hi = x.amin(0).double(), x.amax(0).double()
    with pytest.raises(ValueError, match=r"counts must be int64 \[threads, 24\]"):
        cpu_kernels.count_into(torch.zeros(2, 23, dtype=torch.int64), [x], lo, safe_bin_width(lo, hi, 8), 8)
    with pytest.raises(ValueError, match=r"bins must be in \[1, 1048576\]"):
        cpu_kernels.count_into(torch.zeros(1, 3 << 21, dtype=torch.int64), [x], lo, safe_bin_width(lo, hi, 1 << 21),
                               1 << 21)
    with pytest.raises(ValueError, match="every batch must have 3 channels"):
        cpu_kernels.count_into(torch.zeros(1, 24, dtype=torch.int64), [x, torch.randn(2, 4)], lo,
                               safe_bin_width(lo, hi, 8), 8)


@pytest.mark.parametrize("limit, hold", [(1, True), (40, True), (1 << 26, True), (1 << 26, False)])
def test_accumulator_compiled_path_equals_torch_path(monkeypatch, threads, limit, hold):
    """Batches counted one by one, or held and counted in one call, or flushed whenever they would
    pass the limit, give the torch path's histogram; so does any thread count."""
    import esparse.stats as stats_module

    monkeypatch.setattr(stats_module, "_HELD_BATCHES_MAX_ELEMENTS", limit)
    generator = torch.Generator().manual_seed(limit)
    batches = [torch.randn(1, rows, 12, generator=generator) * 4 for rows in (5, 17, 1, 30)]

    def stream(compiled: bool, workers: int):
        threads(workers)
        monkeypatch.setattr(cpu_kernels, "AVAILABLE", compiled)
        acc = StatsAccumulator(12, frozenset({"norm", "entropy"}), 32)
        assert acc._compiled == compiled
        for b in batches:
            acc.observe_range(b)
        for b in batches:
            acc.observe(b, sequences=1, unchanged_until_finalize=hold)
        return acc.finalize()

    reference = stream(False, 2)
    for workers in (1, 2, 3):
        compiled = stream(True, workers)
        assert torch.equal(compiled.hist, reference.hist)
        assert torch.equal(compiled.sum_sq, reference.sum_sq)


def _integer_blocks(seed: int, blocks: int, rows: int, width: int, ties: bool) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    high = 4 if ties else 1 << 24  # few distinct values: many exact ties between gains
    return torch.randint(0, high, (blocks, rows, width), generator=generator).to(torch.float64)


@settings(max_examples=30, deadline=None)
@given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]), seed=st.integers(0, 10_000),
       blocks=st.integers(1, 5), rows=st.integers(1, 40), groups=st.integers(2, 6), ties=st.booleans())
def test_swap_gains_equal_the_torch_path_bit_for_bit(nm, seed, blocks, rows, groups, ties):
    n, m = nm
    values = _integer_blocks(seed, blocks, rows, groups * m, ties)
    gain_torch, kept_torch = shuffle._block_swap_gains(values, n, m)
    gain_numba, kept_numba = cpu_kernels.block_swap_gains(values, n, m)
    assert torch.equal(gain_numba, gain_torch)
    assert torch.equal(kept_numba, kept_torch)


@settings(max_examples=30, deadline=None)
@given(nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]), seed=st.integers(0, 10_000),
       blocks=st.integers(1, 5), rows=st.integers(1, 30), groups=st.integers(2, 6), ties=st.booleans(),
       passes=st.integers(0, 4))
def test_local_search_makes_the_torch_paths_decisions(nm, seed, blocks, rows, groups, ties, passes):
    """Order, passes, swaps and gain, on integer scores with and without many exact ties."""
    n, m = nm
    values = _integer_blocks(seed, blocks, rows, groups * m, ties)
    compiled = cpu_kernels.local_search(values, n, m, passes, 1e-12, shuffle._SCREEN_REL_TOL)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernels, "AVAILABLE", False)
        reference = shuffle._local_search(values, n, m, passes, 1e-12)
    assert torch.equal(compiled[0], reference[0])
    assert compiled[1:] == reference[1:]


def test_swap_gain_argument_errors():
    with pytest.raises(ValueError, match="float64"):
        cpu_kernels.block_swap_gains(torch.zeros(1, 2, 8, dtype=torch.float32), 2, 4)
    with pytest.raises(ValueError, match="m dividing the block width 6"):
        cpu_kernels.block_swap_gains(torch.zeros(1, 2, 6, dtype=torch.float64), 2, 4)


@settings(max_examples=30, deadline=None)
@given(nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (4, 8), (2, 8)]), seed=st.integers(0, 10_000),
       rows=st.integers(1, 50), groups=st.integers(1, 20))
def test_kept_score_equals_the_torch_path(nm, seed, rows, groups):
    n, m = nm
    generator = torch.Generator().manual_seed(seed)
    score = torch.randn(rows, groups * m, generator=generator, dtype=torch.float64).abs()
    grid = shuffle.fixed_point_scores(score)
    perm = torch.randperm(groups * m, generator=generator)
    compiled = [cpu_kernels.nm_kept_score(s, n, m, p) for s in (score, grid) for p in (None, perm)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_kernels, "AVAILABLE", False)
        reference = [shuffle.nm_kept_score(s, n, m, p) for s in (score, grid) for p in (None, perm)]
    assert compiled[2:] == reference[2:]  # integer grid: exact in any order
    assert compiled[:2] == pytest.approx(reference[:2], rel=1e-13)  # float sums: only the order differs


def test_kept_score_does_not_depend_on_the_thread_count(threads):
    generator = torch.Generator().manual_seed(4)
    score = torch.rand(999, 64, generator=generator, dtype=torch.float64) * 1e3
    results = set()
    for workers in (1, 2, 3):
        threads(workers)
        results.add(cpu_kernels.nm_kept_score(score, 2, 4))
    assert len(results) == 1


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
def test_channel_shuffle_is_the_same_on_either_path(monkeypatch, pattern):
    """End to end: the same permutation, chosen candidate, passes and swaps with and without numba."""
    n, m = pattern
    generator = torch.Generator().manual_seed(11)
    score = torch.randn(96, 256, generator=generator, dtype=torch.float64).abs()
    score *= torch.rand(256, generator=generator, dtype=torch.float64) * 10
    compiled = shuffle.channel_shuffle(score, n, m, block_size=32, max_passes=3)
    monkeypatch.setattr(cpu_kernels, "AVAILABLE", False)
    reference = shuffle.channel_shuffle(score, n, m, block_size=32, max_passes=3)
    assert torch.equal(compiled.perm, reference.perm)
    assert compiled.chosen == reference.chosen
    assert compiled.local == reference.local
    assert compiled.efficacy == pytest.approx(reference.efficacy, rel=1e-12)
    assert compiled.local["swaps"] > 0


def test_numba_is_loaded_only_when_a_kernel_runs():
    """Wanda, SparseGPT and every other job import the driver and statistics without numba's memory."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "import esparse.pruning.driver, esparse.pruning.shuffle, esparse.stats\n"
            "from esparse.pruning.methods import build_method\n"
            "from esparse.pruning.pattern import SparsityPattern\n"
            "w = torch.randn(8, 16)\n"
            "stats = esparse.stats.StatsAccumulator(16, frozenset({'norm'}))\n"
            "stats.observe(torch.randn(4, 16), 1)\n"
            "build_method('wanda').prune_layer(w, stats.finalize(), SparsityPattern.parse('2:4'))\n"
            "assert 'numba' not in sys.modules, 'numba imported without a compiled kernel running'\n"
            "from esparse import cpu_kernels\n"
            "cpu_kernels.nm_kept_score(w.double(), 2, 4)\n"
            "assert 'numba' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
