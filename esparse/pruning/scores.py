"""Importance scores (higher = keep) for magnitude, Wanda and E-Sparse.

All scores are float64 [C_out, C_in] on the weight's device. Per-column factors are computed on
the CPU in float64 (they are tiny); the score is then |W| (exact in float64) times that factor,
one correctly rounded multiply per element, so a score is bit-identical on every device.
"""

from __future__ import annotations

import torch

from esparse.errors import ConfigError

ESPARSE_METRICS = ("entropy", "norm", "entropy+norm")
NORM_SCALINGS = ("mean", "max", "none")


def _abs_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [C_out, C_in], got shape {tuple(weight.shape)}")
    return weight.detach().abs().to(torch.float64)


def _column_factor_on(factor: torch.Tensor, weight: torch.Tensor, what: str) -> torch.Tensor:
    if factor.dim() != 1 or factor.numel() != weight.shape[1]:
        raise ValueError(f"{what} has shape {tuple(factor.shape)}, expected [{weight.shape[1]}] (= C_in)")
    if not torch.isfinite(factor).all():
        raise ValueError(f"{what} contains non-finite values")
    return factor.to(device=weight.device, dtype=torch.float64).unsqueeze(0)


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij|."""
    return _abs_weight(weight)


def wanda_score(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    """Wanda: |W_ij| * sqrt(scaler_row_j), scaler_row = sum over tokens of x_j^2 / nsequences.

    This is Wanda's own convention (its `scaler_row` divides by the number of calibration
    sequences); any per-layer constant leaves the per-row ranking unchanged.
    """
    factor = torch.sqrt(scaler_row.detach().to("cpu", torch.float64))
    return _abs_weight(weight) * _column_factor_on(factor, weight, "Wanda scaler_row")


def scaled_norm(l2_norm: torch.Tensor, norm_scaling: str = "mean") -> torch.Tensor:
    """||X_j|| divided by its mean ("mean") or max ("max") over channels, or unscaled ("none")."""
    if norm_scaling not in NORM_SCALINGS:
        raise ConfigError(f"norm_scaling {norm_scaling!r} is not allowed; allowed: {', '.join(NORM_SCALINGS)}")
    norms = l2_norm.detach().to("cpu", torch.float64)
    if norm_scaling == "none":
        return norms
    scale = norms.mean() if norm_scaling == "mean" else norms.max()
    # All-zero inputs: every channel is equally (un)important; avoid 0/0.
    if not bool(scale > 0):
        return norms
    return norms / scale


def esparse_column_factor(
    metric: str,
    *,
    entropy: torch.Tensor | None = None,
    l2_norm: torch.Tensor | None = None,
    alpha: float = 1.0,
    norm_scaling: str = "mean",
) -> torch.Tensor:
    """Per-channel factor f_j of the E-Sparse score |W_ij| * f_j (float64, CPU).

    "entropy": H_j; "entropy+norm": H_j + alpha * ||X_j|| / scale; "norm": ||X_j|| / scale.
    """
    if metric not in ESPARSE_METRICS:
        raise ConfigError(f"E-Sparse metric {metric!r} is not allowed; allowed: {', '.join(ESPARSE_METRICS)}")
    parts = []
    if metric in ("entropy", "entropy+norm"):
        if entropy is None:
            raise ValueError(f"E-Sparse metric {metric!r} needs the channel entropy")
        parts.append(entropy.detach().to("cpu", torch.float64))
    if metric in ("norm", "entropy+norm"):
        if l2_norm is None:
            raise ValueError(f"E-Sparse metric {metric!r} needs the channel L2 norms")
        weight_of_norm = float(alpha) if metric == "entropy+norm" else 1.0
        parts.append(weight_of_norm * scaled_norm(l2_norm, norm_scaling))
    factor = parts[0]
    for part in parts[1:]:
        factor = factor + part
    return factor


def esparse_score(
    weight: torch.Tensor,
    metric: str,
    *,
    entropy: torch.Tensor | None = None,
    l2_norm: torch.Tensor | None = None,
    alpha: float = 1.0,
    norm_scaling: str = "mean",
) -> torch.Tensor:
    """E-Sparse: |W_ij| * (H_j + alpha * ||X_j||_2 / mean_j ||X_j||_2) and its ablation variants."""
    factor = esparse_column_factor(metric, entropy=entropy, l2_norm=l2_norm, alpha=alpha, norm_scaling=norm_scaling)
    return _abs_weight(weight) * _column_factor_on(factor, weight, f"E-Sparse {metric} factor")
