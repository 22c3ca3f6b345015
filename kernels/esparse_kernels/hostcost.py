"""Host cost per call of a linear layer: what an eager forward (the prefill of a short prompt) pays on
the CPU before the GPU sees the kernel.

Why: at 128-token prefill the whole-model profile is host-bound for dense and 2:4 alike (docs/
PERFORMANCE.md, run M1), so the CPU time per call decides the ratio there, not the kernels. The GPU
is first given a long sleep kernel, so the calls only enqueue; their host time is then timed with
``time.perf_counter`` and the GPU never makes them wait. Medians over rounds; the queue depth (calls
per round) stays far below the launch queue's limit.

    python -m esparse_kernels.hostcost --shape 4096x4096 --tokens 1,128 --out hostcost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from esparse.errors import ConfigError

from .pack import pack_24, random_24_weight

SLEEP_CYCLES = 200_000_000  # ~0.1 s on a ~2 GHz GPU clock: longer than one round of enqueued calls


def host_us_per_call(call, calls_per_round: int = 50, rounds: int = 15) -> float:
    """Median host microseconds per call of `call` while the GPU is busy (see module doc)."""
    if not torch.cuda.is_available():
        raise ConfigError("the host-cost probe needs a CUDA device (torch.cuda.is_available() is False)")
    for _ in range(3):  # first calls build plans, workspaces and allocator pools
        call()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        torch.cuda._sleep(SLEEP_CYCLES)
        start = time.perf_counter()
        for _ in range(calls_per_round):
            call()
        samples.append((time.perf_counter() - start) / calls_per_round * 1e6)
        torch.cuda.synchronize()
    return statistics.median(samples)


def layers_for(out_features: int, in_features: int, tokens: list[int], device) -> dict[str, nn.Module]:
    """nn.Linear and SparseLinear routes of one shape: the decode kernel to 16 tokens, CUTLASS above,
    with and without an input permutation."""
    from .linear import SparseLinear

    gen = torch.Generator().manual_seed(0)
    plain = pack_24(*random_24_weight(out_features, in_features, torch.float16, "cpu", gen, with_perm=False))
    permuted = pack_24(*random_24_weight(out_features, in_features, torch.float16, "cpu", gen))
    plan = {16: {"backend": "ours_cuda", "config": {"warps": 4, "split_k": 2}},
            max(max(tokens), 32): {"backend": "ours_cutlass", "config": {"index": 1}}}
    dense = nn.Linear(in_features, out_features, bias=False, dtype=torch.float16, device=device)
    return {"dense": dense,
            "sparse": SparseLinear(plain.to(device), None, plan, allow_dense=False),
            "sparse_perm": SparseLinear(permuted.to(device), None, plan, allow_dense=False)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4096x4096", help="OUTxIN")
    parser.add_argument("--tokens", default="1,128", help="comma-separated token counts")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
    tokens = [int(t) for t in args.tokens.split(",")]
    device = torch.device("cuda")
    rows = []
    with torch.no_grad():
        layers = layers_for(out_f, in_f, tokens, device)
        for t in tokens:
            x = torch.randn(t, in_f, dtype=torch.float16, device=device)
            for name, layer in layers.items():
                backend = "cublas" if name == "dense" else layer._route(t)[0]
                us = host_us_per_call(lambda: layer(x))
                rows.append({"layer": name, "backend": backend, "tokens": t, "host_us_per_call": round(us, 2)})
                print(f"{out_f}x{in_f} {t:5d} tokens {name:12s} {backend:14s} {us:7.2f} us host per call", flush=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                          "shape": [out_f, in_f], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
