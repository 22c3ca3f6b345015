"""The fused decoder kernels (add+RMSNorm, rope+cache write, SiLU*mul) against the eager decoder.

On CPU they run under TRITON_INTERPRET=1 (set before triton is imported, as in test_kernels_triton);
with a CUDA device the compiled kernels run. The whole fused decoder must give the eager decoder's
logits, and write the same KV cache rows, in prefill and in masked decode steps.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
import esparse_kernels.fused as fused  # noqa: E402

if DEVICE == "cpu" and not isinstance(fused._silu_mul_kernel, __import__("triton").runtime.interpreter.InterpretedFunction):
    fused = importlib.reload(fused)

from esparse.decoder import Decoder, DecoderShape, RMSNorm, StaticCache, _rotate_half  # noqa: E402
from esparse.errors import ConfigError  # noqa: E402


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [48, 200])  # 200: not a power of two (masked tail)
def test_add_rms_norm_matches_eager(dtype, hidden):
    residual = torch.randn(3, 5, hidden, generator=_gen(0)).to(DEVICE, dtype)
    delta = torch.randn(3, 5, hidden, generator=_gen(1)).to(DEVICE, dtype)
    norm = RMSNorm(hidden, 1e-6).to(DEVICE, dtype)
    norm.weight.data = torch.rand(hidden, generator=_gen(2)).to(DEVICE, dtype) + 0.5
    expected_sum = residual + delta
    expected = norm(expected_sum)
    got = fused.add_rms_norm(residual, delta, norm.weight, 1e-6)  # residual updated in place
    tol = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(residual, expected_sum, **tol)
    torch.testing.assert_close(got, expected, rtol=1e-5 if dtype == torch.float32 else 2e-3,
                               atol=1e-5 if dtype == torch.float32 else 2e-3)
    plain = fused.add_rms_norm(residual.clone(), None, norm.weight, 1e-6)  # no delta: norm only
    torch.testing.assert_close(plain, norm(residual), rtol=1e-5 if dtype == torch.float32 else 2e-3,
                               atol=1e-5 if dtype == torch.float32 else 2e-3)


def test_rope_cache_rotates_q_and_writes_k_v_rows():
    batch, tokens, q_heads, kv_heads, head_dim, max_len = 2, 3, 6, 2, 16, 10
    q = torch.randn(batch, tokens, q_heads * head_dim, generator=_gen(3)).to(DEVICE)
    k = torch.randn(batch, tokens, kv_heads * head_dim, generator=_gen(4)).to(DEVICE)
    v = torch.randn(batch, tokens, kv_heads * head_dim, generator=_gen(5)).to(DEVICE)
    angles = torch.rand(tokens, head_dim // 2, generator=_gen(6)).to(DEVICE) * 6
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().contiguous(), emb.sin().contiguous()
    positions = torch.tensor([7, 2, 5], device=DEVICE)
    cache_k = torch.full((batch, kv_heads, max_len, head_dim), float("nan"), device=DEVICE)
    cache_v = cache_k.clone()
    qh = q.view(batch, tokens, q_heads, head_dim).transpose(1, 2)
    kh = k.view(batch, tokens, kv_heads, head_dim).transpose(1, 2)
    expected_q = (qh * cos + _rotate_half(qh) * sin).transpose(1, 2).reshape_as(q)
    expected_k = kh * cos + _rotate_half(kh) * sin
    fused.rope_cache(q, k, v, cos, sin, positions, cache_k, cache_v)
    torch.testing.assert_close(q, expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache_k[:, :, positions], expected_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache_v[:, :, positions], v.view(batch, tokens, kv_heads, head_dim).transpose(1, 2))
    untouched = [row for row in range(max_len) if row not in positions.tolist()]
    assert torch.isnan(cache_k[:, :, untouched]).all() and torch.isnan(cache_v[:, :, untouched]).all()


def test_silu_mul_matches_eager():
    gate = torch.randn(4, 3001, generator=_gen(7)).to(DEVICE, torch.float16)  # a partial last block
    up = torch.randn(4, 3001, generator=_gen(8)).to(DEVICE, torch.float16)
    torch.testing.assert_close(fused.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, rtol=2e-3, atol=2e-3)


def test_grouped_projection_slices_are_read_in_place():
    """q, k, v and gate, up as column slices of one grouped projection output: same results as copies."""
    batch, tokens, q_heads, kv_heads, head_dim, max_len = 2, 3, 4, 2, 16, 8
    widths = [q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv = torch.randn(batch, tokens, sum(widths), generator=_gen(11)).to(DEVICE)
    q, k, v = qkv.split(widths, dim=-1)
    angles = torch.rand(tokens, head_dim // 2, generator=_gen(12)).to(DEVICE) * 6
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().contiguous(), emb.sin().contiguous()
    positions = torch.tensor([1, 4, 6], device=DEVICE)
    caches = [torch.zeros(batch, kv_heads, max_len, head_dim, device=DEVICE) for _ in range(4)]
    q_copy = q.contiguous()
    fused.rope_cache(q_copy, k.contiguous(), v.contiguous(), cos, sin, positions, caches[0], caches[1])
    fused.rope_cache(q, k, v, cos, sin, positions, caches[2], caches[3])
    torch.testing.assert_close(q, q_copy, rtol=0, atol=0)
    torch.testing.assert_close(caches[2], caches[0], rtol=0, atol=0)
    torch.testing.assert_close(caches[3], caches[1], rtol=0, atol=0)
    gate_up = torch.randn(batch, tokens, 2 * 300, generator=_gen(13)).to(DEVICE, torch.float16)
    gate, up = gate_up.split(300, dim=-1)
    got = fused.silu_mul(gate, up)
    assert got.is_contiguous()
    torch.testing.assert_close(got, fused.silu_mul(gate.contiguous(), up.contiguous()), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="unit stride"):
        fused.silu_mul(gate[..., ::2], up[..., ::2])
    with pytest.raises(ConfigError, match="evenly strided"):
        fused.silu_mul(gate.transpose(0, 1), up.transpose(0, 1))


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="norm weight"):
        fused.add_rms_norm(torch.zeros(2, 8, device=DEVICE), None, torch.ones(4, device=DEVICE), 1e-6)
    with pytest.raises(ConfigError, match="one shape"):
        fused.silu_mul(torch.zeros(2, 8, device=DEVICE), torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ConfigError, match="power-of-two head_dim"):
        cache = torch.zeros(1, 1, 4, 12, device=DEVICE)
        fused.rope_cache(torch.zeros(1, 1, 12, device=DEVICE), torch.zeros(1, 1, 12, device=DEVICE),
                         torch.zeros(1, 1, 12, device=DEVICE), torch.zeros(1, 12, device=DEVICE),
                         torch.zeros(1, 12, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE),
                         cache, cache.clone())


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain attention and grouped-query attention
def test_fused_decoder_equals_eager_decoder(kv_heads):
    shape = DecoderShape(hidden=64, intermediate=96, heads=4, kv_heads=kv_heads, layers=2, vocab=50)
    torch.manual_seed(0)
    eager = Decoder(shape, dtype=torch.float32, device=DEVICE, fused=False)
    for param in eager.parameters():  # RMSNorm weights start at 1: make them informative
        param.data.uniform_(-0.5, 0.5).add_(0.1 if param.dim() == 1 else 0.0)
    fast = Decoder(shape, dtype=torch.float32, device=DEVICE, fused=True)
    fast.load_state_dict(eager.state_dict())
    tokens = torch.randint(0, shape.vocab, (2, 9), generator=_gen(9)).to(DEVICE)
    caches = [StaticCache(shape, 2, 16, torch.float32, DEVICE) for _ in range(2)]
    with torch.no_grad():
        outs = [model(tokens[:, :6], torch.arange(6, device=DEVICE), cache, attend=6, causal_prefill=True, last_only=False)
                for model, cache in zip((eager, fast), caches)]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
        for position in range(6, 9):  # decode against a longer cache than written (device-side mask)
            steps = [model(tokens[:, position:position + 1], torch.tensor([position], device=DEVICE), cache,
                           attend=13) for model, cache in zip((eager, fast), caches)]
            torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(caches[1].keys, caches[0].keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].values, caches[0].values)
