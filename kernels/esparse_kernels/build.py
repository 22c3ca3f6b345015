"""Kernel build step: pack every 2:4 linear of a pruned model and autotune per shape and token bucket.

    python -m esparse_kernels.build --model-dir D --out-dir O [--tokens 1,2,4,...] [--device cuda|cpu]

Reads ``model.safetensors`` (or its sharded index) and ``sparsity.safetensors`` (interfaces.md), packs
each linear whose mask is 2:4 in its permuted order, and writes into the output directory:

- ``packed.safetensors``: per layer ``<name>.values``, ``<name>.meta``, ``<name>.shape`` and, when the
  layer was shuffled, ``<name>.perm`` (pack.py documents the format);
- ``plan.json``: per distinct weight shape and token bucket the chosen backend and its configuration,
  the measured time of every candidate, the device, versions, and the skipped layers with reasons.

Without CUDA (or with device="cpu") it packs and writes a CPU-reference plan: plan["device"] == "cpu",
plan["measured"] is False and plan["reason"] says why; every bucket then uses the reference backend.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esparse.errors import ConfigError, DataError
from esparse.io import atomic_path, sha256_file, write_json

from .pack import Packed24, is_24, pack_24

# the benchmark's buckets plus 32 (batch-32 decode; the decode kernel's largest token count)
DEFAULT_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 256, 2048, 8192)
PLAN_VERSION = 1
PACKED_FILE = "packed.safetensors"
PLAN_FILE = "plan.json"


def _model_files(model_dir: Path) -> list[Path]:
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    raise DataError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")


class _TensorSource:
    """Lazy access to tensors spread over safetensors files (no full load of large models)."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    self._where[key] = path

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self._where[key]), framework="pt") as fh:
            return fh.get_tensor(key)


def read_sparsity(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Masks and permutations by module name from sparsity.safetensors."""
    path = model_dir / "sparsity.safetensors"
    if not path.is_file():
        raise DataError(f"{path} not found: the kernel build needs the pruned model's masks")
    masks, perms = {}, {}
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():
            if key.endswith(".mask"):
                masks[key[: -len(".mask")]] = fh.get_tensor(key)
            elif key.endswith(".perm"):
                perms[key[: -len(".perm")]] = fh.get_tensor(key)
    if not masks:
        raise DataError(f"{path} holds no '<module>.mask' tensors")
    return masks, perms


def pack_model(model_dir: str | Path) -> tuple[dict[str, Packed24], dict[str, str]]:
    """Pack every 2:4 linear of the pruned model; returns (packed by name, skipped name -> reason)."""
    model_dir = Path(model_dir)
    masks, perms = read_sparsity(model_dir)
    source = _TensorSource(_model_files(model_dir))
    packed: dict[str, Packed24] = {}
    skipped: dict[str, str] = {}
    for name in sorted(masks):
        mask = masks[name].to(torch.bool)
        key = f"{name}.weight"
        if key not in source:
            skipped[name] = f"weight {key!r} not in the model files"
            continue
        weight = source.get(key)
        if weight.shape != mask.shape:
            skipped[name] = f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}"
            continue
        if weight.dtype not in (torch.float16, torch.bfloat16):
            weight = weight.to(torch.float16)
        perm = perms.get(name)
        if weight.shape[1] % 4 != 0:
            skipped[name] = f"in_features={weight.shape[1]} is not a multiple of 4"
            continue
        if not is_24(mask, perm):
            skipped[name] = "mask is not 2:4 in its " + ("permuted" if perm is not None else "stored") + " column order"
            continue
        packed[name] = pack_24(weight, mask, perm)
    return packed, skipped


def save_packed(path: Path, packed: dict[str, Packed24]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, p in packed.items():
        tensors.update(p.to("cpu").state_dict(prefix=f"{name}."))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "esparse-2of4-v1"})


def load_packed(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Packed24]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"packed weights {path} not found (run esparse_kernels.build first)")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as fh:
        for key in fh.keys():
            tensors[key] = fh.get_tensor(key)
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    return {name: Packed24.from_state_dict(tensors, prefix=f"{name}.") for name in names}


def _check_buckets(token_buckets) -> tuple[int, ...]:
    buckets = tuple(int(t) for t in token_buckets)
    if not buckets or any(t < 1 for t in buckets) or list(buckets) != sorted(set(buckets)):
        raise ConfigError(f"token_buckets must be increasing positive integers, got {token_buckets!r}")
    return buckets


def _shape_key(p: Packed24) -> str:
    return f"{p.out_features}x{p.in_features}:{str(p.dtype).replace('torch.', '')}"


def _reference_bucket() -> dict:
    return {"backend": "reference", "config": {}, "median_us": None, "sparse_only": {"backend": "reference"},
            "candidates": []}


def tune_shape(p: Packed24, buckets: tuple[int, ...], device: torch.device, reps: int, log,
               include_cslt: bool = True, include_triton: bool = True) -> dict:
    """Autotune one packed shape for every token bucket on `device`: the plan entries per bucket."""
    from .autotune import SPARSE_BACKENDS, ShapeBench, best_of, tune_tokens
    from .pack import unpack_24

    n_sms = torch.cuda.get_device_properties(device).multi_processor_count
    dev_packed = p.to(device)
    bench = ShapeBench(weight=unpack_24(dev_packed).contiguous(), packed=dev_packed, reps=reps)
    out = {}
    for t in buckets:
        meas = tune_tokens(bench, t, n_sms, include_cslt=include_cslt, log=log, include_triton=include_triton)
        best = best_of(meas, ("dense",) + SPARSE_BACKENDS)
        best_sparse = best_of(meas, SPARSE_BACKENDS)
        cands = [m.to_dict() for m in meas]
        entry = {"candidates": cands}
        for key, m in (("best", best), ("sparse_only", best_sparse)):
            entry[key] = None if m is None else {
                "backend": m.backend, "config": m.config, "label": m.label, "median_us": m.timing.median_us}
        entry["backend"] = best.backend if best else "reference"
        entry["config"] = best.config if best else {}
        entry["median_us"] = best.timing.median_us if best else None
        dense = next((m for m in meas if m.backend == "dense" and m.timing), None)
        entry["dense_us"] = dense.timing.median_us if dense else None
        out[str(t)] = entry
    bench.release()
    del bench
    release_cublas_workspaces()
    return out


def release_cublas_workspaces() -> None:
    """Free cuBLAS's per-stream workspaces (about 32 MiB each, one per stream that ran a GEMM, kept by
    PyTorch for the process's life) and return cached blocks: tuning times cuBLAS on many capture and
    side streams, and without this their workspaces stay allocated next to the model."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()


def build_kernels(pruned_model_dir: str | Path, out_dir: str | Path,
                  token_buckets=DEFAULT_TOKEN_BUCKETS, device: str | torch.device | None = None,
                  tune_reps: int = 10, log=None, include_cslt: bool = True, include_triton: bool = True) -> dict:
    """Pack the pruned model's 2:4 linears, autotune on `device` (default: CUDA if available), write
    packed.safetensors and plan.json into out_dir; returns the plan."""
    from .env import device_info, software_versions

    model_dir = Path(pruned_model_dir)
    out = Path(out_dir)
    buckets = _check_buckets(token_buckets)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} requested but torch.cuda.is_available() is False")
    packed, skipped = pack_model(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_packed(out / PACKED_FILE, packed)
    layers_by_shape: dict[str, list[str]] = {}
    for name, p in packed.items():
        layers_by_shape.setdefault(_shape_key(p), []).append(name)
    measured = device.type == "cuda"
    plan: dict = {
        "plan_version": PLAN_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_dir": str(model_dir),
        "inputs": {"sparsity.safetensors": sha256_file(model_dir / "sparsity.safetensors")},
        "packed_file": PACKED_FILE,
        "packed_sha256": sha256_file(out / PACKED_FILE),
        "token_buckets": list(buckets),
        "device": "cuda" if measured else "cpu",
        "device_info": device_info(device),
        "measured": measured,
        "versions": software_versions(),
        "layers": {name: {"shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                          "permuted": p.perm is not None, "shape_key": _shape_key(p)}
                   for name, p in packed.items()},
        "skipped": skipped,
        "candidates_included": {"cusparselt": include_cslt, "triton": include_triton},
        "shapes": {},
    }
    if not measured:
        plan["reason"] = ("no CUDA device: torch.cuda.is_available() is False" if not torch.cuda.is_available()
                          else f"device={device} requested")
        plan["timing_method"] = None
    else:
        plan["timing_method"] = ("CUDA-graph replay of a rotation over copies spanning > 4.5x L2 (at most 256), "
                                 f"median of {tune_reps} replays")
    for key, names in layers_by_shape.items():
        p = packed[names[0]]
        entry = {"out_features": p.out_features, "in_features": p.in_features, "layers": names}
        if measured:
            if log:
                log(f"tuning {key} ({len(names)} layers)")
            entry["buckets"] = tune_shape(p, buckets, device, tune_reps, log, include_cslt, include_triton)
        else:
            entry["buckets"] = {str(t): _reference_bucket() for t in buckets}
        plan["shapes"][key] = entry
    write_json(out / PLAN_FILE, plan)
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m esparse_kernels.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--tokens", default=",".join(map(str, DEFAULT_TOKEN_BUCKETS)),
                    help="token buckets, comma-separated increasing integers")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--tune-reps", type=int, default=10)
    ap.add_argument("--no-cusparselt", action="store_true", help="leave cuSPARSELt out of the candidates")
    ap.add_argument("--no-triton", action="store_true", help="leave the Triton kernels out of the candidates")
    args = ap.parse_args(argv)
    try:
        buckets = tuple(int(t) for t in args.tokens.split(",") if t.strip())
    except ValueError as exc:
        raise ConfigError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from exc
    plan = build_kernels(args.model_dir, args.out_dir, buckets, args.device, args.tune_reps,
                         log=lambda s: print(s, flush=True), include_cslt=not args.no_cusparselt,
                         include_triton=not args.no_triton)
    print(f"packed {len(plan['layers'])} layers ({len(plan['skipped'])} skipped) into {args.out_dir}; "
          f"plan device={plan['device']} measured={plan['measured']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
