"""Sparsity patterns: N:M (keep N of every M consecutive input columns) or unstructured per row."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from esparse.errors import ConfigError

_ALLOWED_FORMS = (
    '"N:M" or "NofM" (e.g. "2:4", "4:8", "2of4"), "unstructured" (= 50%), '
    '"unstructuredPP" with a percentage (e.g. "unstructured50"), '
    '"unstructured:F" with a fraction (e.g. "unstructured:0.6")'
)
_NM_RE = re.compile(r"^\s*(\d+)\s*(?::|of)\s*(\d+)\s*$", re.IGNORECASE)
_UNSTRUCTURED_PERCENT_RE = re.compile(r"^\s*unstructured[-_]?(\d+(?:\.\d+)?)\s*%?\s*$", re.IGNORECASE)
_UNSTRUCTURED_FRACTION_RE = re.compile(r"^\s*unstructured\s*:\s*(\d*\.?\d+(?:e-?\d+)?)\s*$", re.IGNORECASE)
_UNSTRUCTURED_BARE_RE = re.compile(r"^\s*unstructured\s*$", re.IGNORECASE)
# Guards floor(width * sparsity) against binary rounding (e.g. 100 * 0.29 = 28.999999999999996).
_COUNT_EPS = 1e-9


@dataclass(frozen=True)
class SparsityPattern:
    """N:M when `n` and `m` are set, otherwise unstructured with `unstructured_sparsity` pruned per row.

    Build with `SparsityPattern.nm(2, 4)`, `SparsityPattern.unstructured(0.5)` or `SparsityPattern.parse(text)`.
    """

    n: int | None = None
    m: int | None = None
    unstructured_sparsity: float | None = None

    def __post_init__(self) -> None:
        if self.unstructured_sparsity is None:
            if self.n is None or self.m is None:
                raise ConfigError("a sparsity pattern needs either n and m (N:M) or an unstructured sparsity")
            for label, value in (("N", self.n), ("M", self.m)):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f"N:M pattern: {label} must be an integer, got {value!r}")
            if self.m < 2:
                raise ConfigError(f"N:M pattern {self.n}:{self.m}: M must be at least 2")
            if self.n < 1:
                raise ConfigError(f"N:M pattern {self.n}:{self.m}: N must be at least 1")
            if self.n >= self.m:
                raise ConfigError(
                    f"N:M pattern {self.n}:{self.m}: N must be smaller than M "
                    f"(N = M prunes nothing, N > M is impossible)"
                )
        else:
            if self.n is not None or self.m is not None:
                raise ConfigError("a sparsity pattern is either N:M or unstructured, not both")
            value = self.unstructured_sparsity
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"unstructured sparsity must be a number in (0, 1), got {value!r}")
            if not 0.0 < float(value) < 1.0:
                raise ConfigError(f"unstructured sparsity must lie strictly between 0 and 1, got {value!r}")
            object.__setattr__(self, "unstructured_sparsity", float(value))

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def nm(cls, n: int, m: int) -> "SparsityPattern":
        return cls(n=n, m=m)

    @classmethod
    def unstructured(cls, sparsity: float = 0.5) -> "SparsityPattern":
        return cls(unstructured_sparsity=sparsity)

    @classmethod
    def parse(cls, text: "str | SparsityPattern") -> "SparsityPattern":
        """Parse "2:4", "2of4", "unstructured", "unstructured50", "unstructured:0.6" (case-insensitive)."""
        if isinstance(text, SparsityPattern):
            return text
        if not isinstance(text, str):
            raise ConfigError(f"sparsity pattern must be a string, got {text!r}; allowed forms: {_ALLOWED_FORMS}")
        try:
            return cls._parse_text(text)
        except ConfigError as error:
            if str(error).startswith("unknown sparsity pattern"):
                raise
            raise ConfigError(f"sparsity pattern {text!r}: {error}") from None

    @classmethod
    def _parse_text(cls, text: str) -> "SparsityPattern":
        match = _NM_RE.match(text)
        if match:
            return cls(n=int(match.group(1)), m=int(match.group(2)))
        if _UNSTRUCTURED_BARE_RE.match(text):
            return cls(unstructured_sparsity=0.5)
        match = _UNSTRUCTURED_FRACTION_RE.match(text)
        if match:
            return cls(unstructured_sparsity=float(match.group(1)))
        match = _UNSTRUCTURED_PERCENT_RE.match(text)
        if match:
            percent = float(match.group(1))
            return cls(unstructured_sparsity=percent / 100.0)
        raise ConfigError(f"unknown sparsity pattern {text!r}; allowed forms: {_ALLOWED_FORMS}")

    # ---- properties ---------------------------------------------------------------------------
    @property
    def is_nm(self) -> bool:
        return self.unstructured_sparsity is None

    @property
    def sparsity(self) -> float:
        """Target fraction of pruned weights."""
        if self.is_nm:
            return 1.0 - self.n / self.m
        return self.unstructured_sparsity

    def _percent_text(self, decimal_mark: str) -> str:
        percent = round(self.unstructured_sparsity * 100.0, 6)
        if percent == int(percent):
            return str(int(percent))
        return f"{percent:g}".replace(".", decimal_mark)

    @property
    def slug(self) -> str:
        """File-path form: "2of4", "4of8", "unstructured50" (fractions: "unstructured62p5")."""
        if self.is_nm:
            return f"{self.n}of{self.m}"
        return f"unstructured{self._percent_text('p')}"

    @property
    def label(self) -> str:
        """Table form: "2:4", "4:8", "unstructured-50%"."""
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return f"unstructured-{self._percent_text('.')}%"

    def pruned_per_row(self, in_features: int) -> int:
        """Weights pruned in one output row of width `in_features` (Wanda: int(width * sparsity))."""
        if self.is_nm:
            return (in_features // self.m) * (self.m - self.n)
        return int(math.floor(in_features * self.unstructured_sparsity + _COUNT_EPS))

    def pruned_total(self, numel: int) -> int:
        """Weights pruned out of `numel` when the count is taken over the whole set (not per row)."""
        if self.is_nm:
            return (numel // self.m) * (self.m - self.n)
        return int(math.floor(numel * self.unstructured_sparsity + _COUNT_EPS))

    def __str__(self) -> str:
        return self.label


def check_layer_width(pattern: SparsityPattern, in_features: int) -> None:
    """Raise ConfigError when the pattern cannot tile a layer with `in_features` input columns."""
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ConfigError(f"layer input width must be a positive integer, got {in_features!r}")
    if pattern.is_nm and in_features % pattern.m != 0:
        raise ConfigError(
            f"pattern {pattern.label}: M = {pattern.m} does not divide the layer input width {in_features}; "
            f"allowed: patterns whose M divides {in_features}"
        )
