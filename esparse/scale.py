"""Prune the first blocks of a LLaMA-shaped random model on the visible devices; record memory per device.

    esparse prune-scale --shape llama-65b --blocks 4 --method esparse --pattern 2:4 --devices cuda --out DIR

Models too large to ship (LLaMA-30B/65B) are studied with random weights of their real shapes: the
memory and time of calibration statistics and pruning depend on shapes, not values. Only the first
`--blocks` decoder blocks are built (block i of an 80-block model is the same computation as block i
of a 4-block one: the driver sees one block at a time), and the record says so. The model is built
on the CPU like a loaded checkpoint and placed by esparse.placement across `--devices` (several GPUs,
or one GPU with the blocks that do not fit offloaded to the CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from .decoder import PROFILE_SHAPES, DecoderShape
from .errors import ConfigError
from .io import sha256_tensor, write_json

log = logging.getLogger(__name__)


def random_llama(shape: DecoderShape, blocks: int, dtype: torch.dtype, seed: int = 0, max_positions: int = 4096):
    """A LlamaForCausalLM with `blocks` decoder blocks of `shape`, weights N(0, 0.02) (norms 1), on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if blocks < 1:
        raise ConfigError(f"--blocks must be at least 1, got {blocks}")
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         num_hidden_layers=blocks, vocab_size=shape.vocab, max_position_embeddings=max_positions,
                         rms_norm_eps=shape.rms_eps, rope_theta=shape.rope_theta,
                         tie_word_embeddings=shape.tied_embeddings, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    model.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1:
                parameter.fill_(1.0)  # RMSNorm weights
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    # The rotary table is a computed buffer, not a weight: rebuild it off the meta device.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def run_scale_study(shape_name: str, blocks: int, method_name: str, pattern_text: str, devices: str,
                    nsamples: int, seqlen: int, dtype_name: str, max_memory: dict | None, seed: int) -> dict:
    from .models import resolve_dtype
    from .placement import device_budgets, module_bytes, parse_devices, plan_placement
    from .profiling import nvml_snapshot
    from .pruning.driver import prune_model
    from .pruning.methods import build_method
    from .pruning.pattern import SparsityPattern
    from .models import find_decoder_blocks

    if shape_name not in PROFILE_SHAPES:
        raise ConfigError(f"unknown shape {shape_name!r}; allowed: {', '.join(sorted(PROFILE_SHAPES))}")
    shape = PROFILE_SHAPES[shape_name]
    if not 1 <= blocks <= shape.layers:
        raise ConfigError(f"--blocks {blocks} is outside 1..{shape.layers} (the blocks of {shape_name})")
    method = build_method(method_name, {})
    pattern = SparsityPattern.parse(pattern_text)
    compute_devices = parse_devices(devices)
    build_start = time.perf_counter()
    model = random_llama(shape, blocks, resolve_dtype(dtype_name), seed=seed)
    build_seconds = time.perf_counter() - build_start
    _prefix, block_list = find_decoder_blocks(model)
    sizes = [module_bytes(block) for block in block_list]
    placement = plan_placement(sizes, compute_devices, device_budgets(compute_devices, max_memory))
    tokens = torch.randint(0, shape.vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed + 1))
    gpus = [d for d in compute_devices if d.type == "cuda"]
    nvml_before = {str(d): nvml_snapshot(d.index or 0) for d in gpus}
    outcome = prune_model(model, method, pattern, tokens, placement=placement, progress=False)
    nvml_after = {str(d): nvml_snapshot(d.index or 0) for d in gpus}
    per_block: dict[int, float] = {}
    for layer in outcome.layers:
        index = int(layer["name"].split(".")[2])
        per_block[index] = per_block.get(index, 0.0) + layer["seconds"]
    return {
        "what": (f"calibration statistics and {pattern.label} pruning with {method.name} of the first {blocks} of "
                 f"{shape.layers} blocks of a {shape_name}-shape model with random weights (N(0, 0.02)); speed and "
                 "memory depend on shapes, not values; no quality figure is meaningful here"),
        "shape": shape_name, "hidden": shape.hidden, "intermediate": shape.intermediate,
        "blocks_pruned": blocks, "blocks_in_full_model": shape.layers,
        "block_bytes": sizes[0], "model_bytes_built": module_bytes(model),
        "method": method.name, "pattern": pattern.label, "dtype": dtype_name,
        "calibration": {"nsamples": nsamples, "seqlen": seqlen, "tokens": "random", "seed": seed + 1},
        "placement": placement.describe(),
        "summary": outcome.summary,
        "layer_seconds_per_block": [per_block[i] for i in sorted(per_block)],
        "layers": len(outcome.layers),
        "mask_checker": "passed on every pruned layer (the driver raises on the first failure)",
        "masks_sha256": sha256_tensor(torch.cat([m.flatten() for m in outcome.masks.values()])),
        "build_seconds": build_seconds,
        "nvml_before": nvml_before, "nvml_after": nvml_after,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda if torch.cuda.is_available() else None},
        "device_names": {str(d): torch.cuda.get_device_name(d) for d in gpus},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="llama-65b", help=f"one of {', '.join(sorted(PROFILE_SHAPES))}")
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks to build and prune (the first ones)")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--devices", default="auto",
                        help="compute devices: auto, cpu, cuda (every visible GPU), cuda:K, or a comma-separated list")
    parser.add_argument("--max-memory", action="append", default=[], metavar="DEVICE=SIZE",
                        help="resident-block budget of a device, e.g. cuda:0=20GiB (repeatable); "
                             "default 80%% of a GPU's free memory")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file to write")


def run_cli(args: argparse.Namespace) -> int:
    from .config import parse_assignments

    max_memory = parse_assignments(args.max_memory, "--max-memory", "cuda:0=20GiB")
    logging.getLogger("esparse").setLevel(logging.INFO)
    record = run_scale_study(args.shape, args.blocks, args.method, args.pattern, args.devices, args.nsamples,
                             args.seqlen, args.dtype, max_memory or None, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    summary = record["summary"]
    print(json.dumps({"shape": record["shape"], "blocks": record["blocks_pruned"], "method": record["method"],
                      "seconds": round(summary["seconds"], 2),
                      "peak_memory_bytes_by_device": summary.get("peak_memory_bytes_by_device"),
                      "placement": record["placement"]["blocks_by_home_device"]}, indent=1))
    return 0
