"""Provenance: what every result carries (code version, config hash, versions, hardware, inputs)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "lm_eval", "snakemake", "datasets", "safetensors", "triton", "numba", "esparse-bench")
REPO_ROOT = Path(__file__).resolve().parents[1]


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON form of the resolved configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def software_versions() -> dict:
    versions = {"python": platform.python_version()}
    versions.update({name: _version(name) for name in PACKAGES})
    versions["cuda"] = torch.version.cuda
    cusparselt = None
    try:
        if torch.cuda.is_available() and hasattr(torch.backends, "cusparselt"):
            cusparselt = torch.backends.cusparselt.version()
    except (RuntimeError, AttributeError):
        cusparselt = None
    versions["cusparselt"] = cusparselt
    return versions


@functools.lru_cache(maxsize=1)
def hardware() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpus": [],
    }
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                info["gpus"].append({
                    "index": index,
                    "name": pynvml.nvmlDeviceGetName(handle),
                    "memory_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                })
        except Exception as error:  # NVML missing or refused: record why instead of guessing
            info["nvml_error"] = repr(error)
            info["gpus"] = [{"index": i, "name": torch.cuda.get_device_name(i)} for i in range(torch.cuda.device_count())]
    return info


def provenance(config: dict | None = None, rule: str | None = None, wildcards: dict | None = None,
               inputs: dict | None = None, seeds: dict | None = None, extra: dict | None = None) -> dict:
    """The provenance block of DESIGN.md; `inputs` maps a role to a sha256 (or a dict of them)."""
    block = {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code": code_version(),
        "config_sha256": config_hash(config) if config is not None else None,
        "rule": rule,
        "wildcards": wildcards or {},
        "software": software_versions(),
        "hardware": hardware(),
        "seeds": seeds or {},
        "inputs": inputs or {},
    }
    if extra:
        block.update(extra)
    return block
