"""Kernel build step and SparseLinear on CPU: packs, writes a CPU-reference plan marked as such."""

from __future__ import annotations

import pytest
import torch

from esparse.errors import ConfigError, DataError
from esparse.io import read_json
from esparse_kernels.build import build_kernels, load_packed, main
from esparse_kernels.linear import SparseLinear, swap_sparse_linears
from esparse_kernels.pack import pack_24, random_24_weight, rel_frobenius_error, unpack_24
from esparse_kernels.testing import DEFAULT_LAYERS, TinyModel, make_pruned_dir


@pytest.fixture()
def pruned(tmp_path):
    model_dir = tmp_path / "pruned"
    weights = make_pruned_dir(model_dir, seed=7)
    return model_dir, weights


def test_build_on_cpu_packs_and_marks_plan(pruned, tmp_path):
    model_dir, weights = pruned
    out = tmp_path / "kernels"
    plan = build_kernels(model_dir, out, token_buckets=(1, 16, 256), device="cpu")
    assert plan["device"] == "cpu" and plan["measured"] is False and "reason" in plan
    assert read_json(out / "plan.json") == plan
    assert set(plan["skipped"]) == {"model.layers.0.mlp.gate_proj"}  # a 4:8 mask is not 2:4
    assert "not 2:4" in plan["skipped"]["model.layers.0.mlp.gate_proj"]
    packed = load_packed(out / "packed.safetensors")
    assert set(packed) == {n for n, (_, _, kind) in DEFAULT_LAYERS.items() if kind != "4of8"}
    for name, p in packed.items():
        assert torch.equal(unpack_24(p), weights[name])  # exact round trip through the file
        assert (p.perm is not None) == (DEFAULT_LAYERS[name][2] == "2of4_perm")
        assert plan["layers"][name]["permuted"] == (p.perm is not None)
    for entry in plan["shapes"].values():
        assert set(entry["buckets"]) == {"1", "16", "256"}
        assert all(b["backend"] == "reference" for b in entry["buckets"].values())


def test_cli_and_swap(pruned, tmp_path):
    model_dir, weights = pruned
    out = tmp_path / "kernels_cli"
    assert main(["--model-dir", str(model_dir), "--out-dir", str(out), "--tokens", "1,8", "--device", "cpu"]) == 0
    model = TinyModel(model_dir, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    inputs = {name: torch.randn(2, 3, DEFAULT_LAYERS[name][1], generator=gen) for name in model.names}
    before = {name: model.get_submodule(name)(inputs[name]) for name in model.names}
    swapped = swap_sparse_linears(model, out)
    assert sorted(swapped) == sorted(n for n, v in DEFAULT_LAYERS.items() if v[2] != "4of8")
    for name in model.names:
        module = model.get_submodule(name)
        assert isinstance(module, SparseLinear) == (name in swapped)
        after = module(inputs[name])
        assert after.shape == before[name].shape and after.dtype == before[name].dtype
        # the packed weights are the file's fp16 values; the computation rounds through fp16
        assert rel_frobenius_error(after, before[name]) < 1e-3


def test_sparse_linear_routes_by_bucket():
    gen = torch.Generator().manual_seed(5)
    w, mask, perm = random_24_weight(32, 64, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm)
    buckets = {1: {"backend": "ours", "config": {"kind": "gemv", "block_n": 16, "block_kh": 16}},
               16: {"backend": "dense", "config": {}}, 256: {"backend": "reference", "config": {}}}
    layer = SparseLinear(packed, None, buckets)
    # on CPU every bucket runs the reference path whatever the plan says
    assert layer.backends == {1: "reference", 16: "reference", 256: "reference"}
    assert layer._route(1) is layer._routes[0] and layer._route(2) is layer._routes[1]
    assert layer._route(17) is layer._routes[2] and layer._route(10_000) is layer._routes[2]
    x = torch.randn(5, 64, generator=gen).half()
    y = layer(x)
    ref = x.double() @ w.double().t()
    assert rel_frobenius_error(y, ref) < 1e-3
    with pytest.raises(ConfigError, match="features"):
        layer(torch.randn(2, 63).half())


def test_build_errors(tmp_path, pruned):
    model_dir, _ = pruned
    with pytest.raises(ConfigError, match="increasing"):
        build_kernels(model_dir, tmp_path / "o", token_buckets=(16, 1), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        build_kernels(empty, tmp_path / "o2", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            build_kernels(model_dir, tmp_path / "o3", device="cuda")


def test_bench_helpers():
    from esparse_kernels.autotune import kernel_candidates
    from esparse_kernels.bench import parse_tokens, row_metrics
    from esparse_kernels.shapes import ALL_SHAPES, select_shapes

    assert parse_tokens("1,16,2048") == [1, 16, 2048]
    with pytest.raises(ConfigError):
        parse_tokens("1,x")
    assert len(ALL_SHAPES) == 16 and len(select_shapes(None)) == 16
    assert [s.name for s in select_shapes("llama-7b.down,64x128")] == ["llama-7b.down", "custom.64x128"]
    with pytest.raises(ConfigError, match="unknown shape"):
        select_shapes("llama-8b")
    ceil = {"copy_bytes_per_s": 4e12, "fp16_dense_flops_per_s": 7e14}
    n = k = 8192
    packed_bytes = int(0.5625 * n * k * 2)
    one = row_metrics(n, k, 1, "sparse", 100.0, ceil, packed_bytes)
    assert one["ratio_limit"] == pytest.approx(1.7776, rel=1e-3)  # memory bound: 1/0.5625 minus the io
    big = row_metrics(n, k, 8192, "sparse", 1000.0, ceil, packed_bytes)
    assert big["ratio_limit"] == pytest.approx(2.0, rel=1e-6)  # compute bound: sparse tensor cores
    for tokens in (1, 8, 16, 64, 2048):
        cands = kernel_candidates(4096, 4096, tokens)
        assert cands and all(c.supports(tokens) for c in cands)
        assert len(set(cands)) == len(cands)
