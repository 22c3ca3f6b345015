"""Model layer: registry, references, structure helpers across architectures."""

import pytest
import torch
from torch import nn

from esparse.errors import ModelError
from esparse.models import (REGISTRY, TINY_ARCHS, build_tiny_model, describe_model_ref, find_decoder_blocks,
                            find_linears, load_model, model_slug)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_blocks_and_linears_found_for_every_family(arch):
    model = build_tiny_model(arch, layers=3)
    prefix, blocks = find_decoder_blocks(model)
    assert len(blocks) == 3
    assert dict(model.named_modules())[prefix] is blocks
    linears = find_linears(blocks[0])
    assert len(linears) >= 6  # q, k, v, o + at least two MLP projections
    assert all(isinstance(m, nn.Linear) for m in linears.values())
    assert not any("lm_head" in name or "embed" in name for name in linears)


def test_model_refs():
    assert describe_model_ref("smollm2-135m") == "registry"
    assert describe_model_ref("HuggingFaceTB/SmolLM2-135M") == "hub"
    assert model_slug("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB--SmolLM2-135M"
    assert model_slug("smollm2-135m") == "smollm2-135m"
    with pytest.raises(ModelError, match="unknown model 'no such model'.*registry name"):
        describe_model_ref("no such model")


def test_local_directory_ref_and_load(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    assert describe_model_ref(str(path)) == "local"
    model, tokenizer = load_model(path)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_load_model_rejects_non_model_dir(tmp_path):
    with pytest.raises(ModelError, match="not a Hugging Face model directory"):
        load_model(tmp_path)


def test_registry_pins_the_gguf_checksum():
    spec = REGISTRY["smollm2-135m"]
    assert len(spec.gguf_sha256) == 64 and spec.version == "0.1.2"
