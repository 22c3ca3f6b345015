"""Candidates per (shape, token count) and their measurement on the current CUDA device.

Backends:
- ``dense``: cuBLAS ``torch.mm(x, W.t())`` on the masked dense weight in the original column order.
- ``ours``: the Triton kernels of triton_sp24 on the packed format, permutation included.
- ``ours_cuda``: the CUDA C++ decode kernel of cuda_sp24 (sparse tensor cores, 1-32 tokens),
  permutation included (gathered once per CTA into shared memory).
- ``ours_cutlass``: the prefill GEMM of cutlass_sp24 (CUTLASS's ``wgmma.sp`` kernels, Hopper, from
  cutlass_sp24.MIN_TOKENS tokens), permutation included (x[:, perm] gathered by the library's own
  kernel before the GEMM).
- ``cusparselt``: ``torch._cslt_sparse_mm`` (permuted x via index_select + sparse GEMM), searched
  algorithm and a sweep of algorithm ids / split-K, timed under graph replay.
- ``decompress_dense``: decompress the packed weight (Triton) into a scratch buffer, then cuBLAS.

``ShapeBench`` owns the rotation copies for one weight shape and times any candidate at any token
count; ``tune_shape`` times every candidate of every token bucket and returns the records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from esparse.errors import ConfigError

from . import cslt
from .pack import Packed24, pack_24, random_24_weight, rel_frobenius_error, unpack_24_permuted
from .timing import MAX_SETS, Timing, l2_bytes, rotation_sets, time_calls

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 64, 256, 2048, 8192)
SPARSE_BACKENDS = ("ours", "ours_cuda", "ours_cutlass", "cusparselt", "decompress_dense")

# (block_n, block_kh, num_warps) of the FMA decode kernel
GEMV_BLOCKS = ((16, 128, 4), (32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 64, 4), (8, 256, 4))
# (block_n, block_t, block_kh, num_warps, num_stages) of the tensor-core kernel, by token range
DOT_BLOCKS_SMALL = ((64, 16, 128, 4, 2), (64, 16, 32, 4, 3), (128, 16, 32, 4, 3), (64, 16, 64, 4, 2))
DOT_BLOCKS_MID = ((64, 64, 64, 4, 3), (128, 64, 32, 4, 3), (128, 64, 64, 8, 3), (64, 32, 64, 4, 3))
DOT_BLOCKS_LARGE = ((128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3))
DOT_BLOCKS_PREFILL = ((128, 128, 32, 8, 3), (128, 256, 32, 8, 3))


def _pow2_at_least(x: float) -> int:
    return 1 if x <= 1 else 1 << math.ceil(math.log2(x))


def _splits(tiles: int, n_sms: int, max_split: int) -> list[int]:
    """Split-K factors around the smallest one giving >= 2 programs per multiprocessor."""
    base = _pow2_at_least(2 * n_sms / max(tiles, 1))
    cands = {base, base * 2}
    return sorted(s for s in cands if s <= max(1, max_split)) or [1]


def kernel_candidates(out_features: int, in_features: int, tokens: int, n_sms: int = 132,
                      has_perm: bool = True):
    """Our kernel configurations worth timing for this shape and token count."""
    from .triton_sp24 import GEMV_MAX_TOKENS, KernelConfig

    kh = in_features // 2
    out: list[KernelConfig] = []
    if tokens <= GEMV_MAX_TOKENS:
        blocks_gemv = GEMV_BLOCKS if tokens <= 2 else GEMV_BLOCKS[:4]
        for i, (bn, bkh, warps) in enumerate(blocks_gemv):
            tiles = -(-out_features // bn)
            # gathering x through a random permutation touches ~one cache line per value; a
            # pre-permuted x (one index_select launch) keeps each warp's gathers within a few lines
            modes = ("pre", "gather") if has_perm and i < 2 else ("pre",)
            for split in _splits(tiles, n_sms, max(1, kh // bkh)):
                for mode in modes:
                    out.append(KernelConfig("gemv", bn, bkh, split_k=split, num_warps=warps, perm_mode=mode))
    if tokens <= 4:
        blocks, modes = (), ()
    elif tokens <= 16:
        blocks, modes = DOT_BLOCKS_SMALL, ("pre",)
    elif tokens <= 64:
        blocks, modes = DOT_BLOCKS_MID, ("pre",)
    elif tokens <= 512:
        blocks, modes = DOT_BLOCKS_LARGE, ("pre",)
    else:
        blocks, modes = DOT_BLOCKS_PREFILL, ("pre",)
    for bn, bt, bkh, warps, stages in blocks:
        tiles = -(-out_features // bn) * -(-tokens // bt)
        splits = _splits(tiles, n_sms, max(1, kh // bkh)) if tokens <= 512 else [1]
        for split in splits:
            for mode in modes:
                out.append(KernelConfig("dot", bn, bkh, block_t=bt, split_k=split, num_warps=warps,
                                        num_stages=stages, perm_mode=mode if has_perm else "gather"))
    seen, unique = set(), []
    for cfg in out:
        if cfg not in seen:
            seen.add(cfg)
            unique.append(cfg)
    return unique


@dataclass
class Measurement:
    backend: str
    config: dict
    label: str
    timing: Timing | None
    rel_err: float | None = None
    error: str | None = None
    set_bytes: int = 0

    def to_dict(self) -> dict:
        out = {"backend": self.backend, "config": self.config, "label": self.label, "rel_err": self.rel_err,
               "set_bytes": self.set_bytes}
        if self.timing is not None:
            out.update(self.timing.to_dict())
        if self.error:
            out["error"] = self.error
        return out


def copy_packed(p: Packed24) -> Packed24:
    return Packed24(values=p.values.clone(), meta=p.meta.clone(),
                    perm=None if p.perm is None else p.perm.clone(), shape=p.shape)


@dataclass
class ShapeBench:
    """Rotation copies of one weight (dense, packed, cuSPARSELt-compressed) and timed candidates."""

    weight: torch.Tensor  # masked dense, original column order, on the device
    packed: Packed24  # on the device
    reps: int = 20
    max_sets: int = MAX_SETS
    check: bool = True
    # metadata layout the decode kernel and the decompression read: "sm90" (CUTLASS's, what a layer
    # holding the CUTLASS prefill route keeps as its only copy), "rows" (pack.py's), or "auto" (sm90
    # where the CUTLASS library runs this shape, else rows)
    meta_layout: str = "auto"
    _copies: dict = field(default_factory=dict)
    _dense_perm: torch.Tensor | None = None
    _ref_cache: dict = field(default_factory=dict)

    @classmethod
    def random(cls, out_features: int, in_features: int, dtype=torch.float16, device="cuda", seed: int = 0,
               with_perm: bool = True, **kw) -> "ShapeBench":
        gen = torch.Generator().manual_seed(seed)
        w, mask, perm = random_24_weight(out_features, in_features, dtype, "cpu", gen, with_perm)
        packed = pack_24(w, mask, perm)
        return cls(weight=w.to(device), packed=packed.to(device), **kw)

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape

    @property
    def device(self):
        return self.weight.device

    @property
    def l2(self) -> int:
        return l2_bytes(self.device)

    def dense_perm(self) -> torch.Tensor:
        if self._dense_perm is None:
            self._dense_perm = unpack_24_permuted(self.packed).contiguous()
        return self._dense_perm

    def _weight_copies(self, kind: str, count: int) -> list:
        lst = self._copies.setdefault(kind, [])
        while len(lst) < count:
            if kind == "dense":
                lst.append(self.weight if not lst else self.weight.clone())
            elif kind == "packed":
                lst.append(self.packed if not lst else copy_packed(self.packed))
            elif kind == "packed_noperm":
                base = self._copies.get("packed", [self.packed])
                src = base[len(lst)] if len(lst) < len(base) else copy_packed(self.packed)
                lst.append(Packed24(src.values, src.meta, None, src.shape))
            elif kind == "cslt":
                lst.append(cslt.compress(self.dense_perm()) if not lst else lst[0].clone())
            elif kind == "meta_sm90":  # the metadata of the packed copy of the same index, sm90 layout
                from .pack import meta_to_sm90

                packed = self._weight_copies("packed", len(lst) + 1)[len(lst)]
                lst.append(meta_to_sm90(packed.meta, packed.in_features))
            elif kind == "cutlass":  # values shared with the packed copy of the same index
                from .cutlass_sp24 import CutlassWeight

                packed = self._weight_copies("packed", len(lst) + 1)[len(lst)]
                lst.append(CutlassWeight.from_packed(packed))
            else:
                raise ValueError(kind)
        return lst[:count]

    def release(self) -> None:
        self._copies.clear()
        self._ref_cache.clear()
        self._dense_perm = None

    def uses_sm90_meta(self) -> bool:
        if self.meta_layout not in ("auto", "sm90", "rows"):
            raise ConfigError(f"meta_layout {self.meta_layout!r} must be 'auto', 'sm90' or 'rows'")
        if self.meta_layout != "auto":
            return self.meta_layout == "sm90"
        from . import cutlass_sp24

        n, k = self.shape
        return cutlass_sp24.supports_shape(n, k, self.weight.dtype) and cutlass_sp24.available()

    def _meta_copies(self, count: int) -> list:
        """Per rotation copy: its sm90 metadata, or None (the packed copy's own rows metadata)."""
        return self._weight_copies("meta_sm90", count) if self.uses_sm90_meta() else [None] * count

    def _inputs(self, tokens: int, count: int, rows: int | None = None) -> list[torch.Tensor]:
        n, k = self.shape
        gen = torch.Generator(device=self.device).manual_seed(1000 + tokens)
        base = torch.randn(rows or tokens, k, generator=gen, device=self.device, dtype=torch.float32)
        base = base.to(self.weight.dtype)
        return [base] + [base.clone() for _ in range(count - 1)]

    def _reference(self, x: torch.Tensor, permuted_weight: bool = False) -> torch.Tensor:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            if permuted_weight:  # the no-permutation timing variant multiplies x with W[:, perm]
                return x.float() @ self.dense_perm().float().t()
            return x.float() @ self.weight.float().t()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev

    def _set_count(self, weight_bytes: int, tokens: int, rows: int | None = None) -> tuple[int, int]:
        n, k = self.shape
        el = self.weight.element_size()
        set_bytes = weight_bytes + (rows or tokens) * (k + n) * el
        return rotation_sets(set_bytes, self.l2, cap=self.max_sets), set_bytes

    # -- backends -----------------------------------------------------------------------------
    def time_dense(self, tokens: int, reps: int | None = None) -> Measurement:
        n, k = self.shape
        sets, set_bytes = self._set_count(n * k * self.weight.element_size(), tokens)
        ws = self._weight_copies("dense", sets)
        xs = self._inputs(tokens, sets)
        outs = [torch.empty(tokens, n, dtype=self.weight.dtype, device=self.device) for _ in range(sets)]
        calls = [(lambda x=x, w=w, o=o: torch.mm(x, w.t(), out=o)) for x, w, o in zip(xs, ws, outs)]
        err = None
        if self.check:
            outs[0].fill_(float("nan"))
            calls[0]()
            err = rel_frobenius_error(outs[0], self._reference(xs[0]))
        timing = time_calls(calls, reps or self.reps)
        return Measurement("dense", {"library": "cublas"}, "cublas", timing, err, set_bytes=set_bytes)

    def time_ours(self, config, tokens: int, reps: int | None = None, with_perm: bool = True) -> Measurement:
        from .triton_sp24 import Workspace, sp24_matmul

        n, k = self.shape
        kind = "packed" if with_perm else "packed_noperm"
        sets, set_bytes = self._set_count(self.packed.nbytes(), tokens)
        ps = self._weight_copies(kind, sets)
        xs = self._inputs(tokens, sets)
        outs = [torch.empty(tokens, n, dtype=self.weight.dtype, device=self.device) for _ in range(sets)]
        ws = Workspace(config, n, tokens, self.device, in_features=k, dtype=self.weight.dtype)
        calls = [(lambda x=x, p=p, o=o: sp24_matmul(x, p, config, ws, out=o)) for x, p, o in zip(xs, ps, outs)]
        err = None
        if self.check:
            for _ in range(2):  # twice: the second run reuses the counters the first one reset
                outs[0].fill_(float("nan"))
                calls[0]()
            err = rel_frobenius_error(outs[0], self._reference(xs[0], permuted_weight=not with_perm
                                                              and self.packed.perm is not None))
        timing = time_calls(calls, reps or self.reps)
        if self.check:  # after hundreds of launches the counters must all be back at zero
            if int(ws.counters.abs().sum()) != 0:
                err = float("inf")
        backend = "ours" if with_perm else "ours_noperm"
        return Measurement(backend, config.to_dict(), config.label, timing, err, set_bytes=set_bytes)

    def time_cuda(self, config, tokens: int, reps: int | None = None, with_perm: bool = True) -> Measurement:
        from .cuda_sp24 import CudaWorkspace, sp24_cuda_matmul

        n, k = self.shape
        kind = "packed" if with_perm else "packed_noperm"
        sets, set_bytes = self._set_count(self.packed.nbytes(), tokens)
        ps = self._weight_copies(kind, sets)
        xs = self._inputs(tokens, sets)
        outs = [torch.empty(tokens, n, dtype=self.weight.dtype, device=self.device) for _ in range(sets)]
        ws = CudaWorkspace(config, n, tokens, self.device, k, self.weight.dtype)
        metas = self._meta_copies(sets)
        calls = [(lambda x=x, p=p, o=o, e=e: sp24_cuda_matmul(x, p, config, ws, out=o, meta_sm90=e))
                 for x, p, o, e in zip(xs, ps, outs, metas)]
        err = None
        if self.check:
            errs = []
            for _ in range(2):  # twice: the second run reuses the counters the first one reset
                outs[0].fill_(float("nan"))
                calls[0]()
                errs.append(rel_frobenius_error(outs[0], self._reference(xs[0], permuted_weight=not with_perm
                                                                         and self.packed.perm is not None)))
            err = max(errs)
        timing = time_calls(calls, reps or self.reps)
        if self.check and int(ws.counters.abs().sum()) != 0:
            err = float("inf")
        backend = "ours_cuda" if with_perm else "ours_cuda_noperm"
        recorded = {**config.to_dict(), "meta_layout": "sm90" if metas[0] is not None else "rows"}
        return Measurement(backend, recorded, config.label, timing, err, set_bytes=set_bytes)

    def time_cutlass(self, config, tokens: int, reps: int | None = None, with_perm: bool = True) -> Measurement:
        from .cutlass_sp24 import sp24_cutlass_matmul, workspace_bytes

        n, k = self.shape
        cw0 = self._weight_copies("cutlass", 1)[0]
        sets, set_bytes = self._set_count(cw0.nbytes(), tokens)
        cws = self._weight_copies("cutlass", sets)
        xs = self._inputs(tokens, sets)
        outs = [torch.empty(tokens, n, dtype=self.weight.dtype, device=self.device) for _ in range(sets)]
        perm = self.packed.perm if with_perm else None
        x_perm = torch.empty(tokens, k, dtype=self.weight.dtype, device=self.device) if perm is not None else None
        need = workspace_bytes(cw0, config, tokens)
        ws = torch.empty(need, dtype=torch.uint8, device=self.device) if need else None
        calls = [(lambda x=x, c=c, o=o: sp24_cutlass_matmul(x, c, config, perm, out=o, x_perm=x_perm, workspace=ws))
                 for x, c, o in zip(xs, cws, outs)]
        err = None
        if self.check:
            outs[0].fill_(float("nan"))
            calls[0]()
            err = rel_frobenius_error(outs[0], self._reference(xs[0], permuted_weight=perm is None
                                                              and self.packed.perm is not None))
        timing = time_calls(calls, reps or self.reps)
        backend = "ours_cutlass" if with_perm else "ours_cutlass_noperm"
        return Measurement(backend, config.to_dict(), config.label, timing, err, set_bytes=set_bytes)

    def time_decompress_dense(self, tokens: int, reps: int | None = None) -> Measurement:
        from .triton_sp24 import sp24_decompress

        n, k = self.shape
        sets, set_bytes = self._set_count(self.packed.nbytes(), tokens)
        ps = self._weight_copies("packed", sets)
        xs = self._inputs(tokens, sets)
        outs = [torch.empty(tokens, n, dtype=self.weight.dtype, device=self.device) for _ in range(sets)]
        scratch = torch.empty(n, k, dtype=self.weight.dtype, device=self.device)
        xp = torch.empty(tokens, k, dtype=self.weight.dtype, device=self.device)

        def call(x, p, o, e):
            sp24_decompress(p, out=scratch, meta_sm90=e)
            src = x
            if p.perm is not None:
                torch.index_select(x, 1, p.perm, out=xp)
                src = xp
            torch.mm(src, scratch.t(), out=o)

        metas = self._meta_copies(sets)
        calls = [(lambda x=x, p=p, o=o, e=e: call(x, p, o, e)) for x, p, o, e in zip(xs, ps, outs, metas)]
        err = None
        if self.check:
            outs[0].fill_(float("nan"))
            calls[0]()
            err = rel_frobenius_error(outs[0], self._reference(xs[0]))
        timing = time_calls(calls, reps or self.reps)
        config = {"decompress": "triton", "gemm": "cublas", "meta_layout": "sm90" if metas[0] is not None else "rows"}
        return Measurement("decompress_dense", config, "decompress+cublas", timing, err, set_bytes=set_bytes)

    def time_cslt(self, tokens: int, alg_id: int, split_k: int = 1, reps: int | None = None,
                  with_perm: bool = True) -> Measurement:
        n, k = self.shape
        rows = cslt.padded_tokens(tokens)
        sets, set_bytes = self._set_count(self.packed.nbytes(), tokens, rows=rows)
        cs = self._weight_copies("cslt", sets)
        xs = self._inputs(tokens, sets, rows=rows)
        perm = self.packed.perm if with_perm else None
        xp = torch.empty(rows, k, dtype=self.weight.dtype, device=self.device)

        def call(x, c):
            src = x
            if perm is not None:
                torch.index_select(x, 1, perm, out=xp)
                src = xp
            return cslt.mm(c, src, alg_id=alg_id, split_k=split_k)

        calls = [(lambda x=x, c=c: call(x, c)) for x, c in zip(xs, cs)]
        err = None
        if self.check:
            out = calls[0]()
            ref = self._reference(xs[0], permuted_weight=perm is None and self.packed.perm is not None)
            err = rel_frobenius_error(out[:tokens], ref[:tokens])
        timing = time_calls(calls, reps or self.reps)
        cfg = {"alg_id": alg_id, "split_k": split_k, "padded_tokens": rows}
        backend = "cusparselt" if with_perm else "cusparselt_noperm"
        return Measurement(backend, cfg, f"cslt_alg{alg_id}_sk{split_k}", timing, err, set_bytes=set_bytes)


def _safe(fn: Callable[[], Measurement], backend: str, label: str, config: dict) -> Measurement:
    try:
        return fn()
    except Exception as exc:  # a candidate that fails to compile or run is recorded, not fatal
        torch.cuda.synchronize()
        return Measurement(backend, config, label, None, None, error=f"{type(exc).__name__}: {exc}"[:300])


CSLT_MIN_TOKENS = 64


def cslt_candidates(bench: "ShapeBench", tokens: int, max_algs: int = 8) -> list[tuple[int, int]]:
    """(alg_id, split_k) pairs to time under graph replay: algorithm ids 0.. (the sweep stops at the
    first id that fails); split-K is left at 1. The library's own
    search (torch._cslt_sparse_mm_search) is not used: on the H200 it raised an internal error and left
    an illegal-instruction fault behind at 16 padded tokens, which kills the process's CUDA context.
    Below 64 tokens nothing is tried: at 16 tokens algorithm 2 never returned (576x576, H200), and
    algorithms 0/1 ran 3-4x slower than cuBLAS there."""
    if tokens < CSLT_MIN_TOKENS:
        return []
    top = 4 if tokens < 64 else max_algs
    return [(a, 1) for a in range(top)]


class _Recorder(list):
    """A list of measurements that reports each one as it arrives (so a crash loses nothing)."""

    def __init__(self, on_result: Callable[[Measurement], None] | None):
        super().__init__()
        self._on_result = on_result

    def append(self, m: Measurement) -> None:
        super().append(m)
        if self._on_result is not None:
            self._on_result(m)


def cuda_available() -> bool:
    """True when the CUDA decode kernel builds and runs here (first call compiles it)."""
    if not torch.cuda.is_available():
        return False
    from . import cuda_sp24

    return cuda_sp24.available()


def cutlass_available() -> bool:
    """True when the CUTLASS prefill library builds and loads here (Hopper only; first call compiles)."""
    if not torch.cuda.is_available():
        return False
    from . import cutlass_sp24

    return cutlass_sp24.available()


def tune_tokens(bench: ShapeBench, tokens: int, n_sms: int, include_cslt: bool = True,
                include_dense: bool = True, include_decompress: bool | None = None,
                log: Callable[[str], None] | None = None,
                on_result: Callable[[Measurement], None] | None = None,
                include_triton: bool = True, include_cuda: bool = True,
                include_cutlass: bool = True) -> list[Measurement]:
    """Time every candidate for one token count; returns all measurements (failed ones with .error)."""
    n, k = bench.shape
    res: list[Measurement] = _Recorder(on_result)
    if bench.meta_layout == "auto" and not include_cutlass:
        bench.meta_layout = "rows"  # no CUTLASS route, so the layers keep pack.py's metadata
    if include_dense:
        res.append(_safe(lambda: bench.time_dense(tokens), "dense", "cublas", {}))
    has_perm = bench.packed.perm is not None
    if include_triton:
        for cfg in kernel_candidates(n, k, tokens, n_sms, has_perm):
            res.append(_safe(lambda cfg=cfg: bench.time_ours(cfg, tokens), "ours", cfg.label, cfg.to_dict()))
    if include_cuda and cuda_available():
        from .cuda_sp24 import cluster_supported, cuda_candidates, pdl_supported, supports_shape

        if supports_shape(n, k, bench.weight.dtype):
            for cfg in cuda_candidates(n, k, tokens, n_sms, pdl=pdl_supported(), cluster=cluster_supported()):
                res.append(_safe(lambda cfg=cfg: bench.time_cuda(cfg, tokens), "ours_cuda", cfg.label,
                                 cfg.to_dict()))
    from .cutlass_sp24 import MIN_TOKENS as CUTLASS_MIN_TOKENS

    if include_cutlass and tokens >= CUTLASS_MIN_TOKENS and cutlass_available():  # no build below it
        from .cutlass_sp24 import cutlass_candidates

        for cfg in cutlass_candidates(n, k, tokens, bench.weight.dtype):
            res.append(_safe(lambda cfg=cfg: bench.time_cutlass(cfg, tokens), "ours_cutlass", cfg.label,
                             cfg.to_dict()))
    if include_decompress is None:
        include_decompress = tokens >= 16
    if include_decompress:
        res.append(_safe(lambda: bench.time_decompress_dense(tokens), "decompress_dense", "decompress+cublas", {}))
    if include_cslt and cslt.available():
        pairs = cslt_candidates(bench, tokens)
        stop_after_fail = False
        for alg, split in pairs:
            if stop_after_fail and split == 1:
                continue
            m = _safe(lambda alg=alg, split=split: bench.time_cslt(tokens, alg, split), "cusparselt",
                      f"cslt_alg{alg}_sk{split}", {"alg_id": alg, "split_k": split})
            res.append(m)
            if m.error and split == 1 and alg > 0:
                stop_after_fail = True  # ids past the last valid algorithm fail; stop sweeping
    if log:
        ok = [m for m in res if m.timing is not None]
        best = min(ok, key=lambda m: m.timing.median_us) if ok else None
        log(f"  {n}x{k} T={tokens}: {len(res)} candidates, best {best.label if best else None} "
            f"{best.timing.median_us if best else float('nan'):.1f} us")
    return list(res)


def best_of(measurements: list[Measurement], backends: tuple[str, ...], max_err: float = 1e-3) -> Measurement | None:
    ok = [m for m in measurements if m.backend in backends and m.timing is not None and m.error is None
          and (m.rel_err is None or m.rel_err < max_err)]
    return min(ok, key=lambda m: m.timing.median_us) if ok else None
