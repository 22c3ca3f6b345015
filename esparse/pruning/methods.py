"""Pruning methods behind one interface; the block-by-block driver has no method-specific code.

A method declares which calibration statistics it needs (`needs`, a subset of
{"norm", "entropy", "hessian"}, plus `entropy_bins` when "entropy" is needed) and prunes one
linear layer at a time with `prune_layer(weight, stats, pattern)`. Build methods by name with
`build_method(name, settings)`; "dense" is not a method (the driver skips pruning for it).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from esparse.errors import ConfigError
from esparse.pruning.masks import check_mask, select_mask, unpermute_mask
from esparse.pruning.pattern import SparsityPattern, check_layer_width
from esparse.pruning.scores import ESPARSE_METRICS, NORM_SCALINGS, esparse_score, magnitude_score, wanda_score
from esparse.pruning.shuffle import SHUFFLE_MODES, channel_shuffle
from esparse.pruning.sparsegpt import COMPUTE_DTYPES, sparsegpt_hessian, sparsegpt_prune

if TYPE_CHECKING:  # the statistics type lives with the driver; only its documented interface is used
    from esparse.stats import LayerStats

STAT_NAMES = frozenset({"norm", "entropy", "hessian"})


@dataclass
class LayerPruneResult:
    """Outcome of pruning one linear layer.

    weight: the new weight (same dtype/device as the input), zero wherever `mask` is False.
    mask: bool [C_out, C_in], True = kept, in the ORIGINAL column order.
    perm: LongTensor [C_in] (perm[j] = original column at position j) when a channel shuffle was
        applied, else None; the N:M pattern then holds on mask[:, perm].
    kept_score_ratio: shuffle efficacy (kept score with shuffle / without), None without shuffle.
    extra: JSON-able details (settings used, shuffle candidates, SparseGPT damping, ...).
    mask_scope: how an unstructured target is counted: "row" (exact per row, Wanda) or "layer"
        (exact over the layer, SparseGPT's per-block selection); N:M is always per group.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    perm: torch.Tensor | None = None
    kept_score_ratio: float | None = None
    extra: dict = field(default_factory=dict)
    mask_scope: str = "row"

    @property
    def shuffle_efficacy(self) -> float | None:
        return self.kept_score_ratio


def check_layer_result(result: LayerPruneResult, pattern: SparsityPattern) -> dict:
    """Run the mask checker on a result (pattern, permutation, zeros in the weight); returns its report."""
    return check_mask(result.mask, pattern, result.perm, scope=result.mask_scope, weight=result.weight)


# ---- settings validation -----------------------------------------------------------------------
def _number(method: str, key: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{method}: setting {key!r} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{method}: setting {key!r} = {value!r} is outside the allowed range {bracket}{low}, {high}]")
    return float(value)


def _integer(method: str, key: str, value: Any, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{method}: setting {key!r} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{method}: setting {key!r} = {value!r} is outside the allowed range [{low}, {high if high is not None else 'inf'}]")
    return value


def _choice(method: str, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{method}: setting {key!r} = {value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")
    return value


def _boolean(method: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{method}: setting {key!r} must be true or false, got {value!r}")
    return value


class PruningMethod(ABC):
    """One pruning method. Subclasses set `name`, `needs` and implement `prune_layer`."""

    name: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    needs: frozenset[str] = frozenset()
    entropy_bins: int | None = None

    @classmethod
    def from_settings(cls, settings: dict | None) -> "PruningMethod":
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(cls.DEFAULTS))
        if unknown:
            allowed = ", ".join(sorted(cls.DEFAULTS)) or "none"
            raise ConfigError(f"{cls.name}: unknown setting(s) {', '.join(map(repr, unknown))}; allowed: {allowed}")
        return cls(**{**cls.DEFAULTS, **settings})

    def settings(self) -> dict:
        """The resolved settings (defaults included), JSON-able, for provenance."""
        return {key: getattr(self, key) for key in self.DEFAULTS}

    def describe(self) -> dict:
        return {
            "name": self.name,
            "settings": self.settings(),
            "needs": sorted(self.needs),
            "entropy_bins": self.entropy_bins,
        }

    def validate(self, pattern: SparsityPattern, in_features: int | None = None) -> None:
        """Raise ConfigError when this method cannot prune with `pattern` (a layer of `in_features` inputs)."""
        if in_features is not None:
            check_layer_width(pattern, in_features)

    def _require_stats(self, stats: "LayerStats | None") -> "LayerStats":
        if stats is None:
            raise ValueError(f"{self.name} needs calibration statistics ({', '.join(sorted(self.needs))}), got None")
        return stats

    @abstractmethod
    def prune_layer(self, weight: torch.Tensor, stats: "LayerStats | None", pattern: SparsityPattern) -> LayerPruneResult:
        """Prune one linear layer's weight [C_out, C_in]; the input weight is not modified."""

    def check(self, result: LayerPruneResult, pattern: SparsityPattern) -> dict:
        return check_layer_result(result, pattern)


class ScoreMethod(PruningMethod):
    """score -> optional channel shuffle -> mask -> apply, shared by magnitude, Wanda and E-Sparse."""

    shuffle: str = "none"
    block_size: int = 32
    max_passes: int = 2
    keep_best: bool = True

    @abstractmethod
    def score(self, weight: torch.Tensor, stats: "LayerStats | None") -> torch.Tensor:
        """float64 [C_out, C_in] importance, higher = keep."""

    def prune_layer(self, weight: torch.Tensor, stats: "LayerStats | None", pattern: SparsityPattern) -> LayerPruneResult:
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        self.validate(pattern, weight.shape[1])
        score = self.score(weight, stats)
        perm = None
        efficacy = None
        extra: dict = {"method": self.name}
        if self.shuffle != "none" and pattern.is_nm:
            shuffled = channel_shuffle(
                score, pattern.n, pattern.m, self.shuffle,
                block_size=self.block_size, max_passes=self.max_passes, keep_best=self.keep_best,
            )
            extra["shuffle"] = shuffled.info()
            efficacy = shuffled.efficacy
            if shuffled.chosen != "identity":
                perm = shuffled.perm.to(weight.device)
        elif self.shuffle != "none":
            extra["shuffle"] = "skipped: a column permutation cannot change a per-row unstructured selection"
        if perm is None:
            mask = select_mask(score, pattern)
        else:
            mask = unpermute_mask(select_mask(score[:, perm], pattern), perm)
        new_weight = weight.detach().masked_fill(~mask, 0)
        return LayerPruneResult(weight=new_weight, mask=mask, perm=perm, kept_score_ratio=efficacy, extra=extra)


class Magnitude(ScoreMethod):
    name = "magnitude"
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def score(self, weight, stats):
        return magnitude_score(weight)


class Wanda(ScoreMethod):
    name = "wanda"
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    needs = frozenset({"norm"})

    def score(self, weight, stats):
        return wanda_score(weight, self._require_stats(stats).wanda_scaler_row())


class ESparse(ScoreMethod):
    """E-Sparse: |W_ij| * (H_j + alpha * ||X_j|| / scale) with optional channel shuffle.

    metric "entropy": |W| * H; "norm": exactly Wanda's score; "entropy+norm": the full metric.
    """

    name = "esparse"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "alpha": 1.0,
        "bins": 64,
        "metric": "entropy+norm",
        "norm_scaling": "mean",
        "shuffle": "global+local",
        "block_size": 32,
        "max_passes": 2,
        "keep_best": True,
    }

    def __init__(
        self,
        alpha: float = 1.0,
        bins: int = 64,
        metric: str = "entropy+norm",
        norm_scaling: str = "mean",
        shuffle: str = "global+local",
        block_size: int = 32,
        max_passes: int = 2,
        keep_best: bool = True,
    ) -> None:
        self.alpha = _number(self.name, "alpha", alpha, low=0.0)
        self.bins = _integer(self.name, "bins", bins, low=2, high=1 << 16)
        self.metric = _choice(self.name, "metric", metric, ESPARSE_METRICS)
        self.norm_scaling = _choice(self.name, "norm_scaling", norm_scaling, NORM_SCALINGS)
        self.shuffle = _choice(self.name, "shuffle", shuffle, SHUFFLE_MODES)
        self.block_size = _integer(self.name, "block_size", block_size, low=1)
        self.max_passes = _integer(self.name, "max_passes", max_passes, low=0)
        self.keep_best = _boolean(self.name, "keep_best", keep_best)
        needs = set()
        if self.metric in ("entropy", "entropy+norm"):
            needs.add("entropy")
        if self.metric in ("norm", "entropy+norm"):
            needs.add("norm")
        self.needs = frozenset(needs)
        self.entropy_bins = self.bins if "entropy" in needs else None

    def validate(self, pattern, in_features=None):
        super().validate(pattern, in_features)
        if pattern.is_nm and self.shuffle == "global+local" and self.block_size % pattern.m != 0:
            raise ConfigError(
                f"esparse: block_size {self.block_size} must be a multiple of M = {pattern.m} for pattern {pattern.label}"
            )

    def score(self, weight, stats):
        stats = self._require_stats(stats)
        if self.metric == "norm":
            return wanda_score(weight, stats.wanda_scaler_row())
        entropy = stats.entropy()
        l2_norm = stats.l2_norm() if self.metric == "entropy+norm" else None
        return esparse_score(
            weight, self.metric, entropy=entropy, l2_norm=l2_norm, alpha=self.alpha, norm_scaling=self.norm_scaling
        )


class SparseGPT(PruningMethod):
    """SparseGPT with its OBS weight update (the only method here that changes kept weights)."""

    name = "sparsegpt"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "blocksize": 128,
        "percdamp": 0.01,
        "compute_dtype": "float64",
        "max_damp_retries": 4,
        "damp_growth": 10.0,
    }
    needs = frozenset({"hessian"})

    def __init__(
        self,
        blocksize: int = 128,
        percdamp: float = 0.01,
        compute_dtype: str = "float64",
        max_damp_retries: int = 4,
        damp_growth: float = 10.0,
    ) -> None:
        self.blocksize = _integer(self.name, "blocksize", blocksize, low=1)
        self.percdamp = _number(self.name, "percdamp", percdamp, low=0.0, high=1e6)
        self.compute_dtype = _choice(self.name, "compute_dtype", compute_dtype, tuple(COMPUTE_DTYPES))
        self.max_damp_retries = _integer(self.name, "max_damp_retries", max_damp_retries, low=0, high=20)
        self.damp_growth = _number(self.name, "damp_growth", damp_growth, low=1.0, high=1e6, low_open=True)

    def validate(self, pattern, in_features=None):
        super().validate(pattern, in_features)
        if pattern.is_nm and self.blocksize % pattern.m != 0:
            raise ConfigError(
                f"sparsegpt: blocksize {self.blocksize} must be a multiple of M = {pattern.m} for pattern {pattern.label}"
            )

    def prune_layer(self, weight, stats, pattern):
        if weight.dim() != 2:
            raise ValueError(f"{self.name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        self.validate(pattern, weight.shape[1])
        stats = self._require_stats(stats)
        if stats.hessian is None:
            raise ValueError("sparsegpt needs LayerStats.hessian, which is None")
        result = sparsegpt_prune(
            weight,
            sparsegpt_hessian(stats.hessian, stats.nsequences),
            pattern,
            blocksize=self.blocksize,
            percdamp=self.percdamp,
            compute_dtype=self.compute_dtype,
            max_damp_retries=self.max_damp_retries,
            damp_growth=self.damp_growth,
        )
        return LayerPruneResult(
            weight=result.weight,
            mask=result.mask,
            extra={"method": self.name, **result.info},
            mask_scope="row" if pattern.is_nm else "layer",
        )


_REGISTRY: dict[str, type[PruningMethod]] = {cls.name: cls for cls in (Magnitude, Wanda, SparseGPT, ESparse)}
METHOD_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_method(name: str, settings: dict | None = None) -> PruningMethod:
    """The method called `name` with `settings` (unknown names/keys and bad values: ConfigError)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        hint = " ('dense' is not a pruning method: the driver skips pruning for it)" if name == "dense" else ""
        raise ConfigError(f"unknown pruning method {name!r}{hint}; allowed: {', '.join(METHOD_NAMES)}")
    if settings is not None and not isinstance(settings, dict):
        raise ConfigError(f"{name}: settings must be a mapping, got {type(settings).__name__}")
    return _REGISTRY[name].from_settings(settings)
