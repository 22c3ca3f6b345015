"""CPU and CUDA give the same masks (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from esparse.pruning.masks import check_mask, select_mask
from esparse.pruning.methods import build_method, check_layer_result
from esparse.pruning.pattern import SparsityPattern
from esparse.pruning.scores import esparse_score, wanda_score
from esparse.stats import LayerStats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PATTERNS = ["2:4", "4:8", "unstructured", "16:32"]


def _quantized_layer(rows: int, cols: int, seed: int):
    """4-bit-like weights (16 levels per 32-column block) and calibration statistics."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.randint(-8, 8, (rows, cols), generator=generator).to(torch.float32)
    block_scale = torch.rand(rows, cols // 32, 1, generator=generator) + 0.5
    weight = (levels.reshape(rows, cols // 32, 32) * block_scale).reshape(rows, cols).to(torch.bfloat16)
    inputs = torch.randn(256, cols, generator=generator, dtype=torch.float64)
    inputs[:, : cols // 50] *= 30
    stats = LayerStats(
        ntokens=256, nsequences=4, sum_sq=inputs.square().sum(0),
        hist=torch.randint(0, 50, (cols, 32), generator=generator),
        hessian=inputs.T @ inputs,
    )
    return weight, stats


def _to(stats: LayerStats, device: str) -> LayerStats:
    return LayerStats(
        ntokens=stats.ntokens, nsequences=stats.nsequences, sum_sq=stats.sum_sq.to(device),
        hist=None if stats.hist is None else stats.hist.to(device),
        hessian=None if stats.hessian is None else stats.hessian.to(device),
    )


@pytest.mark.parametrize("pattern_text", PATTERNS)
def test_masks_and_scores_identical_on_cpu_and_cuda(pattern_text):
    pattern = SparsityPattern.parse(pattern_text)
    weight, stats = _quantized_layer(1536, 576, seed=1)
    for score in (
        weight.abs().to(torch.float64),
        wanda_score(weight, stats.wanda_scaler_row()),
        esparse_score(weight, "entropy+norm", entropy=stats.entropy(), l2_norm=stats.l2_norm(), alpha=0.7),
    ):
        on_gpu = score.cuda()
        assert torch.equal(on_gpu.cpu(), score)
        cpu_mask = select_mask(score, pattern)
        gpu_mask = select_mask(on_gpu, pattern)
        assert torch.equal(gpu_mask.cpu(), cpu_mask)
        check_mask(gpu_mask, pattern)
    gpu_wanda = wanda_score(weight.cuda(), _to(stats, "cuda").wanda_scaler_row())
    assert torch.equal(gpu_wanda.cpu(), wanda_score(weight, stats.wanda_scaler_row()))


@pytest.mark.parametrize("name, settings_", [
    ("magnitude", {}), ("wanda", {}), ("esparse", {"shuffle": "none"}), ("esparse", {}), ("sparsegpt", {}),
])
@pytest.mark.parametrize("pattern_text", ["2:4", "unstructured"])
def test_methods_on_cuda(name, settings_, pattern_text):
    pattern = SparsityPattern.parse(pattern_text)
    method = build_method(name, settings_)
    weight, stats = _quantized_layer(384, 576, seed=2)
    cpu = method.prune_layer(weight, stats, pattern)
    gpu = method.prune_layer(weight.cuda(), _to(stats, "cuda"), pattern)
    assert gpu.weight.is_cuda and gpu.weight.dtype == weight.dtype
    check_layer_result(gpu, pattern)
    if name in ("magnitude", "wanda") or settings_.get("shuffle") == "none":
        assert torch.equal(gpu.mask.cpu(), cpu.mask) and torch.equal(gpu.weight.cpu(), cpu.weight)
    if gpu.perm is not None:
        assert gpu.kept_score_ratio >= 1.0
        x = torch.randn(4, 576, dtype=torch.float64, device="cuda")
        pruned = gpu.weight.to(torch.float64)
        torch.testing.assert_close(x[:, gpu.perm] @ pruned[:, gpu.perm].T, x @ pruned.T)
    if name == "sparsegpt":
        assert torch.isfinite(gpu.weight.float()).all()
        agreement = (gpu.mask.cpu() == cpu.mask).float().mean().item()
        assert agreement > 0.99  # float64 on both; only near-ties may flip


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_channel_shuffle_identical_on_cpu_and_cuda(n, m):
    """The shuffle decides on exact integer sums, so the device (and its chunking of the gain
    computation, much larger on a GPU) cannot change the permutation."""
    from esparse.pruning.shuffle import channel_shuffle

    weight, stats = _quantized_layer(1536, 576, seed=3)
    score = esparse_score(weight, "entropy+norm", entropy=stats.entropy(), l2_norm=stats.l2_norm(), alpha=64.0)
    on_cpu = channel_shuffle(score, n, m)
    on_gpu = channel_shuffle(score.cuda(), n, m)
    assert on_cpu.chosen == on_gpu.chosen and on_cpu.local == on_gpu.local
    assert torch.equal(on_cpu.perm, on_gpu.perm.cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_histogram_identical_on_cpu_and_cuda(dtype):
    from esparse.stats import StatsAccumulator

    generator = torch.Generator().manual_seed(4)
    batches = [(torch.randn(2, 300, 576, generator=generator) * torch.rand(576, generator=generator) * 4).to(dtype)
               for _ in range(5)]
    results = []
    for device in ("cpu", "cuda"):
        accumulator = StatsAccumulator(576, frozenset({"entropy"}), 256, device)
        for batch in batches:
            accumulator.observe_range(batch.to(device))
        for batch in batches:
            accumulator.observe(batch.to(device), sequences=2)
        results.append(accumulator.finalize())
    assert torch.equal(results[0].lo, results[1].lo.cpu()) and torch.equal(results[0].hi, results[1].hi.cpu())
    assert torch.equal(results[0].hist, results[1].hist.cpu())
