"""The pruning-time benchmark (E-Sparse against Wanda) on a tiny model: it runs, times both methods
for every pattern and repeat, and its mask digests show determinism."""

import json

import torch
from safetensors.torch import save_file

from esparse.cli import main
from esparse.prune_bench import run_prune_benchmark


def test_prune_benchmark_on_a_tiny_model(tiny_model_dirs, tmp_path):
    calibration = tmp_path / "tokens.safetensors"
    save_file({"tokens": torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))}, str(calibration))
    lines = []
    record = run_prune_benchmark(str(tiny_model_dirs["llama"]), str(calibration), ["2:4", "unstructured50"], 2,
                                 {"esparse": {"alpha": 64.0, "bins": 256}}, report=lines.append)
    assert len(lines) == 4 and all("ratio" in line for line in lines)
    assert [row["pattern"] for row in record["summary"]] == ["2:4", "unstructured-50%"]
    for row in record["summary"]:
        assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
        assert row["ratio_median"] > 0 and row["masks_identical_across_repeats"]
    assert len(record["runs"]) == 8
    assert record["settings"]["esparse"]["bins"] == 256
    # E-Sparse and Wanda choose different 2:4 masks (the shuffle and the entropy term change them)
    digests = {(r["pattern"], r["method"]): r["masks_sha256"] for r in record["runs"]}
    assert digests[("2:4", "wanda")] != digests[("2:4", "esparse")]


def test_prune_benchmark_cli(tiny_model_dirs, tmp_path, capsys):
    calibration = tmp_path / "tokens.safetensors"
    save_file({"tokens": torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(1))}, str(calibration))
    out = tmp_path / "bench.json"
    assert main(["prune-bench", "--model", str(tiny_model_dirs["opt"]), "--calibration", str(calibration),
                 "--patterns", "4:8", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4:8: E-Sparse / Wanda =" in printed and "budget" in printed
    record = json.loads(out.read_text())
    assert record["summary"][0]["pattern"] == "4:8" and record["threads"] >= 1
    assert main(["prune-bench", "--model", str(tiny_model_dirs["opt"]), "--calibration", str(calibration),
                 "--repeats", "0", "--out", str(out)]) == 2
    assert main(["prune-bench", "--model", str(tiny_model_dirs["opt"]), "--calibration", str(calibration),
                 "--config", "preset", "--out", str(out)]) == 2
    assert "--config 'preset' is not NAME=VALUE" in capsys.readouterr().err
