"""Profiling on a machine without CUDA: nothing is measured and every row says so; the pieces the GPU
run relies on (random 2:4 layers, the sparse decoder) are checked on the CPU."""

import math

import pandas as pd
import pytest
import torch

from esparse.decoder import Decoder, DecoderShape, StaticCache
from esparse.io import read_json
from esparse.pipeline import profile_step, profile_tables_step
from esparse.profiling import (LATENCY_COLUMNS, MEMORY_COLUMNS, ProfileSettings, profile_target,
                               random_packed_24, random_variants)

SETTINGS = {"enabled": True, "targets": ["llama-7b"], "dtype": "float16",
            "prefill": {"prompts": [128, 2048], "batches": [1, 8]}, "decode": {"contexts": [128, 2048], "batches": [1, 32]},
            "warmup": 2, "repeats": 8, "tune_reps": 3, "seed": 0}


def test_without_cuda_every_case_is_named_and_carries_no_number():
    settings = ProfileSettings.from_config(SETTINGS)
    record = profile_target("llama-7b", random_variants(), settings, "cpu")
    assert record["measured"] is False and "CUDA" in record["reason"]
    assert len(record["latency"]) == 3 * (4 + 4) and len(record["memory"]) == 3 * 4
    for row in record["latency"]:
        assert row["status"].startswith("not measured: ")
        assert all(row[k] is None for k in ("median_ms", "q1_ms", "q3_ms", "tokens_per_s"))
    for row in record["memory"]:
        assert all(row[k] is None for k in ("linear_weight_bytes", "max_memory_allocated", "nvml_used_bytes"))
    assert {(r["method"], r["shuffle"]) for r in record["latency"]} == {("dense", False), ("magnitude", False),
                                                                         ("magnitude", True)}


def test_profile_rule_step_and_tables(tmp_path):
    out = tmp_path / "profile" / "llama-7b.json"
    profile_step("llama-7b", {}, SETTINGS, "global+local", "cpu", str(out), {"preset": "smoke"}, {"target": "llama-7b"})
    record = read_json(out)
    assert record["provenance"]["seeds"] == {"profiling": 0}
    latency, memory = tmp_path / "latency.csv", tmp_path / "memory.csv"
    profile_tables_step([str(out)], str(latency), str(memory))
    table = pd.read_csv(latency)
    assert list(table.columns) == LATENCY_COLUMNS and table["median_ms"].isna().all()
    assert list(pd.read_csv(memory).columns) == MEMORY_COLUMNS


def test_token_counts_cover_every_gemm_of_the_cases():
    settings = ProfileSettings.from_config(SETTINGS)
    assert settings.token_counts() == [1, 8, 32, 128, 1024, 2048, 16384]


@pytest.mark.parametrize("shuffle", [False, True])
def test_random_layer_is_magnitude_24_in_the_order_the_kernel_reads(shuffle):
    from esparse_kernels.pack import unpack_24, unpack_24_permuted

    generator = torch.Generator().manual_seed(0)
    packed = random_packed_24(16, 64, shuffle, generator, torch.float32, "cpu")
    assert (packed.perm is not None) == shuffle
    ordered = unpack_24_permuted(packed).reshape(16, 16, 4)
    assert ((ordered != 0).sum(-1) <= 2).all()
    dense = unpack_24(packed)  # original column order
    assert (dense != 0).float().mean().item() == 0.5


def test_sparse_decoder_equals_the_masked_dense_decoder():
    """SparseLinear layers (CPU reference path, with permutations) inside the profiling decoder give the
    logits of the same decoder holding the masked dense weights."""
    from esparse_kernels.linear import SparseLinear
    from esparse_kernels.pack import unpack_24

    shape = DecoderShape(hidden=32, intermediate=64, heads=4, kv_heads=2, layers=2, vocab=40)
    generator = torch.Generator().manual_seed(1)
    packed = {}

    def sparse(name, out_f, in_f):
        packed[len(packed)] = p = random_packed_24(out_f, in_f, True, generator, torch.float16, "cpu")
        return SparseLinear(p, None, None)

    torch.manual_seed(0)
    sparse_model = Decoder(shape, linear_factory=sparse, dtype=torch.float16)
    order = iter(range(len(packed)))

    def dense(name, out_f, in_f):
        linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.float32)
        linear.weight.data = unpack_24(packed[next(order)]).float()
        return linear

    torch.manual_seed(0)
    dense_model = Decoder(shape, linear_factory=dense, dtype=torch.float32)
    dense_model.embed_tokens.weight.data = sparse_model.embed_tokens.weight.data.float()
    dense_model.lm_head.weight.data = sparse_model.lm_head.weight.data.float()
    tokens = torch.randint(0, 40, (2, 6), generator=generator)
    with torch.no_grad():
        got = sparse_model.float()(tokens, torch.arange(6), StaticCache(shape, 2, 6, torch.float32, "cpu"), 6, True)
        want = dense_model(tokens, torch.arange(6), StaticCache(shape, 2, 6, torch.float32, "cpu"), 6, True)
    assert math.isfinite(float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


def _pruned_24_with_kernels(tiny_model_dirs, tmp_path, method="magnitude"):
    """A tiny LLaMA pruned at 2:4 by the pipeline's prune step, and its (CPU-reference) kernel build."""
    from esparse.config import resolve_config
    from esparse.pipeline import prune_step
    from esparse_kernels.build import build_kernels

    config = resolve_config({"preset": "smoke"})
    pruned = tmp_path / "pruned"
    prune_step(str(tiny_model_dirs["llama"]), None, method, "2:4", {}, str(pruned), "cpu", "float32", config,
               {"model": "tiny", "method": method, "pattern": "2of4"})
    kernels = tmp_path / "kernels"
    build_kernels(pruned, kernels, token_buckets=(1, 16, 256), device="cpu")
    return pruned, kernels


def test_greedy_agreement_of_the_kernel_model(tiny_model_dirs, tmp_path):
    """The check the GPU profile records (issue 6): the packed-kernel model generates what the masked
    dense model generates. On CPU the kernel layers take the reference path."""
    from esparse.profiling import greedy_agreement

    pruned, kernels = _pruned_24_with_kernels(tiny_model_dirs, tmp_path)
    result = greedy_agreement(str(pruned), str(kernels), "cpu", dtype="float32", new_tokens=8,
                              prompts=("the history of", "in the year"))
    assert result["layers_swapped"] > 0 and len(result["prompts"]) == 2
    for prompt in result["prompts"]:
        assert len(prompt["dense_masked_tokens"]) == len(prompt["kernel_tokens"]) == 8
    assert result["agree"], [(p["dense_masked_tokens"], p["kernel_tokens"]) for p in result["prompts"]]


def test_greedy_agreement_refuses_a_build_that_swaps_nothing(tiny_model_dirs, tmp_path):
    """A kernel build whose layers are not in the model would compare the dense model with itself."""
    from esparse.errors import ConfigError
    from esparse.profiling import greedy_agreement

    _, kernels = _pruned_24_with_kernels(tiny_model_dirs, tmp_path)  # LLaMA layer names
    with pytest.raises(ConfigError, match="no layer"):
        greedy_agreement(str(tiny_model_dirs["opt"]), str(kernels), "cpu", dtype="float32", new_tokens=2)


def _sparse_decoder(shape, seed, dense_mlp_inputs=False):
    """A float16 decoder whose linears are SparseLinear layers with random permutations (CPU reference
    path); with dense_mlp_inputs, gate/up stay dense nn.Linear layers (a partly swapped model)."""
    from esparse_kernels.linear import SparseLinear

    generator = torch.Generator().manual_seed(seed)

    def factory(name, out_f, in_f):
        if dense_mlp_inputs and name in ("mlp.gate_proj", "mlp.up_proj"):
            return torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.float16)
        return SparseLinear(random_packed_24(out_f, in_f, True, generator, torch.float16, "cpu"), None, None)

    torch.manual_seed(seed)
    return Decoder(shape, linear_factory=factory, dtype=torch.float16)


@pytest.mark.parametrize("dense_mlp_inputs", [False, True])
def test_folding_down_proj_permutation_into_gate_and_up_keeps_the_logits(dense_mlp_inputs):
    shape = DecoderShape(hidden=32, intermediate=64, heads=4, kv_heads=2, layers=2, vocab=40)
    model = _sparse_decoder(shape, 3, dense_mlp_inputs)  # float16: SparseLinear does not follow .float()
    tokens = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(4))

    def logits():
        with torch.no_grad():
            return model(tokens, torch.arange(6), StaticCache(shape, 2, 6, torch.float16, "cpu"), 6, True, False)

    before = logits()
    old = [(b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj) for b in model.layers]
    eye = torch.eye(32, dtype=torch.float16)
    old_gate_rows = [gate(eye).t() for gate, _, _ in old]
    assert model.fold_mlp_permutations() == 2 and model.folded_blocks == 2
    for block, (gate, up, down), rows in zip(model.layers, old, old_gate_rows):
        assert block.mlp.down_proj.perm is None and down.perm is not None  # the old layers are untouched
        assert block.mlp.gate_proj is not gate and block.mlp.up_proj is not up
        assert torch.equal(block.mlp.gate_proj(eye).t(), rows[down.perm.long()])
        assert block.self_attn.o_proj.perm is not None  # o_proj keeps its gather (docstring)
    assert torch.equal(logits(), before)  # the same products summed in the same order
    assert model.fold_mlp_permutations() == 0  # nothing left to fold


def test_folding_refuses_grouped_decoders_and_mismatched_producers():
    from esparse.errors import ConfigError
    from esparse_kernels.linear import SparseLinear, fold_input_permutation

    shape = DecoderShape(hidden=32, intermediate=64, heads=4, kv_heads=2, layers=1, vocab=40)
    model = _sparse_decoder(shape, 5)
    model.group_projections()
    with pytest.raises(ConfigError, match="before group_projections"):
        model.fold_mlp_permutations()
    down = model.layers[0].mlp.down_proj
    with pytest.raises(ConfigError, match=r"out_features \[32, 64\] must all equal the consumer's in_features 64"):
        fold_input_permutation([model.layers[0].mlp.gate_proj, model.layers[0].self_attn.q_proj], down)
    with pytest.raises(ConfigError, match="must be a SparseLinear, got Linear"):
        fold_input_permutation([], torch.nn.Linear(4, 4))
    plain = SparseLinear(random_packed_24(8, 16, False, torch.Generator(), torch.float16, "cpu"))
    producers = [torch.nn.Linear(8, 16)]
    assert fold_input_permutation(producers, plain) == (producers, plain)  # no permutation: unchanged


def test_fold_setting_reaches_the_record_and_the_decoder_label():
    from esparse.profiling import _decoder_label

    assert ProfileSettings.from_config(SETTINGS).fold_permutations is True
    assert ProfileSettings.from_config({**SETTINGS, "fold_permutations": False}).fold_permutations is False
    record = profile_target("llama-7b", random_variants(), ProfileSettings.from_config(SETTINGS), "cpu")
    assert record["settings"]["fold_permutations"] is True
    shape = DecoderShape(hidden=32, intermediate=64, heads=4, kv_heads=2, layers=1, vocab=40)
    model = _sparse_decoder(shape, 6)
    model.fused = True
    assert _decoder_label(model) == "fused"
    model.fold_mlp_permutations()
    assert _decoder_label(model) == "fused+folded"
