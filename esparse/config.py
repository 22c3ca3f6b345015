"""Configuration: defaults + preset + user overrides, validated before any job runs."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError, EsparseError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "workflow" / "config"
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


def _load_yaml(path: Path) -> Any:
    with open(path) as handle:
        return yaml.safe_load(handle)


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?)$")
_WORDS = {"true": True, "false": False, "null": None, "none": None, "~": None}


def parse_assignments(items: list[str], option: str, example: str) -> dict[str, str]:
    """`NAME=VALUE` command-line items (e.g. repeated `--config preset=default`) as a dict."""
    assignments = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r} is not NAME=VALUE (e.g. {example})")
        name, value = item.split("=", 1)
        assignments[name.strip()] = value.strip()
    return assignments


def parse_cli_values(value: Any) -> Any:
    """Snakemake's `--config key={a: 1}` hands nested scalars over as strings ('1'). Read plain numbers,
    true/false and null as such; every other string (e.g. a pattern "2:4") stays a string."""
    if isinstance(value, dict):
        return {key: parse_cli_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [parse_cli_values(item) for item in value]
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _WORDS:
            return _WORDS[text.lower()]
        if _NUMBER.match(text):
            return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
    return value


def available_presets() -> dict:
    return _load_yaml(CONFIG_DIR / "presets.yaml") or {}


def _format_schema_error(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(part) for part in error.absolute_path) or "(top level)"
    if error.validator == "enum":
        allowed = ", ".join(repr(v) for v in error.validator_value)
        return f"config {where}: {error.instance!r} is not allowed; allowed values: {allowed}"
    if error.validator == "additionalProperties":
        return f"config {where}: {error.message} (see workflow/schemas/config.schema.yaml)"
    return f"config {where}: {error.message}"


def resolve_config(user: dict | None = None, base_dir: str | Path | None = None) -> dict:
    """Merge config.yaml, the chosen preset and `user` overrides; validate; normalise paths."""
    user = parse_cli_values(dict(user or {}))
    base = _load_yaml(CONFIG_DIR / "config.yaml")
    presets = available_presets()
    preset = user.get("preset", base.get("preset"))
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}: allowed presets are {', '.join(sorted(presets))}")
    config = deep_merge(deep_merge(base, presets[preset] or {}), user)
    config["preset"] = preset
    validator = jsonschema.Draft202012Validator(_load_yaml(SCHEMA_PATH))
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_format_schema_error(errors[0]))
    base_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if config.get("data_mirror"):
        mirror = (base_dir / config["data_mirror"]).resolve()
        if not (mirror / "SHA256SUMS").is_file():
            raise ConfigError(f"data_mirror {config['data_mirror']!r} ({mirror}) is not a data mirror: no SHA256SUMS there")
        config["data_mirror"] = str(mirror)
    validate_semantics(config)
    if config.get("data_mirror"):
        verify_mirror_inputs(config)
    return config


def validate_semantics(config: dict) -> None:
    """Checks a schema cannot express: patterns, method settings, model names, context lengths."""
    from .models import REGISTRY, describe_model_ref
    from .pruning.methods import build_method
    from .pruning.pattern import SparsityPattern

    try:
        for pattern in config["patterns"] + [config["ablation"]["pattern"]]:
            SparsityPattern.parse(pattern)
        for method in config["methods"]:
            if method != "dense":
                build_method(method, config["method_settings"].get(method, {}))
        for ref in config["models"]:
            describe_model_ref(ref)
            if ref in REGISTRY:
                context = REGISTRY[ref].context_length
                for section in ("calibration", "perplexity"):
                    seqlen = config[section]["seqlen"]
                    if seqlen > context:
                        raise ConfigError(
                            f"{section}.seqlen {seqlen} exceeds the context length {context} of model {ref!r}"
                        )
    except ConfigError:
        raise
    except EsparseError as error:
        raise ConfigError(str(error)) from error
    slugs = [SparsityPattern.parse(p).slug for p in config["patterns"]]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"patterns {config['patterns']} name the same pattern twice")
    check_profile_targets(config)


def check_profile_targets(config: dict) -> None:
    """Each profiling target is a model of this run (real weights) or a known shape (random weights)."""
    from .decoder import PROFILE_SHAPES
    from .models import model_slug

    models = {model_slug(ref) for ref in config["models"]}
    for target in config["profiling"]["targets"]:
        if target not in models and target not in PROFILE_SHAPES:
            raise ConfigError(
                f"profiling target {target!r} is neither a model of this run ({', '.join(sorted(models))}) "
                f"nor a profile shape ({', '.join(PROFILE_SHAPES)})")


def datasets_used(config: dict) -> set[str]:
    used = {config["calibration"]["dataset"], config["perplexity"]["dataset"]}
    if config["ablation"]["enabled"]:
        used.add(config["ablation"]["dataset"])
    return used


def verify_mirror_inputs(config: dict) -> None:
    """Check every mirror file this run will read against SHA256SUMS before any job starts."""
    from .data import get_spec, verify_mirror_file

    for name in sorted(datasets_used(config)):
        for relpath in get_spec(name).mirror_files:
            verify_mirror_file(config["data_mirror"], relpath)


def export_package_path(repo_root: str | Path) -> None:
    """Put this checkout's packages on PYTHONPATH for jobs that run in other environments (conda, SLURM)."""
    import os

    entries = [str(Path(repo_root)), str(Path(repo_root) / "kernels")]
    existing = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in entries]
    os.environ.update(PYTHONPATH=os.pathsep.join(entries + existing))


def device_for(config: dict) -> str:
    import torch

    wanted = config.get("device", "auto")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    return wanted
