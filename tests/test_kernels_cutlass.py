"""The CUTLASS prefill GEMM (esparse_kernels.cutlass_sp24): its build recipe, errors and dispatch on
the CPU, and (on a Hopper GPU with nvcc and the CUTLASS headers) the compiled kernels against the
reference, under CUDA-graph capture and inside SparseLinear."""

from __future__ import annotations

import re

import pytest
import torch

import esparse_kernels.cutlass_sp24 as ct
from esparse.errors import ConfigError
from esparse_kernels.linear import SparseLinear
from esparse_kernels.pack import pack_24, random_24_weight, reference_linear, rel_frobenius_error
from esparse_kernels.testing import capture_graph

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def test_units_match_the_source():
    """The build compiles one unit per (dtype, configuration) the source declares, and the counts agree."""
    src = ct.SOURCE.read_text()
    assert f"constexpr int kNumConfigs = {ct.NUM_CONFIGS};" in src
    traits = sorted(int(c) for c in re.findall(r"template <> struct ConfigTraits<(\d+)>", src))
    assert traits == list(range(ct.NUM_CONFIGS))
    table = re.search(r"kGemms\[2\]\[esp::kNumConfigs\] = \{(.*?)\};", src, re.S).group(1)
    listed = {(int(d), int(c)) for d, c in re.findall(r"esp_gemm_(\d)_(\d+)", table)}
    built = {(u // 100, u % 100) for u in ct.UNITS if u >= 0}
    assert listed == built and len(built) == 2 * ct.NUM_CONFIGS
    for u in ct.UNITS:
        if u >= 0:
            assert ct.unit_defines(u) == [f"-DESP_UNIT={u}", f"-DESP_DTYPE={u // 100}", f"-DESP_CONFIG={u % 100}"]


def test_compile_commands(tmp_path):
    compiles, link = ct.compile_commands("/opt/nvcc", tmp_path / "cutlass", tmp_path, tmp_path / "lib.so")
    assert len(compiles) == len(ct.UNITS)
    units = [next(a for a in c if a.startswith("-DESP_UNIT=")) for c in compiles]
    assert len(set(units)) == len(units)
    for cmd in compiles:  # wgmma.sp exists only on the sm_90a target
        assert "-gencode=arch=compute_90a,code=sm_90a" in cmd and cmd[-2:] == ["-o", cmd[-1]]
        assert f"-I{tmp_path / 'cutlass' / 'include'}" in cmd
    objs = [c[-1] for c in compiles]
    assert link[0] == "/opt/nvcc" and "-shared" in link and all(o in link for o in objs)


def test_missing_cutlass_headers_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ESPARSE_CUTLASS_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        ct.cutlass_source_dir()


def test_missing_nvcc_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="nvcc"):
        ct.find_nvcc()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_library_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(ct, "_LIB", None)
    monkeypatch.setattr(ct, "_LIB_ERROR", None)
    with pytest.raises(ConfigError, match="CUDA device"):
        ct.load_library()
    assert not ct.available()


def test_candidates_and_configs():
    assert ct.cutlass_candidates(4096, 4096, ct.MIN_TOKENS - 1, torch.float16) == []
    assert ct.cutlass_candidates(4096, 4096, 2048, torch.float32) == []
    assert ct.cutlass_candidates(4100, 4096, 2048, torch.float16) == []  # output rows not 16-byte aligned
    assert ct.cutlass_candidates(4096, 4000, 2048, torch.float16) == []  # K not a multiple of 64
    cands = ct.cutlass_candidates(4096, 4096, 2048, torch.bfloat16)
    assert [c.index for c in cands] == list(range(ct.NUM_CONFIGS))
    assert ct.CutlassConfig.from_dict(cands[-1].to_dict()) == cands[-1]
    with pytest.raises(ConfigError, match=f"0..{ct.NUM_CONFIGS - 1}"):
        ct.CutlassConfig(ct.NUM_CONFIGS)


def test_plan_with_cutlass_runs_the_reference_on_cpu():
    gen = torch.Generator().manual_seed(5)
    w, mask, perm = random_24_weight(32, 128, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm)
    layer = SparseLinear(packed, None, {16: {"backend": "ours_cuda", "config": {}},
                                        2048: {"backend": "ours_cutlass", "config": {"index": 1}}})
    assert layer.backends == {16: "reference", 2048: "reference"}
    assert layer.meta_layout == "rows" and layer.weight_nbytes() == packed.nbytes()
    x = torch.randn(80, 128, generator=gen).half()
    assert rel_frobenius_error(layer(x), reference_linear(x, packed)) < 1e-3


# -- on a Hopper GPU ---------------------------------------------------------------------------------
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a compute-capability 9.0 GPU")


def _layer_case(n, k, dtype, seed=0, with_perm=True):
    gen = torch.Generator().manual_seed(seed)
    w, mask, perm = random_24_weight(n, k, dtype, "cpu", gen, with_perm=with_perm)
    return pack_24(w, mask, perm).to("cuda"), gen


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index", range(ct.NUM_CONFIGS))
def test_gemm_matches_reference(dtype, index):
    packed, gen = _layer_case(512, 1024, dtype, seed=index)
    weight = ct.CutlassWeight.from_packed(packed)
    assert weight.shares_values and weight.values.data_ptr() == packed.values.data_ptr()
    for tokens in (64, 200):
        x = torch.randn(tokens, 1024, generator=gen).to(dtype).cuda()
        out = torch.full((tokens, 512), float("nan"), dtype=dtype, device="cuda")
        ct.sp24_cutlass_matmul(x, weight, ct.CutlassConfig(index), packed.perm, out=out)
        tol = 1e-3 if dtype == torch.float16 else 8e-3
        assert rel_frobenius_error(out, reference_linear(x, packed)) < tol


@needs_hopper
@pytest.mark.parametrize("k", [576, 320])
def test_k_off_the_tile(k):
    """K not a multiple of the 128-wide tile: CUTLASS's compressed rows may be padded (then the weight
    keeps its own values, placeholders zeroed); either way the product is right."""
    packed, gen = _layer_case(64, k, torch.float16)
    weight = ct.CutlassWeight.from_packed(packed)
    assert weight.shares_values == (weight.values.data_ptr() == packed.values.data_ptr())
    x = torch.randn(70, k, generator=gen).half().cuda()
    for index in range(ct.NUM_CONFIGS):
        out = ct.sp24_cutlass_matmul(x, weight, ct.CutlassConfig(index), packed.perm)
        assert rel_frobenius_error(out, reference_linear(x, packed)) < 1e-3


@needs_hopper
@pytest.mark.parametrize("k", [4096, 13824, 40, 1000])
def test_permute_columns_is_exact(k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(37, k, generator=gen).bfloat16().cuda()
    perm = torch.randperm(k, generator=gen).to(torch.int32).cuda()
    out = torch.full_like(x, float("nan"))
    ct.permute_columns(x, perm, out=out)
    assert torch.equal(out, x[:, perm.long()])


@needs_hopper
def test_graph_replay_equals_eager():
    packed, gen = _layer_case(256, 512, torch.float16)
    weight = ct.CutlassWeight.from_packed(packed)
    cfg = ct.CutlassConfig(0)
    x = torch.randn(128, 512, generator=gen).half().cuda()
    x_perm, out = torch.empty_like(x), torch.empty(128, 256, dtype=torch.float16, device="cuda")
    eager = ct.sp24_cutlass_matmul(x, weight, cfg, packed.perm).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ct.sp24_cutlass_matmul(x, weight, cfg, packed.perm, out=out, x_perm=x_perm)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@needs_hopper
def test_prepared_gemm_is_the_checked_call_in_one_host_call():
    """PreparedGemm (what SparseLinear holds): gather + GEMM in one library call, equal to the checked
    sp24_cutlass_matmul, with and without a permutation; bad permutations and buffers are named."""
    for with_perm in (True, False):
        packed, gen = _layer_case(256, 512, torch.float16, seed=7, with_perm=with_perm)
        weight = ct.CutlassWeight.from_packed(packed)
        cfg = ct.CutlassConfig(1)
        gemm = ct.PreparedGemm(weight, cfg, packed.perm)
        assert gemm.permuted == with_perm
        x = torch.randn(100, 512, generator=gen).half().cuda()
        out = torch.full((100, 256), float("nan"), dtype=torch.float16, device="cuda")
        x_perm = torch.empty(128, 512, dtype=torch.float16, device="cuda") if with_perm else None  # longer: a scratch
        gemm(x, out, x_perm)
        assert torch.equal(out, ct.sp24_cutlass_matmul(x, weight, cfg, packed.perm))
        assert rel_frobenius_error(out, reference_linear(x, packed)) < 1e-3
    with pytest.raises(ConfigError, match="int32 \\[512\\]"):
        ct.PreparedGemm(weight, cfg, torch.arange(512, device="cuda"))
    with pytest.raises(ConfigError, match="x_perm must be"):
        ct.sp24_cutlass_matmul(x, weight, cfg, torch.arange(512, dtype=torch.int32, device="cuda"),
                               x_perm=torch.empty(10, 512, dtype=torch.float16, device="cuda"))


@needs_hopper
def test_sparse_linear_routes_prefill_to_cutlass():
    packed, gen = _layer_case(256, 512, torch.bfloat16)
    bias = torch.randn(256, generator=gen).bfloat16().cuda()
    layer = SparseLinear(packed, bias, {16: {"backend": "decompress_dense", "config": {}},
                                        4096: {"backend": "ours_cutlass", "config": {"index": 3}}})
    assert layer.backends[4096] == "ours_cutlass"
    assert layer.meta_layout == "sm90" and layer.packed.meta.numel() == 0  # one metadata copy
    x = torch.randn(2, 300, 512, generator=gen).bfloat16().cuda()
    ref = reference_linear(x.reshape(-1, 512), packed) + bias
    assert rel_frobenius_error(layer(x).reshape(-1, 256), ref) < 8e-3
    x = torch.randn(5, 512, generator=gen).bfloat16().cuda()  # decompress_dense, from the sm90 metadata
    assert rel_frobenius_error(layer(x), reference_linear(x, packed) + bias) < 8e-3


@needs_hopper
@pytest.mark.parametrize("n,k", [(256, 512), (200, 576), (1000, 1600)])
def test_compressor_metadata_is_pack_meta_in_the_sm90_layout(n, k):
    """What lets one metadata copy serve both kernels: CUTLASS's compressor writes exactly
    pack.meta_to_sm90 of pack.py's words (from_packed checks it on every weight; here the whole tensor,
    padding aside)."""
    from esparse_kernels.pack import meta_to_sm90, sm90_meta_shape, sm90_word_index

    packed, _ = _layer_case(n, k, torch.float16, seed=n)
    weight = ct.CutlassWeight.from_packed(packed)
    ours = meta_to_sm90(packed.meta, k)
    rows_aligned, _ = sm90_meta_shape(n, k)
    index = sm90_word_index(torch.arange(n, device="cuda").unsqueeze(1),
                            torch.arange(k // 16, device="cuda").unsqueeze(0), rows_aligned).reshape(-1)
    assert weight.meta.numel() >= ours.numel()
    assert torch.equal(weight.meta.view(torch.int16)[index], ours.view(torch.int16)[index])


@needs_hopper
def test_decode_and_prefill_layer_keeps_one_metadata_copy():
    """The issue-6 layer: CUDA decode kernel for few tokens, CUTLASS for many, 0.5625 of the dense bytes
    (+ the permutation), both paths exact, captured in one CUDA graph."""
    n, k = 1024, 2048
    packed, gen = _layer_case(n, k, torch.float16, seed=3)
    layer = SparseLinear(packed, None, {16: {"backend": "ours_cuda", "config": {"warps": 4, "split_k": 2}},
                                        4096: {"backend": "ours_cutlass", "config": {"index": 0}}})
    assert layer.backends == {16: "ours_cuda", 4096: "ours_cutlass"} and layer.meta_layout == "sm90"
    assert layer.weight_nbytes() == n * k * 2 * 9 // 16 + k * 4
    xs = [torch.randn(t, k, generator=gen).half().cuda() for t in (1, 16, 300)]
    for x in xs:
        assert rel_frobenius_error(layer(x), reference_linear(x, packed)) < 1e-3
    graph, outs = capture_graph(lambda: [layer(x) for x in xs])
    for x in xs:
        x.copy_(torch.randn(x.shape, generator=gen).half())
    for o in outs:
        o.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for x, o in zip(xs, outs):
        assert rel_frobenius_error(o, reference_linear(x, packed)) < 1e-3


@needs_hopper
def test_folded_mlp_permutation_on_layers_with_one_metadata_copy():
    """down_proj's permutation moved into gate/up's rows, on layers holding only the sm90 metadata (the
    rows come back from it): the MLP's output is unchanged at decode and prefill token counts, and
    down_proj no longer carries a permutation."""
    import torch.nn.functional as F

    from esparse_kernels.linear import fold_input_permutation

    hidden, inter = 512, 1024
    plan = {16: {"backend": "ours_cuda", "config": {"warps": 4, "split_k": 2}},
            4096: {"backend": "ours_cutlass", "config": {"index": 0}}}
    packs = [_layer_case(inter, hidden, torch.float16, seed=s)[0] for s in (1, 2)]
    down_packed, gen = _layer_case(hidden, inter, torch.float16, seed=3)
    gate, up, down = (SparseLinear(p, None, plan) for p in (*packs, down_packed))
    assert down.meta_layout == "sm90" and torch.equal(down.row_major_packed().meta, down_packed.meta)
    (gate2, up2), down2 = fold_input_permutation([gate, up], down)
    assert down2.perm is None and down2.meta_layout == "sm90" and gate2.backends == gate.backends
    for tokens in (1, 16, 300):
        x = torch.randn(tokens, hidden, generator=gen).half().cuda()
        want = down(F.silu(gate(x)) * up(x))
        got = down2(F.silu(gate2(x)) * up2(x))
        assert rel_frobenius_error(got, want) < 1e-3
