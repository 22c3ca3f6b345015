"""ProjectionGroup: the linears of a block that read one input (q, k, v; gate, up) run as one GEMM.

Why: at batch-1 decode a LLaMA-7B q, k or v projection streams 18 MB of packed weight in ~11 us, and a
fixed part of that (launch, ramp, tail, split-K reduction) does not shrink with the weight. One launch
over the three weights pays it once. The dense baseline gets the same treatment (one cuBLAS GEMM on the
concatenated weight), so a profile compares kernels, not launch counts.

- Dense members (``nn.Linear`` without bias): one concatenated weight; the members' weights become row
  slices of it (no second copy), so the members still work on their own.
- 2:4 members (``SparseLinear``, decode route ``ours_cuda``): one launch of the CUDA decode kernel over
  all of them (``cuda_sp24.sp24_cuda_group_matmul``: each CTA takes one member's row tile, with that
  member's weight, permutation and metadata). Its configuration is tuned per token bucket on the group
  (rotating weight copies, as the per-shape tuner does), and the group is used for a bucket only where
  it beat the members' own tuned launches one after another in the same timing; elsewhere, and past the
  decode kernel's 32 tokens, the members run as planned.
- Anything else runs the members one after another.

``forward`` returns one output per member, in order; grouped outputs are column slices of one buffer
(evenly strided rows, unit stride along features), which the fused decoder kernels read in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from esparse.errors import ConfigError

from .autotune import copy_packed
from .pack import rel_frobenius_error
from .timing import l2_bytes, rotation_sets, time_calls

_GROUP_PLANS: dict[tuple, dict] = {}  # (widths, in_features, tokens, dtype, permuted, device) -> tuning result


@dataclass
class GroupTiming:
    """One bucket's tuning: the members' own launches one after another against the best group launch."""

    tokens: int
    separate_us: float
    grouped_us: float
    config: dict
    candidates: int

    @property
    def grouped(self) -> bool:
        return self.grouped_us < self.separate_us

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "separate_us": self.separate_us, "grouped_us": self.grouped_us,
                "config": self.config, "candidates": self.candidates, "grouped": self.grouped}


class ProjectionGroup(nn.Module):
    """Members sharing one input, run as one GEMM where that is faster (module doc)."""

    def __init__(self, members, tokens=(1,), reps: int = 10):
        super().__init__()
        members = list(members)
        if not 1 <= len(members) <= 3:
            raise ConfigError(f"a projection group takes 1..3 linears, got {len(members)}")
        in_features = {m.in_features for m in members}
        if len(in_features) != 1:
            raise ConfigError(f"grouped linears must read one input; in_features differ: {sorted(in_features)}")
        self.in_features = in_features.pop()
        self._members = members  # a plain list: the members stay registered where they are, once
        self.widths = [m.out_features for m in members]
        self.kind = "separate"
        self.weight = None
        self.timings: list[GroupTiming] = []
        self._routes: dict[int, tuple] = {}
        if all(type(m) is nn.Linear and m.bias is None for m in members) and \
                len({(m.weight.dtype, m.weight.device) for m in members}) == 1:
            self._group_dense()
        else:
            from .linear import SparseLinear

            if all(isinstance(m, SparseLinear) for m in members):
                self._group_sparse(sorted({int(t) for t in tokens}), reps)

    # -- construction -------------------------------------------------------------------------
    def _group_dense(self) -> None:
        with torch.no_grad():
            weight = torch.cat([m.weight for m in self._members])
            start = 0
            for m, width in zip(self._members, self.widths):
                m.weight.data = weight[start:start + width]  # a view: the concatenation is the only copy
                start += width
        self.weight = weight
        self.kind = "dense"

    def _group_sparse(self, tokens: list[int], reps: int) -> None:
        from . import cuda_sp24

        members = self._members
        device = members[0].values.device
        if device.type != "cuda" or not cuda_sp24.available():
            return
        if any(m.bias is not None for m in members) or len({m.values.dtype for m in members}) != 1:
            return
        for t in tokens:
            routes = [m._route(t) for m in members]
            if t > cuda_sp24.MAX_TOKENS or any(r[0] != "ours_cuda" or t > r[3] for r in routes):
                continue
            timing = self._tune(t, routes, reps)
            self.timings.append(timing)
            if timing.grouped:
                cfg = cuda_sp24.CudaConfig.from_dict(timing.config)
                self._routes[t] = (cfg, self._workspace(cfg, t))
        if self._routes:
            self.kind = "sparse"

    def _workspace(self, cfg, tokens: int):
        from . import cuda_sp24
        from .linear import _shared_workspace

        members = self._members
        staged = len({id(m.packed.perm) for m in members})
        dtype, device = members[0].values.dtype, members[0].values.device
        return _shared_workspace(
            lambda: cuda_sp24.CudaWorkspace(cfg, self.widths, tokens, device, self.in_features, dtype, staged),
            "ours_cuda_group", repr(cfg), tuple(self.widths), self.in_features, tokens, dtype, device, staged)

    def _tune(self, tokens: int, routes, reps: int) -> GroupTiming:
        """Time the members' planned launches back to back and every group configuration, on rotating
        copies of the weights (more than 4x the L2 size in all), in one sitting; cached per group shape."""
        from . import cuda_sp24

        members = self._members
        dtype, device = members[0].values.dtype, members[0].values.device
        permuted = tuple(m.packed.perm is not None for m in members)
        key = (tuple(self.widths), self.in_features, tokens, dtype, permuted, str(device),
               tuple(repr(r[1]) for r in routes))
        cached = _GROUP_PLANS.get(key)
        if cached is not None:
            return GroupTiming(**cached)
        packs = [m.packed for m in members]
        metas = [m.meta_sm90 for m in members]
        weight_bytes = sum(p.nbytes() + (0 if e is None else e.numel()) for p, e in zip(packs, metas))
        set_bytes = weight_bytes + tokens * (self.in_features + sum(self.widths)) * packs[0].values.element_size()
        sets = rotation_sets(set_bytes, l2_bytes(device))
        copies = [(packs, metas)] + [([copy_packed(p) for p in packs], [None if e is None else e.clone() for e in metas])
                                     for _ in range(sets - 1)]
        gen = torch.Generator(device=device).manual_seed(2000 + tokens)
        xs = [torch.randn(tokens, self.in_features, generator=gen, device=device).to(dtype) for _ in range(sets)]
        buffers = [torch.empty(tokens, sum(self.widths), dtype=dtype, device=device) for _ in range(sets)]

        def separate(x, ps, es, out):
            for (_, cfg, ws, _), p, e, o in zip(routes, ps, es, out.split(self.widths, dim=1)):
                cuda_sp24.sp24_cuda_matmul(x, p, cfg, ws, out=o, meta_sm90=e)

        with torch.no_grad():
            reference = torch.empty_like(buffers[0])
            separate(xs[0], *copies[0], reference)
            separate_us = time_calls([lambda x=x, c=c, o=o: separate(x, *c, o)
                                      for x, c, o in zip(xs, copies, buffers)], reps).median_us
            best, best_us, count = None, float("inf"), 0
            for cfg in cuda_sp24.cuda_candidates(sum(self.widths), self.in_features, tokens,
                                                 torch.cuda.get_device_properties(device).multi_processor_count,
                                                 pdl=cuda_sp24.pdl_supported(),
                                                 cluster=cuda_sp24.cluster_supported()):
                ws = cuda_sp24.CudaWorkspace(cfg, self.widths, tokens, device, self.in_features, dtype,
                                             len({id(p.perm) for p in packs}))
                calls = [lambda x=x, c=c, o=o, ws=ws, cfg=cfg: cuda_sp24.sp24_cuda_group_matmul(
                    x, c[0], cfg, ws, list(o.split(self.widths, dim=1)), c[1]) for x, c, o in zip(xs, copies, buffers)]
                buffers[0].fill_(float("nan"))  # unwritten outputs must show
                calls[0]()
                error = rel_frobenius_error(buffers[0], reference)
                if not error < 1e-3:
                    raise ConfigError(f"grouped decode launch {cfg.label} for widths {self.widths} x "
                                      f"{self.in_features} disagrees with its members (relative error {error})")
                us = time_calls(calls, reps).median_us
                count += 1
                if us < best_us:
                    best, best_us = cfg, us
        result = GroupTiming(tokens, separate_us, best_us, best.to_dict(), count)
        _GROUP_PLANS[key] = {k: v for k, v in result.to_dict().items() if k != "grouped"}
        return result

    # -- forward ------------------------------------------------------------------------------
    @property
    def grouped_tokens(self) -> list[int]:
        """Token buckets that run as one launch (2:4 groups; empty otherwise)."""
        return sorted(self._routes)

    def _route(self, tokens: int):
        for size in sorted(self._routes):
            if tokens <= size:
                return self._routes[size]
        return None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lead = x.shape[:-1]
        if self.kind == "dense":
            return F.linear(x, self.weight).split(self.widths, dim=-1)
        route = self._route(x.numel() // self.in_features) if self.kind == "sparse" else None
        if route is None:
            return tuple(m(x) for m in self._members)
        from .cuda_sp24 import sp24_cuda_group_matmul

        members = self._members
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != members[0].values.dtype:
            raise ConfigError(f"grouped 2:4 layers hold {members[0].values.dtype}, the input is {x2.dtype}")
        x2 = x2.contiguous()
        out = torch.empty(x2.shape[0], sum(self.widths), dtype=x2.dtype, device=x2.device)
        cfg, ws = route
        sp24_cuda_group_matmul(x2, [m.packed for m in members], cfg, ws, list(out.split(self.widths, dim=1)),
                               [m.meta_sm90 for m in members])
        return out.view(*lead, sum(self.widths)).split(self.widths, dim=-1)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, widths={self.widths}, in_features={self.in_features}, grouped_tokens={self.grouped_tokens}"


__all__ = ["ProjectionGroup", "GroupTiming"]
