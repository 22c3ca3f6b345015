"""Streaming statistics against brute-force computations on small inputs."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from esparse.stats import (LayerStats, ScratchPool, StatsAccumulator, channel_bin_index, channel_histogram,
                           histogram_scratch_elements)


@pytest.fixture
def torch_histogram_path(monkeypatch):
    """The torch bin-index + bincount path (the GPU's), which a CPU with numba would not take."""
    import esparse.cpu_kernels

    monkeypatch.setattr(esparse.cpu_kernels, "AVAILABLE", False)


def brute_entropy(x: torch.Tensor, bins: int) -> torch.Tensor:
    """One channel at a time with torch.histc over the channel's exact range."""
    out = []
    for j in range(x.shape[1]):
        col = x[:, j].to(torch.float64)
        lo, hi = col.min().item(), col.max().item()
        if lo == hi:
            out.append(0.0)
            continue
        counts = torch.histc(col, bins=bins, min=lo, max=hi)
        p = counts / counts.sum()
        out.append(-sum(v * math.log(v) for v in p.tolist() if v > 0))
    return torch.tensor(out, dtype=torch.float64)


def stream(batches, needs, bins=8, scratch=None):
    acc = StatsAccumulator(batches[0].shape[-1], frozenset(needs), bins, scratch=scratch)
    if acc.needs_range_pass:
        for b in batches:
            acc.observe_range(b)
    for b in batches:
        acc.observe(b, sequences=b.shape[0])
    return acc.finalize()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), nbatches=st.integers(1, 4), bins=st.sampled_from([2, 5, 16, 64]))
def test_streaming_matches_brute_force(seed, nbatches, bins):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, 7, 6, generator=g) * torch.rand(6, generator=g) * 5 for _ in range(nbatches)]
    batches[0][..., 3] = 1.25  # a constant channel in the first batch only
    stats = stream(batches, {"norm", "entropy", "hessian"}, bins)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).to(torch.float64)
    assert stats.ntokens == x.shape[0]
    assert stats.nsequences == 2 * nbatches
    torch.testing.assert_close(stats.sum_sq, (x ** 2).sum(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats.l2_norm(), x.norm(dim=0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats.wanda_scaler_row(), (x ** 2).sum(0) / (2 * nbatches), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats.hessian, x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.lo, x.min(0).values)
    torch.testing.assert_close(stats.hi, x.max(0).values)
    assert int(stats.hist.sum()) == x.numel()
    torch.testing.assert_close(stats.entropy(), brute_entropy(x.to(torch.float32), bins), rtol=1e-6, atol=1e-9)


def test_batch_split_does_not_change_statistics():
    x = torch.randn(6, 16, 10)
    whole = stream([x], {"norm", "entropy", "hessian"}, 16)
    split = stream(list(x.split(1)), {"norm", "entropy", "hessian"}, 16)
    assert torch.equal(whole.hist, split.hist)
    torch.testing.assert_close(whole.sum_sq, split.sum_sq)
    # float32 GEMM per batch: equal up to float32 rounding, not bit for bit
    torch.testing.assert_close(whole.hessian, split.hessian, rtol=1e-5, atol=1e-4)


def test_entropy_extremes():
    hist = torch.tensor([[10, 0, 0, 0], [5, 5, 5, 5]])
    stats = LayerStats(ntokens=20, nsequences=1, sum_sq=torch.ones(2, dtype=torch.float64), hist=hist)
    ent = stats.entropy()
    assert ent[0].item() == 0.0
    assert ent[1].item() == pytest.approx(math.log(4))


def test_histogram_maximum_lands_in_last_bin():
    x = torch.tensor([[0.0], [1.0], [0.5]])
    hist = channel_histogram(x, torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64), 2)
    assert hist.tolist() == [[1, 2]]


def test_histogram_requires_range_pass_first():
    acc = StatsAccumulator(4, frozenset({"entropy"}), 8)
    with pytest.raises(RuntimeError, match="observe_range"):
        acc.observe(torch.randn(3, 4), sequences=1)


def test_pass_token_counts_must_agree():
    acc = StatsAccumulator(4, frozenset({"entropy"}), 8)
    acc.observe_range(torch.randn(3, 4))
    acc.observe_range(torch.randn(3, 4))
    acc.observe(torch.randn(3, 4), sequences=1)
    with pytest.raises(RuntimeError, match="same calibration inputs"):
        acc.finalize()


def test_only_requested_statistics_are_kept():
    stats = stream([torch.randn(1, 5, 4)], {"norm"})
    assert stats.hist is None and stats.hessian is None
    with pytest.raises(ValueError):
        stats.entropy()


def test_chunked_histogram_equals_per_channel_histc_and_leaves_the_input_alone():
    """More rows than one chunk, float64 input (no conversion copy), a constant channel."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3000, 200, generator=g, dtype=torch.float64) * torch.rand(200, generator=g, dtype=torch.float64))
    x[:, 11] = -0.5
    before = x.clone()
    lo, hi = x.amin(0), x.amax(0)
    hist = channel_histogram(x, lo, hi, 16)
    assert torch.equal(x, before)
    for j in range(x.shape[1]):
        expected = torch.histc(x[:, j], bins=16, min=lo[j].item(), max=hi[j].item()) if hi[j] > lo[j] \
            else torch.tensor([x.shape[0]] + [0] * 15, dtype=torch.float64)
        assert hist[j].tolist() == expected.to(torch.int64).tolist(), j



@pytest.mark.parametrize("limit", [1, 50, 130, 10_000])
def test_pooled_bin_indices_count_like_one_histogram(monkeypatch, torch_histogram_path, limit):
    """Indices pooled across batches and counted when the buffer fills (or a batch exceeds it) give
    the histogram of all the data at once."""
    import esparse.stats as stats_module

    monkeypatch.setattr(stats_module, "_PENDING_MIN_ELEMENTS", limit)
    monkeypatch.setattr(stats_module, "_PENDING_MAX_ELEMENTS", limit)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(1, rows, 6, generator=g) for rows in (3, 11, 1, 20, 7)]
    stats = stream(batches, {"entropy"}, 8)
    x = torch.cat([b.reshape(-1, 6) for b in batches])
    assert torch.equal(stats.hist, channel_histogram(x, stats.lo, stats.hi, 8))


def test_non_finite_calibration_inputs_are_refused():
    x = torch.randn(1, 4, 3)
    x[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match="1 of 3 channels contain NaN or infinite"):
        stream([x], {"entropy"})


def test_scratch_pool_hands_back_the_smallest_fitting_buffer_of_the_dtype():
    pool = ScratchPool()
    small, large = pool.take(10, torch.int32, torch.device("cpu")), pool.take(100, torch.int32, torch.device("cpu"))
    pool.give(large)
    pool.give(small)
    assert pool.take(5, torch.float64, torch.device("cpu")).dtype == torch.float64  # no int32 buffer handed out
    assert pool.take(8, torch.int32, torch.device("cpu")) is small
    assert pool.take(8, torch.int32, torch.device("cpu")) is large
    fresh = pool.take(8, torch.int32, torch.device("cpu"))
    assert fresh is not small and fresh is not large


def test_accumulators_sharing_a_pool_reuse_its_buffers_and_count_the_same(torch_histogram_path):
    """Garbage left in a reused buffer by one layer must not leak into the next layer's histogram."""
    g = torch.Generator().manual_seed(9)
    layers = [[torch.randn(2, 5, width, generator=g) * 3 for _ in range(3)] for width in (8, 8, 4, 8)]
    pool = ScratchPool()
    for batches in layers:
        shared = stream(batches, {"entropy"}, 16, scratch=pool)
        alone = stream(batches, {"entropy"}, 16)
        assert torch.equal(shared.hist, alone.hist)
    assert len(pool._free) == 2  # one index buffer and one float64 scratch, passed from layer to layer


@pytest.mark.parametrize("tokens", [1, 7, 3000])
def test_bin_index_with_given_scratch_equals_the_allocating_path(tokens):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 300, generator=g)
    lo, hi = x.amin(0).to(torch.float64), x.amax(0).to(torch.float64)
    scratch = torch.full((histogram_scratch_elements(300, x.device),), float("nan"), dtype=torch.float64)
    assert torch.equal(channel_bin_index(x, lo, hi, 32, scratch=scratch), channel_bin_index(x, lo, hi, 32))
    with pytest.raises(ValueError, match="scratch must be a 1-D float64 tensor"):
        channel_bin_index(x, lo, hi, 32, scratch=torch.empty(min(tokens, 2) * 300 - 1, dtype=torch.float64))
