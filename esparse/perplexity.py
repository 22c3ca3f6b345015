"""Perplexity, exactly the protocol of the Wanda/SparseGPT papers.

WikiText-2: test rows joined with "\n\n", tokenized once, cut into non-overlapping windows of
`seqlen` tokens (remainder dropped); NLL per window = mean token loss x seqlen;
ppl = exp(sum NLL / (windows x seqlen)). This is not lm-eval's document-level `wikitext` word
perplexity. Held-apart C4 (used only to choose hyper-parameters): documents joined with " ", as
SparseGPT's C4 evaluation does, then the same windows.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .io import sha256_tensor

STREAM_JOINS = {"wikitext2": "\n\n", "c4_heldout": " "}


def token_stream(rows: list[str], tokenizer, dataset: str = "wikitext2") -> torch.Tensor:
    """The evaluation token stream (int64, 1-D) of a data set's rows, joined per its protocol."""
    if dataset not in STREAM_JOINS:
        raise ConfigError(f"no perplexity protocol for data set {dataset!r}; allowed: {', '.join(STREAM_JOINS)}")
    return tokenizer(STREAM_JOINS[dataset].join(rows), return_tensors="pt")["input_ids"][0].to(torch.int64)


def wikitext_token_stream(rows: list[str], tokenizer) -> torch.Tensor:
    return token_stream(rows, tokenizer, "wikitext2")


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """NLL of one window as the protocol defines it: mean next-token loss x window length."""
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), batch[0, 1:], reduction="mean")
    return loss.item() * batch.shape[1]


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None,
               device: str | torch.device = "cpu", progress: bool = True) -> dict:
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ConfigError(f"perplexity seqlen must be an integer >= 2, got {seqlen!r}")
    available = tokens.numel() // seqlen
    if available == 0:
        raise ConfigError(f"the token stream has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1):
        raise ConfigError(f"perplexity max_windows must be a positive integer or null, got {max_windows!r}")
    windows = available if max_windows is None else min(available, max_windows)
    total_nll = 0.0
    per_window = []
    for index in tqdm(range(windows), desc=f"ppl@{seqlen}", disable=not progress, mininterval=10):
        batch = tokens[index * seqlen:(index + 1) * seqlen].unsqueeze(0).to(device)
        nll = window_nll(model(input_ids=batch).logits, batch)
        per_window.append(nll)
        total_nll += nll
    return {
        "ppl": math.exp(total_nll / (windows * seqlen)),
        "seqlen": seqlen,
        "windows": windows,
        "windows_available": available,
        "subset": windows < available,
        "stream_tokens": int(tokens.numel()),
        "stream_sha256": sha256_tensor(tokens),
        "nll_per_window": per_window,
    }
