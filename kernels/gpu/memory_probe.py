"""Which CUDA tensors outlive the prefill cases of a 2:4 model (a diagnostic for the decode peak).

    PYTHONPATH=kernels:. python3 kernels/gpu/memory_probe.py --target llama-7b

Runs `measure_variant` on the magnitude 2:4 variant with the full profiling grid and, at the first
scratch release before the decode cases, lists the live CUDA tensors that are not the model's own
parameters and buffers, largest first, with memory_allocated before and after the release.
"""

from __future__ import annotations

import argparse
import gc
from collections import Counter

import torch

import esparse.profiling as profiling


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="llama-7b")
    args = parser.parse_args()
    settings = profiling.ProfileSettings(warmup=1, repeats=3, tune_reps=3)
    device = torch.device("cuda:0")
    original = profiling.release_scratch
    state = {"model_ptrs": set(), "done": False}
    build = profiling.build_variant

    def build_and_remember(*a, **kw):
        model = build(*a, **kw)
        state["model_ptrs"] = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        print(f"after build: allocated {torch.cuda.memory_allocated() / 1e9:.3f} GB")
        return model

    def release_and_dump():
        if not state["done"]:
            before = torch.cuda.memory_allocated()
            original()
            gc.collect()
            torch.cuda.synchronize()
            after = torch.cuda.memory_allocated()
            print(f"at the first decode case: allocated {before / 1e9:.3f} GB before release, {after / 1e9:.3f} after")
            live = Counter()
            for obj in gc.get_objects():
                try:
                    if torch.is_tensor(obj) and obj.is_cuda and obj.data_ptr() not in state["model_ptrs"]:
                        live[(tuple(obj.shape), str(obj.dtype))] += obj.untyped_storage().nbytes()
                except Exception:
                    pass
            for (shape, dtype), nbytes in live.most_common(15):
                print(f"  {nbytes / 1e6:10.1f} MB  {dtype} {shape}")
            print(f"  total non-model tensors: {sum(live.values()) / 1e9:.3f} GB")
            state["done"] = True
        else:
            original()

    profiling.release_scratch = release_and_dump
    profiling.build_variant = build_and_remember
    plans: dict = {}
    latency, memory = profiling.measure_variant(args.target, profiling.Variant("magnitude", "2:4", False, "random"),
                                                settings, device, plans)
    for row in memory:
        print(row["batch"], row["context"], "peak", row["max_memory_allocated"], "model", row["model_weight_bytes"],
              "kv", row["kv_cache_bytes"], "resident", row.get("resident_bytes"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
