"""Benchmark: dense cuBLAS vs PyTorch cuSPARSELt vs our 2:4 kernels over model linear shapes.

    python -m esparse_kernels.bench --out reports/gpu/kernels_h200.csv [--shapes llama-7b,...] [--tokens 1,16]
        [--tune-reps 10] [--final-reps 30] [--no-cusparselt] [--no-triton] [--no-cuda] [--no-isolate]
        [--worker-timeout 1800]

For every shape and token count: time every candidate (tuning pass), then time the best of each
backend again with more repeats (final pass; these are the reported rows), plus `dispatch` (the best
final backend, dense allowed: what SparseLinear runs) and `dispatch_sparse` (best sparse-only backend).
Backends: `ours` (Triton kernels), `ours_cuda` (the CUDA decode kernel on sparse tensor cores, 1-32
tokens), `ours_cutlass` (CUTLASS's Hopper sparse GEMM, 16+ tokens), `cusparselt`, `decompress_dense`.
Rows of backend `ours_noperm` / `ours_cuda_noperm` / `ours_cutlass_noperm` / `cusparselt_noperm` show
the same best configs without the channel permutation. Weights are random 2:4 in a random permuted order, inputs random (never zeros).
cuSPARSELt is tried from 64 tokens up (autotune.cslt_candidates says why); each model runs in its own
worker process, rerun without cuSPARSELt if it faults or outlives --worker-timeout.
Besides the CSV it writes <out>.meta.json (command, device, versions, measured ceilings) and
<out>.tuning.jsonl (every candidate's timing and error).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

from esparse.errors import ConfigError

from .autotune import SPARSE_BACKENDS
from .shapes import select_shapes

CSV_COLUMNS = [
    "shape", "model", "layers", "out_features", "in_features", "tokens", "backend", "config", "perm",
    "median_us", "p10_us", "p90_us", "ratio_vs_dense", "bytes", "tb_s", "tflop_s", "limit_us",
    "frac_of_limit", "ratio_limit", "rot_sets", "set_mb", "graph", "reps", "rel_err", "device",
]


def parse_tokens(text: str) -> list[int]:
    try:
        toks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise ConfigError(f"--tokens must be comma-separated positive integers, got {text!r}") from exc
    if not toks or any(t < 1 for t in toks):
        raise ConfigError(f"--tokens must be comma-separated positive integers, got {text!r}")
    return toks


def row_metrics(n: int, k: int, tokens: int, backend: str, median_us: float, ceilings: dict,
                packed_bytes: int, el: int = 2) -> dict:
    """Bytes, achieved rates and the physical limit of one measured row."""
    io_bytes = tokens * (k + n) * el
    sparse = backend != "dense"
    weight_bytes = packed_bytes if sparse else n * k * el
    nbytes = weight_bytes + io_bytes
    flops = 2.0 * tokens * n * k  # dense-equivalent
    bw, rate = ceilings["copy_bytes_per_s"], ceilings["fp16_dense_flops_per_s"]
    limit_dense = max((n * k * el + io_bytes) / bw, flops / rate)
    limit_sparse = max((packed_bytes + io_bytes) / bw, flops / (2 * rate))
    limit = limit_sparse if sparse else limit_dense
    sec = median_us * 1e-6
    return {
        "bytes": nbytes, "tb_s": nbytes / sec / 1e12, "tflop_s": flops / sec / 1e12,
        "limit_us": limit * 1e6, "frac_of_limit": limit / sec, "ratio_limit": limit_dense / limit_sparse,
    }


def measure_shape(shape, tokens: list[int], ceilings: dict, dev: dict, tune_reps: int, final_reps: int, seed: int,
                  include_cslt: bool, emit_row, emit_tuning, log=print, include_triton: bool = True,
                  include_cuda: bool = True, include_cutlass: bool = True, meta_layout: str = "auto") -> None:
    """Tune and measure one shape at every token count; rows and tuning records go out as they come.
    meta_layout: the metadata layout the decode kernel and the decompression read (autotune.ShapeBench)."""
    from .autotune import ShapeBench, best_of, tune_tokens
    from .triton_sp24 import KernelConfig

    n, k = shape.out_features, shape.in_features
    n_sms = dev["multiprocessors"]
    bench = ShapeBench.random(n, k, seed=seed, reps=tune_reps, meta_layout=meta_layout)
    packed_bytes = bench.packed.nbytes()
    t_start = time.time()
    for t in tokens:
        def record(m, t=t):
            emit_tuning({"shape": shape.name, "tokens": t, **m.to_dict()})
            if m.timing is None:
                log(f"    FAIL {m.backend} {m.label}: {m.error}")
        all_meas = tune_tokens(bench, t, n_sms, include_cslt=include_cslt, log=log, on_result=record,
                               include_triton=include_triton, include_cuda=include_cuda,
                               include_cutlass=include_cutlass)
        final = []
        dense = bench.time_dense(t, reps=final_reps)
        final.append(dense)
        best_ours = best_of(all_meas, ("ours",))
        if best_ours is not None:
            cfg = KernelConfig.from_dict(best_ours.config)
            final.append(bench.time_ours(cfg, t, reps=final_reps))
            final.append(bench.time_ours(cfg, t, reps=final_reps, with_perm=False))
        best_cuda = best_of(all_meas, ("ours_cuda",))
        if best_cuda is not None:
            from .cuda_sp24 import CudaConfig

            ccfg = CudaConfig.from_dict(best_cuda.config)
            final.append(bench.time_cuda(ccfg, t, reps=final_reps))
            final.append(bench.time_cuda(ccfg, t, reps=final_reps, with_perm=False))
        best_cutlass = best_of(all_meas, ("ours_cutlass",))
        if best_cutlass is not None:
            from .cutlass_sp24 import CutlassConfig

            kcfg = CutlassConfig.from_dict(best_cutlass.config)
            final.append(bench.time_cutlass(kcfg, t, reps=final_reps))
            final.append(bench.time_cutlass(kcfg, t, reps=final_reps, with_perm=False))
        best_cslt = best_of(all_meas, ("cusparselt",))
        if best_cslt is not None:
            alg, split = best_cslt.config["alg_id"], best_cslt.config["split_k"]
            final.append(bench.time_cslt(t, alg, split, reps=final_reps))
            final.append(bench.time_cslt(t, alg, split, reps=final_reps, with_perm=False))
        if any(m.backend == "decompress_dense" and m.timing for m in all_meas):
            final.append(bench.time_decompress_dense(t, reps=final_reps))
        dense_us = dense.timing.median_us
        ok = [m for m in final if m.timing is not None and (m.rel_err is None or m.rel_err < 1e-3)]
        dispatch = min((m for m in ok if m.backend in ("dense",) + SPARSE_BACKENDS), key=lambda m: m.timing.median_us)
        sparse_only = [m for m in ok if m.backend in SPARSE_BACKENDS]
        dispatch_sparse = min(sparse_only, key=lambda m: m.timing.median_us) if sparse_only else None
        extra = [("dispatch", dispatch)] + ([("dispatch_sparse", dispatch_sparse)] if dispatch_sparse else [])
        for name, m in [(m.backend, m) for m in final] + extra:
            if m.timing is None:
                continue
            label = m.label if not name.startswith("dispatch") else f"{m.backend}:{m.label}"
            perm = 0 if (m.backend.endswith("_noperm") or m.backend == "dense") else 1
            row = {
                "shape": shape.name, "model": shape.model, "layers": shape.layers, "out_features": n,
                "in_features": k, "tokens": t, "backend": name, "config": label, "perm": perm,
                "median_us": round(m.timing.median_us, 3), "p10_us": round(m.timing.p10_us, 3),
                "p90_us": round(m.timing.p90_us, 3), "ratio_vs_dense": round(dense_us / m.timing.median_us, 4),
                "rot_sets": m.timing.sets, "set_mb": round(m.set_bytes / 2**20, 2), "graph": int(m.timing.graph),
                "reps": m.timing.reps, "rel_err": None if m.rel_err is None else f"{m.rel_err:.3e}",
                "device": dev["name"],
            }
            met = row_metrics(n, k, t, "dense" if m.backend == "dense" else "sparse", m.timing.median_us,
                              ceilings, packed_bytes)
            row.update({key: (round(v, 4) if isinstance(v, float) else v) for key, v in met.items()})
            emit_row(row)
        log(f"{shape.name:22s} T={t:5d} dense {dense_us:9.2f}us | dispatch {dispatch.backend}:{dispatch.label} "
            f"{dense_us / dispatch.timing.median_us:5.2f}x | ours "
            f"{(dense_us / best_ours.timing.median_us) if best_ours else float('nan'):5.2f}x (tune) | cuda "
            f"{(dense_us / best_cuda.timing.median_us) if best_cuda else float('nan'):5.2f}x (tune) | cutlass "
            f"{(dense_us / best_cutlass.timing.median_us) if best_cutlass else float('nan'):5.2f}x (tune) | cslt "
            f"{(dense_us / best_cslt.timing.median_us) if best_cslt else float('nan'):5.2f}x (tune)  "
            f"[{time.time() - t_start:.0f}s]")
    bench.release()
    del bench
    torch.cuda.empty_cache()


def _jsonl_appender(path: Path):
    def emit(rec: dict) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")
    return emit


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(shapes_spec: str | None, tokens: list[int], out_csv: Path, tune_reps: int = 10, final_reps: int = 30,
        seed: int = 0, log=print, isolate: bool = True, include_cslt: bool = True,
        worker_timeout: float = 1800.0, include_triton: bool = True, include_cuda: bool = True,
        include_cutlass: bool = True, meta_layout: str = "auto") -> list[dict]:
    """The whole benchmark. With isolate, each model runs in its own process, killed after
    worker_timeout seconds: a device fault or a hang (both seen inside cuSPARSELt on the H200) then
    costs that model's cuSPARSELt rows only, as it is rerun without them."""
    import subprocess

    from . import cslt
    from .env import device_info, measure_ceilings, software_versions
    from .shapes import ALL_SHAPES

    if not torch.cuda.is_available():
        raise ConfigError("the benchmark needs a CUDA device (torch.cuda.is_available() is False)")
    shapes = select_shapes(shapes_spec)
    dev = device_info()
    ceilings = measure_ceilings()
    log(f"device {dev['name']} sms={dev['multiprocessors']} l2={dev['l2_bytes'] / 2**20:.0f}MiB "
        f"copy={ceilings['copy_bytes_per_s'] / 1e12:.2f}TB/s mm={ceilings['fp16_dense_flops_per_s'] / 1e12:.0f}TFLOP/s; "
        f"cusparselt={cslt.available()} {cslt.version()}")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows_path = out_csv.with_suffix(".rows.jsonl")
    tuning_path = out_csv.with_suffix(".tuning.jsonl")
    for p in (rows_path, tuning_path):
        p.unlink(missing_ok=True)
    t_start = time.time()
    groups: dict[str, list] = {}
    for shape in shapes:
        groups.setdefault(shape.model, []).append(shape)
    failed_groups = []
    for model, group in groups.items():
        seeds = {s.name: seed + (ALL_SHAPES.index(s) if s in ALL_SHAPES else 0) for s in group}
        if not isolate:
            for s in group:
                measure_shape(s, tokens, ceilings, dev, tune_reps, final_reps, seeds[s.name], include_cslt,
                              _jsonl_appender(rows_path), _jsonl_appender(tuning_path), log,
                              include_triton=include_triton, include_cuda=include_cuda,
                              include_cutlass=include_cutlass, meta_layout=meta_layout)
            continue
        ceil_path = out_csv.with_suffix(".ceilings.json")
        ceil_path.write_text(json.dumps({"ceilings": ceilings, "device": dev}))
        for attempt, with_cslt in enumerate((True, False) if include_cslt else (False,)):
            before = len(_read_jsonl(rows_path))
            cmd = [sys.executable, "-m", "esparse_kernels.bench", "--worker", "--out", str(out_csv),
                   "--shapes", ",".join(s.name for s in group), "--tokens", ",".join(map(str, tokens)),
                   "--tune-reps", str(tune_reps), "--final-reps", str(final_reps), "--seed", str(seed),
                   "--meta-layout", meta_layout]
            if not with_cslt:
                cmd.append("--no-cslt")
            if not include_triton:
                cmd.append("--no-triton")
            if not include_cuda:
                cmd.append("--no-cuda")
            if not include_cutlass:
                cmd.append("--no-cutlass")
            try:
                returncode = subprocess.run(cmd, timeout=worker_timeout).returncode
            except subprocess.TimeoutExpired:
                returncode = "timeout"
            if returncode == 0:
                break
            log(f"!! worker for {model} ended with {returncode} (cuSPARSELt {'on' if with_cslt else 'off'})")
            if attempt == 0:  # drop the partial rows of the failed attempt before the rerun
                kept = _read_jsonl(rows_path)[:before]
                rows_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            else:
                failed_groups.append(model)
        log(f"== {model} done [{time.time() - t_start:.0f}s]")
    rows = _read_jsonl(rows_path)
    _write_csv(out_csv, rows)
    rows_path.unlink(missing_ok=True)
    out_csv.with_suffix(".ceilings.json").unlink(missing_ok=True)
    meta = {
        "command": " ".join(sys.argv), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": dev, "versions": software_versions(), "ceilings": ceilings, "tokens": tokens,
        "shapes": [s.name for s in shapes], "tune_reps": tune_reps, "final_reps": final_reps, "seed": seed,
        "wall_s": time.time() - t_start, "failed_models": failed_groups,
    }
    out_csv.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    print_summary(rows, log)
    return rows


def _worker(args) -> int:
    from .shapes import ALL_SHAPES

    info = json.loads(args.out.with_suffix(".ceilings.json").read_text())
    rows_path = args.out.with_suffix(".rows.jsonl")
    tuning_path = args.out.with_suffix(".tuning.jsonl")
    log = lambda s: print(s, flush=True)  # noqa: E731
    for shape in select_shapes(args.shapes):
        seed = args.seed + (ALL_SHAPES.index(shape) if shape in ALL_SHAPES else 0)
        measure_shape(shape, parse_tokens(args.tokens), info["ceilings"], info["device"], args.tune_reps,
                      args.final_reps, seed, not args.no_cslt, _jsonl_appender(rows_path),
                      _jsonl_appender(tuning_path), log, include_triton=not args.no_triton,
                      include_cuda=not args.no_cuda, include_cutlass=not args.no_cutlass,
                      meta_layout=args.meta_layout)
    return 0


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in CSV_COLUMNS})
    tmp.replace(path)


def print_summary(rows: list[dict], log=print) -> None:
    """Ratio vs dense of `ours` and `dispatch` per shape (rows) and token count (columns)."""
    toks = sorted({r["tokens"] for r in rows})
    for backend in ("ours", "ours_cuda", "ours_cuda_noperm", "ours_cutlass", "ours_cutlass_noperm", "cusparselt",
                    "dispatch"):
        log(f"\nratio vs dense, backend={backend}")
        log("shape".ljust(24) + "".join(f"{t:>7d}" for t in toks))
        for shape in dict.fromkeys(r["shape"] for r in rows):
            vals = {r["tokens"]: r["ratio_vs_dense"] for r in rows if r["shape"] == shape and r["backend"] == backend}
            log(shape.ljust(24) + "".join(f"{vals[t]:7.2f}" if t in vals else "      -" for t in toks))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m esparse_kernels.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="CSV to write (plus .meta.json and .tuning.jsonl)")
    ap.add_argument("--shapes", default=None, help="models, shape names or OUTxIN, comma-separated (default all)")
    ap.add_argument("--tokens", default="1,2,4,8,16,64,256,2048,8192")
    ap.add_argument("--tune-reps", type=int, default=10)
    ap.add_argument("--final-reps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-isolate", action="store_true", help="run every model in this process")
    ap.add_argument("--worker-timeout", type=float, default=1800.0,
                    help="seconds before a model's worker process is killed and rerun without cuSPARSELt")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-cslt", "--no-cusparselt", dest="no_cslt", action="store_true",
                    help="leave PyTorch's cuSPARSELt out (its algorithm sweep hung on the H200 at 16 tokens)")
    ap.add_argument("--no-triton", action="store_true", help="leave the Triton kernels out of the candidates")
    ap.add_argument("--no-cuda", action="store_true", help="leave the CUDA decode kernel out of the candidates")
    ap.add_argument("--no-cutlass", action="store_true",
                    help="leave the CUTLASS prefill kernel (Hopper sparse GEMM) out of the candidates")
    ap.add_argument("--meta-layout", choices=("auto", "rows", "sm90"), default="auto",
                    help="metadata layout the decode kernel and the decompression read: sm90 (CUTLASS's, what a "
                         "layer with the CUTLASS route keeps), rows (pack.py's), auto (sm90 where CUTLASS runs)")
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)
    run(args.shapes, parse_tokens(args.tokens), args.out, args.tune_reps, args.final_reps, args.seed,
        log=lambda s: print(s, flush=True), isolate=not args.no_isolate, include_cslt=not args.no_cslt,
        worker_timeout=args.worker_timeout, include_triton=not args.no_triton, include_cuda=not args.no_cuda,
        include_cutlass=not args.no_cutlass, meta_layout=args.meta_layout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
