"""Where the 2:4 model's extra allocated memory comes from: memory_allocated around tuning and builds."""
import gc

import torch

import esparse.profiling as profiling
from esparse.decoder import PROFILE_SHAPES

settings = profiling.ProfileSettings(warmup=1, repeats=3, tune_reps=3)
device = torch.device("cuda:0")
gb = lambda: f"{torch.cuda.memory_allocated() / 1e9:.3f} GB"  # noqa: E731
print("start", gb())
from esparse_kernels.build import tune_shape  # noqa: E402

gen = torch.Generator(device=device).manual_seed(0)
p = profiling.random_packed_24(11008, 4096, False, gen, torch.float16, device)
print("one packed 11008x4096", gb(), "nbytes", p.nbytes() / 1e9)
plan = tune_shape(p, tuple(settings.token_counts()), device, 3, log=None, include_cslt=False, include_triton=False)
gc.collect(); torch.cuda.synchronize()
print("after tune_shape (all buckets)", gb())
plan1 = tune_shape(p, (1,), device, 3, log=None, include_cslt=False, include_triton=False)
gc.collect(); torch.cuda.synchronize()
print("after tune_shape (bucket 1)", gb())
plan16 = tune_shape(p, (16384,), device, 3, log=None, include_cslt=False, include_triton=False)
gc.collect(); torch.cuda.synchronize()
print("after tune_shape (bucket 16384)", gb())
del p
gc.collect(); torch.cuda.empty_cache()
print("after del packed", gb())
plans = {}
for attempt in range(2):
    model = profiling.build_variant("llama-7b", profiling.Variant("magnitude", "2:4", False, "random"), settings, device, plans)
    print(f"build {attempt}: allocated", gb(), "model bytes", profiling._model_bytes(model) / 1e9)
    del model
    gc.collect(); torch.cuda.empty_cache()
    print(f"after del model {attempt}", gb())
dense = profiling.build_variant("llama-7b", profiling.Variant("dense", "dense", False, "random"), settings, device, plans)
print("dense build", gb(), "model bytes", profiling._model_bytes(dense) / 1e9)
