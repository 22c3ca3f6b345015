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

Arithmetic is fp32 inside each kernel with one rounding to the storage dtype; the decoder's eager path
(same formulas in PyTorch) is the reference in the tests, which run under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from esparse.errors import ConfigError


@triton.jit
def _add_rms_norm_kernel(res_ptr, delta_ptr, w_ptr, out_ptr, H, eps, HAS_DELTA: tl.constexpr,
                         BLOCK: tl.constexpr):
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
                                  HAS_DELTA=delta is not None, BLOCK=block, num_warps=4 if block <= 4096 else 8)
    return out


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, ck_ptr, cv_ptr,
                       T, HQ, HKV, MAXLEN, D: tl.constexpr, HALF: tl.constexpr):
    bt = tl.program_id(0)       # one (sequence, token) row
    head = tl.program_id(1)     # one query head (and, for head < HKV, one key/value head)
    b = bt // T
    t = bt % T
    i = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + t * D + i).to(tl.float32)
    sin = tl.load(sin_ptr + t * D + i).to(tl.float32)
    q_base = q_ptr + bt.to(tl.int64) * HQ * D + head * D
    q1 = tl.load(q_base + i).to(tl.float32)
    q2 = tl.load(q_base + HALF + i).to(tl.float32)
    tl.store(q_base + i, (q1 * cos - q2 * sin).to(q_ptr.dtype.element_ty))
    tl.store(q_base + HALF + i, (q2 * cos + q1 * sin).to(q_ptr.dtype.element_ty))
    if head < HKV:
        pos = tl.load(pos_ptr + t)
        row = ((b.to(tl.int64) * HKV + head) * MAXLEN + pos) * D
        k_base = k_ptr + bt.to(tl.int64) * HKV * D + head * D
        k1 = tl.load(k_base + i).to(tl.float32)
        k2 = tl.load(k_base + HALF + i).to(tl.float32)
        tl.store(ck_ptr + row + i, (k1 * cos - k2 * sin).to(ck_ptr.dtype.element_ty))
        tl.store(ck_ptr + row + HALF + i, (k2 * cos + k1 * sin).to(ck_ptr.dtype.element_ty))
        v_base = v_ptr + bt.to(tl.int64) * HKV * D + head * D
        tl.store(cv_ptr + row + i, tl.load(v_base + i))
        tl.store(cv_ptr + row + HALF + i, tl.load(v_base + HALF + i))


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor, cache_keys: torch.Tensor, cache_values: torch.Tensor) -> None:
    """Rotate q [B, T, HQ*D] in place; write rotated k and v ([B, T, HKV*D]) into cache rows
    positions[t] of cache_keys/cache_values [B, HKV, MAXLEN, D]. cos/sin: [T, D] (LLaMA's duplicated
    halves, the rotate_half convention)."""
    batch, kv_heads, max_len, head_dim = cache_keys.shape
    tokens = q.shape[1]
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ConfigError(f"rope_cache needs a power-of-two head_dim, got {head_dim}")
    for name, tensor in (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("positions", positions)):
        if not tensor.is_contiguous():
            raise ConfigError(f"rope_cache needs a contiguous {name}")
    if not (cache_keys.is_contiguous() and cache_values.is_contiguous()):
        raise ConfigError("rope_cache needs contiguous cache tensors")
    q_heads = q.shape[-1] // head_dim
    if k.shape[-1] != kv_heads * head_dim or q.shape[0] != batch or cos.shape != (tokens, head_dim):
        raise ConfigError(f"rope_cache shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                          f"cos {tuple(cos.shape)}, cache {tuple(cache_keys.shape)}")
    _rope_cache_kernel[(batch * tokens, q_heads)](q, k, v, cos, sin, positions, cache_keys, cache_values,
                                                  tokens, q_heads, kv_heads, max_len, D=head_dim,
                                                  HALF=head_dim // 2, num_warps=1)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(gate_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    # eager rounding order: silu rounded to the storage dtype, then the product
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, (silu * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or not (gate.is_contiguous() and up.is_contiguous()):
        raise ConfigError("silu_mul needs contiguous gate and up of one shape")
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 2048
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4)
    return out
