"""A LLaMA-architecture decoder with a static KV cache, for latency and memory profiling.

Why not the Hugging Face module: a decode step must be captured whole in one CUDA graph, for the
dense baseline and the sparse model alike, so that the ratio compares kernels and not Python. That
needs a forward pass without host synchronisation and with fixed tensor addresses: the cache is
preallocated, the new key/value rows are written with `index_copy_` at a device-side position, and
the attention mask is computed on the device. This module does exactly LLaMA's arithmetic (RMSNorm,
rotary embeddings in the `rotate_half` convention, grouped-query attention, SwiGLU MLP) and is
checked against `transformers`' LlamaForCausalLM logits in the tests; its linear layers are plain
`nn.Linear` or any drop-in replacement (the 2:4 `SparseLinear`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear of one block, by its Hugging Face name."""
        kv = self.kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (self.hidden, self.hidden), "self_attn.k_proj": (kv, self.hidden),
            "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, self.hidden),
            "mlp.gate_proj": (self.intermediate, self.hidden), "mlp.up_proj": (self.intermediate, self.hidden),
            "mlp.down_proj": (self.hidden, self.intermediate),
        }

    @classmethod
    def from_hf_config(cls, config) -> "DecoderShape":
        if getattr(config, "model_type", None) not in ("llama", "mistral"):
            raise ConfigError(f"the profiling decoder implements LLaMA-style models, not {config.model_type!r}")
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   layers=config.num_hidden_layers, vocab=config.vocab_size,
                   rope_theta=float(getattr(config, "rope_theta", None)
                                    or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
                   rms_eps=config.rms_norm_eps, tied_embeddings=bool(config.tie_word_embeddings))


# Published LLaMA-1 shapes (Touvron et al. 2023, table 2), profiled with random weights.
PROFILE_SHAPES: dict[str, DecoderShape] = {
    "llama-7b": DecoderShape(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32000),
    "llama-13b": DecoderShape(hidden=5120, intermediate=13824, heads=40, kv_heads=40, layers=40, vocab=32000),
    "llama-30b": DecoderShape(hidden=6656, intermediate=17920, heads=52, kv_heads=52, layers=60, vocab=32000),
    "llama-65b": DecoderShape(hidden=8192, intermediate=22016, heads=64, kv_heads=64, layers=80, vocab=32000),
}


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Block(nn.Module):
    def __init__(self, shape: DecoderShape, linear_factory):
        super().__init__()
        self.input_layernorm = RMSNorm(shape.hidden, shape.rms_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden, shape.rms_eps)
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        for name, (out_f, in_f) in shape.linear_shapes().items():
            parent, child = name.split(".")
            setattr(getattr(self, parent), child, linear_factory(name, out_f, in_f))
        self.shape = shape


class StaticCache:
    """Keys and values of every layer, [layers, batch, kv_heads, max_len, head_dim], allocated once."""

    def __init__(self, shape: DecoderShape, batch: int, max_len: int, dtype: torch.dtype, device):
        size = (shape.layers, batch, shape.kv_heads, max_len, shape.head_dim)
        self.keys = torch.zeros(size, dtype=dtype, device=device)
        self.values = torch.zeros(size, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() * 2


class Decoder(nn.Module):
    """LLaMA decoder. `linear_factory(name, out, in)` builds each block linear (default nn.Linear)."""

    def __init__(self, shape: DecoderShape, linear_factory=None, dtype=torch.float32, device="cpu",
                 fused: bool | None = None):
        super().__init__()
        # fused: the non-GEMM work in three Triton kernels (esparse_kernels.fused); default on CUDA
        self.fused = torch.device(device).type == "cuda" if fused is None else bool(fused)
        factory = linear_factory or (lambda name, out_f, in_f: nn.Linear(in_f, out_f, bias=False,
                                                                        dtype=dtype, device=device))
        self.shape = shape
        self.embed_tokens = nn.Embedding(shape.vocab, shape.hidden, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Block(shape, factory).to(device=device) for _ in range(shape.layers))
        for block in self.layers:  # norms follow the model dtype; linears keep what the factory made
            block.input_layernorm.to(dtype=dtype, device=device)
            block.post_attention_layernorm.to(dtype=dtype, device=device)
        self.norm = RMSNorm(shape.hidden, shape.rms_eps).to(dtype=dtype, device=device)
        self.lm_head = nn.Linear(shape.hidden, shape.vocab, bias=False, dtype=dtype, device=device)
        if shape.tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32,
                                                                device=device) / shape.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._groups: list | None = None  # per block (q/k/v group, gate/up group): group_projections()
        self.folded_blocks = 0  # blocks whose down_proj permutation lives in gate/up: fold_mlp_permutations()

    def fold_mlp_permutations(self) -> int:
        """Fold every 2:4 down_proj's input permutation into the rows of gate_proj and up_proj; returns
        how many blocks were folded.

        SiLU*mul is elementwise, so silu(gate[perm] x) * up[perm] x is the MLP's hidden state already
        in down_proj's permuted order, and down_proj multiplies it with no gather (DESIGN.md: the
        permutation is folded into the producer). Exact. o_proj's permutation stays in its kernel: its
        input comes out of attention, where a channel belongs to one head's softmax, and the channel
        shuffle moves channels across heads, so v_proj's rows cannot take it.
        Call before group_projections() (the groups hold the members they were built from)."""
        from esparse_kernels.linear import SparseLinear, fold_input_permutation

        if self._groups:
            raise ConfigError("fold the permutations before group_projections(): the groups hold the old layers")
        folded = 0
        for block in self.layers:
            mlp = block.mlp
            if not isinstance(mlp.down_proj, SparseLinear) or mlp.down_proj.perm is None:
                continue
            (mlp.gate_proj, mlp.up_proj), mlp.down_proj = fold_input_permutation([mlp.gate_proj, mlp.up_proj],
                                                                                 mlp.down_proj)
            folded += 1
        self.folded_blocks = folded
        return folded

    def group_projections(self, tokens=(1,), reps: int = 10) -> None:
        """Run q/k/v and gate/up of every block as grouped projections in the fused forward
        (esparse_kernels.group.ProjectionGroup: one GEMM each, dense or 2:4, where that is faster);
        `tokens`: the decode token counts to tune the 2:4 groups for."""
        from esparse_kernels.group import ProjectionGroup

        self._groups = [(ProjectionGroup([b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj], tokens, reps),
                         ProjectionGroup([b.mlp.gate_proj, b.mlp.up_proj], tokens, reps)) for b in self.layers]

    @property
    def projection_groups(self) -> list:
        return list(self._groups or [])

    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticCache, attend: int,
                causal_prefill: bool = False, last_only: bool = True) -> torch.Tensor:
        """Logits for `tokens` [B, T] at absolute `positions` [T] (a device tensor), writing their keys
        and values into `cache` and attending to cache rows 0..attend-1.

        causal_prefill: the T tokens are positions 0..T-1 and attend == T (SDPA's causal kernel);
        otherwise row t may see cache rows <= positions[t] (a device-side mask: graph-capturable).
        """
        shape = self.shape
        batch, length = tokens.shape
        if attend > cache.max_len:
            raise ConfigError(f"attend {attend} exceeds the cache length {cache.max_len}")
        hidden = self.embed_tokens(tokens)
        cos, sin = self._rope(positions, hidden.dtype)
        if self.fused:
            return self._forward_fused(hidden, positions, cos, sin, cache, attend, causal_prefill, last_only)
        mask = None
        if not causal_prefill:
            mask = torch.arange(attend, device=tokens.device).unsqueeze(0) <= positions.unsqueeze(1)
        for index, block in enumerate(self.layers):
            x = block.input_layernorm(hidden)
            attn = block.self_attn
            q = attn.q_proj(x).view(batch, length, shape.heads, shape.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, length, shape.kv_heads, shape.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, length, shape.kv_heads, shape.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.keys[index].index_copy_(2, positions, k)
            cache.values[index].index_copy_(2, positions, v)
            keys = cache.keys[index][:, :, :attend]
            values = cache.values[index][:, :, :attend]
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal_prefill,
                                                 enable_gqa=shape.kv_heads != shape.heads)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, shape.hidden))
            x = block.post_attention_layernorm(hidden)
            mlp = block.mlp
            hidden = hidden + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
        if last_only:
            hidden = hidden[:, -1:]
        return self.lm_head(self.norm(hidden))

    def _forward_fused(self, hidden, positions, cos, sin, cache: StaticCache, attend: int, causal_prefill: bool,
                       last_only: bool) -> torch.Tensor:
        """forward() with the non-GEMM work fused: per block two add+RMSNorm, one rope+cache-write and
        one SiLU*mul launch around the seven linears (or, after group_projections(), the q/k/v and
        gate/up groups, o and down) and the attention kernel."""
        from esparse_kernels.fused import add_rms_norm, rope_cache, silu_mul

        shape = self.shape
        batch, length, _ = hidden.shape
        hidden = hidden.contiguous()
        bias = None
        if not causal_prefill:
            # additive mask built once per step; its row stride padded to 8 elements so that SDPA's
            # memory-efficient kernel takes it as is (no per-layer padding copy)
            padded = -(-attend // 8) * 8
            allowed = torch.arange(padded, device=hidden.device).unsqueeze(0) <= positions.unsqueeze(1)
            bias = torch.zeros((length, padded), dtype=hidden.dtype, device=hidden.device)
            bias = bias.masked_fill_(~allowed, float("-inf"))[:, :attend]
        delta = None
        for index, block in enumerate(self.layers):
            groups = self._groups[index] if self._groups else None
            x = add_rms_norm(hidden, delta, block.input_layernorm.weight, block.input_layernorm.eps)
            attn = block.self_attn
            q, k, v = groups[0](x) if groups else (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
            rope_cache(q, k, v, cos, sin, positions, cache.keys[index], cache.values[index])
            out = F.scaled_dot_product_attention(
                q.view(batch, length, shape.heads, shape.head_dim).transpose(1, 2),
                cache.keys[index][:, :, :attend], cache.values[index][:, :, :attend], attn_mask=bias,
                is_causal=causal_prefill, enable_gqa=shape.kv_heads != shape.heads)
            delta = attn.o_proj(out.transpose(1, 2).reshape(batch, length, shape.hidden))
            x = add_rms_norm(hidden, delta, block.post_attention_layernorm.weight, block.post_attention_layernorm.eps)
            mlp = block.mlp
            gate, up = groups[1](x) if groups else (mlp.gate_proj(x), mlp.up_proj(x))
            delta = mlp.down_proj(silu_mul(gate, up))
        normed = add_rms_norm(hidden, delta, self.norm.weight, self.norm.eps)
        if last_only:
            normed = normed[:, -1:]
        return self.lm_head(normed)

    @classmethod
    def from_hf(cls, hf_model, linear_factory=None, fused: bool | None = None) -> "Decoder":
        """A Decoder holding `hf_model`'s weights (LLaMA/Mistral/Qwen2-style, no linear biases).

        linear_factory(name, hf_linear) may replace a block linear (e.g. by a SparseLinear); names are
        "layers.<i>.<self_attn|mlp>.<proj>" relative to the decoder stack."""
        shape = DecoderShape.from_hf_config(hf_model.config)
        weight = hf_model.get_input_embeddings().weight
        model = cls(shape, linear_factory=lambda name, o, i: nn.Identity(), dtype=weight.dtype, device="meta",
                    fused=weight.device.type == "cuda" if fused is None else fused)
        stack = hf_model.model
        model.embed_tokens = stack.embed_tokens
        model.norm.weight = stack.norm.weight
        model.lm_head = hf_model.lm_head
        model.inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float32,
                                                                      device=weight.device) / shape.head_dim))
        for index, (ours, theirs) in enumerate(zip(model.layers, stack.layers)):
            ours.input_layernorm.weight = theirs.input_layernorm.weight
            ours.post_attention_layernorm.weight = theirs.post_attention_layernorm.weight
            for name in shape.linear_shapes():
                parent, child = name.split(".")
                linear = getattr(getattr(theirs, parent), child)
                if getattr(linear, "bias", None) is not None:
                    raise ConfigError(f"layer {index} {name} has a bias; the profiling decoder has none")
                made = linear if linear_factory is None else linear_factory(f"layers.{index}.{name}", linear)
                setattr(getattr(ours, parent), child, made)
        return model
