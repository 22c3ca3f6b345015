"""Independent check of the WikiText-2 perplexity protocol on a real model (run by hand).

Two computations over every window, sharing only the model's forward pass:
- esparse: the mirror loader, `esparse.perplexity.token_stream` and `window_nll`;
- independent: the raw wiki.test.raw split into rows the way the Hub builder does, the tokenizer
  called directly, and the model's own `labels=` loss (transformers' shift and mean).
Prints both perplexities and their relative difference; exits 1 above --tolerance. With
--against, the perplexity that the pipeline's `perplexity` rule recorded (a results/ppl/... JSON of the
same model, seqlen and window count) must also agree with the independent one.

    python tests/independent_ppl_check.py resources/models/smollm2-135m ../shared/data --seqlen 2048 \
        [--against results/ppl/smollm2-135m/dense/dense.json]
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("mirror")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--against", help="a perplexity JSON written by the pipeline's perplexity rule")
    args = parser.parse_args()
    from esparse.data import load_records
    from esparse.models import load_model
    from esparse.perplexity import token_stream, window_nll

    model, tokenizer = load_model(args.model_dir)
    ours_tokens = token_stream(load_records("wikitext2", args.mirror)["text"], tokenizer, "wikitext2")
    raw = (Path(args.mirror) / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]
    their_tokens = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    seqlen = args.seqlen
    windows = their_tokens.numel() // seqlen
    if args.max_windows:
        windows = min(windows, args.max_windows)
    ours_nll = theirs_nll = 0.0
    with torch.no_grad():
        for w in tqdm(range(windows), mininterval=30):
            batch = their_tokens[w * seqlen:(w + 1) * seqlen].unsqueeze(0)
            out = model(batch, labels=batch)
            theirs_nll += out.loss.double().item() * seqlen
            ours_nll += window_nll(out.logits, ours_tokens[w * seqlen:(w + 1) * seqlen].unsqueeze(0))
    ours = math.exp(ours_nll / (windows * seqlen))
    theirs = math.exp(theirs_nll / (windows * seqlen))
    rel = abs(ours - theirs) / theirs
    report = {"seqlen": seqlen, "windows": windows, "rows": len(rows),
              "token_streams_equal": bool(torch.equal(ours_tokens, their_tokens)),
              "esparse_ppl": ours, "independent_ppl": theirs, "relative_difference": rel}
    ok = rel <= args.tolerance and report["token_streams_equal"]
    if args.against:
        recorded = json.loads(Path(args.against).read_text())
        same_protocol = recorded["seqlen"] == seqlen and recorded["windows"] == windows
        pipeline_rel = abs(recorded["ppl"] - theirs) / theirs
        report.update({"pipeline_record": args.against, "pipeline_ppl": recorded["ppl"],
                       "pipeline_windows": recorded["windows"], "pipeline_relative_difference": pipeline_rel})
        ok = ok and same_protocol and pipeline_rel <= args.tolerance
    report["passed"] = ok
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
