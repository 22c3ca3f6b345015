"""SparseLinear: a drop-in nn.Linear on the packed 2:4 weight that picks its path per call from the plan.

The path is chosen on the host from the token count (a shape, never a device value), every workspace
is allocated at construction (split-K partials and zeroed ticket counters, the pre-permuted input
buffer), so the hot path has no host synchronisation and no cudaMalloc: outputs come from PyTorch's
caching allocator, which CUDA-graph capture supports, and whole models can be captured.

Backends: ``ours`` (Triton kernels), ``ours_cuda`` (the CUDA decode kernel on sparse tensor cores,
1-32 tokens; token counts beyond its bucket fall back to ``decompress_dense``), ``ours_cutlass``
(CUTLASS's Hopper sparse GEMM for prefill; it shares the packed values and brings CUTLASS's metadata,
1/16 of the dense bytes, made once at construction), ``dense`` (cuBLAS on
a dense copy of the masked weight: only kept when the plan picks dense somewhere and ``allow_dense``
is true, and it costs the dense weight's memory), ``cusparselt`` (compressed copy made at
construction), ``decompress_dense`` (Triton decompress into a scratch buffer shared by all layers of
one shape, then cuBLAS) and ``reference`` (plain PyTorch; used on CPU and for CPU-reference plans).

Metadata: when a layer holds the CUTLASS route and none of its routes needs pack.py's row-major
metadata (the Triton ``ours`` kernels and ``reference`` do), it keeps CUTLASS's sm90 layout as its only
copy: ``ours_cuda`` and ``decompress_dense`` read that layout too, so the layer stores values + 1/16,
0.5625 of the dense bytes (``meta_layout`` says which layout it holds).
"""

from __future__ import annotations

import bisect
from pathlib import Path

import torch
from torch import nn

from esparse.errors import ConfigError, DataError
from esparse.io import read_json

from .pack import Packed24, check_perm, meta_from_sm90, reorder_rows, unpack_24, unpack_24_permuted

_SCRATCH: dict[tuple, torch.Tensor] = {}
_WORKSPACES: dict[tuple, object] = {}


def _shared_workspace(make, *key):
    """One split-K workspace per (backend, config, shape, bucket, dtype, device), shared by every layer
    of that shape: layers run one after another on one stream, and each kernel call leaves its ticket
    counters at zero, so a 32-layer model holds one workspace per shape instead of 32."""
    workspace = _WORKSPACES.get(key)
    if workspace is None:
        workspace = _WORKSPACES[key] = make()
    return workspace


def workspace_nbytes() -> int:
    """Bytes held by the shared split-K workspaces (every live shape, bucket and configuration)."""
    return sum(t.numel() * t.element_size() for ws in _WORKSPACES.values() for t in vars(ws).values()
               if isinstance(t, torch.Tensor))


def release_scratch() -> None:
    """Drop the shared decompression/permutation scratch buffers (they regrow on demand); workspaces of
    live layers stay referenced by their layers."""
    _SCRATCH.clear()


def _scratch(purpose: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer shared by every layer (layers run one after another on one stream); grows on demand."""
    key = (purpose, shape[1:], dtype, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.shape[0] < shape[0]:
        buf = torch.empty(shape, dtype=dtype, device=device)
        _SCRATCH[key] = buf
    return buf[: shape[0]]


class SparseLinear(nn.Module):
    """y = x @ W^T + b for a packed 2:4 weight; the backend per token bucket comes from ``buckets``.

    ``buckets`` maps the bucket's largest token count to {"backend", "config"} (a plan entry). Token
    counts above the largest bucket use the largest bucket's backend (a split-K tensor-core route
    then runs without split-K, allocating its own workspace). Build the layer on its final device:
    the workspaces and packed tensors do not follow ``module.to()``.
    """

    def __init__(self, packed: Packed24, bias: torch.Tensor | None = None, buckets: dict | None = None,
                 allow_dense: bool = True):
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.packed = packed
        self.register_buffer("values", packed.values, persistent=False)
        self.register_buffer("meta", packed.meta, persistent=False)
        self.register_buffer("perm", packed.perm, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(packed.dtype), requires_grad=False)
        self.allow_dense = allow_dense
        plan = buckets or {1: {"backend": "reference", "config": {}}}
        self._bucket_sizes = sorted(int(t) for t in plan)
        self._bucket_specs = [self._spec(plan[key]) for key in sorted(plan, key=int)]
        self._routes: list = []
        self._dense_weight = None
        self._cslt_weight = None
        self._cutlass_weight = None
        self._cutlass_ws: dict[tuple[int, int], int] = {}
        self.meta_sm90: torch.Tensor | None = None
        self._build_routes()
        self._share_metadata()

    # -- construction -------------------------------------------------------------------------
    def _spec(self, entry: dict) -> dict:
        if not self.allow_dense and entry.get("backend") == "dense":
            alt = entry.get("sparse_only") or {"backend": "reference", "config": {}}
            return {"backend": alt.get("backend", "reference"), "config": alt.get("config", {}) or {}}
        return {"backend": entry.get("backend", "reference"), "config": entry.get("config", {}) or {}}

    def _build_routes(self) -> None:
        from . import cslt

        device = self.values.device
        self._routes = []
        for size, spec in zip(self._bucket_sizes, self._bucket_specs):
            backend = spec["backend"]
            if device.type != "cuda":
                backend = "reference"  # the Triton kernels and cuSPARSELt need a CUDA device
            if backend == "cusparselt" and not cslt.available():
                backend = "decompress_dense"
            if backend == "ours":
                from .triton_sp24 import KernelConfig, Workspace

                cfg = KernelConfig.from_dict(spec["config"])
                if not cfg.supports(size):
                    raise ConfigError(f"plan gives {cfg.label} for a bucket of {size} tokens it cannot run")
                if cfg.cluster and torch.cuda.get_device_capability(device)[0] < 9:
                    raise ConfigError(f"plan gives {cfg.label}, whose thread-block clusters need compute capability "
                                      f"9.0, on {torch.cuda.get_device_name(device)}: rebuild the plan on this GPU")
                ws = _shared_workspace(
                    lambda: Workspace(cfg, self.out_features, size, device, self.in_features, self.values.dtype),
                    "ours", repr(cfg), self.out_features, self.in_features, size, self.values.dtype, device)
                # beyond the bucket (largest bucket only) the same blocks run without split-K
                if cfg.kind == "dot":
                    from dataclasses import replace

                    big = replace(cfg, split_k=1)
                else:
                    big = None
                self._routes.append(("ours", cfg, ws, big, size))
            elif backend == "ours_cuda":
                from . import cuda_sp24

                if (not cuda_sp24.available()
                        or not cuda_sp24.supports_shape(self.out_features, self.in_features, self.values.dtype)):
                    self._routes.append(("decompress_dense",))  # the extension cannot run here
                    continue
                cfg = cuda_sp24.CudaConfig.from_dict(spec["config"])
                if not cfg.supports(size):
                    raise ConfigError(f"plan gives {cfg.label} for a bucket of {size} tokens it cannot run")
                if cfg.cluster and torch.cuda.get_device_capability(device)[0] < 9:
                    raise ConfigError(f"plan gives {cfg.label}, whose thread-block clusters need compute capability "
                                      f"9.0, on {torch.cuda.get_device_name(device)}: rebuild the plan on this GPU")
                ws = _shared_workspace(
                    lambda: cuda_sp24.CudaWorkspace(cfg, self.out_features, size, device, self.in_features,
                                                    self.values.dtype),
                    "ours_cuda", repr(cfg), self.out_features, self.in_features, size, self.values.dtype, device)
                self._routes.append(("ours_cuda", cfg, ws, size))
            elif backend == "ours_cutlass":
                from . import cutlass_sp24

                if (not cutlass_sp24.available()
                        or not cutlass_sp24.supports_shape(self.out_features, self.in_features, self.values.dtype)):
                    self._routes.append(("decompress_dense",))  # the library cannot run here
                    continue
                if self._cutlass_weight is None:
                    self._cutlass_weight = cutlass_sp24.CutlassWeight.from_packed(self.packed)
                    # buffers, so that model-size accounting (parameters + buffers) sees them
                    self.register_buffer("cutlass_meta", self._cutlass_weight.meta, persistent=False)
                    if not self._cutlass_weight.shares_values:
                        self.register_buffer("cutlass_values", self._cutlass_weight.values, persistent=False)
                cfg = cutlass_sp24.CutlassConfig.from_dict(spec["config"])
                self._routes.append(("ours_cutlass", cfg,
                                     cutlass_sp24.PreparedGemm(self._cutlass_weight, cfg, self.packed.perm)))
            elif backend == "dense":
                if self._dense_weight is None:
                    self._dense_weight = unpack_24(self.packed).contiguous()
                self._routes.append(("dense",))
            elif backend == "cusparselt":
                if self._cslt_weight is None:
                    self._cslt_weight = cslt.compress(unpack_24_permuted(self.packed))
                self._routes.append(("cusparselt", int(spec["config"].get("alg_id", 0)),
                                     int(spec["config"].get("split_k", 1))))
            elif backend in ("decompress_dense", "reference"):
                self._routes.append((backend,))
            else:
                raise ConfigError(f"unknown backend {backend!r} in the plan")

    def _share_metadata(self) -> None:
        """Keep one metadata copy: CUTLASS's sm90 layout, when every route here can read it."""
        if self._cutlass_weight is None or any(route[0] in ("ours", "reference") for route in self._routes):
            return
        self.meta_sm90 = self._cutlass_weight.meta
        empty = torch.empty((self.out_features, 0), dtype=torch.int32, device=self.values.device)
        self.packed = Packed24(self.packed.values, empty, self.packed.perm, self.packed.shape)
        self.register_buffer("meta", empty, persistent=False)

    def row_major_packed(self) -> Packed24:
        """The packed weight with pack.py's row-major metadata (rebuilt from the sm90 copy when that is
        the only one this layer keeps)."""
        if self.meta_sm90 is None:
            return self.packed
        meta = meta_from_sm90(self.meta_sm90, self.out_features, self.in_features)
        return Packed24(self.packed.values, meta, self.packed.perm, self.packed.shape)

    def rebuilt(self, packed: Packed24, bias: torch.Tensor | None) -> "SparseLinear":
        """A layer on another packed weight of the same shape, with this layer's plan (same routes)."""
        if packed.shape != self.packed.shape:
            raise ConfigError(f"rebuilt layer must keep the shape {self.packed.shape}, got {packed.shape}")
        plan = dict(zip(self._bucket_sizes, self._bucket_specs))
        return SparseLinear(packed, bias, plan, self.allow_dense)

    @property
    def meta_layout(self) -> str:
        return "rows" if self.meta_sm90 is None else "sm90"

    def weight_nbytes(self) -> int:
        """Bytes of every weight representation this layer holds: the packed format (permutation
        included) plus what its routes added (CUTLASS's metadata and any values it could not share, a
        dense copy, a cuSPARSELt copy)."""
        total = self.packed.nbytes(include_perm=True)
        if self._cutlass_weight is not None:
            total += self._cutlass_weight.nbytes(count_shared=False)
        if self._dense_weight is not None:
            total += self._dense_weight.numel() * self._dense_weight.element_size()
        if self._cslt_weight is not None:
            total += self._cslt_weight.numel() * self._cslt_weight.element_size()
        return total

    @property
    def backends(self) -> dict[int, str]:
        return {size: route[0] for size, route in zip(self._bucket_sizes, self._routes)}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"permuted={self.perm is not None}, backends={self.backends}, meta_layout={self.meta_layout}")

    # -- forward ------------------------------------------------------------------------------
    def _route(self, tokens: int):
        i = bisect.bisect_left(self._bucket_sizes, tokens)
        return self._routes[min(i, len(self._routes) - 1)]

    def _permuted_input_buffer(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        return _scratch("x_perm", (rows, self.in_features), x.dtype, x.device)

    def _permuted_input(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        buf = self._permuted_input_buffer(x, rows)
        torch.index_select(x, 1, self.packed.perm, out=buf[: x.shape[0]])
        return buf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if x.shape[-1] != self.in_features:
            raise ConfigError(f"input has {x.shape[-1]} features, layer expects {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.values.dtype:
            x2 = x2.to(self.values.dtype)
        x2 = x2.contiguous()
        t = x2.shape[0]
        route = self._route(t)
        kind = route[0]
        if kind == "ours":
            from .triton_sp24 import sp24_matmul

            _, cfg, ws, big, size = route
            if t > size:
                if big is None:
                    raise ConfigError(f"{cfg.label} cannot run {t} tokens (bucket of {size})")
                from .triton_sp24 import Workspace

                ws_big = Workspace(big, self.out_features, t, x2.device, self.in_features, x2.dtype)
                y = sp24_matmul(x2, self.packed, big, ws_big)
            else:
                y = sp24_matmul(x2, self.packed, cfg, ws)
        elif kind == "ours_cuda" and t <= route[3]:
            from .cuda_sp24 import sp24_cuda_matmul

            y = sp24_cuda_matmul(x2, self.packed, route[1], route[2], meta_sm90=self.meta_sm90)
        elif kind == "ours_cutlass":
            # the prepared call: one host call for gather + GEMM (short prompts are host-bound)
            _, cfg, gemm = route
            need = self._cutlass_ws.get((cfg.index, t))
            if need is None:  # host arithmetic only, but a ctypes call: once per configuration and size
                from .cutlass_sp24 import workspace_bytes

                need = self._cutlass_ws[(cfg.index, t)] = workspace_bytes(self._cutlass_weight, cfg, t)
            ws = _scratch("cutlass_ws", (need,), torch.uint8, x2.device) if need else None
            x_perm = self._permuted_input_buffer(x2, t) if gemm.permuted else None
            y = gemm(x2, torch.empty(t, self.out_features, dtype=x2.dtype, device=x2.device), x_perm, ws)
        elif kind == "dense":
            y = torch.mm(x2, self._dense_weight.t())
        elif kind == "cusparselt":
            from . import cslt

            rows = cslt.padded_tokens(t)
            if self.packed.perm is not None:
                src = self._permuted_input(x2, rows)
            elif rows != t:
                src = _scratch("x_pad", (rows, self.in_features), x2.dtype, x2.device)
                src[:t].copy_(x2)
            else:
                src = x2
            y = cslt.mm(self._cslt_weight, src[:rows], alg_id=route[1], split_k=route[2])[:t]
        elif kind in ("decompress_dense", "ours_cuda"):  # ours_cuda past its bucket: decompress
            from .triton_sp24 import sp24_decompress

            dense = _scratch("dense_w", (self.out_features, self.in_features), x2.dtype, x2.device)
            sp24_decompress(self.packed, out=dense, meta_sm90=self.meta_sm90)
            src = self._permuted_input(x2, t)[:t] if self.packed.perm is not None else x2
            y = torch.mm(src, dense.t())
        else:  # reference: exact PyTorch arithmetic in float32
            dense = unpack_24_permuted(self.packed).to(torch.float32)
            src = x2[:, self.packed.perm.to(torch.int64)] if self.packed.perm is not None else x2
            y = (src.to(torch.float32) @ dense.t()).to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        if y.dtype != x.dtype:  # computed in the packed dtype; hand back what the caller gave
            y = y.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor, perm: torch.Tensor | None = None,
                    buckets: dict | None = None, allow_dense: bool = True) -> "SparseLinear":
        from .pack import pack_24

        w = linear.weight.detach()
        if w.dtype not in (torch.float16, torch.bfloat16):
            w = w.to(torch.float16)
        packed = pack_24(w, mask.to(w.device), None if perm is None else perm.to(w.device))
        return cls(packed, linear.bias, buckets, allow_dense)


def reorder_output_rows(layer: nn.Module, order: torch.Tensor) -> nn.Module:
    """A new layer whose output feature i computes what ``layer``'s output feature order[i] computes
    (a ``SparseLinear`` keeps its plan); ``layer`` itself is left as it is."""
    if isinstance(layer, SparseLinear):
        packed = reorder_rows(layer.row_major_packed(), order)
        bias = None if layer.bias is None else layer.bias.detach()[order.to(layer.bias.device, torch.int64)]
        return layer.rebuilt(packed, bias)
    if isinstance(layer, nn.Linear):
        index = check_perm(order, layer.out_features).to(layer.weight.device)
        weight = layer.weight.detach()
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        out.weight = nn.Parameter(weight[index], requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach()[index], requires_grad=layer.bias.requires_grad)
        return out
    raise ConfigError(f"cannot reorder the output rows of a {type(layer).__name__} (nn.Linear or SparseLinear only)")


def fold_input_permutation(producers: list[nn.Module], consumer: SparseLinear) -> tuple[list[nn.Module], SparseLinear]:
    """Move ``consumer``'s input permutation into the output rows of the layers that produce its input.

    Valid only where the consumer's input is an elementwise function of the producers' outputs (e.g.
    down_proj(silu(gate_proj(x)) * up_proj(x))): reordering every producer's rows by the permutation
    then hands the consumer x[:, perm] directly, so it multiplies without a gather. Exact: the same
    products are summed in the same order. Returns the (possibly rebuilt) producers and the consumer
    without a permutation; a consumer without one comes back unchanged.
    """
    if not isinstance(consumer, SparseLinear):
        raise ConfigError(f"the consumer must be a SparseLinear, got {type(consumer).__name__}")
    perm = consumer.packed.perm
    if perm is None:
        return list(producers), consumer
    widths = sorted({p.out_features for p in producers})
    if widths != [consumer.in_features]:
        raise ConfigError(f"producers' out_features {widths} must all equal the consumer's in_features "
                          f"{consumer.in_features}")
    folded = [reorder_output_rows(p, perm) for p in producers]
    packed = consumer.row_major_packed()
    plain = consumer.rebuilt(Packed24(packed.values, packed.meta, None, packed.shape),
                             None if consumer.bias is None else consumer.bias.detach())
    return folded, plain


def plan_buckets(plan: dict, layer_name: str) -> dict:
    """The bucket table of one layer from a plan written by build_kernels."""
    try:
        key = plan["layers"][layer_name]["shape_key"]
        buckets = plan["shapes"][key]["buckets"]
    except KeyError as exc:
        raise DataError(f"plan has no entry for layer {layer_name!r} ({exc})") from exc
    return {int(t): entry for t, entry in buckets.items()}


def swap_sparse_linears(model: nn.Module, build_dir: str | Path, allow_dense: bool = True) -> list[str]:
    """Replace every nn.Linear that build_kernels packed by a SparseLinear; returns the swapped names.

    The packed weights go to each replaced layer's device and dtype; layers the build skipped (no
    valid 2:4 mask) stay dense.
    """
    from .build import PACKED_FILE, PLAN_FILE, load_packed

    build_dir = Path(build_dir)
    plan = read_json(build_dir / PLAN_FILE)
    packed_all = load_packed(build_dir / PACKED_FILE)
    swapped = []
    for name, packed in packed_all.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(module, nn.Linear):
            continue
        if (module.out_features, module.in_features) != packed.shape:
            raise DataError(f"layer {name}: model shape {(module.out_features, module.in_features)} != packed {packed.shape}")
        device = module.weight.device
        dtype = module.weight.dtype if module.weight.dtype in (torch.float16, torch.bfloat16) else packed.dtype
        p = Packed24(packed.values.to(device=device, dtype=dtype), packed.meta.to(device),
                     None if packed.perm is None else packed.perm.to(device), packed.shape)
        buckets = plan_buckets(plan, name) if plan.get("measured") else {1: {"backend": "reference", "config": {}}}
        new = SparseLinear(p, module.bias, buckets, allow_dense)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        swapped.append(name)
    return swapped
