"""Sparse 2:4 kernels for the suite: packed format, Triton decode/prefill kernels, autotuned build plans.

- ``pack``: the packed 2:4 format (values + 2-bit indices + optional permutation), exact round trip.
- ``triton_sp24``: Triton kernels (few-token gather kernel, tensor-core kernel, decompression).
- ``cuda_sp24``: CUDA C++ decode kernel (1-32 tokens) on the sparse tensor cores (``mma.sp``), a
  PyTorch extension compiled on first use from ``csrc/``.
- ``build``: ``build_kernels(pruned_model_dir, out_dir, token_buckets, device)`` and its CLI.
- ``linear``: ``SparseLinear`` and ``swap_sparse_linears(model, build_dir)``.
- ``bench``: the benchmark CLI (``python -m esparse_kernels.bench``); ``selfcheck``: GPU exactness check.

Modules that need Triton or CUDA are imported lazily, so ``import esparse_kernels`` stays light.
"""

from .pack import Packed24, is_24, pack_24, reference_linear, unpack_24, unpack_24_permuted

__all__ = [
    "Packed24", "is_24", "pack_24", "unpack_24", "unpack_24_permuted", "reference_linear",
    "build_kernels", "SparseLinear", "swap_sparse_linears",
]


def __getattr__(name: str):
    if name == "build_kernels":
        from .build import build_kernels

        return build_kernels
    if name in ("SparseLinear", "swap_sparse_linears"):
        from . import linear

        return getattr(linear, name)
    raise AttributeError(f"module 'esparse_kernels' has no attribute {name!r}")
