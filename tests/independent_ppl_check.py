"""Independent check of the WikiText-2 perplexity protocol on a real model (run by hand).

Computes the perplexity twice: once through esparse (mirror loader + esparse.perplexity) and once
independently (the raw wiki.test.raw file split into rows the way the Hub builder does, the
model's own `labels=` loss). Prints both and their relative difference; exits 1 above --tolerance.

    python tests/independent_ppl_check.py resources/models/smollm2-135m ../shared/data --seqlen 2048
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def independent(model_dir: str, mirror: str, seqlen: int, max_windows: int | None) -> dict:
    raw = (Path(mirror) / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids
    windows = ids.shape[1] // seqlen if max_windows is None else min(max_windows, ids.shape[1] // seqlen)
    nll = 0.0
    with torch.no_grad():
        for w in range(windows):
            batch = ids[:, w * seqlen:(w + 1) * seqlen]
            nll += model(batch, labels=batch).loss.double().item() * seqlen
    return {"ppl": math.exp(nll / (windows * seqlen)), "windows": windows, "rows": len(rows)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("mirror")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    args = parser.parse_args()
    from esparse.data import load_records
    from esparse.models import load_model
    from esparse.perplexity import perplexity, wikitext_token_stream

    model, tokenizer = load_model(args.model_dir)
    tokens = wikitext_token_stream(load_records("wikitext2", args.mirror)["text"], tokenizer)
    ours = perplexity(model, tokens, args.seqlen, args.max_windows)
    other = independent(args.model_dir, args.mirror, args.seqlen, args.max_windows)
    rel = abs(ours["ppl"] - other["ppl"]) / other["ppl"]
    print(json.dumps({"esparse": {k: ours[k] for k in ("ppl", "seqlen", "windows", "stream_tokens", "stream_sha256")},
                      "independent": other, "relative_difference": rel}, indent=2))
    return 0 if rel <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
