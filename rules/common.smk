# Shared helpers for all rules: the resolved configuration and the output layout.
import sys
from pathlib import Path

from esparse.config import device_for, export_package_path, resolve_config
from esparse.errors import EsparseError
from esparse.gpu_lease import export_slots as export_gpu_slots
from esparse.models import model_slug
from esparse.pipeline import ablation_variants
from esparse.pruning.pattern import SparsityPattern

try:
    config = resolve_config(config, base_dir=workflow.basedir)
    DEVICE = device_for(config)
except EsparseError as error:
    sys.exit(f"esparse-bench: {error}")

# Jobs (local, conda or SLURM) import the package from this checkout.
export_package_path(workflow.basedir)
# `--resources gpu=K`: local GPU jobs lease one of the first K devices each (esparse/gpu_lease.py).
export_gpu_slots(getattr(workflow, "global_resources", None))
# GPUs per prune / perplexity / ablation job: with more than one, the job's model is placed block by
# block across them (esparse/placement.py). Other GPU rules use one device.
GPUS_PER_JOB = config["gpus_per_job"] if DEVICE == "cuda" else 0
# The pinned environment the rules run in with --sdm conda (relative to rules/).
RULE_ENV = "../envs/esparse-cuda.yaml" if DEVICE == "cuda" else "../envs/esparse-cpu.yaml"

RESULTS = config["results_dir"]
RESOURCES = config["resources_dir"]
MIRROR = config["data_mirror"]
MODELS = {model_slug(ref): ref for ref in config["models"]}
PATTERNS = {SparsityPattern.parse(p).slug: SparsityPattern.parse(p) for p in config["patterns"]}
PRUNING_METHODS = [m for m in config["methods"] if m != "dense"]


wildcard_constraints:
    model="|".join(MODELS),
    method="|".join(config["methods"]),
    pattern="|".join(list(PATTERNS) + ["dense"]),
    variant="[A-Za-z0-9_.+-]+",


def method_pattern_pairs():
    """(method, pattern slug) for every result: dense once, every pruning method at every pattern."""
    pairs = [("dense", "dense")] if "dense" in config["methods"] else []
    pairs += [(m, p) for m in PRUNING_METHODS for p in PATTERNS]
    return pairs


def evaluated_model_dir(wildcards):
    """The dense model for method 'dense', otherwise that method's pruned model."""
    if wildcards.method == "dense":
        return f"{RESOURCES}/models/{wildcards.model}"
    return f"{RESULTS}/pruned/{wildcards.model}/{wildcards.method}/{wildcards.pattern}"


def pattern_text(wildcards):
    return PATTERNS[wildcards.pattern].label


# --- profiling (rules/profile.smk) ---
PROFILE = config["profiling"]
# Real-weight variants of a registry model: the 2:4 models this run prunes without and with channel
# shuffle (Wanda; E-Sparse as configured), each with its kernel build.
PROFILE_SPARSE_METHODS = [m for m in ("wanda", "esparse") if m in PRUNING_METHODS and "2of4" in PATTERNS
                          and config["kernels"]["enabled"]]


def profile_inputs(wildcards):
    if wildcards.target not in MODELS:
        return {}  # a profile shape: random weights, no inputs
    inputs = {"dense": f"{RESOURCES}/models/{wildcards.target}"}
    for method in PROFILE_SPARSE_METHODS:
        inputs[method] = f"{RESULTS}/pruned/{wildcards.target}/{method}/2of4"
        inputs[f"{method}_kernels"] = f"{RESULTS}/kernels/{wildcards.target}/{method}/2of4/plan.json"
    return inputs
