"""Where each decoder block lives and runs when a model is pruned or evaluated on several devices.

The sequential pruning protocol processes one block at a time, so several GPUs buy memory, not
parallelism: the blocks are split into contiguous runs, one per compute device, as evenly as the
devices' budgets allow, and stay resident there (no host round trip per block, and the pruned model
is already placed for evaluation). Blocks that fit on no device are offloaded: they live on the CPU
and visit a compute device only while they are processed. Everything outside the blocks (embeddings,
final norm, head, rotary tables) sits on the first device, so tied input/output embeddings stay one
tensor.

`plan_placement` is a pure function of block sizes and budgets; `parse_devices` and
`device_budgets` turn configuration and the machine into its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError

CPU = torch.device("cpu")
# Of a GPU's free memory, the share resident blocks may take; the rest is working memory (the block
# being processed, calibration activations, statistics, allocator slack).
DEFAULT_RESIDENT_FRACTION = 0.8


@dataclass(frozen=True)
class BlockPlacement:
    """Block i runs on `compute[i]` and stays on `home[i]` between uses (== compute, or cpu: offloaded)."""

    compute: tuple[torch.device, ...]
    home: tuple[torch.device, ...]
    budgets: tuple[tuple[str, int | None], ...] = ()

    @property
    def devices(self) -> list[torch.device]:
        """The distinct compute devices, first use first."""
        return list(dict.fromkeys(self.compute))

    @property
    def first_device(self) -> torch.device:
        return self.compute[0]

    def offloaded(self) -> list[int]:
        return [i for i, (run, home) in enumerate(zip(self.compute, self.home)) if run != home]

    def describe(self) -> dict:
        """JSON-ready: block ranges per device and the offloaded blocks (for prune records and logs)."""
        ranges: dict[str, list[list[int]]] = {}
        for index, device in enumerate(self.home):
            spans = ranges.setdefault(str(device), [])
            if spans and spans[-1][1] == index - 1:
                spans[-1][1] = index
            else:
                spans.append([index, index])
        return {
            "compute_devices": [str(d) for d in self.devices],
            "blocks_by_home_device": ranges,
            "offloaded_blocks": self.offloaded(),
            "resident_budget_bytes": {name: budget for name, budget in self.budgets},
        }


def parse_devices(spec: str | Sequence[str] | torch.device, cuda_count: int | None = None) -> list[torch.device]:
    """Compute devices from configuration.

    `cpu`; `cuda` (every visible GPU, e.g. the ones a multi-GPU lease exposed); `cuda:K`; `auto`
    (every visible GPU, else cpu); or a list/comma-separated string of those, in order.
    """
    if cuda_count is None:
        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(spec, torch.device):
        items = [str(spec)]
    elif isinstance(spec, str):
        items = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        items = [str(part).strip() for part in spec]
    if not items:
        raise ConfigError("no compute device given: allowed cpu, cuda, cuda:K, auto or a list of them")
    devices: list[torch.device] = []
    for item in items:
        if item == "auto":
            devices += [torch.device("cuda", k) for k in range(cuda_count)] or [CPU]
        elif item == "cuda":
            if cuda_count == 0:
                raise ConfigError("device 'cuda' requested but no CUDA device is visible; use 'auto' or 'cpu'")
            devices += [torch.device("cuda", k) for k in range(cuda_count)]
        elif item == "cpu":
            devices.append(CPU)
        elif item.startswith("cuda:") and item[5:].isdigit():
            index = int(item[5:])
            if index >= cuda_count:
                raise ConfigError(f"device {item!r} does not exist: {cuda_count} CUDA device(s) visible "
                                  f"(cuda:0..cuda:{cuda_count - 1})" if cuda_count else
                                  f"device {item!r} requested but no CUDA device is visible")
            devices.append(torch.device("cuda", index))
        else:
            raise ConfigError(f"unknown device {item!r}: allowed cpu, cuda, cuda:K, auto, or a comma-separated list")
    if len(set(devices)) != len(devices):
        raise ConfigError(f"device list {[str(d) for d in devices]} names a device twice")
    return devices


def parse_bytes(text: str | int | float) -> int:
    """'40GiB', '512MiB', '2GB' or a number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"memory budget {text!r} is negative")
        return int(text)
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1}
    raw = str(text).strip().lower().replace(" ", "")
    for unit in sorted(units, key=len, reverse=True):
        if raw.endswith(unit):
            number = raw[: -len(unit)]
            try:
                value = float(number)
            except ValueError:
                break
            if value < 0 or not math.isfinite(value):
                break
            return int(value * units[unit])
    raise ConfigError(f"memory budget {text!r} is not a size: use e.g. '40GiB', '512MiB' or a byte count")


def device_budgets(devices: Sequence[torch.device], max_memory: Mapping[str, str | int] | None = None,
                   resident_fraction: float = DEFAULT_RESIDENT_FRACTION) -> dict[torch.device, int | None]:
    """Bytes of resident blocks each device may hold: `max_memory[str(device)]` when given, else
    `resident_fraction` of a GPU's free memory now; None (unbounded) for the CPU."""
    max_memory = dict(max_memory or {})
    unknown = set(max_memory) - {str(d) for d in devices}
    if unknown:
        raise ConfigError(f"max_memory names {sorted(unknown)}, which are not compute devices "
                          f"{[str(d) for d in devices]}")
    budgets: dict[torch.device, int | None] = {}
    for device in devices:
        if str(device) in max_memory:
            budgets[device] = parse_bytes(max_memory[str(device)])
        elif device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            budgets[device] = int(free * resident_fraction)
        else:
            budgets[device] = None
    return budgets


def plan_placement(block_bytes: Sequence[int], devices: Sequence[torch.device],
                   budgets: Mapping[torch.device, int | None] | None = None) -> BlockPlacement:
    """Split blocks into contiguous runs, one per device in device order, as evenly as budgets allow.

    A device's capacity is its budget over the largest block (blocks of a model share one shape, and
    the bound keeps every run within budget whatever the sizes). Counts are water-filled: devices
    with the least capacity take all they can, the others split the rest evenly. Blocks that fit
    nowhere are offloaded (home cpu) and computed on the device with the most capacity left.
    """
    if not devices:
        raise ConfigError("plan_placement needs at least one compute device")
    budgets = dict(budgets or {})
    n = len(block_bytes)
    if n == 0:
        raise ConfigError("the model has no decoder blocks to place")
    if any(size < 0 for size in block_bytes):
        raise ConfigError(f"block sizes must be non-negative, got {list(block_bytes)}")
    largest = max(max(block_bytes), 1)
    limit = {d: budgets.get(d) for d in devices}
    capacity = {d: n if limit[d] is None else min(n, limit[d] // largest) for d in devices}
    counts = {}
    remaining = n
    by_capacity = sorted(devices, key=lambda d: (capacity[d], list(devices).index(d)))
    for position, device in enumerate(by_capacity):
        counts[device] = min(capacity[device], math.ceil(remaining / (len(by_capacity) - position)))
        remaining -= counts[device]
    compute: list[torch.device] = []
    for device in devices:
        compute += [device] * counts[device]
    home = list(compute)
    if remaining:
        spare = max(devices, key=lambda d: (capacity[d] - counts[d], -list(devices).index(d)))
        compute += [spare] * remaining
        home += [CPU] * remaining
    return BlockPlacement(tuple(compute), tuple(home), tuple((str(d), limit[d]) for d in devices))


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def to_device(value, device: torch.device):
    """Move tensors inside nested tuples/lists/dicts (block kwargs: masks, position embeddings)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def device_map(model: nn.Module, blocks_prefix: str, placement: BlockPlacement) -> dict[str, str]:
    """An accelerate device map: each block on its home device, everything else on the first device."""
    first = str(placement.first_device)
    mapping: dict[str, str] = {}
    path = blocks_prefix.split(".")
    module = model
    prefix = ""
    for part in path:
        for name, _child in module.named_children():
            if name != part:
                mapping[f"{prefix}{name}"] = first
        module = getattr(module, part)
        prefix = f"{prefix}{part}."
    for index, home in enumerate(placement.home):
        mapping[f"{blocks_prefix}.{index}"] = str(home)
    # Parameters or buffers held directly by the modules on the path (rare) go to the first device.
    owners = {"" if not path else ".".join(path[:k]) for k in range(len(path))}
    for owner in owners:
        holder = model.get_submodule(owner) if owner else model
        if any(True for _ in holder.named_parameters(recurse=False)) or any(True for _ in holder.named_buffers(recurse=False)):
            raise ConfigError(f"module {owner or '<root>'!r} holds tensors directly; cannot map it by blocks")
    return mapping


def dispatch(model: nn.Module, blocks_prefix: str, placement: BlockPlacement) -> nn.Module:
    """Place a (pruned) model for evaluation following `placement`: one device -> plain `.to()`,
    several or offloaded blocks -> accelerate's hooks move activations (and offloaded weights)."""
    if len(placement.devices) == 1 and not placement.offloaded():
        return model.to(placement.first_device)
    from accelerate import dispatch_model

    mapping = device_map(model, blocks_prefix, placement)
    return dispatch_model(model, device_map=mapping, main_device=str(placement.first_device))


def placement_for(model: nn.Module, device: str, max_memory: Mapping[str, str | int] | None = None
                  ) -> BlockPlacement | None:
    """The pipeline's placement: None (the one-device driver path, unchanged) unless `device` names
    several compute devices, e.g. `cuda` in a job that leased two GPUs, or `cuda:0,cpu`."""
    from .models import find_decoder_blocks

    devices = parse_devices(device)
    if len(devices) == 1 and not max_memory:
        return None
    _prefix, blocks = find_decoder_blocks(model)
    return plan_placement([module_bytes(block) for block in blocks], devices, device_budgets(devices, max_memory))
