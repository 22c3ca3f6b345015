"""Triton kernels against the masked dense reference, on CPU through TRITON_INTERPRET=1.

The interpreter is chosen when a kernel is decorated, so the variable is set before triton is
imported (and triton_sp24 is reloaded if something imported it earlier without the interpreter); it
stays set for the session, as Triton reads it again later. With a CUDA device this module is skipped:
tests/test_kernels_cuda.py runs the compiled kernels there.
Outputs are poisoned with NaN before every run; split-K ticket counters must return to zero.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CUDA present: the compiled kernels are tested by test_kernels_cuda.py", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
import esparse_kernels.triton_sp24 as sp24  # noqa: E402

if not isinstance(sp24._sp24_gemv_kernel, __import__("triton").runtime.interpreter.InterpretedFunction):
    sp24 = importlib.reload(sp24)

from esparse_kernels.pack import pack_24, random_24_weight, reference_linear, rel_frobenius_error, unpack_24_permuted  # noqa: E402

KC = sp24.KernelConfig
CASES = [
    # (out, in, config, tokens, dtype)
    (48, 96, KC("gemv", 16, 32), 1, torch.float16),
    (40, 160, KC("gemv", 16, 16, split_k=3), 3, torch.float16),  # tails in N and in K, split-K
    (48, 96, KC("gemv", 8, 32, split_k=2, perm_mode="pre"), 8, torch.float16),
    (48, 96, KC("gemv", 32, 64, split_k=2), 5, torch.bfloat16),
    (40, 160, KC("dot", 16, 16, block_t=16), 5, torch.float16),
    (48, 96, KC("dot", 16, 32, block_t=16, split_k=2, perm_mode="pre"), 20, torch.float16),
    # bf16 tl.dot is wrong inside Triton 3.6's interpreter (fp16 is right); the compiled bf16 dot is
    # checked on the GPU by esparse_kernels.selfcheck and test_kernels_cuda.py
    (40, 160, KC("dot", 32, 16, block_t=32, split_k=4), 33, torch.float16),
]


@pytest.fixture(scope="module")
def gen():
    return torch.Generator().manual_seed(20240)


@pytest.mark.parametrize("n,k,cfg,tokens,dtype", CASES, ids=[f"{c[2].label}-T{c[3]}-{c[4]}".replace("torch.", "")
                                                              for c in CASES])
@pytest.mark.parametrize("with_perm", [True, False], ids=["perm", "noperm"])
def test_matmul_matches_reference(gen, n, k, cfg, tokens, dtype, with_perm):
    w, mask, perm = random_24_weight(n, k, dtype, "cpu", gen, with_perm)
    packed = pack_24(w, mask, perm)
    x = torch.randn(tokens, k, generator=gen).to(dtype)
    ws = sp24.Workspace(cfg, n, tokens, "cpu", k, dtype)
    ref = reference_linear(x, packed)
    tol = 1e-3 if dtype == torch.float16 else 8e-3  # output rounding of bf16 alone is ~2e-3
    for _ in range(2):  # the second run reuses the counters the first one must have reset
        out = torch.full((tokens, n), float("nan"), dtype=dtype)
        sp24.sp24_matmul(x, packed, cfg, ws, out=out)
        assert not torch.isnan(out).any(), "some outputs were never written"
        assert rel_frobenius_error(out, ref) < tol
        assert int(ws.counters.abs().sum()) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decompress_is_exact(gen, dtype):
    w, mask, perm = random_24_weight(40, 160, dtype, "cpu", gen)
    packed = pack_24(w, mask, perm)
    out = torch.full((40, 160), float("nan"), dtype=dtype)
    sp24.sp24_decompress(packed, out=out, block_n=16, block_kh=16)
    assert torch.equal(out, unpack_24_permuted(packed))


@pytest.mark.parametrize("n,k,block_kh", [(40, 160, 16), (80, 288, 32), (130, 192, 64)])
def test_decompress_reads_the_sm90_metadata(gen, n, k, block_kh):
    """The layout a layer holding the CUTLASS prefill path keeps (rows and column atoms crossed, tails)."""
    from esparse_kernels.pack import meta_to_sm90

    w, mask, perm = random_24_weight(n, k, torch.float16, "cpu", gen)
    packed = pack_24(w, mask, perm)
    empty = type(packed)(packed.values, packed.meta[:, :0].clone(), packed.perm, packed.shape)
    out = torch.full((n, k), float("nan"), dtype=torch.float16)
    sp24.sp24_decompress(empty, out=out, block_n=16, block_kh=block_kh, meta_sm90=meta_to_sm90(packed.meta, k))
    assert torch.equal(out, unpack_24_permuted(packed))


def test_config_validation():
    from esparse.errors import ConfigError

    with pytest.raises(ConfigError):
        KC("gemv", 16, 24)
    with pytest.raises(ConfigError):
        KC("dot", 8, 32)
    with pytest.raises(ConfigError):
        KC("fast", 16, 32)
    cfg = KC("dot", 64, 64, block_t=16, split_k=4, perm_mode="pre")
    assert KC.from_dict(cfg.to_dict()) == cfg
    assert KC("gemv", 16, 32).supports(8) and not KC("gemv", 16, 32).supports(9)
