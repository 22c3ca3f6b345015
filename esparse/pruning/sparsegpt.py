"""SparseGPT per-layer solver (Frantar & Alistarh, 2023): OBS mask selection with weight update.

Hessian normalisation: SparseGPT keeps a running average H = 2/nsamples * sum_t x_t x_t^T with
nsamples the number of calibration *sequences*; from LayerStats that is
H = 2 / nsequences * LayerStats.hessian. The scale matters only through the dead-column test and
is otherwise cancelled by the relative damping (a fraction of the mean diagonal).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from esparse.pruning.masks import keep_top_k
from esparse.pruning.pattern import SparsityPattern, check_layer_width

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class SparseGPTNumericalError(ArithmeticError):
    """The damped Hessian stayed non positive-definite (or non-finite) after every damping retry."""


def sparsegpt_hessian(hessian_sum: torch.Tensor, nsequences: int) -> torch.Tensor:
    """SparseGPT's H = 2 / nsequences * sum_t x_t x_t^T from the unscaled sum of outer products."""
    if nsequences < 1:
        raise ValueError(f"nsequences must be positive, got {nsequences}")
    return hessian_sum * (2.0 / nsequences)


def inverse_hessian_cholesky(
    hessian: torch.Tensor,
    *,
    percdamp: float = 0.01,
    max_damp_retries: int = 4,
    damp_growth: float = 10.0,
) -> tuple[torch.Tensor, dict]:
    """Upper Cholesky factor U of (H + damp*I)^-1 (U^T U = H^-1), as SparseGPT uses it.

    `hessian` must already have its dead columns (zero diagonal) set to 1 on the diagonal.
    damp = percdamp * mean(diag(H)); when a Cholesky fails (or gives non-finite values) the damping
    fraction is multiplied by `damp_growth`, at most `max_damp_retries` times, with a warning each
    time; then SparseGPTNumericalError. Returns U and {"damp_fraction", "damp_retries"}.
    """
    if not torch.isfinite(hessian).all():
        raise SparseGPTNumericalError("the Hessian has non-finite entries (check the calibration activations)")
    size = hessian.shape[0]
    mean_diagonal = torch.diagonal(hessian).mean()
    eye = torch.eye(size, dtype=hessian.dtype, device=hessian.device)
    fraction = float(percdamp)
    for attempt in range(max_damp_retries + 1):
        damped = hessian + (fraction * mean_diagonal) * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        failure = f"Cholesky of H + damp*I failed (info={int(info)})" if int(info) else None
        if failure is None:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info):
                failure = f"Cholesky of (H + damp*I)^-1 failed (info={int(info)})"
            elif not torch.isfinite(upper).all():
                failure = "Cholesky factor of (H + damp*I)^-1 is not finite"
        if failure is None:
            return upper, {"damp_fraction": fraction, "damp_retries": attempt}
        if attempt == max_damp_retries:
            break
        # A zero damping cannot grow: start the retries from a small positive fraction.
        next_fraction = max(fraction, 1e-6) * damp_growth
        logger.warning(
            "SparseGPT: %s at damping %.3g x mean diag; retrying with %.3g (retry %d of %d)",
            failure, fraction, next_fraction, attempt + 1, max_damp_retries,
        )
        fraction = next_fraction
    raise SparseGPTNumericalError(
        f"SparseGPT: {failure} even at damping {fraction:.3g} x mean diagonal after {max_damp_retries} retries"
    )


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # same dtype and device as the input weight, zero where pruned
    mask: torch.Tensor  # bool, True = kept
    info: dict = field(default_factory=dict)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    compute_dtype: str = "float64",
    max_damp_retries: int = 4,
    damp_growth: float = 10.0,
) -> SparseGPTResult:
    """Prune one linear layer with SparseGPT.

    weight: [C_out, C_in]; hessian: SparseGPT's H [C_in, C_in] (see `sparsegpt_hessian`).
    Columns are processed in blocks of `blocksize`. Mask choice by w^2 / [H^-1]_jj^2 on the
    partially updated weights: N:M picks the N best inside each group of M when the loop reaches
    the group's first column; unstructured picks, per block, the best of the whole block (all
    rows), pruning floor(s * rows * end) - floor(s * rows * start) weights so that the layer total
    is exactly floor(s * C_out * C_in). Ties: the lower (row-major) index is kept. Pruned weights'
    error is propagated to the not yet processed columns (OBS update).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    check_layer_width(pattern, cols)
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"Hessian has shape {tuple(hessian.shape)}, expected {(cols, cols)}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype {compute_dtype!r} is not one of {sorted(COMPUTE_DTYPES)}")
    if blocksize < 1 or (pattern.is_nm and blocksize % pattern.m != 0):
        raise ValueError(f"blocksize {blocksize} must be a positive multiple of M")
    dtype = COMPUTE_DTYPES[compute_dtype]
    device = weight.device

    work = weight.detach().to(dtype).clone()
    hessian = hessian.detach().to(device=device, dtype=dtype).clone()
    dead = torch.diagonal(hessian) == 0
    # Inputs that are always zero: the weights are irrelevant; SparseGPT zeroes them and makes H regular.
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    upper, damp_info = inverse_hessian_cholesky(
        hessian, percdamp=percdamp, max_damp_retries=max_damp_retries, damp_growth=damp_growth
    )
    del hessian

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    total_error = torch.zeros((), dtype=dtype, device=device)  # a tensor: no device sync per column
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        count = stop - start
        block = work[:, start:stop].clone()
        errors = torch.zeros_like(block)
        inverse_block = upper[start:stop, start:stop]
        diagonal = torch.diagonal(inverse_block)
        block_pruned = torch.zeros(rows, count, dtype=torch.bool, device=device)
        if not pattern.is_nm:
            saliency = block.square() / diagonal.square().unsqueeze(0)
            to_prune = pattern.pruned_total(rows * stop) - pattern.pruned_total(rows * start)
            keep = keep_top_k(saliency.reshape(1, -1), rows * count - to_prune)
            block_pruned = ~keep.reshape(rows, count)
        for i in range(count):
            if pattern.is_nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                saliency = block[:, group].square() / diagonal[group].square().unsqueeze(0)
                block_pruned[:, group] = ~keep_top_k(saliency, pattern.n)
            error = block[:, i] * block_pruned[:, i] / diagonal[i]
            # OBS update of this and the following columns of the block (column i becomes q).
            block[:, i:].addr_(error, inverse_block[i, i:], alpha=-1.0)
            errors[:, i] = error
        total_error += errors.square().sum()
        block.masked_fill_(block_pruned, 0.0)
        work[:, start:stop] = block
        pruned[:, start:stop] = block_pruned
        if stop < cols:
            work[:, stop:].sub_(errors @ upper[start:stop, stop:])
    mask = ~pruned
    new_weight = work.to(weight.dtype).masked_fill_(pruned, 0)
    if not torch.isfinite(new_weight).all():
        raise SparseGPTNumericalError("SparseGPT produced non-finite weights")
    info = {
        **damp_info,
        "percdamp": percdamp,
        "blocksize": blocksize,
        "compute_dtype": compute_dtype,
        "dead_columns": int(dead.sum()),
        "obs_loss": float(total_error) / 2.0,
        "hessian_normalisation": "H = 2/nsequences * sum_t x_t x_t^T",
    }
    return SparseGPTResult(weight=new_weight, mask=mask, info=info)
