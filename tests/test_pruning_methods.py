"""The plug-in interface: registry, settings validation, needs, and prune_layer of every method."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esparse.errors import ConfigError
from esparse.pruning.methods import (
    METHOD_NAMES,
    ESparse,
    LayerPruneResult,
    PruningMethod,
    build_method,
    check_layer_result,
)
from esparse.pruning.pattern import SparsityPattern
from esparse.pruning.scores import esparse_score, magnitude_score, scaled_norm, wanda_score
from esparse.stats import LayerStats, StatsAccumulator


def _stats_from_inputs(inputs: torch.Tensor, needs: frozenset[str], bins: int = 16, sequences: int = 4) -> LayerStats:
    accumulator = StatsAccumulator(inputs.shape[-1], needs, bins)
    if accumulator.needs_range_pass:
        accumulator.observe_range(inputs)
    accumulator.observe(inputs, sequences)
    return accumulator.finalize()


def _layer(seed: int, rows: int = 24, cols: int = 64, tokens: int = 96):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    inputs = torch.randn(tokens, cols, generator=generator) * (torch.rand(cols, generator=generator) * 3 + 0.1)
    return weight, inputs


def test_registry_names_and_errors():
    assert set(METHOD_NAMES) == {"magnitude", "wanda", "sparsegpt", "esparse"}
    for name in METHOD_NAMES:
        method = build_method(name)
        assert isinstance(method, PruningMethod) and method.name == name
        assert method.needs <= {"norm", "entropy", "hessian"}
        json.dumps(method.describe())
    with pytest.raises(ConfigError, match=r"'wandaa'.*allowed: magnitude, wanda, sparsegpt, esparse"):
        build_method("wandaa")
    with pytest.raises(ConfigError, match="'dense' is not a pruning method"):
        build_method("dense")
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) 'alpah'.*allowed: alpha, bins"):
        build_method("esparse", {"alpah": 1.0})
    with pytest.raises(ConfigError, match="allowed: none"):
        build_method("wanda", {"alpha": 1.0})
    with pytest.raises(ConfigError, match="mapping"):
        build_method("esparse", ["alpha"])


@pytest.mark.parametrize(
    "name, settings_, match",
    [
        ("esparse", {"metric": "entropy*norm"}, "allowed: 'entropy', 'norm', 'entropy\\+norm'"),
        ("esparse", {"shuffle": "local"}, "allowed: 'none', 'global', 'global\\+local'"),
        ("esparse", {"alpha": -1}, "outside the allowed range"),
        ("esparse", {"alpha": float("nan")}, "finite number"),
        ("esparse", {"bins": 1}, "outside the allowed range"),
        ("esparse", {"bins": 8.5}, "integer"),
        ("esparse", {"block_size": True}, "integer"),
        ("esparse", {"norm_scaling": "median"}, "allowed: 'mean', 'max', 'none'"),
        ("esparse", {"keep_best": "yes"}, "true or false"),
        ("sparsegpt", {"percdamp": -0.1}, "outside the allowed range"),
        ("sparsegpt", {"compute_dtype": "float16"}, "allowed: 'float64', 'float32'"),
        ("sparsegpt", {"damp_growth": 1.0}, "outside the allowed range"),
        ("sparsegpt", {"blocksize": 0}, "outside the allowed range"),
    ],
)
def test_invalid_settings_name_the_value(name, settings_, match):
    with pytest.raises(ConfigError, match=match):
        build_method(name, settings_)


def test_pattern_validation_errors():
    with pytest.raises(ConfigError, match="block_size 6 must be a multiple of M = 4"):
        build_method("esparse", {"block_size": 6}).validate(SparsityPattern.parse("2:4"))
    build_method("esparse", {"block_size": 6, "shuffle": "global"}).validate(SparsityPattern.parse("2:4"))
    with pytest.raises(ConfigError, match="blocksize 100 must be a multiple of M = 8"):
        build_method("sparsegpt", {"blocksize": 100}).validate(SparsityPattern.parse("4:8"))
    with pytest.raises(ConfigError, match="does not divide the layer input width 60"):
        build_method("wanda").validate(SparsityPattern.parse("4:8"), 60)
    weight = torch.randn(4, 60)
    with pytest.raises(ConfigError, match="does not divide"):
        build_method("magnitude").prune_layer(weight, None, SparsityPattern.parse("4:8"))


def test_needs_follow_the_metric():
    assert build_method("magnitude").needs == frozenset()
    assert build_method("wanda").needs == {"norm"}
    assert build_method("sparsegpt").needs == {"hessian"}
    full = build_method("esparse", {"bins": 32})
    assert full.needs == {"entropy", "norm"} and full.entropy_bins == 32
    entropy_only = build_method("esparse", {"metric": "entropy"})
    assert entropy_only.needs == {"entropy"}
    norm_only = build_method("esparse", {"metric": "norm"})
    assert norm_only.needs == {"norm"} and norm_only.entropy_bins is None
    assert build_method("esparse").settings() == ESparse.DEFAULTS


PATTERNS = ["2:4", "4:8", "1:4", "unstructured", "unstructured:0.6"]
CONFIGS = [
    ("magnitude", {}),
    ("wanda", {}),
    ("sparsegpt", {"blocksize": 32}),
    ("esparse", {"shuffle": "none"}),
    ("esparse", {"metric": "entropy", "shuffle": "global"}),
    ("esparse", {"shuffle": "global+local", "block_size": 16, "max_passes": 2}),
    ("esparse", {"metric": "norm", "shuffle": "global+local", "keep_best": False, "norm_scaling": "max"}),
]


@settings(max_examples=30, deadline=None)
@given(config=st.sampled_from(CONFIGS), pattern_text=st.sampled_from(PATTERNS), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_every_method_prunes_a_valid_layer(config, pattern_text, seed, dtype):
    name, settings_ = config
    method = build_method(name, settings_)
    pattern = SparsityPattern.parse(pattern_text)
    weight, inputs = _layer(seed)
    weight = weight.to(dtype)
    original = weight.clone()
    stats = _stats_from_inputs(inputs, method.needs, method.entropy_bins or 2) if method.needs else None
    result = method.prune_layer(weight, stats, pattern)
    assert isinstance(result, LayerPruneResult)
    assert torch.equal(weight, original)
    assert result.weight.dtype == dtype and result.weight.device == weight.device
    assert result.mask.dtype == torch.bool and result.mask.shape == weight.shape
    report = check_layer_result(result, pattern)
    rows, cols = weight.shape
    if pattern.is_nm:
        expected = pattern.sparsity
    elif result.mask_scope == "layer":
        expected = pattern.pruned_total(rows * cols) / (rows * cols)
    else:
        expected = pattern.pruned_per_row(cols) / cols
    assert report["sparsity"] == pytest.approx(expected, abs=1e-12)
    json.dumps(result.extra)
    if name != "sparsegpt":  # score methods only zero weights, never change kept ones
        assert torch.equal(result.weight, original.masked_fill(~result.mask, 0))
    if result.perm is not None:
        x = torch.randn(3, weight.shape[1], dtype=torch.float64)
        pruned = result.weight.to(torch.float64)
        torch.testing.assert_close(x[:, result.perm] @ pruned[:, result.perm].T, x @ pruned.T)
        assert result.kept_score_ratio is not None
    if result.kept_score_ratio is not None and settings_.get("keep_best", True):
        assert result.kept_score_ratio >= 1.0
    # determinism: bit-identical on repeat
    again = method.prune_layer(weight, stats, pattern)
    assert torch.equal(again.mask, result.mask) and torch.equal(again.weight, result.weight)


def test_esparse_norm_metric_is_exactly_wanda_and_stats_are_used():
    weight, inputs = _layer(11)
    stats = _stats_from_inputs(inputs, frozenset({"norm", "entropy"}), bins=16)
    pattern = SparsityPattern.parse("2:4")
    wanda = build_method("wanda").prune_layer(weight, stats, pattern)
    norm_only = build_method("esparse", {"metric": "norm", "shuffle": "none"}).prune_layer(weight, stats, pattern)
    assert torch.equal(wanda.mask, norm_only.mask)
    # Wanda's exact convention: |W| * sqrt(sum_sq / nsequences)
    expected = weight.abs().double() * torch.sqrt(stats.sum_sq / stats.nsequences)
    assert torch.equal(wanda_score(weight, stats.wanda_scaler_row()), expected)
    # E-Sparse full metric: |W| * (H + alpha * ||X|| / mean ||X||)
    norms = stats.l2_norm()
    full = esparse_score(weight, "entropy+norm", entropy=stats.entropy(), l2_norm=norms, alpha=0.5)
    torch.testing.assert_close(full, weight.abs().double() * (stats.entropy() + 0.5 * norms / norms.mean()), rtol=1e-15, atol=0)
    assert torch.equal(esparse_score(weight, "entropy", entropy=stats.entropy()), weight.abs().double() * stats.entropy())
    assert torch.equal(magnitude_score(weight), weight.abs().double())
    torch.testing.assert_close(scaled_norm(norms, "max"), norms / norms.max())
    assert torch.equal(scaled_norm(torch.zeros(4, dtype=torch.float64)), torch.zeros(4, dtype=torch.float64))
    # entropy and norm metrics give different masks here (the statistics matter)
    entropy_only = build_method("esparse", {"metric": "entropy", "shuffle": "none"}).prune_layer(weight, stats, pattern)
    assert not torch.equal(entropy_only.mask, wanda.mask)


def test_methods_needing_stats_reject_none():
    weight, _ = _layer(0)
    for name in ("wanda", "esparse", "sparsegpt"):
        with pytest.raises(ValueError, match="needs calibration statistics"):
            build_method(name).prune_layer(weight, None, SparsityPattern.parse("2:4"))


def test_unstructured_esparse_skips_shuffle_and_sparsegpt_counts_per_layer():
    weight, inputs = _layer(3)
    stats = _stats_from_inputs(inputs, frozenset({"norm", "entropy", "hessian"}), bins=64)
    pattern = SparsityPattern.parse("unstructured")
    esparse = build_method("esparse").prune_layer(weight, stats, pattern)
    assert esparse.perm is None and esparse.kept_score_ratio is None and "skipped" in esparse.extra["shuffle"]
    assert esparse.mask_scope == "row"
    sparsegpt = build_method("sparsegpt").prune_layer(weight, stats, pattern)
    assert sparsegpt.mask_scope == "layer"
    assert check_layer_result(sparsegpt, pattern)["sparsity"] == 0.5
