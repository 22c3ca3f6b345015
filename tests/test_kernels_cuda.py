"""Compiled kernels, the CUDA build and SparseLinear on a GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from esparse_kernels.build import build_kernels  # noqa: E402
from esparse_kernels.linear import SparseLinear, swap_sparse_linears  # noqa: E402
from esparse_kernels.pack import pack_24, random_24_weight, reference_linear, rel_frobenius_error  # noqa: E402
from esparse_kernels.testing import DEFAULT_LAYERS, TinyModel, capture_graph, make_pruned_dir  # noqa: E402
from esparse_kernels.triton_sp24 import KernelConfig, Workspace, sp24_matmul  # noqa: E402

DEV = "cuda"


@pytest.mark.parametrize("cfg,tokens", [
    (KernelConfig("gemv", 16, 128), 1), (KernelConfig("gemv", 32, 256, split_k=4, num_warps=8), 3),
    (KernelConfig("gemv", 16, 128, split_k=2, perm_mode="pre"), 8),
    (KernelConfig("dot", 64, 64, block_t=16, split_k=4), 16),
    (KernelConfig("dot", 128, 32, block_t=128, num_warps=8, num_stages=3, perm_mode="pre"), 300),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_match_reference(cfg, tokens, dtype):
    gen = torch.Generator().manual_seed(11)
    w, mask, perm = random_24_weight(1000, 1056, dtype, "cpu", gen)
    packed = pack_24(w, mask, perm).to(DEV)
    ws = Workspace(cfg, 1000, tokens, DEV, 1056, dtype)
    ref = reference_linear(torch.randn(tokens, 1056, generator=gen).to(dtype).to(DEV), packed)
    tol = 1e-3 if dtype == torch.float16 else 8e-3
    for _ in range(3):
        x = torch.randn(tokens, 1056, generator=gen).to(dtype).to(DEV)  # fresh inputs every run
        ref = reference_linear(x, packed)
        out = torch.full((tokens, 1000), float("nan"), dtype=dtype, device=DEV)
        sp24_matmul(x, packed, cfg, ws, out=out)
        assert rel_frobenius_error(out, ref) < tol
    assert int(ws.counters.abs().sum()) == 0


@pytest.fixture(scope="module")
def cuda_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda_build")
    make_pruned_dir(root / "pruned", seed=3)
    plan = build_kernels(root / "pruned", root / "kernels", token_buckets=(1, 8, 64), device="cuda",
                         tune_reps=3, include_cslt=False)
    return root, plan


def test_build_plan_is_measured(cuda_build):
    _, plan = cuda_build
    assert plan["device"] == "cuda" and plan["measured"] is True
    assert plan["device_info"]["name"] == torch.cuda.get_device_name()
    for entry in plan["shapes"].values():
        for bucket in entry["buckets"].values():
            timed = [c for c in bucket["candidates"] if c.get("median_us")]
            assert timed and bucket["median_us"] == min(c["median_us"] for c in timed
                                                        if c["rel_err"] is None or c["rel_err"] < 1e-3)
            assert bucket["backend"] in ("dense", "ours", "decompress_dense")


@pytest.mark.parametrize("allow_dense", [True, False])
def test_swapped_model_matches_dense_and_needs_no_sync(cuda_build, allow_dense):
    root, _ = cuda_build
    model = TinyModel(root / "pruned", device=DEV)
    dense = {n: model.get_submodule(n) for n in model.names}
    reference = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in dense.items()}
    swapped = swap_sparse_linears(model, root / "kernels", allow_dense=allow_dense)
    assert len(swapped) == 3
    gen = torch.Generator(device=DEV).manual_seed(0)
    for name in swapped:
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseLinear)
        if not allow_dense:
            assert "dense" not in layer.backends.values()
        w, b = reference[name]
        for tokens in (1, 5, 8, 40, 64, 100):
            x = torch.randn(tokens, w.shape[1], generator=gen, device=DEV).half()
            layer(x)  # warm-up: compilation may synchronise, the steady state must not
            torch.cuda.set_sync_debug_mode("error")
            try:
                y = layer(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            ref = x.double() @ w.double().t() + b.double()
            assert rel_frobenius_error(y, ref) < 1e-3, (name, tokens)


def test_sparse_linear_is_graph_capturable(cuda_build):
    root, _ = cuda_build
    model = TinyModel(root / "pruned", device=DEV)
    name = "model.layers.0.mlp.down_proj"
    w = model.get_submodule(name).weight.detach().clone()
    b = model.get_submodule(name).bias.detach().clone()
    swap_sparse_linears(model, root / "kernels")
    layer = model.get_submodule(name)
    for tokens in (1, 8, 40):
        static_x = torch.randn(tokens, w.shape[1], device=DEV).half()
        graph, static_y = capture_graph(lambda: layer(static_x))
        for _ in range(3):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            torch.cuda.synchronize()
            ref = static_x.double() @ w.double().t() + b.double()
            assert rel_frobenius_error(static_y, ref) < 1e-3


def test_cusparselt_route():
    from esparse_kernels import cslt

    if not cslt.available():
        pytest.skip("cuSPARSELt not available in this torch build")
    gen = torch.Generator().manual_seed(9)
    w, mask, perm = random_24_weight(256, 512, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm).to(DEV)
    layer = SparseLinear(packed, None, {64: {"backend": "cusparselt", "config": {"alg_id": 0, "split_k": 1}}})
    for tokens in (64, 50):
        x = torch.randn(tokens, 512, generator=gen).half().to(DEV)
        y = layer(x)
        assert rel_frobenius_error(y, x.double() @ w.double().to(DEV).t()) < 1e-3
