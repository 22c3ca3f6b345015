"""One decode GEMM, called a few times, for Nsight Compute to read its hardware counters.

Timing with CUDA events says how long the decode kernel takes; `ncu` says why (achieved DRAM and L2
throughput, warp stall reasons, occupancy). This script only makes the calls: h200.sh runs it under
`ncu --clock-control none -k regex:... --launch-skip S --launch-count 1`, so the profiled launch is a
warm one. `--config` is a tuning label (`mma_w4_sk4_d8_pre_ldg_pdl_cl`, as the benchmark CSV names it) or
`cublas` for the dense baseline of the same shape.

    python kernels/gpu/ncu_decode.py --shape 4096x4096 --tokens 32 --config mma_w8_sk4_d8_pre
"""

from __future__ import annotations

import argparse
import re

import torch

from esparse.errors import ConfigError

LABEL = re.compile(r"mma_w(?P<warps>\d+)_sk(?P<split_k>\d+)_d(?P<depth>\d+)(?P<pre>_pre)?(?P<direct>_ldg)?(?P<pdl>_pdl)?"
                   r"(?P<cluster>_cl)?")


def parse_label(label: str):
    """The CudaConfig a tuning label names (CudaConfig.label's inverse)."""
    from esparse_kernels.cuda_sp24 import CudaConfig

    match = LABEL.fullmatch(label)
    if match is None:
        raise ConfigError(f"--config {label!r} is not a decode-kernel label like mma_w4_sk4_d8_pre_ldg_pdl, nor 'cublas'")
    config = CudaConfig(warps=int(match["warps"]), split_k=int(match["split_k"]), depth=int(match["depth"]),
                        pre=bool(match["pre"]), direct=bool(match["direct"]), pdl=bool(match["pdl"]),
                        cluster=bool(match["cluster"]))
    assert config.label == label
    return config


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", required=True, help="OUTxIN")
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    args = parser.parse_args(argv)
    out_f, in_f = (int(v) for v in args.shape.lower().split("x"))
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, in_f, generator=generator).to("cuda", dtype)
    if args.config == "cublas":
        weight = (torch.randn(out_f, in_f, generator=generator) * in_f ** -0.5).to("cuda", dtype)
        call = lambda: torch.nn.functional.linear(x, weight)  # noqa: E731
    else:
        from esparse_kernels.cuda_sp24 import CudaWorkspace, sp24_cuda_matmul
        from esparse_kernels.pack import meta_to_sm90, pack_24, random_24_weight

        config = parse_label(args.config)
        packed = pack_24(*random_24_weight(out_f, in_f, dtype, "cpu", generator)).to("cuda")
        meta = meta_to_sm90(packed.meta, in_f)  # the layout the model's layers keep (run M1)
        workspace = CudaWorkspace(config, out_f, args.tokens, "cuda", in_f, dtype)
        out = torch.empty(args.tokens, out_f, dtype=dtype, device="cuda")
        call = lambda: sp24_cuda_matmul(x, packed, config, workspace, out, meta)  # noqa: E731
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()
    print(f"{args.calls} calls of {args.config} at {args.shape}, {args.tokens} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
