"""Test support: a tiny pruned-model directory in the interfaces.md layout (for tests and smoke runs of
the build) and CUDA-graph capture of a callable."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .pack import random_24_weight

def capture_graph(fn):
    """(graph, fn's output as captured): fn runs once on a side stream first (lazy allocations and
    one-time launch set-up stay out of the capture), then once under torch.cuda.graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# name -> (out, in, kind): "2of4_perm" (2:4 after a channel shuffle), "2of4" (no shuffle), "4of8" (skipped)
DEFAULT_LAYERS = {
    "model.layers.0.self_attn.q_proj": (64, 128, "2of4_perm"),
    "model.layers.0.mlp.up_proj": (96, 128, "2of4"),
    "model.layers.0.mlp.down_proj": (128, 96, "2of4_perm"),
    "model.layers.0.mlp.gate_proj": (96, 128, "4of8"),
}


def make_pruned_dir(path: str | Path, layers: dict | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Write model.safetensors + sparsity.safetensors; returns the masked weights by module name."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors, sparsity, weights = {}, {}, {}
    for name, (n, k, kind) in (layers or DEFAULT_LAYERS).items():
        if kind == "4of8":
            w = torch.randn(n, k, generator=gen)
            keep = torch.rand(n, k // 8, 8, generator=gen).argsort(dim=-1)[..., :4]
            mask = torch.zeros(n, k // 8, 8, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
            w = (w * mask).to(dtype)
            perm = None
        else:
            w, mask, perm = random_24_weight(n, k, dtype, "cpu", gen, with_perm=kind == "2of4_perm")
        tensors[f"{name}.weight"] = w.contiguous()
        tensors[f"{name}.bias"] = torch.randn(n, generator=gen).to(dtype)
        sparsity[f"{name}.mask"] = mask.contiguous()
        if perm is not None:
            sparsity[f"{name}.perm"] = perm.to(torch.int64).contiguous()
        weights[name] = w
    tensors["model.embed_tokens.weight"] = torch.randn(10, 128, generator=gen).to(dtype)
    save_file(tensors, str(path / "model.safetensors"))
    save_file(sparsity, str(path / "sparsity.safetensors"))
    return weights


class TinyModel(nn.Module):
    """nn.Linear modules at the names of DEFAULT_LAYERS, loaded from a make_pruned_dir directory."""

    def __init__(self, model_dir: str | Path, layers: dict | None = None, device="cpu", dtype=torch.float16):
        super().__init__()
        from safetensors.torch import load_file

        state = load_file(str(Path(model_dir) / "model.safetensors"))
        self.names = list((layers or DEFAULT_LAYERS).keys())
        for name, (n, k, _) in (layers or DEFAULT_LAYERS).items():
            parent = self
            parts = name.split(".")
            for part in parts[:-1]:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            lin = nn.Linear(k, n, bias=True, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(state[f"{name}.weight"])
                lin.bias.copy_(state[f"{name}.bias"])
            parent.add_module(parts[-1], lin)
