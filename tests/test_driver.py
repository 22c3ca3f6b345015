"""The block-by-block driver on tiny LLaMA- and OPT-style models."""

import copy

import pytest
import torch

from esparse.io import sha256_tensor
from esparse.models import build_tiny_model, find_decoder_blocks, find_linears
from esparse.pruning.driver import capture_block_inputs, prune_model
from esparse.pruning.masks import select_mask
from esparse.pruning.methods import build_method
from esparse.pruning.pattern import SparsityPattern
from esparse.pruning.scores import wanda_score

ARCHS = ["llama", "opt"]
METHODS = ["magnitude", "wanda", "sparsegpt", "esparse"]


def calibration(vocab=512, n=4, seqlen=48, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "unstructured50"])
def test_every_method_and_pattern(arch, method, pattern):
    model = build_tiny_model(arch)
    outcome = prune_model(model, build_method(method, {}), SparsityPattern.parse(pattern), calibration(),
                          progress=False)
    _, blocks = find_decoder_blocks(model)
    assert len(outcome.layers) == sum(len(find_linears(b)) for b in blocks)
    assert outcome.summary["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
    for layer in outcome.layers:
        assert layer["mask_check"]["sparsity"] == pytest.approx(0.5, abs=1e-9)
    for name, mask in outcome.masks.items():
        weight = dict(model.named_modules())[name].weight
        assert (weight[~mask] == 0).all()
    assert torch.isfinite(model(calibration(n=1)).logits).all()
    if method == "esparse" and pattern != "unstructured50":
        assert outcome.perms, "E-Sparse at N:M records its channel permutations"


@pytest.mark.parametrize("arch", ARCHS)
def test_sequential_protocol_uses_pruned_predecessors(arch):
    """Block 1's Wanda mask must come from the outputs of the already pruned block 0."""
    model = build_tiny_model(arch, layers=2)
    reference = copy.deepcopy(model)
    tokens = calibration()
    pattern = SparsityPattern.parse("2:4")
    outcome = prune_model(model, build_method("wanda", {}), pattern, tokens, progress=False)
    # Brute force: prune block 0 of the reference with the driver's masks, then collect block 1's inputs.
    prefix, ref_blocks = find_decoder_blocks(reference)
    for name, linear in find_linears(ref_blocks[0]).items():
        linear.weight.data[~outcome.masks[f"{prefix}.0.{name}"]] = 0
    inputs, kwargs = capture_block_inputs(reference, tokens, torch.device("cpu"), torch.device("cpu"))
    seen = {}
    hooks = [lin.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, lin in find_linears(ref_blocks[1]).items()]
    with torch.no_grad():
        hidden = torch.cat([ref_blocks[0](inputs[i:i + 1], **kwargs)[0] if isinstance(ref_blocks[0](inputs[i:i + 1], **kwargs), tuple)
                            else ref_blocks[0](inputs[i:i + 1], **kwargs) for i in range(len(inputs))])
        for i in range(len(hidden)):
            ref_blocks[1](hidden[i:i + 1], **kwargs)
    for hook in hooks:
        hook.remove()
    for name, linear in find_linears(ref_blocks[1]).items():
        x = torch.cat(seen[name]).double()
        expected = select_mask(wanda_score(linear.weight.data, (x ** 2).sum(0) / len(tokens)), pattern)
        assert torch.equal(outcome.masks[f"{prefix}.1.{name}"], expected), name


def test_deterministic_masks():
    tokens = calibration()
    digests = []
    for _ in range(2):
        model = build_tiny_model("llama")
        outcome = prune_model(model, build_method("esparse", {}), SparsityPattern.parse("2:4"), tokens, progress=False)
        digests.append(sha256_tensor(torch.cat([m.flatten() for m in outcome.masks.values()])))
    assert digests[0] == digests[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_statistics_pass_equals_a_second_forward(arch):
    """E-Sparse's range + histogram passes: replaying cached inputs gives the masks, permutations and
    weights of a second forward pass, bit for bit."""
    tokens = calibration()
    outcomes, weights = [], []
    for cache_bytes in (0, 2**30):
        model = build_tiny_model(arch)
        outcomes.append(prune_model(model, build_method("esparse", {}), SparsityPattern.parse("2:4"), tokens,
                                    progress=False, stats_cache_bytes=cache_bytes))
        weights.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
    assert outcomes[0].masks.keys() == outcomes[1].masks.keys()
    assert all(torch.equal(outcomes[0].masks[k], outcomes[1].masks[k]) for k in outcomes[0].masks)
    assert all(torch.equal(outcomes[0].perms[k], outcomes[1].perms[k]) for k in outcomes[0].perms)


def test_cached_statistics_notice_an_input_written_after_use(caplog):
    """A model that writes into a linear's input after the linear read it: the held inputs no longer
    hold what the linear saw, so the driver must notice (version counter) and run the second forward."""

    def scramble_down_proj_inputs(model):
        _, blocks = find_decoder_blocks(model)
        for block in blocks:
            seen = []
            block.mlp.down_proj.register_forward_hook(lambda module, args, output, seen=seen: seen.append(args[0]))

            def scramble(module, args, output, seen=seen):
                while seen:
                    seen.pop().mul_(-3.0)  # after the block's forward: only a replay could see it
            block.register_forward_hook(scramble)
        return model

    tokens = calibration()
    outcomes = []
    for cache_bytes in (0, 2**30):
        model = scramble_down_proj_inputs(build_tiny_model("llama"))
        with caplog.at_level("WARNING", logger="esparse.pruning.driver"):
            outcomes.append(prune_model(model, build_method("esparse", {}), SparsityPattern.parse("2:4"), tokens,
                                        progress=False, stats_cache_bytes=cache_bytes))
    assert "modified in place after use" in caplog.text
    assert all(torch.equal(outcomes[0].masks[k], outcomes[1].masks[k]) for k in outcomes[0].masks)
    assert all(torch.equal(outcomes[0].perms[k], outcomes[1].perms[k]) for k in outcomes[0].perms)


def test_activation_offload_gives_the_same_result():
    tokens = calibration()
    results = []
    for offload in (False, True):
        model = build_tiny_model("llama")
        prune_model(model, build_method("sparsegpt", {}), SparsityPattern.parse("2:4"), tokens,
                    offload_activations=offload, progress=False)
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_sparsegpt_beats_magnitude_at_2_4():
    """Logit error on held-out tokens of a random tiny model: SparseGPT at least 10% below magnitude's
    (measured: 0.82x). Per layer, with correlated inputs, the margin is larger (test_pruning_sparsegpt)."""
    dense = build_tiny_model("llama", layers=2)
    held_out = calibration(n=2, seed=1)
    with torch.no_grad():
        target = dense(held_out).logits
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = copy.deepcopy(dense)
        prune_model(model, build_method(method, {}), SparsityPattern.parse("2:4"), calibration(n=8, seqlen=64),
                    progress=False)
        with torch.no_grad():
            errors[method] = (model(held_out).logits - target).pow(2).mean().item()
    assert errors["sparsegpt"] < 0.9 * errors["magnitude"], errors


def test_magnitude_needs_no_calibration():
    model = build_tiny_model("opt")
    outcome = prune_model(model, build_method("magnitude", {}), SparsityPattern.parse("2:4"), None, progress=False)
    assert outcome.summary["calibration_used"] is False


def test_pattern_width_mismatch_is_a_config_error():
    from esparse.errors import ConfigError

    model = build_tiny_model("llama", hidden=60, intermediate=120)
    with pytest.raises(ConfigError, match="8"):
        prune_model(model, build_method("magnitude", {}), SparsityPattern.parse("4:8"), None, progress=False)


@pytest.mark.parametrize("arch, expected", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("opt", [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
])
def test_linears_sharing_an_input_share_statistics(arch, expected):
    """q/k/v (and gate/up) read one tensor; no other layer may be grouped with them, even when the
    allocator reuses a freed tensor's memory for a later input."""
    from esparse.pruning.driver import _shared_input_groups

    model = build_tiny_model(arch)
    inputs, kwargs = capture_block_inputs(model, calibration(n=1), torch.device("cpu"), torch.device("cpu"))
    _, blocks = find_decoder_blocks(model)
    for _ in range(3):
        groups = _shared_input_groups(blocks[0], find_linears(blocks[0]), inputs, kwargs, "cpu")
        assert sorted(map(sorted, groups.values())) == sorted(map(sorted, expected))


def test_statistics_cache_budget():
    from esparse.pruning.driver import DEFAULT_STATS_CACHE_BYTES, stats_cache_budget

    assert stats_cache_budget(torch.device("cpu"), None) == DEFAULT_STATS_CACHE_BYTES
    assert stats_cache_budget(torch.device("cpu"), 123) == 123
    assert stats_cache_budget(torch.device("cpu"), 0) == 0
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        assert stats_cache_budget(torch.device("cuda", 0), None) >= max(DEFAULT_STATS_CACHE_BYTES, free // 3)
