"""Exactness check of every kernel path against the masked dense reference on the current device.

    python -m esparse_kernels.selfcheck [--out check.json] [--backends triton,cuda,cutlass]

Fresh random weights, 2:4 masks in random permuted orders, inputs and permutations for each case;
outputs poisoned with NaN before each run; each split-K case is run several times in a row (the
ticket counters must return to zero and every run must agree bit for bit, else a race is reported).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .pack import pack_24, random_24_weight, reference_linear, rel_frobenius_error, unpack_24, unpack_24_permuted

TOL = 1e-3


def cases(device: str, dtype: torch.dtype):
    from .triton_sp24 import KernelConfig

    shapes = [(192, 576), (576, 1536), (4096, 4096), (1000, 352), (8192, 2208)]
    configs = [
        KernelConfig("gemv", 16, 128), KernelConfig("gemv", 32, 256, split_k=4, num_warps=8),
        KernelConfig("gemv", 8, 256, split_k=8), KernelConfig("gemv", 64, 64, split_k=3),
        KernelConfig("dot", 64, 64, block_t=16, split_k=4),
        KernelConfig("dot", 64, 128, block_t=16, split_k=2, perm_mode="pre"),
        KernelConfig("dot", 128, 32, block_t=64, num_warps=4, num_stages=3, perm_mode="pre"),
        KernelConfig("dot", 128, 32, block_t=128, num_warps=8, num_stages=3, perm_mode="pre"),
        KernelConfig("dot", 128, 64, block_t=64, split_k=8, num_warps=8, num_stages=3, perm_mode="pre"),
    ]
    if dtype != torch.float16:  # the kernels are dtype-generic; a few configs suffice to cover bf16
        configs = [configs[0], configs[1], configs[4], configs[6]]
    tokens = [1, 2, 3, 4, 7, 16, 33, 300]
    for shape in shapes:
        for cfg in configs:
            for t in tokens:
                if cfg.supports(t) and (cfg.kind == "gemv" or t >= 2 or cfg.block_t == 16):
                    yield shape, cfg, t


def run(device: str = "cuda", dtypes=(torch.float16, torch.bfloat16), repeats: int = 3) -> dict:
    from .triton_sp24 import Workspace, sp24_decompress, sp24_matmul

    results, failures = [], []
    gen = torch.Generator().manual_seed(1234)
    packed_cache = {}
    for dtype in dtypes:
        for (n, k), cfg, t in cases(device, dtype):
            key = (n, k, dtype)
            if key not in packed_cache:
                w, mask, perm = random_24_weight(n, k, dtype, "cpu", gen, with_perm=True)
                packed = pack_24(w, mask, perm)
                assert torch.equal(unpack_24(packed), w)
                packed_cache[key] = packed.to(device)
                dense_p = sp24_decompress(packed_cache[key])
                ok = torch.equal(dense_p.cpu(), unpack_24_permuted(packed))
                results.append({"case": f"decompress {n}x{k} {dtype}", "exact": ok})
                if not ok:
                    failures.append(results[-1])
            packed = packed_cache[key]
            x = torch.randn(t, k, generator=gen).to(dtype).to(device)
            ref = reference_linear(x, packed)
            ws = Workspace(cfg, n, t, device, in_features=k, dtype=dtype)
            outs = []
            for _ in range(repeats):
                out = torch.full((t, n), float("nan"), dtype=dtype, device=device)
                sp24_matmul(x, packed, cfg, ws, out=out)
                outs.append(out)
            torch.cuda.synchronize()
            err = max(rel_frobenius_error(o, ref) for o in outs)
            stable = all(torch.equal(outs[0], o) for o in outs[1:])
            counters_zero = int(ws.counters.abs().sum()) == 0
            tol = TOL if dtype == torch.float16 else 8 * TOL  # bf16 output rounding alone is ~2e-3
            rec = {"case": f"{cfg.label} {n}x{k} T={t} {dtype}", "rel_err": err, "stable": stable,
                   "counters_zero": counters_zero, "tol": tol}
            results.append(rec)
            if not (err < tol and stable and counters_zero):
                failures.append(rec)
    return {"device": torch.cuda.get_device_name(), "cases": len(results), "failures": failures,
            "max_rel_err_fp16": max((r["rel_err"] for r in results if "rel_err" in r and "float16" in r["case"]
                                     and "bfloat16" not in r["case"]), default=None),
            "max_rel_err_bf16": max((r["rel_err"] for r in results if "rel_err" in r and "bfloat16" in r["case"]),
                                    default=None),
            "results": results}


def cuda_cases(dtype: torch.dtype, pdl: bool = False, cluster: bool = False):
    from dataclasses import replace

    from .cuda_sp24 import CudaConfig, cluster_fits, fits_shared_memory

    shapes = [(192, 576), (576, 1536), (4096, 4096), (1000, 384), (8192, 2176)]
    configs = [CudaConfig(4, 1, 4), CudaConfig(8, 4, 8, pre=True), CudaConfig(4, 3, 4), CudaConfig(2, 16, 8),
               CudaConfig(8, 2, 4, pre=True), CudaConfig(8, 1, 8, pre=True, direct=True),
               CudaConfig(4, 6, 4, pre=True, direct=True), CudaConfig(1, 2, 8, pre=True),
               CudaConfig(2, 1, 4, pre=True, direct=True), CudaConfig(1, 1, 4)]
    if dtype != torch.float16:
        configs = [configs[0], configs[1], configs[5]]
    if pdl:  # programmatic dependent launches: per-CTA staging, pre-staged, direct
        direct = next(c for c in configs if c.direct)
        configs += [replace(c, pdl=True) for c in (configs[0], configs[1], direct)]
    if cluster:  # the cluster reduction: per-CTA staging, pre-staged, direct (programmatic where pdl)
        configs += [CudaConfig(4, 3, 4, pdl=pdl, cluster=True), CudaConfig(8, 4, 8, pre=True, pdl=pdl, cluster=True),
                    CudaConfig(2, 8, 4, pre=True, direct=True, pdl=pdl, cluster=True)]
    tokens = [1, 2, 3, 7, 8, 9, 15, 16, 17, 24, 32]
    for shape in shapes:
        for cfg in configs:
            for t in tokens:
                if fits_shared_memory(cfg, shape[1], t) and cluster_fits(cfg, shape[1]):  # else the workspace refuses
                    yield shape, cfg, t


def run_cuda(device: str = "cuda", dtypes=(torch.float16, torch.bfloat16), repeats: int = 3) -> dict:
    """The CUDA decode kernel (cuda_sp24) against the reference; same rules as ``run``. Permuted cases
    run with the metadata in both layouts the kernel reads (pack.py's rows and CUTLASS's sm90)."""
    from .cuda_sp24 import CudaWorkspace, cluster_supported, meta_variant, pdl_supported, sp24_cuda_matmul
    from .pack import meta_to_sm90

    results, failures = [], []
    gen = torch.Generator().manual_seed(4321)
    packed_cache = {}
    variant = meta_variant()
    for dtype in dtypes:
        for (n, k), cfg, t in cuda_cases(dtype, pdl=pdl_supported(), cluster=cluster_supported()):
            for with_perm, layout in ((True, "rows"), (True, "sm90"), (False, "rows")):
                key = (n, k, dtype, with_perm)
                if key not in packed_cache:
                    w, mask, perm = random_24_weight(n, k, dtype, "cpu", gen, with_perm=with_perm)
                    packed = pack_24(w, mask, perm).to(device)
                    packed_cache[key] = (packed, meta_to_sm90(packed.meta, k))
                packed, meta_sm90 = packed_cache[key]
                x = torch.randn(t, k, generator=gen).to(dtype).to(device)
                ref = reference_linear(x, packed)
                ws = CudaWorkspace(cfg, n, t, device, k, dtype)
                outs = []
                for _ in range(repeats):
                    out = torch.full((t, n), float("nan"), dtype=dtype, device=device)
                    sp24_cuda_matmul(x, packed, cfg, ws, out=out, meta_sm90=meta_sm90 if layout == "sm90" else None)
                    outs.append(out)
                torch.cuda.synchronize()
                err = max(rel_frobenius_error(o, ref) for o in outs)
                stable = all(torch.equal(outs[0], o) for o in outs[1:])
                counters_zero = int(ws.counters.abs().sum()) == 0
                tol = TOL if dtype == torch.float16 else 8 * TOL
                rec = {"case": f"cuda {cfg.label} {n}x{k} T={t} perm={int(with_perm)} meta={layout} {dtype}",
                       "rel_err": err,
                       "stable": stable, "counters_zero": counters_zero, "tol": tol}
                results.append(rec)
                if not (err < tol and stable and counters_zero):
                    failures.append(rec)
    fp16 = [r["rel_err"] for r in results if "float16" in r["case"] and "bfloat16" not in r["case"]]
    bf16 = [r["rel_err"] for r in results if "bfloat16" in r["case"]]
    return {"device": torch.cuda.get_device_name(), "meta_variant": variant, "cases": len(results),
            "failures": failures, "max_rel_err_fp16": max(fp16, default=None),
            "max_rel_err_bf16": max(bf16, default=None), "results": results}


def run_cutlass(device: str = "cuda", dtypes=(torch.float16, torch.bfloat16), repeats: int = 2) -> dict:
    """The CUTLASS prefill GEMM (cutlass_sp24) against the reference, with and without permutation.

    Every configuration, shapes with and without tile padding (K = 576 is not a multiple of 128), token
    counts below, at and off the tile sizes; a fifth of the kept values are set to exactly zero, so the
    compressor's placeholder path is exercised too."""
    from .cutlass_sp24 import NUM_CONFIGS, CutlassConfig, CutlassWeight, sp24_cutlass_matmul, workspace_bytes

    results, failures = [], []
    gen = torch.Generator().manual_seed(2468)
    shapes = [(192, 576), (576, 1536), (4096, 4096), (1000, 384), (8192, 2176)]
    tokens = [1, 64, 129, 300, 1000]
    for dtype in dtypes:
        configs = range(NUM_CONFIGS) if dtype == torch.float16 else (0, NUM_CONFIGS - 1)
        for n, k in shapes:
            for with_perm in (True, False):
                w, mask, perm = random_24_weight(n, k, dtype, "cpu", gen, with_perm=with_perm)
                w = w * (torch.rand(n, k, generator=gen) > 0.2).to(dtype)  # some kept values exactly zero
                packed = pack_24(w, mask, perm).to(device)
                cw = CutlassWeight.from_packed(packed)
                for index in configs:
                    cfg = CutlassConfig(index)
                    for t in tokens:
                        x = torch.randn(t, k, generator=gen).to(dtype).to(device)
                        ref = reference_linear(x, packed)
                        need = workspace_bytes(cw, cfg, t)
                        ws = torch.empty(need, dtype=torch.uint8, device=device) if need else None
                        outs = []
                        for _ in range(repeats):
                            out = torch.full((t, n), float("nan"), dtype=dtype, device=device)
                            sp24_cutlass_matmul(x, cw, cfg, packed.perm, out=out, workspace=ws)
                            outs.append(out)
                        torch.cuda.synchronize()
                        err = max(rel_frobenius_error(o, ref) for o in outs)
                        stable = all(torch.equal(outs[0], o) for o in outs[1:])
                        tol = TOL if dtype == torch.float16 else 8 * TOL
                        rec = {"case": f"cutlass {cfg.label} {n}x{k} T={t} perm={int(with_perm)} {dtype}",
                               "rel_err": err, "stable": stable, "shares_values": cw.shares_values, "tol": tol}
                        results.append(rec)
                        if not (err < tol and stable):
                            failures.append(rec)
    fp16 = [r["rel_err"] for r in results if "float16" in r["case"] and "bfloat16" not in r["case"]]
    bf16 = [r["rel_err"] for r in results if "bfloat16" in r["case"]]
    return {"device": torch.cuda.get_device_name(), "cases": len(results), "failures": failures,
            "max_rel_err_fp16": max(fp16, default=None), "max_rel_err_bf16": max(bf16, default=None),
            "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m esparse_kernels.selfcheck")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--backends", default="triton,cuda", help="comma-separated: triton, cuda, cutlass")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("selfcheck needs CUDA", file=sys.stderr)
        return 2
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    reports, failed = {}, 0
    for backend in backends:
        if backend == "triton":
            report = run()
        elif backend == "cuda":
            report = run_cuda()
        elif backend == "cutlass":
            report = run_cutlass()
        else:
            print(f"unknown backend {backend!r} (allowed: triton, cuda, cutlass)", file=sys.stderr)
            return 2
        reports[backend] = report
        failed += len(report["failures"])
        extra = f", metadata layout {report['meta_variant']}" if "meta_variant" in report else ""
        print(f"selfcheck {backend} on {report['device']}: {report['cases']} cases, {len(report['failures'])} "
              f"failures, max rel err fp16 {report['max_rel_err_fp16']:.2e}, bf16 {report['max_rel_err_bf16']:.2e}"
              f"{extra}")
        for f in report["failures"][:20]:
            print("FAIL", f)
    if args.out:
        args.out.write_text(json.dumps(reports, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
