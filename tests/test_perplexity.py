"""Perplexity protocol against a direct loss computation on a tiny model."""

import math

import pytest
import torch

from esparse.errors import ConfigError
from esparse.models import load_model
from esparse.perplexity import perplexity, wikitext_token_stream


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return load_model(tiny_model_dirs["llama"])


def test_matches_direct_loss(tiny, wikitext_rows):
    model, tokenizer = tiny
    tokens = wikitext_token_stream(wikitext_rows[:200], tokenizer)
    seqlen = 64
    result = perplexity(model, tokens, seqlen, max_windows=5, progress=False)
    # Independent computation: sum of per-token losses over the first 5 windows, with the protocol's
    # normalisation (mean over seqlen-1 predictions, scaled by seqlen, divided by windows*seqlen).
    total = 0.0
    for w in range(5):
        ids = tokens[w * seqlen:(w + 1) * seqlen]
        logits = model(ids.unsqueeze(0)).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll_tokens = -logp[torch.arange(seqlen - 1), ids[1:]]
        total += nll_tokens.mean().item() * seqlen
    assert result["ppl"] == pytest.approx(math.exp(total / (5 * seqlen)), rel=1e-5)
    assert result["windows"] == 5 and result["subset"] is True
    assert result["windows_available"] == tokens.numel() // seqlen
    assert len(result["stream_sha256"]) == 64


def test_rows_joined_with_blank_lines(tiny):
    _, tokenizer = tiny
    stream = wikitext_token_stream(["a\n", "", "b\n"], tokenizer)
    assert tokenizer.decode(stream) == "a\n\n\n\n\nb\n"


def test_all_windows_and_remainder_dropped(tiny):
    model, _ = tiny
    tokens = torch.randint(0, model.config.vocab_size, (100,))
    result = perplexity(model, tokens, 32, progress=False)
    assert result["windows"] == 3 and result["subset"] is False


@pytest.mark.parametrize("seqlen", [1, 2.5])
def test_bad_seqlen(tiny, seqlen):
    model, _ = tiny
    with pytest.raises(ConfigError, match="seqlen"):
        perplexity(model, torch.arange(100), seqlen, progress=False)
