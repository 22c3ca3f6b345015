"""esparse-bench: reproducible post-training N:M sparsity benchmarks (E-Sparse and baselines)."""

__version__ = "0.1.0"
