"""Block placement across devices (esparse.placement) and the driver running under a placement.

The planner is a pure function, property-tested. The driver and the evaluation dispatch are tested on
the CPU with one device and an explicit placement (the same code path a multi-GPU job takes), and on
CUDA, where present, with blocks split between the GPU and the CPU, so that activations and block
arguments really cross devices.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esparse.errors import ConfigError
from esparse.models import build_tiny_model, find_decoder_blocks
from esparse.perplexity import perplexity
from esparse.placement import (CPU, BlockPlacement, device_map, dispatch, module_bytes, parse_bytes, parse_devices,
                               plan_placement)
from esparse.pruning.driver import prune_model
from esparse.pruning.methods import build_method
from esparse.pruning.pattern import SparsityPattern

GPUS = [torch.device("cuda", k) for k in range(4)]


def calibration(vocab=512, n=4, seqlen=48, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def runs(sequence):
    """Collapse a sequence into its runs of equal items, in order."""
    out = []
    for item in sequence:
        if not out or out[-1] != item:
            out.append(item)
    return out


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 96), sizes=st.lists(st.integers(1, 50), min_size=1, max_size=4),
       block=st.integers(1, 10), data=st.data())
def test_plan_is_contiguous_within_budget_and_balanced(n, sizes, block, data):
    devices = GPUS[:len(sizes)]
    unbounded = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    budgets = {d: None if free else cap * block for d, cap, free in zip(devices, sizes, unbounded)}
    plan = plan_placement([block] * n, devices, budgets)
    assert len(plan.compute) == len(plan.home) == n
    resident = [home for home in plan.home if home != CPU]
    # Resident blocks form one run per device, in device order, ahead of the offloaded tail.
    assert runs(resident) == [d for d in devices if d in resident]
    assert plan.home[:len(resident)] == tuple(resident)
    assert all(home == CPU for home in plan.home[len(resident):])
    for device in devices:
        count = resident.count(device)
        if budgets[device] is not None:
            assert count * block <= budgets[device]
    capacity = sum(n if budgets[d] is None else min(n, budgets[d] // block) for d in devices)
    assert len(resident) == min(n, capacity), "a block is offloaded only when no device has room"
    # Balanced: no device holds more than ceil(n / D) blocks unless a smaller device ran out of room.
    counts = [resident.count(d) for d in devices]
    if all(budgets[d] is None or budgets[d] // block >= -(-n // len(devices)) for d in devices):
        assert max(counts) - min(counts) <= 1
    # Offloaded blocks compute on a device; resident ones compute where they live.
    assert all(run == home for run, home in zip(plan.compute, plan.home) if home != CPU)
    assert all(run in devices for run in plan.compute)
    assert plan_placement([block] * n, devices, budgets) == plan  # deterministic


def test_plan_examples():
    c0, c1 = GPUS[:2]
    plan = plan_placement([10] * 12, [c0, c1], {c0: 100, c1: 20})
    assert plan.describe()["blocks_by_home_device"] == {"cuda:0": [[0, 9]], "cuda:1": [[10, 11]]}
    plan = plan_placement([10] * 12, [c0, c1], {c0: 30, c1: 20})
    assert plan.offloaded() == list(range(5, 12))
    assert plan.compute[5:] == (c0,) * 7  # the device with the most room left (both are full: the first)
    plan = plan_placement([10] * 5, [c0, c1])
    assert plan.home == (c0, c0, c0, c1, c1)


def test_plan_rejects_bad_input():
    with pytest.raises(ConfigError, match="at least one compute device"):
        plan_placement([1], [])
    with pytest.raises(ConfigError, match="no decoder blocks"):
        plan_placement([], [CPU])


def test_parse_devices():
    assert parse_devices("cpu", cuda_count=0) == [CPU]
    assert parse_devices("auto", cuda_count=0) == [CPU]
    assert parse_devices("auto", cuda_count=2) == GPUS[:2]
    assert parse_devices("cuda", cuda_count=3) == GPUS[:3]
    assert parse_devices("cuda:1,cpu", cuda_count=2) == [GPUS[1], CPU]
    assert parse_devices(["cuda:0", "cuda:1"], cuda_count=2) == GPUS[:2]
    with pytest.raises(ConfigError, match="'cuda:2' does not exist: 2 CUDA"):
        parse_devices("cuda:2", cuda_count=2)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        parse_devices("cuda", cuda_count=0)
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        parse_devices("gpu0", cuda_count=1)
    with pytest.raises(ConfigError, match="names a device twice"):
        parse_devices("cuda:0,cuda:0", cuda_count=1)
    with pytest.raises(ConfigError, match="no compute device"):
        parse_devices(" , ", cuda_count=1)


def test_parse_bytes():
    assert parse_bytes("40GiB") == 40 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes(1234) == 1234
    for bad in ("lots", "-1GiB", "GiB", "1.5XB"):
        with pytest.raises(ConfigError, match="is not a size"):
            parse_bytes(bad)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_device_map_covers_every_tensor(arch):
    model = build_tiny_model(arch)
    prefix, blocks = find_decoder_blocks(model)
    plan = plan_placement([module_bytes(b) for b in blocks], GPUS[:2])
    mapping = device_map(model, prefix, plan)
    names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    for name in names:
        owners = [key for key in mapping if name == key or name.startswith(key + ".")]
        assert len(owners) == 1, f"{name} is mapped by {owners}"
    assert mapping[f"{prefix}.0"] == "cuda:0" and mapping[f"{prefix}.{len(blocks) - 1}"] == "cuda:1"
    assert {v for k, v in mapping.items() if not k.startswith(prefix)} == {"cuda:0"}  # tied embeddings stay together


def _pruned(arch, method, placement_for=None, max_blocks=None):
    model = build_tiny_model(arch)
    _prefix, blocks = find_decoder_blocks(model)
    placement = placement_for(blocks) if placement_for else None
    outcome = prune_model(model, build_method(method, {}), SparsityPattern.parse("2:4"), calibration(),
                          progress=False, placement=placement, max_blocks=max_blocks)
    return model, outcome


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_explicit_cpu_placement_equals_the_one_device_path(arch):
    plain_model, plain = _pruned(arch, "esparse")
    placed_model, placed = _pruned(arch, "esparse", lambda blocks: plan_placement([1] * len(blocks), [CPU]))
    assert plain.masks.keys() == placed.masks.keys()
    assert all(torch.equal(plain.masks[k], placed.masks[k]) for k in plain.masks)
    assert all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), placed_model.parameters()))
    _prefix, blocks = find_decoder_blocks(placed_model)
    assert placed.summary["placement"]["blocks_by_home_device"] == {"cpu": [[0, len(blocks) - 1]]}
    assert placed.summary["peak_memory_bytes_by_device"].keys() == {"cpu"}


def test_max_blocks_prunes_only_the_first_blocks():
    model, outcome = _pruned("llama", "wanda", max_blocks=1)
    prefix, blocks = find_decoder_blocks(model)
    assert outcome.summary["blocks_pruned"] == 1 and outcome.summary["blocks_total"] == len(blocks)
    assert all(name.startswith(f"{prefix}.0.") for name in outcome.masks)
    assert (blocks[1].mlp.down_proj.weight != 0).all()
    with pytest.raises(ValueError, match="max_blocks must be an integer in 1..2"):
        _pruned("llama", "wanda", max_blocks=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("method", ["wanda", "esparse", "sparsegpt"])
def test_blocks_split_between_gpu_and_cpu(arch, method):
    """First half of the blocks on the GPU, the rest on the CPU: activations and block arguments (masks,
    rotary tables) cross devices both ways; the result matches the all-CPU run and evaluation through
    accelerate's dispatch gives the same perplexity."""
    gpu = torch.device("cuda", 0)

    def split(blocks):
        half = len(blocks) // 2 or 1
        return BlockPlacement(compute=(gpu,) * half + (CPU,) * (len(blocks) - half),
                              home=(gpu,) * half + (CPU,) * (len(blocks) - half))

    cpu_model, cpu_outcome = _pruned(arch, method)
    split_model, split_outcome = _pruned(arch, method, split)
    assert set(split_outcome.summary["peak_memory_bytes_by_device"]) == {"cuda:0", "cpu"}
    assert split_outcome.summary["peak_memory_bytes_by_device"]["cuda:0"] > 0
    agreeing = sum(torch.equal(cpu_outcome.masks[k], split_outcome.masks[k]) for k in cpu_outcome.masks)
    assert agreeing >= len(cpu_outcome.masks) - 1, "float reductions on another device may flip a near tie, not more"
    prefix, blocks = find_decoder_blocks(split_model)
    placement = split(blocks)
    dispatch(split_model, prefix, placement)
    tokens = calibration(n=1, seqlen=256, seed=5).flatten()
    placed = perplexity(split_model, tokens, 64, device=str(placement.first_device), progress=False)["ppl"]
    cpu_model.to("cpu")
    split_model_cpu_ppl = perplexity(cpu_model, tokens, 64, progress=False)["ppl"]
    assert placed == pytest.approx(split_model_cpu_ppl, rel=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_blocks_compute_on_the_gpu():
    """A budget of one block: the rest live on the CPU and visit the GPU only while processed."""
    gpu = torch.device("cuda", 0)

    def tight(blocks):
        sizes = [module_bytes(b) for b in blocks]
        return plan_placement(sizes, [gpu], {gpu: max(sizes)})

    model, outcome = _pruned("llama", "wanda", tight)
    assert outcome.summary["placement"]["offloaded_blocks"] == [1]
    prefix, blocks = find_decoder_blocks(model)
    assert next(blocks[0].parameters()).device == gpu and next(blocks[1].parameters()).device == CPU
    dispatch(model, prefix, tight(blocks))
    tokens = calibration(n=1, seqlen=128, seed=6).flatten()
    assert torch.isfinite(torch.tensor(perplexity(model, tokens, 64, device="cuda:0", progress=False)["ppl"]))


def test_scale_study_on_a_small_shape(monkeypatch, tmp_path):
    """`esparse prune-scale` end to end on the CPU with a small LLaMA shape in the shape table."""
    from esparse import decoder, scale
    from esparse.cli import main

    small = decoder.DecoderShape(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=3, vocab=300)
    monkeypatch.setitem(decoder.PROFILE_SHAPES, "small", small)
    model = scale.random_llama(small, 2, torch.float32)
    assert torch.isfinite(model(calibration(vocab=300, n=1, seqlen=16)).logits).all()
    out = tmp_path / "scale.json"
    assert main(["prune-scale", "--shape", "small", "--blocks", "2", "--method", "esparse", "--devices", "cpu",
                 "--nsamples", "2", "--seqlen", "32", "--dtype", "float32", "--out", str(out)]) == 0
    import json

    record = json.loads(out.read_text())
    assert record["blocks_pruned"] == 2 and record["blocks_in_full_model"] == 3 and record["layers"] == 14
    assert record["summary"]["achieved_sparsity"] == pytest.approx(0.5)
    assert record["placement"]["blocks_by_home_device"] == {"cpu": [[0, 1]]}
    assert len(record["layer_seconds_per_block"]) == 2
    assert main(["prune-scale", "--shape", "small", "--blocks", "4", "--devices", "cpu", "--out", str(out)]) == 2
    assert main(["prune-scale", "--shape", "llama-99b", "--devices", "cpu", "--out", str(out)]) == 2
    assert main(["prune-scale", "--shape", "small", "--devices", "cpu", "--max-memory", "cuda:0", "--out", str(out)]) == 2
