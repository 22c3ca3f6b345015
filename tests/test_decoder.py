"""The profiling decoder reproduces transformers' LLaMA/Mistral logits, prefill and token-by-token decode."""

import pytest
import torch

from esparse.decoder import Decoder, DecoderShape, StaticCache
from esparse.errors import ConfigError
from esparse.models import build_tiny_model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_prefill_and_decode_match_transformers(arch):
    hf = build_tiny_model(arch, layers=2).to(torch.float64)
    ours = Decoder.from_hf(hf)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _hf_logits(hf, tokens)
    cache = StaticCache(ours.shape, batch=2, max_len=16, dtype=torch.float64, device="cpu")
    with torch.no_grad():
        prefill = ours(tokens[:, :8], torch.arange(8), cache, attend=8, causal_prefill=True, last_only=False)
        torch.testing.assert_close(prefill, expected[:, :8], rtol=1e-10, atol=1e-10)
        for position in range(8, 12):  # one token at a time against the cache, with the device-side mask
            step = ours(tokens[:, position:position + 1], torch.tensor([position]), cache, attend=position + 1)
            torch.testing.assert_close(step[:, 0], expected[:, position], rtol=1e-10, atol=1e-10)


def test_attending_to_a_longer_cache_masks_the_future_rows():
    """A decode step may attend to more cache rows than exist yet (fixed graph shape): they are masked."""
    hf = build_tiny_model("llama", layers=1).to(torch.float64)
    ours = Decoder.from_hf(hf)
    tokens = torch.randint(0, hf.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    cache = StaticCache(ours.shape, batch=1, max_len=32, dtype=torch.float64, device="cpu")
    cache.keys.normal_()  # garbage beyond the written rows must not leak in
    cache.values.normal_()
    with torch.no_grad():
        ours(tokens[:, :5], torch.arange(5), cache, attend=5, causal_prefill=True)
        step = ours(tokens[:, 5:], torch.tensor([5]), cache, attend=32)
    torch.testing.assert_close(step[:, 0], _hf_logits(hf, tokens)[:, 5], rtol=1e-10, atol=1e-10)


def test_random_shape_builds_with_a_linear_factory():
    shape = DecoderShape(hidden=32, intermediate=64, heads=4, kv_heads=2, layers=2, vocab=50)
    made = []

    def factory(name, out_f, in_f):
        made.append((name, out_f, in_f))
        return torch.nn.Linear(in_f, out_f, bias=False)

    model = Decoder(shape, linear_factory=factory)
    assert len(made) == 2 * 7 and ("self_attn.k_proj", 16, 32) in made
    cache = StaticCache(shape, batch=3, max_len=8, dtype=torch.float32, device="cpu")
    assert model(torch.zeros(3, 4, dtype=torch.long), torch.arange(4), cache, attend=4, causal_prefill=True).shape == (3, 1, 50)


def test_other_architectures_are_refused_by_name():
    with pytest.raises(ConfigError, match="'opt'"):
        Decoder.from_hf(build_tiny_model("opt"))
