"""Triton kernels for the packed 2:4 format (see pack.py for the layout).

Two matmul kernels compute out[T, N] = x[T, K] @ W^T, W the masked weight, with fp32 accumulation:

- ``gemv`` (1-8 tokens): each kept value gathers its activation through its 2-bit index (and the
  permutation, in the kernel or pre-applied) and accumulates one FMA per token; no dense expansion.
- ``dot`` (any token count): the same register decompression feeding ``tl.dot`` (tensor cores), token
  tiles of BT >= 16; x is gathered through the permutation in the kernel or pre-permuted by one
  ``index_select`` launch (``perm_mode="pre"``).

Both split K over ``split_k`` programs when the rows alone cannot fill the GPU. The partial sums go to a
fp32 workspace and the last program of each output tile (an atomic ticket counter) adds them up in a
fixed order and resets its counter, so one launch does everything (no memset, no reduce launch) and
the result is deterministic. Counters must start at zero (``Workspace`` allocates them so).

A third kernel decompresses the packed weight to the dense permuted matrix (decompress-then-dense).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

from esparse.errors import ConfigError

from .pack import Packed24, meta_words, sm90_meta_shape

GEMV_MAX_TOKENS = 8


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns loop bounds into ints with int(1-element array), which
    numpy >= 2.4 refuses; re-register __index__ through .item() (CPU interpreter only)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_esparse_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._esparse_fixed = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_index()


@triton.jit
def _sm90_word_offset(rows, words, M_AL):
    """pack.sm90_word_index: offset of 16-bit metadata word `words` of row `rows` in the sm90 layout."""
    m = rows % 64
    j = words % 8
    return ((m // 8) % 2 + 2 * (j // 2) + 8 * (m % 8) + 64 * (j % 2) + 128 * (m // 16) + 512 * (rows // 64)
            + (words // 8) * (M_AL * 8))


@triton.jit
def _decode_tile(vals_ptr, meta_ptr, rows, row_ok, kv0, KH, KW, stride_v, stride_m,
                 BN: tl.constexpr, BKH: tl.constexpr, META_SM90: tl.constexpr, M_AL):
    """Dense [BN, 2*BKH] tile of the permuted weight whose first value column is kv0 (kv0 % 16 == 0).
    META_SM90: meta_ptr is int16 metadata in the sm90 layout (pack.meta_to_sm90) with M_AL rows."""
    G: tl.constexpr = BKH // 2
    W: tl.constexpr = BKH // 16
    vcols = kv0 + tl.arange(0, BKH)
    vals = tl.load(vals_ptr + rows[:, None] * stride_v + vcols[None, :],
                   mask=row_ok[:, None] & (vcols < KH)[None, :], other=0.0)
    v0, v1 = tl.split(tl.reshape(vals, (BN, G, 2)))
    wcols = kv0 // 16 + tl.arange(0, W)
    word_ok = row_ok[:, None] & (wcols < KW)[None, :]
    if META_SM90:  # an int32 word of the rows layout is 16-bit words 2w and 2w + 1 there
        lo = tl.load(meta_ptr + _sm90_word_offset(rows[:, None], 2 * wcols[None, :], M_AL), mask=word_ok, other=0)
        hi = tl.load(meta_ptr + _sm90_word_offset(rows[:, None], 2 * wcols[None, :] + 1, M_AL), mask=word_ok,
                     other=0)
        words = (lo.to(tl.int32) & 0xFFFF) | ((hi.to(tl.int32) & 0xFFFF) << 16)
    else:
        words = tl.load(meta_ptr + rows[:, None] * stride_m + wcols[None, :], mask=word_ok, other=0)
    shifts = tl.arange(0, 8) * 4
    nib = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & 15, (BN, G))
    i0 = nib & 3
    i1 = nib >> 2
    zero = tl.zeros_like(v0)
    # canonical packing has i0 < i1, so position 0 can only hold v0 and position 3 only v1
    d0 = tl.where(i0 == 0, v0, zero)
    d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    d3 = tl.where(i1 == 3, v1, zero)
    return tl.interleave(tl.interleave(d0, d2), tl.interleave(d1, d3))


@triton.jit
def _accumulate(acc, vals, xv, ACC_E: tl.constexpr):
    """acc += vals * x elementwise (ACC_E == 16), or summed over the 16 values of a word (ACC_E == 1,
    a sixteenth of the registers when many tokens each need an accumulator)."""
    prod = vals * xv.to(tl.float32)
    if ACC_E == 1:
        return acc + tl.sum(prod, axis=2, keep_dims=True)
    else:
        return acc + prod


@triton.jit
def _sp24_gemv_kernel(x_ptr, perm_ptr, vals_ptr, meta_ptr, out_ptr, ws_ptr, cnt_ptr,
                      N, K, KH, KW, stride_xt, stride_ot, stride_v, stride_m, kv_per_split,
                      NT: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr,
                      USE_SPLIT: tl.constexpr, HAS_PERM: tl.constexpr, ACC_E: tl.constexpr):
    """Few-token kernel: every kept value fetches its activation through its 2-bit index (and the
    permutation) by a gathered load, then one FMA per token. The tile is [BN, BKH/16, 16] so that
    each meta word (16 values) broadcasts over its values without any reshape or layout change."""
    W: tl.constexpr = BKH // 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    wv = tl.arange(0, W)
    ev = tl.arange(0, 16)
    jw = wv[:, None] * 16 + ev[None, :]  # value column inside the step, [W, 16]
    col_base = (4 * (jw // 2))[None, :, :]  # first dense column of the value's group
    shift = (2 * ev)[None, None, :]
    rows3 = rows[:, None, None]
    row_ok3 = row_ok[:, None, None]
    acc0 = tl.zeros([BN, W, ACC_E], dtype=tl.float32)
    acc1 = tl.zeros([BN, W, ACC_E], dtype=tl.float32)
    acc2 = tl.zeros([BN, W, ACC_E], dtype=tl.float32)
    acc3 = tl.zeros([BN, W, ACC_E], dtype=tl.float32)
    acc4 = tl.zeros([BN, W, ACC_E], dtype=tl.float32)
    acc5 = tl.zeros([BN, W, ACC_E], dtype=tl.float32)
    acc6 = tl.zeros([BN, W, ACC_E], dtype=tl.float32)
    acc7 = tl.zeros([BN, W, ACC_E], dtype=tl.float32)
    kv_begin = pid_k * kv_per_split
    # the same trip count for every split; steps past KH load nothing (masked)
    for step in range(0, kv_per_split // BKH):
        kv0 = kv_begin + step * BKH
        j = kv0 + jw
        vok = row_ok3 & (j < KH)[None, :, :]
        vals = tl.load(vals_ptr + rows3 * stride_v + j[None, :, :], mask=vok, other=0.0).to(tl.float32)
        wcol = kv0 // 16 + wv
        words = tl.load(meta_ptr + rows[:, None] * stride_m + wcol[None, :],
                        mask=row_ok[:, None] & (wcol < KW)[None, :], other=0)
        col = 2 * kv0 + col_base + ((words[:, :, None] >> shift) & 3)
        if HAS_PERM:
            src = tl.load(perm_ptr + col, mask=vok, other=0)
        else:
            src = col
        acc0 = _accumulate(acc0, vals, tl.load(x_ptr + src, mask=vok, other=0.0), ACC_E)
        if NT > 1:
            acc1 = _accumulate(acc1, vals, tl.load(x_ptr + 1 * stride_xt + src, mask=vok, other=0.0), ACC_E)
        if NT > 2:
            acc2 = _accumulate(acc2, vals, tl.load(x_ptr + 2 * stride_xt + src, mask=vok, other=0.0), ACC_E)
        if NT > 3:
            acc3 = _accumulate(acc3, vals, tl.load(x_ptr + 3 * stride_xt + src, mask=vok, other=0.0), ACC_E)
        if NT > 4:
            acc4 = _accumulate(acc4, vals, tl.load(x_ptr + 4 * stride_xt + src, mask=vok, other=0.0), ACC_E)
        if NT > 5:
            acc5 = _accumulate(acc5, vals, tl.load(x_ptr + 5 * stride_xt + src, mask=vok, other=0.0), ACC_E)
        if NT > 6:
            acc6 = _accumulate(acc6, vals, tl.load(x_ptr + 6 * stride_xt + src, mask=vok, other=0.0), ACC_E)
        if NT > 7:
            acc7 = _accumulate(acc7, vals, tl.load(x_ptr + 7 * stride_xt + src, mask=vok, other=0.0), ACC_E)
    y0 = tl.sum(tl.sum(acc0, axis=2), axis=1)
    y1 = tl.sum(tl.sum(acc1, axis=2), axis=1)
    y2 = tl.sum(tl.sum(acc2, axis=2), axis=1)
    y3 = tl.sum(tl.sum(acc3, axis=2), axis=1)
    y4 = tl.sum(tl.sum(acc4, axis=2), axis=1)
    y5 = tl.sum(tl.sum(acc5, axis=2), axis=1)
    y6 = tl.sum(tl.sum(acc6, axis=2), axis=1)
    y7 = tl.sum(tl.sum(acc7, axis=2), axis=1)
    out_ty = out_ptr.dtype.element_ty
    if USE_SPLIT:
        n_tiles = tl.num_programs(0)
        n_split = tl.num_programs(1)
        tile_ws = ws_ptr + pid_n * (8 * BN) + tl.arange(0, BN)
        split_stride = n_tiles * (8 * BN)
        own = tile_ws + pid_k * split_stride
        tl.store(own + 0 * BN, y0)
        if NT > 1:
            tl.store(own + 1 * BN, y1)
        if NT > 2:
            tl.store(own + 2 * BN, y2)
        if NT > 3:
            tl.store(own + 3 * BN, y3)
        if NT > 4:
            tl.store(own + 4 * BN, y4)
        if NT > 5:
            tl.store(own + 5 * BN, y5)
        if NT > 6:
            tl.store(own + 6 * BN, y6)
        if NT > 7:
            tl.store(own + 7 * BN, y7)
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == n_split - 1:
            s0 = tl.zeros([BN], dtype=tl.float32)
            s1 = tl.zeros([BN], dtype=tl.float32)
            s2 = tl.zeros([BN], dtype=tl.float32)
            s3 = tl.zeros([BN], dtype=tl.float32)
            s4 = tl.zeros([BN], dtype=tl.float32)
            s5 = tl.zeros([BN], dtype=tl.float32)
            s6 = tl.zeros([BN], dtype=tl.float32)
            s7 = tl.zeros([BN], dtype=tl.float32)
            for s in range(0, n_split):
                part = tile_ws + s * split_stride
                s0 += tl.load(part + 0 * BN, cache_modifier=".cg")
                if NT > 1:
                    s1 += tl.load(part + 1 * BN, cache_modifier=".cg")
                if NT > 2:
                    s2 += tl.load(part + 2 * BN, cache_modifier=".cg")
                if NT > 3:
                    s3 += tl.load(part + 3 * BN, cache_modifier=".cg")
                if NT > 4:
                    s4 += tl.load(part + 4 * BN, cache_modifier=".cg")
                if NT > 5:
                    s5 += tl.load(part + 5 * BN, cache_modifier=".cg")
                if NT > 6:
                    s6 += tl.load(part + 6 * BN, cache_modifier=".cg")
                if NT > 7:
                    s7 += tl.load(part + 7 * BN, cache_modifier=".cg")
            tl.store(out_ptr + rows, s0.to(out_ty), mask=row_ok)
            if NT > 1:
                tl.store(out_ptr + 1 * stride_ot + rows, s1.to(out_ty), mask=row_ok)
            if NT > 2:
                tl.store(out_ptr + 2 * stride_ot + rows, s2.to(out_ty), mask=row_ok)
            if NT > 3:
                tl.store(out_ptr + 3 * stride_ot + rows, s3.to(out_ty), mask=row_ok)
            if NT > 4:
                tl.store(out_ptr + 4 * stride_ot + rows, s4.to(out_ty), mask=row_ok)
            if NT > 5:
                tl.store(out_ptr + 5 * stride_ot + rows, s5.to(out_ty), mask=row_ok)
            if NT > 6:
                tl.store(out_ptr + 6 * stride_ot + rows, s6.to(out_ty), mask=row_ok)
            if NT > 7:
                tl.store(out_ptr + 7 * stride_ot + rows, s7.to(out_ty), mask=row_ok)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(out_ptr + rows, y0.to(out_ty), mask=row_ok)
        if NT > 1:
            tl.store(out_ptr + 1 * stride_ot + rows, y1.to(out_ty), mask=row_ok)
        if NT > 2:
            tl.store(out_ptr + 2 * stride_ot + rows, y2.to(out_ty), mask=row_ok)
        if NT > 3:
            tl.store(out_ptr + 3 * stride_ot + rows, y3.to(out_ty), mask=row_ok)
        if NT > 4:
            tl.store(out_ptr + 4 * stride_ot + rows, y4.to(out_ty), mask=row_ok)
        if NT > 5:
            tl.store(out_ptr + 5 * stride_ot + rows, y5.to(out_ty), mask=row_ok)
        if NT > 6:
            tl.store(out_ptr + 6 * stride_ot + rows, y6.to(out_ty), mask=row_ok)
        if NT > 7:
            tl.store(out_ptr + 7 * stride_ot + rows, y7.to(out_ty), mask=row_ok)


@triton.jit
def _sp24_dot_kernel(x_ptr, perm_ptr, vals_ptr, meta_ptr, out_ptr, ws_ptr, cnt_ptr,
                     N, K, KH, KW, T, stride_xt, stride_ot, stride_v, stride_m, kv_per_split,
                     BN: tl.constexpr, BT: tl.constexpr, BKH: tl.constexpr,
                     USE_SPLIT: tl.constexpr, HAS_PERM: tl.constexpr):
    BK: tl.constexpr = 2 * BKH
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    toks = pid_t * BT + tl.arange(0, BT)
    tok_ok = toks < T
    acc = tl.zeros([BN, BT], dtype=tl.float32)
    kv_begin = pid_k * kv_per_split
    # the same trip count for every split; steps past KH load nothing (masked)
    for step in range(0, kv_per_split // BKH):
        kv0 = kv_begin + step * BKH
        w = _decode_tile(vals_ptr, meta_ptr, rows, row_ok, kv0, KH, KW, stride_v, stride_m, BN, BKH, False, 0)
        cols = 2 * kv0 + tl.arange(0, BK)
        col_ok = cols < K
        if HAS_PERM:
            src = tl.load(perm_ptr + cols, mask=col_ok, other=0)
        else:
            src = cols
        xt = tl.load(x_ptr + toks[None, :] * stride_xt + src[:, None],
                     mask=col_ok[:, None] & tok_ok[None, :], other=0.0)
        acc = tl.dot(w, xt, acc)
    out_ty = out_ptr.dtype.element_ty
    out_ptrs = out_ptr + toks[None, :] * stride_ot + rows[:, None]
    out_mask = row_ok[:, None] & tok_ok[None, :]
    if USE_SPLIT:
        n_tn = tl.num_programs(0) * tl.num_programs(1)
        n_split = tl.num_programs(2)
        tile = pid_n * tl.num_programs(1) + pid_t
        local = tl.arange(0, BN)[:, None] * BT + tl.arange(0, BT)[None, :]
        tile_ws = ws_ptr + tile * (BN * BT) + local
        split_stride = n_tn * (BN * BT)
        tl.store(tile_ws + pid_k * split_stride, acc)
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == n_split - 1:
            total = tl.zeros([BN, BT], dtype=tl.float32)
            for s in range(0, n_split):
                total += tl.load(tile_ws + s * split_stride, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ty), mask=out_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(out_ptrs, acc.to(out_ty), mask=out_mask)


@triton.jit
def _sp24_decompress_kernel(vals_ptr, meta_ptr, out_ptr, N, K, KH, KW, stride_v, stride_m, stride_o, M_AL,
                            BN: tl.constexpr, BKH: tl.constexpr, META_SM90: tl.constexpr):
    BK: tl.constexpr = 2 * BKH
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BN + tl.arange(0, BN)
    row_ok = rows < N
    kv0 = pid_k * BKH
    w = _decode_tile(vals_ptr, meta_ptr, rows, row_ok, kv0, KH, KW, stride_v, stride_m, BN, BKH, META_SM90, M_AL)
    cols = 2 * kv0 + tl.arange(0, BK)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], w,
             mask=row_ok[:, None] & (cols < K)[None, :])


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of our kernels (what the autotuner searches and the plan records)."""

    kind: str  # "gemv" or "dot"
    block_n: int
    block_kh: int  # kept values per row per step (2*block_kh dense columns); multiple of 16
    block_t: int = 16  # token tile of the dot kernel (ignored by gemv)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    perm_mode: str = "gather"  # "gather" in the kernel, or "pre" (index_select before the launch)

    def __post_init__(self) -> None:
        if self.kind not in ("gemv", "dot"):
            raise ConfigError(f"kernel kind {self.kind!r} not in ('gemv', 'dot')")
        if self.block_kh < 16 or self.block_kh & (self.block_kh - 1):
            raise ConfigError(f"block_kh={self.block_kh} must be a power of two >= 16")
        if self.block_n < 1 or self.block_n & (self.block_n - 1):
            raise ConfigError(f"block_n={self.block_n} must be a power of two")
        if self.kind == "dot" and (self.block_t < 16 or self.block_t & (self.block_t - 1)):
            raise ConfigError(f"block_t={self.block_t} must be a power of two >= 16 for the dot kernel")
        if self.kind == "dot" and self.block_n < 16:
            raise ConfigError(f"block_n={self.block_n} must be >= 16 for the dot kernel")
        if self.split_k < 1:
            raise ConfigError(f"split_k={self.split_k} must be >= 1")
        if self.perm_mode not in ("gather", "pre"):
            raise ConfigError(f"perm_mode {self.perm_mode!r} not in ('gather', 'pre')")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KernelConfig":
        return cls(**data)

    @property
    def label(self) -> str:
        if self.kind == "gemv":
            core = f"gemv_n{self.block_n}_k{2 * self.block_kh}_w{self.num_warps}"
        else:
            core = f"dot_n{self.block_n}_t{self.block_t}_k{2 * self.block_kh}_w{self.num_warps}_s{self.num_stages}"
        return f"{core}_sk{self.split_k}_{self.perm_mode}"

    def supports(self, tokens: int) -> bool:
        return tokens >= 1 and (self.kind == "dot" or tokens <= GEMV_MAX_TOKENS)


class Workspace:
    """Persistent split-K buffers for one (config, shape, max tokens): fp32 partials + zeroed counters."""

    def __init__(self, config: KernelConfig, out_features: int, max_tokens: int,
                 device: torch.device | str, in_features: int | None = None, dtype: torch.dtype = torch.float16):
        n_tiles_n = triton.cdiv(out_features, config.block_n)
        if config.kind == "gemv":
            n_tiles, tile_elems = n_tiles_n, GEMV_MAX_TOKENS * config.block_n
        else:
            n_tiles = n_tiles_n * triton.cdiv(max_tokens, config.block_t)
            tile_elems = config.block_n * config.block_t
        split = config.split_k if config.split_k > 1 else 0
        self.partials = torch.empty(max(split * n_tiles * tile_elems, 1), dtype=torch.float32, device=device)
        self.counters = torch.zeros(max(n_tiles, 1), dtype=torch.int32, device=device)
        self.max_tokens = max_tokens
        self.x_perm = None
        if config.perm_mode == "pre" and in_features is not None:
            self.x_perm = torch.empty(max_tokens, in_features, dtype=dtype, device=device)


def kv_per_split(in_features: int, config: KernelConfig) -> int:
    kh = in_features // 2
    per = triton.cdiv(kh, config.split_k)
    return triton.cdiv(per, config.block_kh) * config.block_kh


def sp24_matmul(x: torch.Tensor, packed: Packed24, config: KernelConfig, workspace: Workspace,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """out[T, N] = x[T, K] @ W^T with our kernels. x must be contiguous 2-D with x.dtype == weight dtype.

    No host synchronisation; allocates only `out` when it is not given (caching allocator).
    """
    t, k = x.shape
    n = packed.out_features
    if out is None:
        out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    kh = k // 2
    kw = packed.meta.shape[1]
    has_perm = packed.perm is not None
    src = x
    if has_perm and config.perm_mode == "pre":
        buf = workspace.x_perm[:t]
        torch.index_select(x, 1, packed.perm, out=buf)
        src, has_perm = buf, False
    perm = packed.perm if has_perm else packed.meta  # any pointer when unused
    kvs = kv_per_split(k, config)
    use_split = config.split_k > 1
    if config.kind == "gemv":
        if t > GEMV_MAX_TOKENS:
            raise ConfigError(f"gemv kernel handles at most {GEMV_MAX_TOKENS} tokens, got {t}")
        grid = (triton.cdiv(n, config.block_n), config.split_k)
        _sp24_gemv_kernel[grid](
            src, perm, packed.values, packed.meta, out, workspace.partials, workspace.counters,
            n, k, kh, kw, src.stride(0), out.stride(0), packed.values.stride(0), packed.meta.stride(0), kvs,
            NT=t, BN=config.block_n, BKH=config.block_kh, USE_SPLIT=use_split, HAS_PERM=has_perm,
            ACC_E=16 if t <= 2 else 1, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        if use_split and t > workspace.max_tokens:
            raise ConfigError(f"workspace sized for {workspace.max_tokens} tokens, got {t}")
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(t, config.block_t), config.split_k)
        _sp24_dot_kernel[grid](
            src, perm, packed.values, packed.meta, out, workspace.partials, workspace.counters,
            n, k, kh, kw, t, src.stride(0), out.stride(0), packed.values.stride(0), packed.meta.stride(0), kvs,
            BN=config.block_n, BT=config.block_t, BKH=config.block_kh, USE_SPLIT=use_split, HAS_PERM=has_perm,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out


def sp24_decompress(packed: Packed24, out: torch.Tensor | None = None, block_n: int = 32,
                    block_kh: int = 64, meta_sm90: torch.Tensor | None = None) -> torch.Tensor:
    """Dense weight in the permuted column order (to multiply with x[:, perm]) by one Triton launch.
    ``meta_sm90``: read the metadata from that layout (pack.meta_to_sm90) instead of ``packed.meta``."""
    n, k = packed.shape
    if out is None:
        out = torch.empty(n, k, dtype=packed.dtype, device=packed.device)
    kh = k // 2
    grid = (triton.cdiv(n, block_n), triton.cdiv(kh, block_kh))
    if meta_sm90 is None:
        meta, stride_m, rows_aligned = packed.meta, packed.meta.stride(0), 0
    else:
        if k % 16:
            raise ConfigError(f"the sm90 metadata layout needs in_features % 16 == 0, got {k}")
        meta, stride_m, rows_aligned = meta_sm90.view(torch.int16), 0, sm90_meta_shape(n, k)[0]
    _sp24_decompress_kernel[grid](
        packed.values, meta, out, n, k, kh, meta_words(k), packed.values.stride(0), stride_m, out.stride(0),
        rows_aligned, BN=block_n, BKH=block_kh, META_SM90=meta_sm90 is not None, num_warps=4,
    )
    return out
