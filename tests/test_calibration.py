"""Calibration sampling: the Wanda/SparseGPT C4 draw, determinism and clear failures."""

import random

import pytest
import torch

from esparse.calibration import sample_calibration
from esparse.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def c4_texts(data_mirror):
    from esparse.data import load_records

    return list(load_records("c4_calibration", data_mirror)["text"][:200])


def reference_draw(texts, tokenizer, nsamples, seqlen, seed):
    """The reference loop as published: tokenize lazily inside the draw."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(texts) - 1)
            enc = tokenizer(texts[i], return_tensors="pt")
            if enc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, enc.input_ids.shape[1] - seqlen - 1)
        out.append(enc.input_ids[:, i:i + seqlen])
    return torch.cat(out, dim=0)


def test_matches_reference_protocol(c4_texts, tiny_tokenizer):
    calib = sample_calibration(c4_texts, tiny_tokenizer, nsamples=6, seqlen=64, seed=0)
    assert calib.tokens.shape == (6, 64) and calib.tokens.dtype == torch.int64
    assert torch.equal(calib.tokens, reference_draw(c4_texts, tiny_tokenizer, 6, 64, 0))


def test_same_seed_same_sha_other_seed_differs(c4_texts, tiny_tokenizer):
    a = sample_calibration(c4_texts, tiny_tokenizer, 4, 32, seed=0)
    b = sample_calibration(c4_texts, tiny_tokenizer, 4, 32, seed=0)
    c = sample_calibration(c4_texts, tiny_tokenizer, 4, 32, seed=1)
    assert a.info["tokens_sha256"] == b.info["tokens_sha256"]
    assert a.info["tokens_sha256"] != c.info["tokens_sha256"]


def test_too_few_long_documents_is_reported(c4_texts, tiny_tokenizer, caplog):
    lengths = sorted(len(tiny_tokenizer(t)["input_ids"]) for t in c4_texts)
    seqlen = lengths[-3]  # only two documents are longer
    calib = sample_calibration(c4_texts, tiny_tokenizer, 5, seqlen, seed=0)
    assert calib.info["pool_documents_longer_than_seqlen"] == 2
    assert calib.info["warnings"] and "repeated documents" in calib.info["warnings"][0]
    assert "repeated documents" in caplog.text


def test_no_long_document_is_an_error(c4_texts, tiny_tokenizer):
    with pytest.raises(DataError, match="no document in the pool"):
        sample_calibration(c4_texts[:3], tiny_tokenizer, 2, 100_000, seed=0)


@pytest.mark.parametrize("bad", [1.5, 0, -3, "8", True])
def test_nsamples_must_be_positive_integer(c4_texts, tiny_tokenizer, bad):
    with pytest.raises(ConfigError, match=r"nsamples must be a positive integer, got"):
        sample_calibration(c4_texts, tiny_tokenizer, bad, 32, seed=0)
