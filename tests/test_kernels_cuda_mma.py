"""The CUDA decode kernel (esparse_kernels.cuda_sp24): its index arithmetic on the CPU through the
emulator, its configuration logic, and (with a GPU) the compiled kernel against the reference."""

from __future__ import annotations

import pytest
import torch

import esparse_kernels.cuda_sp24 as cs
from esparse.errors import ConfigError
from esparse_kernels.cuda_sp24 import CudaConfig, cuda_candidates, effective_splits, emulate, smem_bytes
from esparse_kernels.linear import SparseLinear
from esparse_kernels.pack import meta_to_sm90, pack_24, random_24_weight, reference_linear, rel_frobenius_error
from esparse_kernels.testing import capture_graph

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("n,k,tokens,cfg,with_perm", [
    (40, 192, 3, CudaConfig(2, 2, 4), True),   # row tail inside a warp, 2 splits
    (16, 128, 1, CudaConfig(1, 1, 4), False),  # one token, no permutation
    (24, 256, 11, CudaConfig(1, 3, 8), True),  # two token tiles, uneven split (4 chunks over 3)
    (40, 128, 21, CudaConfig(2, 2, 4), True),  # four token tiles, the last one partly past T
    (16, 192, 32, CudaConfig(1, 1, 4), True),  # the largest token count
])
@pytest.mark.parametrize("variant", [0, 1])
def test_emulated_kernel_matches_reference(n, k, tokens, cfg, with_perm, variant):
    gen = torch.Generator().manual_seed(n * 7 + tokens)
    w, mask, perm = random_24_weight(n, k, torch.float16, "cpu", gen, with_perm=with_perm)
    packed = pack_24(w, mask, perm)
    x = torch.randn(tokens, k, generator=gen).half()
    assert rel_frobenius_error(emulate(x, packed, cfg, variant), reference_linear(x, packed)) < 1e-12


@pytest.mark.parametrize("n,k,tokens,cfg", [
    (80, 320, 2, CudaConfig(2, 2, 4)),   # two row atoms (second partial), 2.5 column atoms, 2 splits
    (16, 192, 9, CudaConfig(1, 3, 4)),   # one chunk per split: odd chunks start a split
])
@pytest.mark.parametrize("variant", [0, 1])
def test_emulated_kernel_reads_the_sm90_metadata_layout(n, k, tokens, cfg, variant):
    gen = torch.Generator().manual_seed(n + k)
    w, mask, perm = random_24_weight(n, k, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm)
    x = torch.randn(tokens, k, generator=gen).half()
    ref = reference_linear(x, packed)
    e = meta_to_sm90(packed.meta, k)
    assert rel_frobenius_error(emulate(x, packed, cfg, variant, meta_sm90=e), ref) < 1e-12
    # a layout the kernel does not read (another weight's metadata) must show
    other = pack_24(*random_24_weight(n, k, torch.float16, "cpu", gen))
    assert rel_frobenius_error(emulate(x, packed, cfg, variant, meta_sm90=meta_to_sm90(other.meta, k)), ref) > 0.1


def test_emulator_detects_a_wrong_metadata_layout(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    w, mask, perm = random_24_weight(16, 128, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm)
    x = torch.randn(2, 128, generator=gen).half()
    original = cs._mma_sp_reference
    monkeypatch.setattr(cs, "_mma_sp_reference", lambda a, b, e, v: original(a, b, e, 1 - v))
    assert rel_frobenius_error(emulate(x, packed, CudaConfig(1, 1, 4), 0), reference_linear(x, packed)) > 0.1


@pytest.mark.parametrize("tokens,with_perm", [(1, True), (3, False), (9, True), (27, True)])
def test_pre_staging_matches_per_cta_staging(tokens, with_perm):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 192, generator=gen).half()
    perm = torch.randperm(192, generator=gen).to(torch.int32) if with_perm else None
    assert torch.equal(cs.emulate_stage(x, perm), cs.staged_by_columns(x, perm))


def test_config_and_splits():
    cfg = CudaConfig(8, 4, 8)
    assert CudaConfig.from_dict(cfg.to_dict()) == cfg and cfg.label == "mma_w8_sk4_d8"
    pre = CudaConfig(8, 4, 8, pre=True)
    assert CudaConfig.from_dict(pre.to_dict()) == pre and pre.label == "mma_w8_sk4_d8_pre"
    direct = CudaConfig(8, 4, 8, pre=True, direct=True)
    assert CudaConfig.from_dict(direct.to_dict()) == direct and direct.label == "mma_w8_sk4_d8_pre_ldg"
    pdl = CudaConfig(8, 4, 8, pre=True, direct=True, pdl=True)
    assert CudaConfig.from_dict(pdl.to_dict()) == pdl and pdl.label == "mma_w8_sk4_d8_pre_ldg_pdl"
    with pytest.raises(ConfigError, match="needs pre=True"):
        CudaConfig(8, 4, 8, direct=True)
    assert cfg.supports(1) and cfg.supports(32) and not cfg.supports(33) and cs.MAX_TOKENS == 32
    for bad in ({"warps": 0}, {"warps": 9}, {"split_k": 0}, {"depth": 6}):
        with pytest.raises(ConfigError):
            CudaConfig(**bad)
    assert effective_splits(4096, 3) == 3 and effective_splits(384, 16) == 6  # never an empty split
    assert effective_splits(256, 3) == 2  # 4 chunks: 2 per split
    assert smem_bytes(4096, 4, 16) == 1024 * 16 * 2
    # 32 tokens of 4096 features staged by one CTA: 256 KiB, more than a multiprocessor's shared memory
    with pytest.raises(ConfigError, match=r"mma_w4_sk1_d4 stages 262144 bytes .* 4096 features and 32 tokens"):
        cs.CudaWorkspace(CudaConfig(4, 1, 4), 4096, 32, "cpu", 4096)


@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008), (22016, 8192), (8192, 22016)])
@pytest.mark.parametrize("tokens", [1, 16, 32])
def test_candidates_fit_the_device(n, k, tokens):
    cands = cuda_candidates(n, k, tokens, n_sms=132)
    assert cands and len(set(cands)) == len(cands)
    for c in cands:
        assert c.supports(tokens) and (c.direct or smem_bytes(k, c.split_k, tokens) <= cs.MAX_SMEM)
        assert effective_splits(k, c.split_k) == c.split_k
        assert -(-n // c.rows_per_cta) * c.split_k <= 6 * 132
    assert cuda_candidates(n, k, 33) == [] and cuda_candidates(n, k + 32, 1) == []
    # no shared memory: split-K 1 stays a candidate however long K is
    assert any(c.direct and c.split_k == 1 for c in cands)
    assert not any(c.pdl for c in cands)
    with_pdl = cuda_candidates(n, k, tokens, n_sms=132, pdl=True)
    assert with_pdl == cands + [CudaConfig(**{**c.to_dict(), "pdl": True}) for c in cands]


def test_cluster_candidates_and_their_limits():
    n, k = 4096, 4096
    with_pdl = cuda_candidates(n, k, 1, n_sms=132, pdl=True)
    both = cuda_candidates(n, k, 1, n_sms=132, pdl=True, cluster=True)
    twins = [c for c in both if c.cluster]
    assert both[:len(with_pdl)] == with_pdl and len(both) == len(with_pdl) + len(twins)
    assert twins and all(c.pdl and 2 <= c.split_k <= cs.MAX_CLUSTER_SPLITS for c in twins)
    assert {CudaConfig(**{**c.to_dict(), "cluster": False}) for c in twins} <= set(with_pdl)
    without_pdl = cuda_candidates(n, k, 1, n_sms=132, cluster=True)
    assert all(not c.pdl for c in without_pdl) and any(c.cluster for c in without_pdl)
    cfg = CudaConfig(4, 3, 8, pre=True, pdl=True, cluster=True)
    assert cfg.label == "mma_w4_sk3_d8_pre_pdl_cl" and CudaConfig.from_dict(cfg.to_dict()) == cfg
    assert CudaConfig.from_dict({"warps": 4, "split_k": 3, "depth": 8}).cluster is False  # plans written before it
    for split in (1, 9):
        with pytest.raises(ConfigError, match=f"cluster=True reduces 2..8 splits in one cluster, got split_k={split}"):
            CudaConfig(4, split, 4, cluster=True)
    # 64 features are one chunk: split-K 2 launches one split, which no cluster reduces
    with pytest.raises(ConfigError, match="mma_w4_sk2_d4_cl launches 1 splits for 64 features"):
        cs.CudaWorkspace(CudaConfig(4, 2, 4, cluster=True), 128, 1, "cpu", 64)


def test_sparse_linear_with_cuda_plan_on_cpu_uses_reference():
    gen = torch.Generator().manual_seed(9)
    w, mask, perm = random_24_weight(32, 128, torch.float16, "cpu", gen)
    layer = SparseLinear(pack_24(w, mask, perm), None, {16: {"backend": "ours_cuda", "config": CudaConfig().to_dict()}})
    if not HAS_CUDA:
        assert layer.backends == {16: "reference"}
    x = torch.randn(3, 128, generator=gen).half()
    assert rel_frobenius_error(layer(x), x.double() @ w.double().t()) < 1e-3


# ---------------------------------------------------------------------------------------------- GPU

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@cuda_only
@pytest.mark.parametrize("cfg,tokens", [(CudaConfig(4, 1, 4), 1), (CudaConfig(8, 4, 8), 5),
                                        (CudaConfig(4, 3, 4), 9), (CudaConfig(2, 6, 8), 16),
                                        (CudaConfig(8, 2, 4, pre=True), 3), (CudaConfig(4, 4, 8, pre=True), 16),
                                        (CudaConfig(8, 1, 4, pre=True, direct=True), 2),
                                        (CudaConfig(4, 3, 8, pre=True, direct=True), 11),
                                        (CudaConfig(4, 3, 4, pdl=True), 1),
                                        (CudaConfig(8, 2, 4, pre=True, pdl=True), 9),
                                        (CudaConfig(4, 3, 8, pre=True, direct=True, pdl=True), 16),
                                        (CudaConfig(4, 2, 4), 17), (CudaConfig(2, 3, 8, pre=True), 24),
                                        (CudaConfig(4, 1, 8, pre=True, direct=True), 32),
                                        (CudaConfig(8, 6, 4, pre=True, direct=True, pdl=True), 29),
                                        (CudaConfig(4, 3, 4, cluster=True), 1),
                                        (CudaConfig(8, 4, 8, pre=True, pdl=True, cluster=True), 16),
                                        (CudaConfig(4, 2, 8, pdl=True, cluster=True), 24),
                                        (CudaConfig(2, 8, 4, pre=True, direct=True, cluster=True), 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_reference(cfg, tokens, dtype):
    if cfg.pdl and not cs.pdl_supported():
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    if cfg.cluster and not cs.cluster_supported():
        pytest.skip("thread-block clusters need compute capability 9.0")
    gen = torch.Generator().manual_seed(tokens)
    n, k = 1000, 1536
    w, mask, perm = random_24_weight(n, k, dtype, "cpu", gen)
    packed = pack_24(w, mask, perm).to("cuda")
    ws = cs.CudaWorkspace(cfg, n, tokens, "cuda", k, dtype)
    tol = 1e-3 if dtype == torch.float16 else 8e-3
    for _ in range(3):
        x = torch.randn(tokens, k, generator=gen).to(dtype).to("cuda")  # fresh inputs every run
        out = torch.full((tokens, n), float("nan"), dtype=dtype, device="cuda")
        cs.sp24_cuda_matmul(x, packed, cfg, ws, out=out)
        assert rel_frobenius_error(out, reference_linear(x, packed)) < tol
    assert int(ws.counters.abs().sum()) == 0


@cuda_only
@pytest.mark.skipif(not (HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9), reason="needs compute capability 9.0")
@pytest.mark.parametrize("tokens", [1, 9, 32])
@pytest.mark.parametrize("base", [CudaConfig(4, 3, 4), CudaConfig(8, 4, 8, pre=True),
                                  CudaConfig(2, 8, 8, pre=True, direct=True), CudaConfig(1, 2, 4, pdl=True)])
def test_cluster_reduction_gives_the_workspace_paths_bits(base, tokens):
    """Same partials, same summation order: the cluster reduction must equal the workspace path exactly,
    across repeated calls (the workspace path's counters come back to zero; the cluster path uses none)."""
    from dataclasses import replace

    gen = torch.Generator().manual_seed(tokens + 70)
    n, k = 1000, 1536
    packed = pack_24(*random_24_weight(n, k, torch.float16, "cpu", gen)).to("cuda")
    clustered = replace(base, cluster=True)
    spaces = {cfg: cs.CudaWorkspace(cfg, n, tokens, "cuda", k) for cfg in (base, clustered)}
    assert spaces[clustered].partials.numel() == 1  # no partials in global memory
    for _ in range(3):
        x = torch.randn(tokens, k, generator=gen).half().cuda()
        outs = {}
        for cfg, ws in spaces.items():
            outs[cfg] = torch.full((tokens, n), float("nan"), dtype=torch.float16, device="cuda")
            cs.sp24_cuda_matmul(x, packed, cfg, ws, out=outs[cfg])
        assert torch.equal(outs[clustered], outs[base])
        assert rel_frobenius_error(outs[clustered], reference_linear(x, packed)) < 1e-3


@cuda_only
@pytest.mark.parametrize("cfg,tokens", [(CudaConfig(4, 1, 4), 1), (CudaConfig(1, 3, 8), 7),
                                        (CudaConfig(8, 2, 4, pre=True), 3),
                                        (CudaConfig(2, 5, 4, pre=True, direct=True), 16),
                                        (CudaConfig(4, 2, 8, pre=True, direct=True), 32)])
def test_cuda_kernel_reads_the_sm90_metadata(cfg, tokens):
    """The layout a layer with the CUTLASS prefill path keeps: the rows meta is then not passed at all."""
    gen = torch.Generator().manual_seed(tokens + 40)
    n, k = 1000, 1600  # rows and columns both past a whole atom
    w, mask, perm = random_24_weight(n, k, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm).to("cuda")
    e = meta_to_sm90(packed.meta, k)
    empty = type(packed)(packed.values, packed.meta[:, :0].clone(), packed.perm, packed.shape)
    ws = cs.CudaWorkspace(cfg, n, tokens, "cuda", k, torch.float16)
    for _ in range(2):
        x = torch.randn(tokens, k, generator=gen).half().cuda()
        out = torch.full((tokens, n), float("nan"), dtype=torch.float16, device="cuda")
        cs.sp24_cuda_matmul(x, empty, cfg, ws, out=out, meta_sm90=e)
        assert rel_frobenius_error(out, reference_linear(x, packed)) < 1e-3


@cuda_only
@pytest.mark.skipif(not (HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9), reason="needs compute capability 9.0")
def test_programmatic_dependent_launches_keep_the_order():
    """Chains where a launched-early kernel could see stale data if its wait were misplaced: each layer
    reads the previous layer's output (written last, by split-K's final CTA), and layers of one shape
    share one split-K workspace and one staging buffer (q, k, v). Eager and CUDA-graph replay."""
    gen = torch.Generator().manual_seed(11)
    n, k, tokens = 1024, 1024, 3
    plans = [CudaConfig(4, 4, 4, pdl=True), CudaConfig(8, 2, 4, pre=True, pdl=True),
             CudaConfig(2, 4, 8, pre=True, direct=True, pdl=True)]
    packs = [pack_24(*random_24_weight(n, k, torch.float16, "cpu", gen)).to("cuda") for _ in range(6)]
    layers = [SparseLinear(p, None, {16: {"backend": "ours_cuda", "config": plans[i % 3].to_dict()}})
              for i, p in enumerate(packs)]

    def chain(x):
        outs = [x]
        for layer in layers[:3]:  # each reads the one before
            outs.append(layer(outs[-1]))
        side = [layer(outs[-1]) for layer in layers[3:]]  # three readers of one input, back to back
        return outs[1:] + side

    def reference(x):
        refs, cur = [], x
        for p in packs[:3]:
            cur = reference_linear(cur, p).half()
            refs.append(cur)
        return refs + [reference_linear(cur, p).half() for p in packs[3:]]

    x = torch.randn(tokens, k, generator=gen).half().cuda() * 0.05
    for out, ref in zip(chain(x), reference(x)):
        assert rel_frobenius_error(out, ref) < 2e-3
    graph, static = capture_graph(lambda: chain(x))
    for _ in range(3):
        x.copy_(torch.randn(tokens, k, generator=gen).half() * 0.05)
        for o in static:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for out, ref in zip(static, reference(x)):
            assert rel_frobenius_error(out, ref) < 2e-3


@cuda_only
def test_cuda_kernel_is_graph_capturable_and_sync_free():
    gen = torch.Generator().manual_seed(1)
    n, k, tokens = 512, 1024, 4
    w, mask, perm = random_24_weight(n, k, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm).to("cuda")
    layer = SparseLinear(packed, None, {16: {"backend": "ours_cuda", "config": CudaConfig(4, 4, 4).to_dict()}})
    assert layer.backends == {16: "ours_cuda"}
    x = torch.randn(tokens, k, generator=gen).half().cuda()
    layer(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rel_frobenius_error(y, reference_linear(x, packed)) < 1e-3
    graph, y_static = capture_graph(lambda: layer(x))
    for _ in range(2):
        x.copy_(torch.randn(tokens, k, generator=gen).half())
        y_static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_frobenius_error(y_static, reference_linear(x, packed)) < 1e-3


def test_ncu_driver_reads_back_every_candidate_label():
    """kernels/gpu/ncu_decode.py takes the tuning labels the benchmark CSV names (CudaConfig.label's inverse)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "kernels" / "gpu" / "ncu_decode.py"
    spec = importlib.util.spec_from_file_location("ncu_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    configs = {c for t in (1, 16, 32) for c in cuda_candidates(4096, 11008, t, pdl=True, cluster=True)}
    assert len(configs) > 20
    for config in configs:
        assert module.parse_label(config.label) == config
    for bad in ("mma_w4_sk4_d8_ldg", "mma_w4_sk4", "cutlass_128x64"):
        with pytest.raises(ConfigError, match="pre=True|not a decode-kernel label"):
            module.parse_label(bad)


def test_self_check_cases_are_all_runnable():
    """Every case the GPU self-check runs is one the workspace accepts (shared memory, cluster splits), and
    the cluster reduction is among them where it is asked for."""
    from esparse_kernels.selfcheck import cuda_cases

    for pdl, cluster in ((False, False), (True, True)):
        cases = list(cuda_cases(torch.float16, pdl=pdl, cluster=cluster))
        assert cases and all(cs.fits_shared_memory(c, k, t) and cs.cluster_fits(c, k) for (_, k), c, t in cases)
        assert any(c.cluster for _, c, _ in cases) == cluster and any(c.pdl for _, c, _ in cases) == pdl
        assert {t for _, _, t in cases} >= {1, 16, 17, 32}
