"""Is the memory left after tuning cuBLAS's per-stream workspaces? Clear them and look."""
import gc

import torch

import esparse.profiling as profiling

settings = profiling.ProfileSettings(warmup=1, repeats=3, tune_reps=3)
device = torch.device("cuda:0")
gb = lambda: f"{torch.cuda.memory_allocated() / 1e9:.3f} GB"  # noqa: E731
from esparse_kernels.build import tune_shape  # noqa: E402

gen = torch.Generator(device=device).manual_seed(0)
p = profiling.random_packed_24(11008, 4096, False, gen, torch.float16, device)
print("one packed", gb())
for buckets in [(1,), (8,), (32,), (2048,), (16384,), tuple(settings.token_counts())]:
    tune_shape(p, buckets, device, 3, log=None, include_cslt=False, include_triton=False)
    gc.collect(); torch.cuda.synchronize()
    print("after tune_shape", buckets, gb())
torch._C._cuda_clearCublasWorkspaces()
gc.collect(); torch.cuda.synchronize(); torch.cuda.empty_cache()
print("after clearing cuBLAS workspaces", gb())
x = torch.randn(8, 4096, device=device, dtype=torch.float16)
w = torch.randn(4096, 4096, device=device, dtype=torch.float16)
for i in range(3):
    s = torch.cuda.Stream(device)
    with torch.cuda.stream(s):
        torch.mm(x, w)
    torch.cuda.synchronize()
    print("after mm on new stream", i, gb())
torch._C._cuda_clearCublasWorkspaces()
print("cleared again", gb())
