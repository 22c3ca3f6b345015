"""Fused Triton kernels for the non-GEMM work of a LLaMA decoder step.

Why: in a batch-1 decode step of LLaMA-7B the seven GEMMs of a block read ~400 MB, yet eager PyTorch
spends some 35 further launches per block on RMSNorm, rotary embeddings, cache writes, the mask,
SiLU*mul and residual adds. Inside a CUDA graph each still costs a few microseconds, so together they
took about half the step and hid most of the 2:4 GEMMs' gain (docs/PERFORMANCE.md). Three kernels
replace them:

- ``add_rms_norm``: residual += delta (in place) and the RMSNorm of the sum, one program per row;
- ``rope_cache``: rotary embedding of q (in place) and k, with k and v written straight into their
  rows of the static KV cache at device-side positions (graph-capturable: no host value involved);
- ``silu_mul``: silu(gate) * up.

q, k, v and gate, up may be column slices of one grouped projection's output (rows evenly strided,
unit stride along features): the kernels take row strides, so no copy splits them.

Programmatic dependent launch (Hopper, as the decode kernel of csrc/sp24_mma.cu): on a device of
compute capability 9.0+, each kernel is launched as a dependent of the kernel before it, waits for it
(``gdc_wait``) before touching memory, and at once lets the next kernel launch
(``gdc_launch_dependents``), so the GEMM after a norm streams its first weights while the norm
runs (run R1: 0.2 ms of a 4.8 ms 2:4 decode step). ``ESPARSE_PDL_FUSED=0`` turns it off here,
``ESPARSE_PDL=0`` here and in the decode kernel.

Arithmetic is fp32 inside each kernel with one rounding to the storage dtype; the decoder's eager path
(same formulas in PyTorch) is the reference in the tests, which run under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from esparse.errors import ConfigError


def _launch_options(tensor: torch.Tensor) -> dict:
    """Launch keywords: programmatic dependent launch on Hopper and newer (see the module doc)."""
    # on by default since run R1 measured it (docs/PERFORMANCE.md); ESPARSE_PDL_FUSED=0 for the A/B
    if tensor.device.type != "cuda" or "0" in (os.environ.get("ESPARSE_PDL", "1"),
                                               os.environ.get("ESPARSE_PDL_FUSED", "1")):
        return {"PDL": False}
    if torch.cuda.get_device_capability(tensor.device)[0] < 9:
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def _wait_and_release(PDL: tl.constexpr):
    if PDL:
        gdc_wait()  # the previous kernel's writes are visible
        gdc_launch_dependents()  # the next kernel may launch and prefetch what it does not share with us


def _row_stride(tensor: torch.Tensor, name: str) -> int:
    """Elements between consecutive rows of a [..., features] tensor whose leading dims flatten to
    evenly strided rows with unit stride along features (a column slice of a contiguous buffer)."""
    if tensor.stride(-1) != 1:
        raise ConfigError(f"{name} needs unit stride along its last dimension, got strides {tensor.stride()}")
    stride = expected = None
    for size, step in zip(reversed(tensor.shape[:-1]), reversed(tensor.stride()[:-1])):
        if size == 1:
            continue
        if stride is None:
            stride = step
        elif step != expected:
            raise ConfigError(f"{name} rows are not evenly strided (shape {tuple(tensor.shape)}, strides "
                              f"{tensor.stride()})")
        expected = step * size
    return tensor.shape[-1] if stride is None else stride


@triton.jit
def _add_rms_norm_kernel(res_ptr, delta_ptr, w_ptr, out_ptr, H, eps, HAS_DELTA: tl.constexpr,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_and_release(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    base = row.to(tl.int64) * H
    x = tl.load(res_ptr + base + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + base + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    scale = tl.rsqrt(tl.sum(x32 * x32, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    # same rounding order as the eager path: normalise in fp32, round, then scale by the weight
    normed = (x32 * scale).to(x.dtype).to(tl.float32)
    tl.store(out_ptr + base + cols, (w * normed).to(x.dtype), mask=ok)


def add_rms_norm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """residual += delta (in place, when given); returns RMSNorm(residual) * weight in residual's dtype."""
    hidden = residual.shape[-1]
    if not residual.is_contiguous() or (delta is not None and (not delta.is_contiguous()
                                                                or delta.shape != residual.shape)):
        raise ConfigError("add_rms_norm needs contiguous residual and delta of the same shape")
    if weight.shape != (hidden,):
        raise ConfigError(f"norm weight has shape {tuple(weight.shape)}, expected ({hidden},)")
    out = torch.empty_like(residual)
    rows = residual.numel() // hidden
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(rows,)](residual, delta if delta is not None else residual, weight, out, hidden, eps,
                                  HAS_DELTA=delta is not None, BLOCK=block, num_warps=4 if block <= 4096 else 8,
                                  **_launch_options(residual))
    return out


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, ck_ptr, cv_ptr,
                       T, HQ, HKV, MAXLEN, q_row, k_row, v_row, D: tl.constexpr, HALF: tl.constexpr,
                       PDL: tl.constexpr):
    _wait_and_release(PDL)
    bt = tl.program_id(0)       # one (sequence, token) row
    head = tl.program_id(1)     # one query head (and, for head < HKV, one key/value head)
    b = bt // T
    t = bt % T
    i = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + t * D + i).to(tl.float32)
    sin = tl.load(sin_ptr + t * D + i).to(tl.float32)
    q_base = q_ptr + bt.to(tl.int64) * q_row + head * D
    q1 = tl.load(q_base + i).to(tl.float32)
    q2 = tl.load(q_base + HALF + i).to(tl.float32)
    tl.store(q_base + i, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty))
    tl.store(q_base + HALF + i, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty))
    if head < HKV:
        pos = tl.load(pos_ptr + t)
        row = ((b.to(tl.int64) * HKV + head) * MAXLEN + pos) * D
        k_base = k_ptr + bt.to(tl.int64) * k_row + head * D
        k1 = tl.load(k_base + i).to(tl.float32)
        k2 = tl.load(k_base + HALF + i).to(tl.float32)
        tl.store(ck_ptr + row + i, (k1 * cos - k2 * sin).to(ck_ptr.dtype.element_ty))
        tl.store(ck_ptr + row + HALF + i, (k2 * cos + k1 * sin).to(ck_ptr.dtype.element_ty))
        v_base = v_ptr + bt.to(tl.int64) * v_row + head * D
        tl.store(cv_ptr + row + i, tl.load(v_base + i))
        tl.store(cv_ptr + row + HALF + i, tl.load(v_base + HALF + i))


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor, cache_keys: torch.Tensor, cache_values: torch.Tensor) -> None:
    """Rotate q [B, T, HQ*D] in place; write rotated k and v ([B, T, HKV*D]) into cache rows
    positions[t] of cache_keys/cache_values [B, HKV, MAXLEN, D]. cos/sin: [T, D] (LLaMA's duplicated
    halves, the rotate_half convention). q, k, v may be column slices of one buffer (evenly strided
    rows)."""
    batch, kv_heads, max_len, head_dim = cache_keys.shape
    tokens = q.shape[1]
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ConfigError(f"rope_cache needs a power-of-two head_dim, got {head_dim}")
    rows = [_row_stride(tensor, name) for name, tensor in (("q", q), ("k", k), ("v", v))]
    for name, tensor in (("cos", cos), ("sin", sin), ("positions", positions)):
        if not tensor.is_contiguous():
            raise ConfigError(f"rope_cache needs a contiguous {name}")
    if not (cache_keys.is_contiguous() and cache_values.is_contiguous()):
        raise ConfigError("rope_cache needs contiguous cache tensors")
    q_heads = q.shape[-1] // head_dim
    if k.shape[-1] != kv_heads * head_dim or q.shape[0] != batch or cos.shape != (tokens, head_dim):
        raise ConfigError(f"rope_cache shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                          f"cos {tuple(cos.shape)}, cache {tuple(cache_keys.shape)}")
    _rope_cache_kernel[(batch * tokens, q_heads)](q, k, v, cos, sin, positions, cache_keys, cache_values,
                                                  tokens, q_heads, kv_heads, max_len, *rows, D=head_dim,
                                                  HALF=head_dim // 2, num_warps=1, **_launch_options(q))


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, width, gate_row, up_row, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_and_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    g = tl.load(gate_ptr + row * gate_row + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_row + cols, mask=ok, other=0.0).to(tl.float32)
    # eager rounding order: silu rounded to the storage dtype, then the product
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (silu * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, contiguous; gate and up may be column slices of one buffer (evenly strided rows)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ConfigError(f"silu_mul needs gate and up of one shape and dtype, got {tuple(gate.shape)} "
                          f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")
    strides = _row_stride(gate, "gate"), _row_stride(up, "up")
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    width = gate.shape[-1]
    rows = gate.numel() // max(width, 1)
    block = 2048
    _silu_mul_kernel[(rows, triton.cdiv(width, block))](gate, up, out, width, *strides, BLOCK=block, num_warps=4,
                                                        **_launch_options(gate))
    return out
