"""Latency and memory of whole models, dense against 2:4 (with and without channel shuffle), on a GPU.

Cases: prefill of `prompt` tokens at batch b (time to first token: the prompt's forward pass and
the first token's logits, eager), and decode steps of batch b at context c (one new token per
sequence against a static KV cache of c rows, the whole step captured in one CUDA graph, for the
dense baseline too). Times are CUDA-event medians with the inter-quartile range over `repeats`
after `warmup` runs; clocks are left as found and recorded (NVML) at start and end.

Models: a registry model's real weights (dense, and its pruned 2:4 versions from the pipeline with
their kernel plans), or a published LLaMA shape (`esparse.decoder.PROFILE_SHAPES`) with random
weights and magnitude 2:4 masks; the rows say which (`weights`: real | random). Speed does not
depend on weight values; for random shapes the shuffled variant uses a random permutation, which
costs the same gather as any other. The permutation is always paid at run time (the kernels gather
the input through it).

On CUDA the decoder runs its non-GEMM work in fused Triton kernels (`decoder` = fused), dense and
sparse alike. The decode peak memory is measured after dropping what earlier cases left allocated
and a decode step does not use (the shared decompression scratch of the prefill cases, cuBLAS's
per-stream workspaces), for the dense model too.

Without CUDA nothing is measured: every row says "not measured: ..." with the reason and carries no
number.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .decoder import Decoder, DecoderShape, PROFILE_SHAPES, StaticCache
from .errors import ConfigError

log = logging.getLogger(__name__)

LATENCY_COLUMNS = ["target", "weights", "method", "pattern", "shuffle", "phase", "batch", "length",
                   "median_ms", "q1_ms", "q3_ms", "repeats", "tokens_per_s", "cuda_graph", "decoder", "backends", "status"]
MEMORY_COLUMNS = ["target", "weights", "method", "pattern", "shuffle", "batch", "context",
                  "linear_weight_bytes", "model_weight_bytes", "kv_cache_bytes", "workspace_bytes", "resident_bytes",
                  "max_memory_allocated", "nvml_used_bytes", "status"]


@dataclass(frozen=True)
class Variant:
    method: str             # dense | magnitude (random shapes) | a pipeline method (real weights)
    pattern: str            # dense | 2:4
    shuffle: bool
    weights: str            # real | random
    model_dir: str | None = None   # real weights: the (pruned) HF directory
    kernel_dir: str | None = None  # real 2:4 weights: the kernel build (packed + plan)


@dataclass
class ProfileSettings:
    prefill_prompts: list[int] = field(default_factory=lambda: [128, 512, 2048])
    prefill_batches: list[int] = field(default_factory=lambda: [1, 8])
    decode_contexts: list[int] = field(default_factory=lambda: [128, 2048])
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    warmup: int = 5
    repeats: int = 30
    tune_reps: int = 10
    dtype: str = "float16"
    seed: int = 0
    fused: bool = True      # False: the eager decoder (A/B of the fusion; CLI --eager)
    # q/k/v and gate/up as one GEMM each, dense and 2:4 alike (fused decoder only; CLI --no-group for
    # the A/B; docs/PERFORMANCE.md, run R1)
    grouped: bool = True
    # down_proj's channel permutation folded into gate/up's rows (exact; CLI --no-fold for the A/B);
    # the other layers keep gathering x through theirs inside the timed step
    fold_permutations: bool = True
    # each decode step's kernels by category from a profiler trace (esparse.kernel_breakdown; CLI --breakdown)
    breakdown: bool = False

    @classmethod
    def from_config(cls, section: dict) -> "ProfileSettings":
        return cls(prefill_prompts=list(section["prefill"]["prompts"]), prefill_batches=list(section["prefill"]["batches"]),
                   decode_contexts=list(section["decode"]["contexts"]), decode_batches=list(section["decode"]["batches"]),
                   warmup=int(section["warmup"]), repeats=int(section["repeats"]), tune_reps=int(section["tune_reps"]),
                   dtype=section["dtype"], seed=int(section.get("seed", 0)),
                   grouped=bool(section.get("grouped_projections", True)),
                   fold_permutations=bool(section.get("fold_permutations", True)))

    def cases(self) -> list[tuple[str, int, int]]:
        """(phase, batch, length): prefill length = prompt tokens, decode length = context rows."""
        return ([("prefill", b, p) for p in self.prefill_prompts for b in self.prefill_batches]
                + [("decode", b, c) for c in self.decode_contexts for b in self.decode_batches])

    def token_counts(self) -> list[int]:
        """Every GEMM row count the cases produce (the kernel plans' buckets)."""
        return sorted({b * p for p in self.prefill_prompts for b in self.prefill_batches}
                      | set(self.decode_batches) | set(self.prefill_batches))


def random_variants() -> list[Variant]:
    return [Variant("dense", "dense", False, "random"), Variant("magnitude", "2:4", False, "random"),
            Variant("magnitude", "2:4", True, "random")]


def _base_row(target: str, variant: Variant) -> dict:
    return {"target": target, "weights": variant.weights, "method": variant.method, "pattern": variant.pattern,
            "shuffle": variant.shuffle}


def not_measured(target: str, variants: list[Variant], settings: ProfileSettings, reason: str) -> dict:
    """Rows for every case that say why nothing was measured (no number is emitted)."""
    status = f"not measured: {reason}"
    latency = [{**dict.fromkeys(LATENCY_COLUMNS), **_base_row(target, v), "phase": phase, "batch": batch,
                "length": length, "status": status}
               for v in variants for phase, batch, length in settings.cases()]
    memory = [{**dict.fromkeys(MEMORY_COLUMNS), **_base_row(target, v), "batch": batch, "context": context,
               "status": status}
              for v in variants for batch in settings.decode_batches for context in settings.decode_contexts]
    return {"target": target, "measured": False, "reason": reason, "latency": latency, "memory": memory,
            "settings": asdict(settings)}


# ------------------------------------------------------------------------------ GPU measurement


def nvml_snapshot(index: int) -> dict:
    """GPU name, driver, clocks and used memory from NVML (None values where NVML is unavailable)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        clocks = {name: pynvml.nvmlDeviceGetClockInfo(handle, getattr(pynvml, f"NVML_CLOCK_{name.upper()}"))
                  for name in ("sm", "mem")}
        info = {"name": pynvml.nvmlDeviceGetName(handle), "driver": pynvml.nvmlSystemGetDriverVersion(),
                "clocks_mhz": clocks, "used_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).used),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in info.items()}
    except Exception as exc:  # NVML missing or failing: say so, never invent
        return {"error": f"NVML unavailable: {exc}"}


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return median, q1, q3


def _time_events(run, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in pairs]


def _linear_bytes(model: Decoder) -> int:
    total = 0
    for block in model.layers:
        for name in model.shape.linear_shapes():
            parent, child = name.split(".")
            module = getattr(getattr(block, parent), child)
            nbytes = getattr(module, "weight_nbytes", None)  # SparseLinear: every representation it holds
            total += nbytes() if nbytes is not None else module.weight.numel() * module.weight.element_size()
    return total


def _model_bytes(model: Decoder) -> int:
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total  # packed 2:4 tensors are (non-persistent) buffers of the SparseLinear modules


def _workspace_bytes() -> int:
    try:
        from esparse_kernels.linear import workspace_nbytes
    except ImportError:  # the kernels package is absent: nothing was allocated by it
        return 0
    return workspace_nbytes()


def _backends(model: Decoder) -> str:
    found = set()
    for module in model.modules():
        backends = getattr(module, "backends", None)
        if isinstance(backends, dict):
            found.update(f"{t}:{b}" for t, b in backends.items())
    return ";".join(sorted(found, key=lambda s: int(s.split(":")[0]))) if found else "cublas"


def _decoder_label(model: Decoder) -> str:
    """fused | eager, + "+folded" when down_proj's permutation lives in gate/up's rows, + "+grouped" when
    q/k/v and gate/up run grouped (the 2:4 groups where tuning found one launch faster: the token
    buckets)."""
    folded = "+folded" if model.folded_blocks else ""
    if not model.fused:
        return "eager" + folded
    groups = [g for pair in model.projection_groups for g in pair]
    if not groups:
        return "fused" + folded
    kinds = {g.kind for g in groups}
    if kinds == {"dense"}:
        return "fused" + folded + "+grouped"
    buckets = sorted({t for g in groups for t in g.grouped_tokens})
    return "fused" + folded + "+grouped" + (f"(2:4 at {'/'.join(map(str, buckets))} tokens)" if buckets
                                            else "(2:4: none faster)")


def random_packed_24(out_f: int, in_f: int, shuffle: bool, generator: torch.Generator, dtype, device):
    """A random weight (uniform, nn.Linear's scale) with its magnitude 2:4 mask, packed; with `shuffle`,
    the mask is 2:4 in a random column permutation, which the packed layer gathers at run time."""
    from esparse_kernels.pack import pack_24

    from .pruning.masks import nm_mask

    bound = in_f ** -0.5
    weight = torch.empty(out_f, in_f, dtype=dtype, device=device).uniform_(-bound, bound, generator=generator)
    perm = torch.randperm(in_f, device=device, generator=generator) if shuffle else None
    ordered = weight if perm is None else weight[:, perm]
    kept = nm_mask(ordered.abs(), 2, 4)  # magnitude 2:4 in the (permuted) order the kernel reads
    mask = kept if perm is None else torch.empty_like(kept).index_copy_(1, perm, kept)
    return pack_24(weight, mask, perm)


def _random_sparse_factory(settings: ProfileSettings, shuffle: bool, device, dtype, plans: dict):
    from esparse_kernels.build import tune_shape
    from esparse_kernels.linear import SparseLinear

    generator = torch.Generator(device=device).manual_seed(settings.seed)

    def factory(name, out_f, in_f):
        packed = random_packed_24(out_f, in_f, shuffle, generator, dtype, device)
        key = (out_f, in_f)
        if key not in plans:  # tuned once per shape (on the first 2:4 variant built), shared by both
            buckets = tuple(settings.token_counts())
            # the CUDA mma.sp kernel supersedes the Triton ones on this path (docs/PERFORMANCE.md); leaving
            # Triton out saves minutes of JIT compilation per shape
            plans[key] = {int(t): entry for t, entry in
                          tune_shape(packed, buckets, device, settings.tune_reps, log=None, include_cslt=False,
                                     include_triton=False).items()}
        return SparseLinear(packed, None, plans[key], allow_dense=False)
    return factory


def build_variant(target: str, variant: Variant, settings: ProfileSettings, device, plans: dict) -> Decoder:
    model = _variant_decoder(target, variant, settings, device, plans)
    if settings.fold_permutations:
        model.fold_mlp_permutations()
    return model


def _variant_decoder(target: str, variant: Variant, settings: ProfileSettings, device, plans: dict) -> Decoder:
    dtype = getattr(torch, settings.dtype)
    if variant.weights == "random":
        shape = PROFILE_SHAPES[target]
        torch.manual_seed(settings.seed)
        factory = None if variant.pattern == "dense" else _random_sparse_factory(settings, variant.shuffle, device, dtype, plans)
        return Decoder(shape, linear_factory=factory, dtype=dtype, device=device, fused=settings.fused).eval()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(variant.model_dir, dtype=dtype).to(device).eval()
    if variant.kernel_dir:
        from esparse_kernels.linear import swap_sparse_linears

        swapped = swap_sparse_linears(hf, variant.kernel_dir, allow_dense=False)
        if not swapped:
            raise ConfigError(f"no layer of {variant.model_dir} was replaced from {variant.kernel_dir}")
    return Decoder.from_hf(hf, fused=settings.fused).eval()


def release_scratch() -> None:
    """Drop what earlier cases left allocated and a decode step does not use: the kernels' shared
    decompression scratch and cuBLAS's per-stream workspaces (dense and sparse models alike)."""
    try:
        from esparse_kernels.build import release_cublas_workspaces
        from esparse_kernels.linear import release_scratch as release
    except ImportError:  # the kernels package is absent: nothing was allocated by it
        return
    release()
    release_cublas_workspaces()


@torch.no_grad()
def measure_variant(target: str, variant: Variant, settings: ProfileSettings, device, plans: dict,
                    group_timings: list | None = None, breakdowns: list | None = None) -> tuple[list, list]:
    """Latency and memory rows of one variant; with `group_timings`, appends what tuning the projection
    groups measured (the first block's groups: every block of a shape shares their tuning); with
    `breakdowns` and `settings.breakdown`, each decode step's kernel times by category."""
    torch.cuda.empty_cache()
    model = build_variant(target, variant, settings, device, plans)
    if settings.grouped and model.fused:
        from esparse_kernels.cuda_sp24 import MAX_TOKENS

        model.group_projections(tokens=[t for t in settings.token_counts() if t <= MAX_TOKENS],
                                reps=settings.tune_reps)
        for group in (model.projection_groups[0] if model.projection_groups else ()):
            for timing in group.timings:
                log.info("%s %s group %s x %d, %d tokens: members %.2f us, grouped %.2f us (%s)", target,
                         variant.method, group.widths, group.in_features, timing.tokens, timing.separate_us,
                         timing.grouped_us, "grouped" if timing.grouped else "kept separate")
            if group_timings is not None:
                group_timings.append({**_base_row(target, variant), "kind": group.kind, "widths": group.widths,
                                      "in_features": group.in_features, "timings": [t.to_dict() for t in group.timings]})
    shape: DecoderShape = model.shape
    base = _base_row(target, variant)
    backends = _backends(model)
    latency, memory = [], []
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    for phase, batch, length in settings.cases():
        if phase == "prefill":
            cache = StaticCache(shape, batch, length, model.embed_tokens.weight.dtype, device)
            tokens = torch.randint(0, shape.vocab, (batch, length), device=device, generator=generator)
            positions = torch.arange(length, device=device)
            run = lambda: model(tokens, positions, cache, attend=length, causal_prefill=True)  # noqa: E731
            samples = _time_events(run, max(1, settings.warmup // 2), max(3, settings.repeats // 3))
            graph = False
        else:
            # the prefill cases' shared decompression scratch is not part of a decode step: drop it so
            # that the decode peak counts what decoding needs (weights, cache, workspaces, activations)
            release_scratch()
            gc.collect()  # tensors kept only by reference cycles (tuning, earlier cases) must not count
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            cache = StaticCache(shape, batch, length + 1, model.embed_tokens.weight.dtype, device)
            cache.keys.normal_(generator=generator)
            cache.values.normal_(generator=generator)
            tokens = torch.randint(0, shape.vocab, (batch, 1), device=device, generator=generator)
            positions = torch.full((1,), length, device=device, dtype=torch.long)
            resident = torch.cuda.memory_allocated(device)  # weights, cache, workspaces: before the step
            step = lambda: model(tokens, positions, cache, attend=length + 1)  # noqa: E731
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up outside capture (allocations, autotuned launches)
                for _ in range(3):
                    step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph_handle = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph_handle):
                step()
            samples = _time_events(graph_handle.replay, settings.warmup, settings.repeats)
            graph = True
            memory.append({**base, "batch": batch, "context": length, "linear_weight_bytes": _linear_bytes(model),
                           "model_weight_bytes": _model_bytes(model), "kv_cache_bytes": cache.nbytes,
                           "workspace_bytes": _workspace_bytes(),
                           "resident_bytes": int(resident),
                           "max_memory_allocated": int(torch.cuda.max_memory_allocated(device)),
                           "nvml_used_bytes": nvml_snapshot(device.index or 0).get("used_bytes"),
                           "status": "measured"})
            # after the memory figures, so that the profiler's own use does not count in them
            if settings.breakdown and breakdowns is not None:
                breakdowns.append({**base, "batch": batch, "context": length, "step_median_ms": _quartiles(samples)[0],
                                   **_graph_breakdown(graph_handle.replay)})
            del graph_handle
        median, q1, q3 = _quartiles(samples)
        new_tokens = batch * (length if phase == "prefill" else 1)
        latency.append({**base, "phase": phase, "batch": batch, "length": length, "median_ms": median,
                        "q1_ms": q1, "q3_ms": q3, "repeats": len(samples),
                        "tokens_per_s": new_tokens / (median / 1e3), "cuda_graph": graph,
                        "decoder": _decoder_label(model), "backends": backends,
                        "status": "measured"})
        log.info("%s %s %s%s %s b=%d len=%d: %.3f ms", target, variant.method, variant.pattern,
                 "+shuffle" if variant.shuffle else "", phase, batch, length, median)
        del cache
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return latency, memory


def _graph_breakdown(replay) -> dict:
    """The kernel breakdown of a decode step, or why it could not be recorded (the latency figure, taken
    before, stands either way)."""
    from .kernel_breakdown import profile_graph_kernels

    try:
        summary = profile_graph_kernels(replay)
    except Exception as exc:  # a profiler failure must not cost the measured grid
        log.warning("kernel breakdown failed: %s", exc)
        return {"breakdown": None, "breakdown_error": f"{type(exc).__name__}: {exc}"}
    log.info("  kernels per step: %s; busy %.3f ms", ", ".join(f"{c['category']} {c['us_per_step'] / 1e3:.3f}"
                                                           for c in summary["categories"]),
             summary["busy_us_per_step"] / 1e3)
    return {"breakdown": summary}


GREEDY_PROMPTS = (
    "The history of the city begins in the twelfth century, when",
    "In 1998, the band released their second album,",
    "The game is played on a board of sixty-four squares, and each player",
)


@torch.no_grad()
def greedy_agreement(model_dir: str, kernel_dir: str, device, dtype: str = "float16", new_tokens: int = 32,
                     prompts: tuple[str, ...] = GREEDY_PROMPTS) -> dict:
    """Greedy continuations of each prompt by the pruned model with its masked dense weights (cuBLAS) and by
    the same model with its 2:4 layers swapped for the packed kernels (plan's sparse paths only); they
    should agree token for token. Returns both token lists per prompt and where they first differ (None: never)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from esparse_kernels.linear import swap_sparse_linears

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens: dict[str, list[list[int]]] = {}
    swapped: list[str] = []
    for kind in ("dense_masked", "kernels"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        if kind == "kernels":
            swapped = swap_sparse_linears(model, kernel_dir, allow_dense=False)
            if not swapped:
                raise ConfigError(f"no layer of {model_dir} was replaced from {kernel_dir}")
        tokens[kind] = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.eos_token_id)
            tokens[kind].append(out[0, ids.shape[1]:].tolist())
        del model
    per_prompt = []
    for prompt, ref, ours in zip(prompts, tokens["dense_masked"], tokens["kernels"]):
        first = next((i for i, (a, b) in enumerate(zip(ref, ours)) if a != b), None)
        per_prompt.append({"prompt": prompt, "dense_masked_tokens": ref, "kernel_tokens": ours,
                           "first_difference": first, "agree": first is None and len(ref) == len(ours) == new_tokens,
                           "dense_masked_text": tokenizer.decode(ref), "kernel_text": tokenizer.decode(ours)})
    return {"model_dir": str(model_dir), "kernel_dir": str(kernel_dir), "dtype": dtype, "new_tokens": new_tokens,
            "layers_swapped": len(swapped), "agree": all(p["agree"] for p in per_prompt), "prompts": per_prompt}


def profile_target(target: str, variants: list[Variant], settings: ProfileSettings, device: str,
                   on_variant=None) -> dict:
    """Measure every variant and case on `device`; without CUDA, the not-measured record."""
    if torch.device(device).type != "cuda":
        return not_measured(target, variants, settings, f"device is {device}, profiling needs a CUDA device")
    if not torch.cuda.is_available():
        return not_measured(target, variants, settings, "no CUDA device (torch.cuda.is_available() is False)")
    if target not in PROFILE_SHAPES and any(v.weights == "random" for v in variants):
        raise ConfigError(f"unknown profile shape {target!r}; allowed: {', '.join(PROFILE_SHAPES)}")
    dev = torch.device(device if ":" in device else "cuda:0")
    start = nvml_snapshot(dev.index or 0)
    plans: dict = {}
    latency, memory, groups, breakdowns = [], [], [], []
    for variant in variants:
        rows_l, rows_m = measure_variant(target, variant, settings, dev, plans, groups, breakdowns)
        latency += rows_l
        memory += rows_m
        if on_variant is not None:  # e.g. save what is measured so far (a killed run keeps it)
            on_variant(latency, memory)
    return {"target": target, "measured": True, "gpu_start": start, "gpu_end": nvml_snapshot(dev.index or 0),
            "device_name": torch.cuda.get_device_name(dev), "settings": asdict(settings),
            "timing": "CUDA events; decode: one CUDA-graph replay per sample; prefill: eager forward",
            "latency": latency, "memory": memory, "projection_groups": groups,
            **({"decode_breakdown": breakdowns} if settings.breakdown else {})}


def main(argv: list[str] | None = None) -> int:
    """Profile one random-weight shape outside the pipeline (the lent GPU's one-off runs):
    python -m esparse.profiling --target llama-7b --prefill 2048:1 --decode 2048:1 --out DIR"""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--target", default="llama-7b", choices=sorted(PROFILE_SHAPES))
    parser.add_argument("--prefill", default="2048:1", help="PROMPT:BATCH,... (time to first token)")
    parser.add_argument("--decode", default="2048:1", help="CONTEXT:BATCH,... (CUDA-graph decode step)")
    parser.add_argument("--variants", default="dense,2:4,2:4+shuffle")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tune-reps", type=int, default=5)
    parser.add_argument("--eager", action="store_true", help="the unfused decoder (A/B of the fused kernels)")
    parser.add_argument("--no-group", action="store_true",
                        help="q/k/v and gate/up as separate GEMMs (A/B of the grouped projections)")
    parser.add_argument("--no-fold", action="store_true",
                        help="keep down_proj's permutation in its kernel (A/B of folding it into gate/up)")
    parser.add_argument("--breakdown", action="store_true",
                        help="record each decode step's kernels by category (torch.profiler, after the timing)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    def pairs(text):
        return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]

    prefill, decode = pairs(args.prefill), pairs(args.decode)
    settings = ProfileSettings(prefill_prompts=sorted({p for p, _ in prefill}), prefill_batches=sorted({b for _, b in prefill}),
                               decode_contexts=sorted({c for c, _ in decode}), decode_batches=sorted({b for _, b in decode}),
                               warmup=args.warmup, repeats=args.repeats, tune_reps=args.tune_reps,
                               fused=not args.eager, grouped=not args.no_group, fold_permutations=not args.no_fold,
                               breakdown=args.breakdown)
    known = {"dense": Variant("dense", "dense", False, "random"), "2:4": Variant("magnitude", "2:4", False, "random"),
             "2:4+shuffle": Variant("magnitude", "2:4", True, "random")}
    variants = [known[name] for name in args.variants.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"profile_{args.target}{'_eager' if args.eager else ''}{'_ungrouped' if args.no_group else ''}"
            f"{'_unfolded' if args.no_fold else ''}")

    def save(latency, memory):
        (out / f"{stem}.partial.json").write_text(json.dumps({"latency": latency, "memory": memory}, indent=1))

    record = profile_target(args.target, variants, settings, "cuda", on_variant=save)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))
    (out / f"{stem}.partial.json").unlink(missing_ok=True)  # the full record supersedes it
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
