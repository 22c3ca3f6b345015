"""Grouped projections (esparse_kernels.group) and the grouped launch of the CUDA decode kernel.

CPU: the dense group (one concatenated weight, members as row views) and the fall-back of 2:4 members
without a CUDA device. GPU: one launch over 1-3 packed weights against the reference, with poisoned
outputs, shared and distinct permutations, every staging mode, split-K and programmatic launch; the
tuned group inside a 2:4 decoder against the same decoder ungrouped.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch import nn

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # the fused decoder's Triton kernels run in the interpreter (as in test_kernels_fused)
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
import esparse_kernels.fused as fused  # noqa: E402

if not HAS_CUDA and not isinstance(fused._silu_mul_kernel, __import__("triton").runtime.interpreter.InterpretedFunction):
    importlib.reload(fused)

import esparse_kernels.cuda_sp24 as cs  # noqa: E402
from esparse.errors import ConfigError  # noqa: E402
from esparse_kernels.cuda_sp24 import CudaConfig  # noqa: E402
from esparse_kernels.group import ProjectionGroup  # noqa: E402
from esparse_kernels.linear import SparseLinear  # noqa: E402
from esparse_kernels.pack import meta_to_sm90, pack_24, random_24_weight, reference_linear, rel_frobenius_error  # noqa: E402
from esparse_kernels.testing import capture_graph  # noqa: E402

cuda_only = pytest.mark.skipif(not (HAS_CUDA and cs.available()), reason="needs a CUDA device and the extension")


def test_dense_group_is_one_gemm_over_views_of_one_weight():
    torch.manual_seed(0)
    members = [nn.Linear(48, n, bias=False) for n in (32, 16, 16)]
    x = torch.randn(2, 5, 48)
    expected = [m(x) for m in members]
    group = ProjectionGroup(members)
    assert group.kind == "dense" and group.weight.shape == (64, 48)
    for m, start in zip(members, (0, 32, 48)):  # the members now read row slices of the one weight
        assert m.weight.data_ptr() == group.weight[start:].data_ptr()
    got = group(x)
    assert [tuple(t.shape) for t in got] == [(2, 5, 32), (2, 5, 16), (2, 5, 16)]
    for g, e, m in zip(got, expected, members):
        torch.testing.assert_close(g, e)
        torch.testing.assert_close(m(x), e)  # the members still work on their own


def test_groups_refuse_mismatched_inputs_and_keep_other_members_separate():
    with pytest.raises(ConfigError, match="in_features differ"):
        ProjectionGroup([nn.Linear(8, 4, bias=False), nn.Linear(16, 4, bias=False)])
    with pytest.raises(ConfigError, match="1..3 linears"):
        ProjectionGroup([nn.Linear(8, 4, bias=False)] * 4)
    biased = [nn.Linear(8, 4), nn.Linear(8, 4)]
    group = ProjectionGroup(biased)
    assert group.kind == "separate"
    x = torch.randn(3, 8)
    for g, m in zip(group(x), biased):
        torch.testing.assert_close(g, m(x))


def test_sparse_members_without_cuda_run_one_after_another():
    gen = torch.Generator().manual_seed(3)
    packs = [pack_24(*random_24_weight(n, 128, torch.float16, "cpu", gen)) for n in (64, 32)]
    members = [SparseLinear(p) for p in packs]
    group = ProjectionGroup(members, tokens=(1,))
    if not HAS_CUDA:
        assert group.kind == "separate" and group.timings == []
    x = torch.randn(1, 128, generator=gen).half()
    for g, p in zip(group(x), packs):
        assert rel_frobenius_error(g, reference_linear(x, p)) < 1e-3


@pytest.mark.parametrize("grouped_dense", [False, True])
def test_decoder_with_grouped_projections_equals_ungrouped(grouped_dense):
    from esparse.decoder import Decoder, DecoderShape, StaticCache

    device = "cuda" if HAS_CUDA else "cpu"
    shape = DecoderShape(hidden=64, intermediate=96, heads=4, kv_heads=2, layers=2, vocab=50)
    torch.manual_seed(0)
    plain = Decoder(shape, dtype=torch.float32, device=device, fused=True)
    grouped = Decoder(shape, dtype=torch.float32, device=device, fused=True)
    grouped.load_state_dict(plain.state_dict())
    if grouped_dense:
        grouped.group_projections()
        assert all(g.kind == "dense" for pair in grouped.projection_groups for g in pair)
    tokens = torch.randint(0, shape.vocab, (2, 7), generator=torch.Generator().manual_seed(1)).to(device)
    caches = [StaticCache(shape, 2, 12, torch.float32, device) for _ in range(2)]
    with torch.no_grad():
        outs = [m(tokens[:, :5], torch.arange(5, device=device), c, attend=5, causal_prefill=True, last_only=False)
                for m, c in zip((plain, grouped), caches)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for pos in (5, 6):
            steps = [m(tokens[:, pos:pos + 1], torch.tensor([pos], device=device), c, attend=pos + 1)
                     for m, c in zip((plain, grouped), caches)]
            torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].keys, caches[0].keys, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# GPU: the grouped launch itself


@cuda_only
@pytest.mark.parametrize("cfg,tokens", [(CudaConfig(4, 1, 4), 1), (CudaConfig(2, 3, 8), 5),
                                        (CudaConfig(8, 2, 4, pre=True), 9),
                                        (CudaConfig(4, 3, 8, pre=True, direct=True), 16),
                                        (CudaConfig(1, 4, 4, pre=True, direct=True, pdl=True), 1),
                                        (CudaConfig(4, 2, 4, pdl=True), 3),
                                        (CudaConfig(4, 3, 4, pdl=True, cluster=True), 1),
                                        (CudaConfig(8, 4, 8, pre=True, direct=True, cluster=True), 32)])
@pytest.mark.parametrize("perms", ["distinct", "shared", "none", "mixed"])
@pytest.mark.parametrize("layout", ["rows", "sm90"])
def test_grouped_launch_matches_each_reference(cfg, tokens, perms, layout):
    if cfg.pdl and not cs.pdl_supported():
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    if cfg.cluster and not cs.cluster_supported():
        pytest.skip("thread-block clusters need compute capability 9.0")
    gen = torch.Generator().manual_seed(tokens * 13 + len(perms))
    widths, k = (1000, 200, 328), 1536  # row tiles that end mid-tile, three sizes
    packs = []
    shared = torch.randperm(k, generator=gen)
    for i, n in enumerate(widths):
        w, mask, perm = random_24_weight(n, k, torch.float16, "cpu", gen, with_perm=perms != "none")
        if perms == "shared":  # the mask is 2:4 in `perm`'s order: carry it over to the shared order
            w, mask = (torch.empty_like(t).index_copy_(1, shared, t[:, perm]) for t in (w, mask))
            perm = shared
        elif perms == "mixed" and i == 1:
            w, mask, perm = random_24_weight(n, k, torch.float16, "cpu", gen, with_perm=False)
        packs.append(pack_24(w, mask, perm).to("cuda"))
    if perms == "shared":  # one permutation tensor: staged once
        packs = [type(p)(p.values, p.meta, packs[0].perm, p.shape) for p in packs]
    metas = [meta_to_sm90(p.meta, k) if layout == "sm90" else None for p in packs]
    staged = len({id(p.perm) for p in packs})
    ws = cs.CudaWorkspace(cfg, list(widths), tokens, "cuda", k, torch.float16, staged)
    buf = torch.empty(tokens, sum(widths), dtype=torch.float16, device="cuda")
    for _ in range(3):  # fresh inputs; the counters must come back to zero each time
        x = torch.randn(tokens, k, generator=gen).half().cuda()
        buf.fill_(float("nan"))
        cs.sp24_cuda_group_matmul(x, packs, cfg, ws, list(buf.split(list(widths), dim=1)), metas)
        for out, p in zip(buf.split(list(widths), dim=1), packs):
            assert rel_frobenius_error(out, reference_linear(x, p)) < 1e-3
    assert int(ws.counters.abs().sum()) == 0


def test_grouped_launch_refuses_bad_groups():
    """Refused before the extension is touched (so on any machine), with the values named."""
    device = "cuda" if HAS_CUDA else "cpu"
    gen = torch.Generator().manual_seed(5)
    packs = [pack_24(*random_24_weight(64, 256, torch.float16, "cpu", gen)).to(device) for _ in range(4)]
    cfg = CudaConfig(4, 1, 4)
    ws = None  # a workspace needs the extension; the refusals below come before it is used
    if HAS_CUDA:
        with pytest.raises(ConfigError, match="1..3 weights"):
            cs.CudaWorkspace(cfg, [64] * 4, 1, device, 256)
        ws = cs.CudaWorkspace(cfg, [64] * 3, 1, device, 256)
    x = torch.randn(1, 256, generator=gen).half().to(device)
    outs = [torch.empty(1, 64, dtype=torch.float16, device=device) for _ in range(4)]
    with pytest.raises(ConfigError, match="1..3 weights, got 4"):
        cs.sp24_cuda_group_matmul(x, packs, cfg, ws, outs)
    with pytest.raises(ConfigError, match="as many outputs"):
        cs.sp24_cuda_group_matmul(x, packs[:2], cfg, ws, outs[:3])
    other = pack_24(*random_24_weight(64, 512, torch.float16, "cpu", gen)).to(device)
    with pytest.raises(ConfigError, match="x has 256 features, weight 1 has 512"):
        cs.sp24_cuda_group_matmul(x, [packs[0], other], cfg, ws, outs[:2])
    if HAS_CUDA:
        with pytest.raises(ConfigError, match="sized for 1 tokens, got 2"):
            cs.sp24_cuda_group_matmul(torch.cat([x, x]), packs[:1], cfg, ws, outs[:1])


BAD_EXTENSION_CALLS = {
    # name: (the call's setup and call, the message its TORCH_CHECK must raise)
    "33 tokens": ("x = torch.randn(33, 256, device='cuda').half()\n"
                  "out = torch.empty(33, 64, dtype=torch.float16, device='cuda')\n"
                  "ext.sp24_mma(x, [p.perm], [p.values], [p.meta], [out], ws, cnt, 1, 4, 4, 0, [None], False, [0], False, False)\n",
                  "the decode kernel takes 1..32 tokens, got 33"),
    "4 weights": ("x = torch.randn(1, 256, device='cuda').half()\n"
                  "outs = [torch.empty(1, 64, dtype=torch.float16, device='cuda') for _ in range(4)]\n"
                  "ext.sp24_mma(x, [p.perm] * 4, [p.values] * 4, [p.meta] * 4, outs, ws, cnt, 1, 4, 4, 0, [None] * 4, False,\n"
                  "             [0] * 4, False, False)\n",
                  "a launch takes 1..3 weights, got 4"),
    "features": ("x = torch.randn(1, 512, device='cuda').half()\n"
                 "out = torch.empty(1, 64, dtype=torch.float16, device='cuda')\n"
                 "ext.sp24_mma(x, [None], [p.values], [p.meta], [out], ws, cnt, 1, 4, 4, 0, [None], False, [0], False, False)\n",
                 "x has 512 features, weight 0 has 256"),
    "cluster of 1": ("x = torch.randn(1, 256, device='cuda').half()\n"
                     "out = torch.empty(1, 64, dtype=torch.float16, device='cuda')\n"
                     "ext.sp24_mma(x, [None], [p.values], [p.meta], [out], ws, cnt, 1, 4, 4, 0, [None], False, [0], False, True)\n",
                     "the cluster reduction takes 2..8 effective splits, got 1"),
}


@cuda_only
@pytest.mark.parametrize("case", sorted(BAD_EXTENSION_CALLS))
def test_extension_check_failures_raise_in_a_child_process(case):
    """A failed check in the extension must come back as a RuntimeError naming the values. Runs S1 and
    S2 crashed instead: cuda-gdb put the SIGSEGV in basic_ostream::_M_insert<long>, inside the .so, while
    the check's message was being built (csrc/sp24_binding.cpp now builds messages without an ostream).
    Each bad call runs in a child process: a crash fails this test, names the call, and leaves the run
    alive."""
    import subprocess
    import sys

    setup, message = BAD_EXTENSION_CALLS[case]
    code = (
        "import faulthandler, torch\n"
        "faulthandler.enable()\n"
        "import esparse_kernels.cuda_sp24 as cs\n"
        "from esparse_kernels.pack import pack_24, random_24_weight\n"
        "ext = cs.load_extension()\n"
        "gen = torch.Generator().manual_seed(0)\n"
        "p = pack_24(*random_24_weight(64, 256, torch.float16, 'cpu', gen)).to('cuda')\n"
        "ws = torch.empty(1, dtype=torch.float32, device='cuda')\n"
        "cnt = torch.zeros(1, dtype=torch.int32, device='cuda')\n"
        "try:\n" + "".join("    " + line + "\n" for line in setup.splitlines()) +
        "except RuntimeError as exc:\n"
        "    print('RuntimeError:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{case}: child exited with {done.returncode}: {done.stderr[-3000:]}"
    assert f"RuntimeError: {message}" in done.stdout, done.stdout + done.stderr[-2000:]


@cuda_only
def test_tuned_sparse_group_in_a_decoder_matches_ungrouped_and_replays_in_a_graph():
    from esparse.decoder import Decoder, DecoderShape, StaticCache
    from esparse_kernels.build import tune_shape

    shape = DecoderShape(hidden=512, intermediate=1024, heads=8, kv_heads=4, layers=2, vocab=64)
    gen = torch.Generator().manual_seed(9)
    plans = {}

    def factory(name, out_f, in_f):
        w, mask, perm = random_24_weight(out_f, in_f, torch.float16, "cpu", gen)
        packed = pack_24(w, mask, perm).to("cuda")
        if (out_f, in_f) not in plans:
            plans[(out_f, in_f)] = {int(t): e for t, e in tune_shape(packed, (1, 4, 64), "cuda", 3, log=None,
                                                                     include_cslt=False,
                                                                     include_triton=False).items()}
        return SparseLinear(packed, None, plans[(out_f, in_f)], allow_dense=False)

    torch.manual_seed(0)
    model = Decoder(shape, linear_factory=factory, dtype=torch.float16, device="cuda", fused=True).eval()
    tokens = torch.randint(0, shape.vocab, (1, 9), device="cuda")
    cache = StaticCache(shape, 1, 16, torch.float16, "cuda")
    with torch.no_grad():
        model(tokens[:, :8], torch.arange(8, device="cuda"), cache, attend=8, causal_prefill=True)
        position = torch.tensor([8], device="cuda")
        step = lambda: model(tokens[:, 8:9], position, cache, attend=9)  # noqa: E731
        expected = step().float()
        model.group_projections(tokens=(1, 4), reps=3)
        groups = [g for pair in model.projection_groups for g in pair]
        assert all(g.timings and all(t.candidates > 0 for t in g.timings) for g in groups)
        got = step().float()
        assert rel_frobenius_error(got, expected) < 2e-3
        graph, static = capture_graph(step)
        static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_frobenius_error(static.float(), expected) < 2e-3
