"""The decode step's kernel breakdown: classification and per-step sums (pure), and a real trace (GPU)."""

import pytest
import torch

from esparse.kernel_breakdown import (KERNEL_CATEGORIES, classify_kernel, kernel_events, profile_graph_kernels,
                                      summarize_kernels)


@pytest.mark.parametrize("name, category", [
    ("void sp24_mma_kernel<false, 1, 8, true>(GroupParams)", "2:4 GEMM, decode kernel"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::collective::"
     "CollectiveMma<cutlass::gemm::MainloopSm90TmaGmmaWarpSpecializedSparse<4>>>>(Params)", "2:4 GEMM, CUTLASS"),
    ("_sp24_gemv_kernel", "2:4 GEMM, Triton"),
    ("_sp24_decompress_kernel", "2:4 decompression"),
    ("sp24_stage_kernel(unsigned short const*, StageGroup)", "activation gather (permutation)"),
    ("void permute_columns_kernel<__half>(__half const*, int const*, __half*, int, int)",
     "activation gather (permutation)"),
    ("nvjet_hsh_64x32_64x16_2x1_v_bz_splitK_TNT", "dense GEMM"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64", "dense GEMM"),
    ("void gemv2T_kernel_val<int, int, __half, __half, float, 128>", "dense GEMM"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "attention"),
    ("_add_rms_norm_kernel", "norm, RoPE, SiLU (fused Triton)"),
    ("_silu_mul_kernel", "norm, RoPE, SiLU (fused Triton)"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_classify_kernel(name, category):
    assert classify_kernel(name) == category


def test_every_category_but_the_last_needs_a_match():
    assert KERNEL_CATEGORIES[-1] == ("other", "")
    assert classify_kernel("") == "other"


def _event(name, ts, dur):
    return {"name": name, "ts": ts, "dur": dur, "cat": "kernel", "ph": "X"}


def test_summarize_kernels_sums_per_step_and_counts_overlap_once():
    # two replays; in each, a GEMM overlaps the start of the next one (programmatic launch) by 2 us
    events = []
    for base in (0.0, 100.0):
        events += [_event("sp24_mma_kernel", base, 10.0), _event("sp24_mma_kernel", base + 8.0, 10.0),
                   _event("_add_rms_norm_kernel", base + 30.0, 4.0)]
    summary = summarize_kernels(events, replays=2)
    assert summary["replays"] == 2
    assert summary["kernel_us_per_step"] == pytest.approx(24.0)
    assert summary["busy_us_per_step"] == pytest.approx(22.0)  # 18 (two GEMMs, 2 us shared) + 4
    by_name = {k["name"]: k for k in summary["kernels"]}
    assert by_name["sp24_mma_kernel"]["calls_per_step"] == 2
    assert by_name["sp24_mma_kernel"]["us_per_step"] == pytest.approx(20.0)
    assert [c["category"] for c in summary["categories"]] == ["2:4 GEMM, decode kernel",
                                                              "norm, RoPE, SiLU (fused Triton)"]
    assert sum(c["share"] for c in summary["categories"]) == pytest.approx(1.0)


def test_union_handles_nested_and_disjoint_intervals():
    events = [_event("a", 0.0, 10.0), _event("b", 2.0, 3.0), _event("c", 20.0, 5.0), _event("d", 24.0, 1.0)]
    assert summarize_kernels(events, replays=1)["busy_us_per_step"] == pytest.approx(15.0)


@pytest.mark.parametrize("events, replays, message", [
    ([_event("a", 0.0, 1.0)], 0, "replays must be >= 1, got 0"),
    ([], 3, "no kernel events"),
])
def test_summarize_kernels_rejects(events, replays, message):
    with pytest.raises(ValueError, match=message):
        summarize_kernels(events, replays)


def test_kernel_events_keeps_only_gpu_kernels():
    trace = {"traceEvents": [_event("k", 0.0, 1.0), {"name": "cudaGraphLaunch", "cat": "cuda_runtime", "ph": "X"},
                             {"name": "k", "cat": "kernel", "ph": "i"}]}
    assert [e["name"] for e in kernel_events(trace)] == ["k"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_profile_graph_kernels_sees_the_kernels_of_graph_replays():
    a = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    b = torch.randn(256, 256, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        (a @ b).relu_()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = (a @ b).relu_()
    graph.replay()
    summary = profile_graph_kernels(graph.replay, replays=5)
    categories = {c["category"] for c in summary["categories"]}
    assert "dense GEMM" in categories, summary["kernels"]
    assert 0 < summary["busy_us_per_step"] <= summary["kernel_us_per_step"] + 1e-6
    assert all(k["calls_per_step"] >= 1 for k in summary["kernels"])
    torch.testing.assert_close(out, (a @ b).relu_())


def test_breakdown_rows_and_csv(tmp_path):
    import json

    import pandas as pd

    from esparse.kernel_breakdown import BREAKDOWN_COLUMNS, breakdown_rows, main

    summary = summarize_kernels([_event("sp24_mma_kernel", 0.0, 3000.0), _event("_silu_mul_kernel", 3000.0, 1000.0)], 1)
    case = {"target": "llama-7b", "weights": "random", "method": "magnitude", "pattern": "2:4", "shuffle": True,
            "batch": 1, "context": 2048, "step_median_ms": 4.2}
    record = {"decode_breakdown": [{**case, "breakdown": summary},
                                   {**case, "batch": 8, "breakdown": None, "breakdown_error": "RuntimeError: x"}]}
    rows = breakdown_rows([record, {"latency": []}])
    assert [r["category"] for r in rows] == ["2:4 GEMM, decode kernel", "norm, RoPE, SiLU (fused Triton)",
                                             "not recorded: RuntimeError: x"]
    assert rows[0]["category_ms"] == pytest.approx(3.0) and rows[0]["busy_ms"] == pytest.approx(4.0)
    assert rows[0]["share"] == pytest.approx(0.75) and rows[2]["batch"] == 8
    path = tmp_path / "p.json"
    path.write_text(json.dumps(record))
    assert main([str(path), "--out", str(tmp_path / "b.csv")]) == 0
    table = pd.read_csv(tmp_path / "b.csv")
    assert list(table.columns) == BREAKDOWN_COLUMNS and len(table) == 3
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"latency": []}))
    with pytest.raises(SystemExit, match="no decode_breakdown"):
        main([str(empty), "--out", str(tmp_path / "c.csv")])
    assert not (tmp_path / "c.csv").exists()


def test_a_failed_trace_is_recorded_as_such(monkeypatch, caplog):
    """The profiler failing (here: it finds no kernels) leaves the case's error in the record and no number."""
    import esparse.kernel_breakdown as kb
    from esparse.profiling import _graph_breakdown

    def no_kernels(replay, replays=20):
        replay()
        return summarize_kernels([], replays)

    monkeypatch.setattr(kb, "profile_graph_kernels", no_kernels)
    calls = []
    entry = _graph_breakdown(lambda: calls.append(1))
    assert calls == [1]
    assert entry["breakdown"] is None
    assert entry["breakdown_error"].startswith("ValueError: no kernel events in the trace")
    assert "kernel breakdown failed" in caplog.text
