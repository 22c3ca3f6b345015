"""The steps the Snakemake rules call: one function per rule, explicit arguments, atomic outputs."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .io import atomic_path, read_json, sha256_file, sha256_tensor, write_json
from .placement import placement_for
from .provenance import provenance

log = logging.getLogger("esparse")


def _single_device(device: str) -> str:
    """The driver's one-device argument: `cuda` (one leased GPU) is cuda:0; lists go through placement."""
    return "cuda:0" if device == "cuda" else device.split(",")[0]


def _place_for_evaluation(model, device: str):
    """Put the model where it is evaluated; returns the device its inputs go to."""
    from .models import find_decoder_blocks
    from .placement import dispatch

    placement = placement_for(model, device)
    if placement is None:
        model.to(_single_device(device))
        return _single_device(device)
    prefix, _blocks = find_decoder_blocks(model)
    log.info("evaluation placement: %s", placement.describe())
    dispatch(model, prefix, placement)
    return str(placement.first_device)


@contextmanager
def step_logging(log_path: str | None, threads: int | None = None, gpus: int = 0):
    """Send logging, warnings and progress bars of one step to its log file; a GPU step first leases
    its own device(s) (esparse.gpu_lease: CUDA_VISIBLE_DEVICES), so parallel GPU jobs do not share one."""
    from .gpu_lease import gpu_lease

    with gpu_lease(gpus):
        with _step_log(log_path, threads):
            yield


@contextmanager
def _step_log(log_path: str | None, threads: int | None):
    if threads:
        torch.set_num_threads(int(threads))
    if log_path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as handle:
        old_stderr = sys.stderr
        sys.stderr = handle
        root = logging.getLogger()
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        try:
            yield
        except Exception:
            log.exception("step failed")
            raise
        finally:
            root.removeHandler(handler)
            sys.stderr = old_stderr


def model_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "esparse_model.json"
    return read_json(path) if path.exists() else {}


# --- model ------------------------------------------------------------------------------------------

def prepare_model_step(ref: str, out_dir: str, cache_dir: str, dtype: str) -> None:
    from .models import prepare_model

    manifest = prepare_model(ref, out_dir, cache_dir, dtype=dtype)
    log.info("prepared %s in %s: %s", ref, out_dir, manifest)


# --- calibration ------------------------------------------------------------------------------------

def calibrate_step(model_dir: str, dataset: str, mirror: str | None, nsamples: int, seqlen: int, seed: int,
                   out_tokens: str, out_json: str, config: dict, wildcards: dict) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from .calibration import sample_calibration, validate_calibration_settings
    from .data import dataset_source, load_records

    model_config = AutoConfig.from_pretrained(model_dir)
    context = getattr(model_config, "max_position_embeddings", None)
    validate_calibration_settings(nsamples, seqlen, context)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = load_records(dataset, mirror)
    calib = sample_calibration(records["text"], tokenizer, nsamples, seqlen, seed)
    with atomic_path(out_tokens) as tmp:
        save_file({"tokens": calib.tokens.contiguous()}, str(tmp), metadata={"sha256": calib.info["tokens_sha256"]})
    manifest = model_manifest(model_dir)
    payload = {
        **calib.info,
        "dataset": dataset_source(dataset, mirror),
        "document_indices": calib.document_indices,
        "window_starts": calib.window_starts,
        "file_sha256": sha256_file(out_tokens),
        "provenance": provenance(config, "calibrate", wildcards,
                                 inputs={"model_weights": manifest.get("weights_sha256"),
                                         "tokenizer": manifest.get("tokenizer_sha256")},
                                 seeds={"calibration": seed}),
    }
    if mirror:
        payload["note"] = ("offline mirror: drawn from the first 1000 documents of C4 en shard 0, not the "
                           "whole shard; the draw differs from an online run")
    write_json(out_json, payload)


def load_calibration_tokens(path: str) -> torch.Tensor:
    return load_file(path)["tokens"]


# --- pruning ----------------------------------------------------------------------------------------

def prune_step(model_dir: str, calibration: str | None, method_name: str, pattern_text: str, settings: dict,
               out_dir: str, device: str, dtype: str, config: dict, wildcards: dict) -> None:
    from .models import load_model
    from .pruning.driver import prune_model
    from .pruning.methods import build_method
    from .pruning.pattern import SparsityPattern

    method = build_method(method_name, settings)
    pattern = SparsityPattern.parse(pattern_text)
    load_start = time.perf_counter()
    model, tokenizer = load_model(model_dir, dtype=dtype, device="cpu")
    tokens = load_calibration_tokens(calibration) if calibration else None
    log.info("loaded model in %.1fs; pruning with %s at %s on %s", time.perf_counter() - load_start,
             method.name, pattern.label, device)
    placement = placement_for(model, device)
    if placement is not None:
        log.info("placement: %s", placement.describe())
    outcome = prune_model(model, method, pattern, tokens if method.needs else None,
                          device=_single_device(device), placement=placement)
    out = Path(out_dir)
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    tensors = {f"{name}.mask": mask for name, mask in outcome.masks.items()}
    tensors.update({f"{name}.perm": perm for name, perm in outcome.perms.items()})
    save_file(tensors, str(staging / "sparsity.safetensors"))
    manifest = model_manifest(model_dir)
    masks_digest = sha256_tensor(torch.cat([m.flatten() for m in outcome.masks.values()]))
    perms_digest = (sha256_tensor(torch.cat([p.flatten() for p in outcome.perms.values()]))
                    if outcome.perms else None)
    payload = {
        "method": method.name,
        "method_settings": settings,
        "pattern": pattern.label,
        "summary": outcome.summary,
        "masks_sha256": masks_digest,
        "perms_sha256": perms_digest,
        "sparsity_file_sha256": sha256_file(staging / "sparsity.safetensors"),
        "weights_sha256": {p.name: sha256_file(p) for p in sorted(staging.glob("model*.safetensors"))},
        "layers": outcome.layers,
        "provenance": provenance(
            config, "prune", wildcards,
            inputs={"model_weights": manifest.get("weights_sha256"), "tokenizer": manifest.get("tokenizer_sha256"),
                    "calibration_tokens": sha256_file(calibration) if calibration else None},
            seeds={"calibration": config["calibration"]["seed"]},
        ),
    }
    write_json(staging / "prune.json", payload)
    for extra in ("esparse_model.json",):
        if (Path(model_dir) / extra).exists():
            shutil.copy2(Path(model_dir) / extra, staging / f"source_{extra}")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    log.info("pruned: achieved sparsity %.4f in %.1fs", outcome.summary["achieved_sparsity"], outcome.summary["seconds"])


# --- perplexity -------------------------------------------------------------------------------------

def perplexity_step(model_dir: str, dataset: str, mirror: str | None, seqlen: int, max_windows: int | None,
                    device: str, dtype: str, out_json: str, config: dict, wildcards: dict) -> None:
    from .data import dataset_source, load_records
    from .models import context_length, load_model
    from .errors import ConfigError
    from .perplexity import perplexity, token_stream

    model, tokenizer = load_model(model_dir, dtype=dtype, device="cpu")
    device = _place_for_evaluation(model, device)
    context = context_length(model)
    if seqlen > context:
        raise ConfigError(f"perplexity seqlen {seqlen} exceeds the model's context length {context}")
    records = load_records(dataset, mirror)
    tokens = token_stream(records["text"], tokenizer, dataset)
    start = time.perf_counter()
    result = perplexity(model, tokens, seqlen, max_windows, device=device)
    result["seconds"] = time.perf_counter() - start
    model_dir_path = Path(model_dir)
    prune_info = read_json(model_dir_path / "prune.json") if (model_dir_path / "prune.json").exists() else None
    manifest = model_manifest(model_dir)
    payload = {
        **wildcards,
        **result,
        "dataset": dataset_source(dataset, mirror),
        "achieved_sparsity": prune_info["summary"]["achieved_sparsity"] if prune_info else 0.0,
        "masks_sha256": prune_info["masks_sha256"] if prune_info else None,
        # Carried over so that the ppl table shows every method's pruning cost from the same run.
        "prune_seconds": prune_info["summary"]["seconds"] if prune_info else None,
        "prune_peak_memory_bytes": prune_info["summary"]["peak_memory_bytes"] if prune_info else None,
        "prune_device": prune_info["summary"]["device"] if prune_info else None,
        "provenance": provenance(
            config, "perplexity", wildcards,
            inputs={"model_weights": {p.name: sha256_file(p) for p in sorted(model_dir_path.glob("model*.safetensors"))},
                    "tokenizer": manifest.get("tokenizer_sha256") or sha256_file(model_dir_path / "tokenizer.json"),
                    "eval_tokens": result["stream_sha256"]},
            extra={"device": device, "dtype": dtype},
        ),
    }
    write_json(out_json, payload)
    log.info("%s: ppl %.4f over %d windows of %d", wildcards, result["ppl"], result["windows"], seqlen)


# --- E-Sparse ablation (hyper-parameters chosen on held-apart C4, never on WikiText-2 test) ----------

def ablation_variants(ablation: dict, base_settings: dict) -> dict[str, dict]:
    """Variant slug -> E-Sparse settings: metric x shuffle at the base alpha/bins, then the joint alpha x bins grid.

    The grid is joint rather than one axis at a time because the two interact (the entropy term's
    spread depends on the bin count, alpha weighs it against the norm term)."""
    def slug(settings: dict) -> str:
        return (f"{settings['metric']}_{settings['shuffle']}_a{settings['alpha']:g}_k{settings['bins']}"
                .replace("+", "-"))

    variants = {}
    for metric in ablation["metrics"]:
        for shuffle in ablation["shuffles"]:
            settings = {**base_settings, "metric": metric, "shuffle": shuffle}
            variants[slug(settings)] = settings
    for alpha in ablation["alphas"]:
        for bins in ablation["bins"]:
            settings = {**base_settings, "alpha": alpha, "bins": bins}
            variants[slug(settings)] = settings
    return variants


def ablation_step(model_dir: str, calibration: str, settings: dict, pattern_text: str, dataset: str,
                  mirror: str | None, seqlen: int, max_windows: int | None, device: str, dtype: str,
                  out_json: str, config: dict, wildcards: dict) -> None:
    """Prune one E-Sparse variant and measure held-apart perplexity; the model is not kept."""
    from .data import dataset_source, load_records
    from .models import load_model
    from .perplexity import perplexity, token_stream
    from .pruning.driver import prune_model
    from .pruning.methods import build_method
    from .pruning.pattern import SparsityPattern

    method = build_method("esparse", settings)
    pattern = SparsityPattern.parse(pattern_text)
    model, tokenizer = load_model(model_dir, dtype=dtype, device="cpu")
    outcome = prune_model(model, method, pattern, load_calibration_tokens(calibration),
                          device=_single_device(device), placement=placement_for(model, device))
    device = _place_for_evaluation(model, device)
    tokens = token_stream(load_records(dataset, mirror)["text"], tokenizer, dataset)
    result = perplexity(model, tokens, seqlen, max_windows, device=device)
    efficacies = [layer["shuffle_efficacy"] for layer in outcome.layers if layer["shuffle_efficacy"] is not None]
    payload = {
        **wildcards,
        "settings": settings,
        "pattern": pattern.label,
        "heldout_dataset": dataset_source(dataset, mirror),
        "heldout_ppl": result["ppl"],
        "seqlen": result["seqlen"],
        "windows": result["windows"],
        "windows_available": result["windows_available"],
        "prune_seconds": outcome.summary["seconds"],
        "achieved_sparsity": outcome.summary["achieved_sparsity"],
        "mean_shuffle_efficacy": sum(efficacies) / len(efficacies) if efficacies else None,
        "masks_sha256": sha256_tensor(torch.cat([m.flatten() for m in outcome.masks.values()])),
        "provenance": provenance(config, "ablation", wildcards,
                                 inputs={"calibration_tokens": sha256_file(calibration),
                                         "eval_tokens": result["stream_sha256"]}),
    }
    write_json(out_json, payload)


def ablation_table_step(json_paths: list[str], configured: dict, out_csv: str, out_choice: str) -> pd.DataFrame:
    """Tabulate the ablation and choose alpha and bins by held-apart perplexity."""
    rows = []
    for path in json_paths:
        record = read_json(path)
        rows.append({"variant": record["variant"], **{k: record["settings"][k] for k in ("metric", "shuffle", "alpha", "bins")},
                     "pattern": record["pattern"], "heldout_ppl": record["heldout_ppl"], "seqlen": record["seqlen"],
                     "windows": record["windows"], "mean_shuffle_efficacy": record["mean_shuffle_efficacy"],
                     "prune_seconds": record["prune_seconds"], "masks_sha256": record["masks_sha256"]})
    table = pd.DataFrame(rows).sort_values(["metric", "shuffle", "alpha", "bins"]).reset_index(drop=True)
    full = table[(table["metric"] == configured["metric"]) & (table["shuffle"] == configured["shuffle"])]
    if full.empty:
        raise ValueError(f"the ablation has no variant with the configured metric {configured['metric']!r} "
                         f"and shuffle {configured['shuffle']!r}, so alpha and bins cannot be chosen")
    best = full.loc[full["heldout_ppl"].idxmin()]
    choice = {
        "criterion": "lowest perplexity on the held-apart C4 documents (c4_heldout), never WikiText-2 test",
        "metric": configured["metric"],
        "shuffle": configured["shuffle"],
        "chosen": {"alpha": float(best["alpha"]), "bins": int(best["bins"])},
        "chosen_heldout_ppl": float(best["heldout_ppl"]),
        "configured": {"alpha": configured["alpha"], "bins": configured["bins"]},
        "configured_is_chosen": (float(best["alpha"]) == float(configured["alpha"])
                                 and int(best["bins"]) == int(configured["bins"])),
        "candidates": full[["alpha", "bins", "heldout_ppl"]].to_dict(orient="records"),
    }
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    write_json(out_choice, choice)
    return table


# --- zero-shot ---------------------------------------------------------------------------------------

def zeroshot_step(model_dir: str, tasks, mirror: str | None, limit, batch_size: int, device: str, dtype: str,
                  out_json: str, out_csv: str, tasks_dir: str, config: dict, wildcards: dict) -> None:
    from .zeroshot import run_zeroshot

    model_dir_path = Path(model_dir)
    prune_info = read_json(model_dir_path / "prune.json") if (model_dir_path / "prune.json").exists() else None
    block = provenance(
        config, "zeroshot", wildcards,
        inputs={"model_weights": {p.name: sha256_file(p) for p in sorted(model_dir_path.glob("model*.safetensors"))},
                "masks_sha256": prune_info["masks_sha256"] if prune_info else None},
        extra={"device": device, "dtype": dtype, "limit": limit, "batch_size": batch_size},
    )
    run_zeroshot(model_dir, out_json, tasks, mirror, limit=limit, batch_size=batch_size, device=device,
                 out_csv=out_csv, tasks_dir=tasks_dir, model_name=wildcards["model"], method=wildcards["method"],
                 pattern=wildcards["pattern"], dtype=dtype, provenance_block=block)


def concat_tables_step(csv_paths: list[str], out_csv: str) -> pd.DataFrame:
    """Concatenate per-job tidy CSVs into one table."""
    table = pd.concat([pd.read_csv(path) for path in csv_paths], ignore_index=True)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table


# --- sparse-kernel build ---------------------------------------------------------------------------

def kernel_build_step(pruned_dir: str, out_dir: str, token_buckets: list[int], device: str) -> None:
    """Pack the 2:4 layers and autotune per shape and token bucket (a CPU-reference plan without CUDA)."""
    from esparse_kernels.build import build_kernels

    plan = build_kernels(pruned_dir, out_dir, token_buckets=tuple(token_buckets), device=device,
                         log=lambda message: log.info("%s", message))
    log.info("kernel plan: device=%s measured=%s", plan.get("device"), plan.get("measured"))


# --- GPU latency and memory profiling ----------------------------------------------------------------

def profile_step(target: str, inputs: dict[str, str], settings: dict, esparse_shuffle: str, device: str,
                 out_json: str, config: dict, wildcards: dict) -> None:
    """Profile one target (esparse/profiling.py); without CUDA the record says what was not measured."""
    from pathlib import Path as _Path

    from .profiling import ProfileSettings, Variant, profile_target, random_variants

    profile_settings = ProfileSettings.from_config(settings)
    if "dense" in inputs:  # a model of this run: real weights
        variants = [Variant("dense", "dense", False, "real", model_dir=inputs["dense"])]
        for method in ("wanda", "esparse"):
            if method in inputs:
                shuffled = method == "esparse" and esparse_shuffle != "none"
                variants.append(Variant(method, "2:4", shuffled, "real", model_dir=inputs[method],
                                        kernel_dir=str(_Path(inputs[f"{method}_kernels"]).parent)))
    else:
        variants = random_variants()
    record = profile_target(target, variants, profile_settings, device)
    record["variants"] = [vars(v) for v in variants]
    if record["measured"]:  # the kernel model must generate what the masked dense model generates
        from .profiling import greedy_agreement

        record["greedy_agreement"] = [
            {"method": v.method, **greedy_agreement(v.model_dir, v.kernel_dir, device, profile_settings.dtype)}
            for v in variants if v.kernel_dir]
        for check in record["greedy_agreement"]:
            log.info("greedy %s 2:4 over %d prompts: %s (first differences %s)", check["method"],
                     len(check["prompts"]), "agree" if check["agree"] else "DIFFER",
                     [p["first_difference"] for p in check["prompts"]])
    checksums = {}
    for name, path in sorted(inputs.items()):
        where = _Path(path)
        if (where / "prune.json").exists():
            pruned = read_json(where / "prune.json")
            checksums[name] = {"masks": pruned["masks_sha256"], "weights": pruned["weights_sha256"]}
        elif where.is_dir():
            checksums[name] = model_manifest(path).get("weights_sha256")
        else:
            checksums[name] = sha256_file(where)
    record["provenance"] = provenance(config, "profile", wildcards, inputs=checksums,
                                      seeds={"profiling": profile_settings.seed}, extra={"device": device})
    write_json(out_json, record)
    log.info("%s: %s", target, "measured" if record["measured"] else record["reason"])


def profile_tables_step(json_paths: list[str], latency_csv: str, memory_csv: str) -> None:
    from .profiling import LATENCY_COLUMNS, MEMORY_COLUMNS

    for key, columns, out in (("latency", LATENCY_COLUMNS, latency_csv), ("memory", MEMORY_COLUMNS, memory_csv)):
        rows = [row for path in json_paths for row in read_json(path)[key]]
        table = pd.DataFrame(rows, columns=columns)
        with atomic_path(out) as tmp:
            table.to_csv(tmp, index=False)


def ppl_table_step(json_paths: list[str], out_csv: str, pruned_dirs: list[str] | None = None) -> pd.DataFrame:
    """One row per perplexity record; pruning time and peak memory from each pruned model's prune.json
    (pruned_dirs), else as the perplexity record copied them."""
    summaries = {}
    for directory in pruned_dirs or []:
        record = read_json(Path(directory) / "prune.json")
        parts = Path(directory).parts
        summaries[(parts[-3], parts[-2], parts[-1])] = record["summary"]
    rows = []
    for path in json_paths:
        record = read_json(path)
        summary = summaries.get((record["model"], record["method"], record["pattern"]))
        rows.append({
            "model": record["model"], "method": record["method"], "pattern": record["pattern"],
            "seqlen": record["seqlen"], "windows": record["windows"],
            "windows_available": record["windows_available"], "ppl": record["ppl"],
            "achieved_sparsity": record["achieved_sparsity"], "masks_sha256": record["masks_sha256"],
            "prune_seconds": summary["seconds"] if summary else record.get("prune_seconds"),
            "prune_peak_memory_bytes": summary["peak_memory_bytes"] if summary else record.get("prune_peak_memory_bytes"),
            "prune_device": summary["device"] if summary else record.get("prune_device"),
        })
    table = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table
