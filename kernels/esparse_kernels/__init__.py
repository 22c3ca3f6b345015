"""Sparse 2:4 kernels (Triton decode, cuSPARSELt prefill), packing and autotuned build plans."""
