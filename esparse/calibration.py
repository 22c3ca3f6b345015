"""Calibration data: the Wanda/SparseGPT protocol on C4.

For each of `nsamples` sequences: draw a random document (Python's `random`, seeded once) until one
is longer than `seqlen` tokens, then a random window of `seqlen` tokens inside it. This module
reproduces that draw exactly; it tokenizes the pool once up front, which does not change the
sequence of random numbers.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from .errors import ConfigError, DataError
from .io import sha256_tensor

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    tokens: torch.Tensor  # int64 [nsamples, seqlen]
    document_indices: list[int]
    window_starts: list[int]
    info: dict = field(default_factory=dict)


def validate_calibration_settings(nsamples, seqlen, context: int | None = None) -> None:
    for name, value in (("nsamples", nsamples), ("seqlen", seqlen)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"calibration {name} must be a positive integer, got {value!r}")
    if context is not None and seqlen > context:
        raise ConfigError(f"calibration seqlen {seqlen} exceeds the model's context length {context}")


def sample_calibration(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int) -> CalibrationSet:
    validate_calibration_settings(nsamples, seqlen)
    encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    eligible = sum(1 for n in lengths if n > seqlen)
    if eligible == 0:
        raise DataError(
            f"no document in the pool of {len(texts)} is longer than seqlen={seqlen} tokens "
            f"(longest has {max(lengths, default=0)}); lower seqlen or use a larger pool"
        )
    rng = random.Random(seed)
    windows, doc_indices, starts = [], [], []
    for _ in range(nsamples):
        while True:
            doc = rng.randint(0, len(encoded) - 1)
            if lengths[doc] > seqlen:
                break
        start = rng.randint(0, lengths[doc] - seqlen - 1)
        windows.append(encoded[doc][start:start + seqlen])
        doc_indices.append(doc)
        starts.append(start)
    tokens = torch.tensor(windows, dtype=torch.int64)
    distinct = len(set(doc_indices))
    info = {
        "protocol": "wanda/sparsegpt c4: random document longer than seqlen, random window, python random seeded once",
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "pool_documents": len(texts),
        "pool_documents_longer_than_seqlen": eligible,
        "distinct_documents_drawn": distinct,
        "tokens_sha256": sha256_tensor(tokens),
        "warnings": [],
    }
    if eligible < nsamples:
        message = (
            f"only {eligible} of {len(texts)} pool documents are longer than seqlen={seqlen}, fewer than "
            f"nsamples={nsamples}: windows are drawn from repeated documents ({distinct} distinct)"
        )
        log.warning(message)
        info["warnings"].append(message)
    return CalibrationSet(tokens=tokens, document_indices=doc_indices, window_starts=starts, info=info)
