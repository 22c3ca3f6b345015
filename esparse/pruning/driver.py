"""The block-by-block pruning driver, shared by every method.

Calibration inputs of block i are the outputs of blocks 0..i-1 *after* they were pruned (the
Wanda/SparseGPT sequential protocol). With one `device`, only one block lives on it at a time and
the rest of the model stays where it was loaded (CPU), so models larger than the device prune too.
With a `placement` (esparse.placement), block i runs on its compute device and then stays on its
home device: resident across several GPUs, or offloaded to the CPU when it fits on none; the
calibration activations follow the blocks from device to device.

The driver knows nothing about any method: it asks the method which statistics it needs
(`method.needs`, `method.entropy_bins`), streams them through forward hooks, and hands each
linear's weight and statistics to `method.prune_layer`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import cpu_kernels
from ..models import find_decoder_blocks, find_linears
from ..placement import BlockPlacement, to_device
from ..stats import ScratchPool, StatsAccumulator
from .methods import PruningMethod, check_layer_result
from .pattern import SparsityPattern, check_layer_width

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class PruneOutcome:
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    perms: dict[str, torch.Tensor] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _block_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _move_non_block_parameters(model: nn.Module, blocks_prefix: str, device: torch.device) -> None:
    """Move embeddings, final norms, rotary buffers etc. to `device`, leaving the blocks alone."""
    skip = blocks_prefix + "."
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(skip):
            tensor.data = tensor.data.to(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, device: torch.device, store_device: torch.device):
    """Run the model up to its first decoder block; return the hidden states and block kwargs."""
    blocks_prefix, blocks = find_decoder_blocks(model)
    _move_non_block_parameters(model, blocks_prefix, device)
    captured: dict = {}
    hidden = []

    def hook(module, args, kwargs):
        state = args[0] if args else kwargs["hidden_states"]
        hidden.append(state.to(store_device))
        if "kwargs" not in captured:
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in tokens:
            try:
                model(input_ids=row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return torch.cat(hidden, dim=0), captured["kwargs"]


def _run_block(block, inputs: torch.Tensor, kwargs: dict, device, outputs: torch.Tensor | None = None):
    for index in range(inputs.shape[0]):
        out = _block_output(block(inputs[index:index + 1].to(device), **kwargs))
        if outputs is not None:
            outputs[index:index + 1] = out.to(outputs.device)


@torch.no_grad()
def _shared_input_groups(block, linears: dict[str, nn.Linear], sample: torch.Tensor, kwargs: dict,
                         device) -> dict[str, list[str]]:
    """Group linears that read the very same input tensor (e.g. q/k/v, gate/up), so their statistics
    are accumulated once. Found by running one calibration sequence through the block."""
    # Hold the input tensors themselves: while they are alive, no later tensor can reuse their
    # memory, so identity (not a data pointer that the allocator may hand out again) decides.
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0])
        return hook

    handles = [linear.register_forward_hook(record(name)) for name, linear in linears.items()]
    try:
        _run_block(block, sample, kwargs, device)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[str, list[str]] = {}
    for name in linears:
        if name not in seen:
            raise RuntimeError(f"linear {name!r} was not called during the block's forward pass")
        leader = next((other for other in groups if seen[other] is seen[name]), name)
        groups.setdefault(leader, []).append(name)
    return groups


DEFAULT_STATS_CACHE_BYTES = 4 * 2**30
_CUDA_CACHE_SHARE_OF_FREE = 0.5


def stats_cache_budget(device: torch.device, configured: int | None) -> int:
    """Bytes of linear inputs a block may hold between the two statistics passes: `configured`, or by
    default 4 GiB, raised on a GPU to half of its free memory (the other half stays for the forward),
    where a second forward pass is the larger cost."""
    if configured is not None:
        return configured
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(DEFAULT_STATS_CACHE_BYTES, int(free * _CUDA_CACHE_SHARE_OF_FREE))
    return DEFAULT_STATS_CACHE_BYTES


def _kept_input(x: torch.Tensor, store_device: torch.device) -> tuple[torch.Tensor, int]:
    """A linear's input held for the replay, with its version counter at capture.

    The block's forward creates a fresh tensor for every linear input, so one that owns its whole
    storage and already lives on `store_device` is held as it is (the version counter shows any
    later in-place write); anything else (another device, a view into a larger buffer) is copied.
    """
    x = x.detach()
    owns_storage = x.is_contiguous() and x.untyped_storage().nbytes() == x.numel() * x.element_size()
    if x.device == store_device and owns_storage:
        return x, x._version
    copy = x.to(store_device, copy=True)
    return copy, copy._version


def _accumulate_statistics(block, linears, accumulators: dict[str, StatsAccumulator], inputs: torch.Tensor,
                           block_kwargs: dict, device, store_device, cache_bytes: int) -> None:
    """Stream every accumulator's statistics from the block's calibration forward pass.

    Statistics with a range pass (entropy) see the same inputs twice. When the inputs of the block's
    linears fit in `cache_bytes` they are held (`_kept_input`) during the range pass and replayed, in
    the same batch order, for the main pass, so the result is bit-identical to a second forward pass
    that the cache saves (one forward instead of two per block).
    """
    two_pass = any(acc.needs_range_pass for acc in accumulators.values())
    tokens = inputs.shape[0] * inputs.shape[1]
    needed = sum(tokens * linears[leader].in_features for leader in accumulators) * inputs.element_size()
    cache: dict[str, list[tuple[torch.Tensor, int]]] | None = {leader: [] for leader in accumulators} \
        if two_pass and needed <= cache_bytes else None
    if two_pass and cache is None:
        log.info("statistics: %.2f GiB of block inputs exceed the cache (%.2f GiB): second forward pass",
                 needed / 2**30, cache_bytes / 2**30)

    def range_hook(leader, acc):
        def hook(module, args, output):
            acc.observe_range(args[0])
            if cache is not None:
                cache[leader].append(_kept_input(args[0], store_device))
        return hook

    def main_hook(acc):
        return lambda module, args, output: acc.observe(args[0], sequences=args[0].shape[0])

    def forward_with(hooks: dict[str, object]) -> None:
        handles = [linears[leader].register_forward_hook(hook) for leader, hook in hooks.items()]
        try:
            _run_block(block, inputs, block_kwargs, device)
        finally:
            for handle in handles:
                handle.remove()

    if two_pass:
        forward_with({leader: range_hook(leader, acc) for leader, acc in accumulators.items()})
    if cache is None:
        forward_with({leader: main_hook(acc) for leader, acc in accumulators.items()})
        return
    written = sorted(leader for leader, batches in cache.items()
                     if any(batch._version != version for batch, version in batches))
    if written:
        # A model that writes into a linear's input after the linear read it: the held tensors no
        # longer hold what the linear saw, so the statistics come from a second forward pass.
        log.warning("statistics: the inputs of %s were modified in place after use: second forward pass",
                    ", ".join(written))
        cache.clear()
        forward_with({leader: main_hook(acc) for leader, acc in accumulators.items()})
        return
    for leader, acc in accumulators.items():
        for batch, _ in cache.pop(leader):
            # held since the range pass and checked unwritten above: nothing writes them before finalize
            acc.observe(batch, sequences=batch.shape[0], unchanged_until_finalize=True)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def single_device_placement(blocks: nn.ModuleList, device: torch.device) -> BlockPlacement:
    """Every block runs on `device` and goes back to where it was loaded afterwards."""
    homes = tuple(next(block.parameters()).device for block in blocks)
    return BlockPlacement(compute=(device,) * len(blocks), home=homes)


@torch.no_grad()
def prune_model(model: nn.Module, method: PruningMethod, pattern: SparsityPattern,
                calibration_tokens: torch.Tensor | None, device: str | torch.device = "cpu",
                offload_activations: bool = False, progress: bool = True,
                stats_cache_bytes: int | None = None,
                placement: BlockPlacement | None = None, max_blocks: int | None = None) -> PruneOutcome:
    """Prune every nn.Linear inside the decoder blocks of `model` in place.

    `placement` (esparse.placement.plan_placement) spreads blocks over several devices; without it
    every block runs on `device`. `stats_cache_bytes` bounds the block's linear inputs held between
    the two passes of statistics that need a fixed range first (entropy); above it the block runs
    forward twice (None: `stats_cache_budget`). `max_blocks` prunes only the first blocks (memory
    and speed studies of models too large to finish; the summary says how many were pruned).
    """
    start = time.perf_counter()
    blocks_prefix, blocks = find_decoder_blocks(model)
    placed = placement is not None
    if placement is None:
        placement = single_device_placement(blocks, torch.device(device))
    elif len(placement.compute) != len(blocks):
        raise ValueError(f"the placement covers {len(placement.compute)} blocks, the model has {len(blocks)}")
    if max_blocks is not None and not (isinstance(max_blocks, int) and 1 <= max_blocks <= len(blocks)):
        raise ValueError(f"max_blocks must be an integer in 1..{len(blocks)}, got {max_blocks!r}")
    device = placement.first_device
    store_device = torch.device("cpu") if offload_activations else device
    for compute_device in placement.devices:
        if compute_device.type == "cuda":
            torch.cuda.init()  # the allocator's per-device stats exist only after CUDA's lazy init
            torch.cuda.reset_peak_memory_stats(compute_device)
    needs = frozenset(method.needs)
    uses_calibration = bool(needs)
    if uses_calibration:
        if calibration_tokens is None:
            raise ValueError(f"method {method.name!r} needs calibration data but none was given")
        inputs, first_kwargs = capture_block_inputs(model, calibration_tokens, device, store_device)
        outputs = torch.empty_like(inputs)
        kwargs_on = {device: first_kwargs}
    outcome = PruneOutcome()
    scratch = ScratchPool()  # histogram buffers, reused layer after layer and block after block
    kept_total = 0
    weights_total = 0
    selected = list(blocks)[:max_blocks] if max_blocks is not None else list(blocks)
    for index, block in enumerate(tqdm(selected, desc=f"prune {method.name} {pattern.label}", disable=not progress,
                                       mininterval=10)):
        block_start = time.perf_counter()
        device = placement.compute[index]
        block.to(device)
        if uses_calibration:
            if not offload_activations and inputs.device != device:
                inputs, outputs = inputs.to(device), torch.empty(inputs.shape, dtype=inputs.dtype, device=device)
            if device not in kwargs_on:
                kwargs_on[device] = to_device(first_kwargs, device)
            block_kwargs = kwargs_on[device]
        linears = find_linears(block)
        for name, linear in linears.items():
            check_layer_width(pattern, linear.in_features)
        stats = {}
        if uses_calibration:
            groups = _shared_input_groups(block, linears, inputs[:1], block_kwargs, device)
            accumulators = {
                leader: StatsAccumulator(linears[leader].in_features, needs, method.entropy_bins or 0, device,
                                         scratch=scratch)
                for leader in groups
            }
            _accumulate_statistics(block, linears, accumulators, inputs, block_kwargs, device,
                                   inputs.device, stats_cache_budget(inputs.device, stats_cache_bytes))
            for leader, members in groups.items():
                shared = accumulators[leader].finalize()
                stats.update({member: shared for member in members})
            del accumulators
        for name, linear in linears.items():
            layer_start = time.perf_counter()
            result = method.prune_layer(linear.weight.data, stats.get(name), pattern)
            check = check_layer_result(result, pattern)  # raises if the pattern or the zeros are wrong
            linear.weight.data.copy_(result.weight)
            full_name = f"{blocks_prefix}.{index}.{name}"
            mask = result.mask.to("cpu", torch.bool)
            perm = None if result.perm is None else result.perm.to("cpu", torch.int64)
            outcome.masks[full_name] = mask
            if perm is not None:
                outcome.perms[full_name] = perm
            kept = int(mask.sum())
            kept_total += kept
            weights_total += mask.numel()
            outcome.layers.append({
                "name": full_name,
                "shape": list(linear.weight.shape),
                "sparsity": 1.0 - kept / mask.numel(),
                "mask_check": check,
                "shuffle_efficacy": result.kept_score_ratio,
                "seconds": time.perf_counter() - layer_start,
                **({"extra": result.extra} if result.extra else {}),
            })
        del stats
        if uses_calibration:
            _run_block(block, inputs, block_kwargs, device, outputs)
            inputs, outputs = outputs, inputs
        block.to(placement.home[index])
        log.info("block %d pruned on %s in %.2fs", index, device, time.perf_counter() - block_start)
    peaks = {str(d): _peak_memory_bytes(d) for d in placement.devices}
    outcome.summary = {
        "method": method.name,
        "pattern": pattern.label,
        "layers": len(outcome.layers),
        "achieved_sparsity": 1.0 - kept_total / max(weights_total, 1),
        "weights_in_pruned_layers": weights_total,
        "seconds": time.perf_counter() - start,
        # One device: its peak. Several: the largest per-device peak (what must fit), all of them below.
        "peak_memory_bytes": max(peaks.values()),
        "peak_memory_kind": " / ".join(sorted({"cuda max_memory_allocated" if d.type == "cuda" else "process max RSS"
                                              for d in placement.devices})),
        "device": ",".join(peaks),
        "calibration_used": uses_calibration,
        # what computed the statistics and shuffles on CPU devices: it moves the pruning time, not the masks
        "cpu_kernels": cpu_kernels.describe(),
    }
    if placed:
        outcome.summary["peak_memory_bytes_by_device"] = peaks
        outcome.summary["placement"] = placement.describe()
    if max_blocks is not None and max_blocks < len(blocks):
        outcome.summary["blocks_pruned"] = max_blocks
        outcome.summary["blocks_total"] = len(blocks)
    return outcome
