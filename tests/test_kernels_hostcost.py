"""The host-cost probe (esparse_kernels.hostcost): refuses without CUDA, builds its layers anywhere,
and on a Hopper GPU writes one row per layer and token count."""

from __future__ import annotations

import pytest
import torch

from esparse.errors import ConfigError
from esparse_kernels import hostcost
from esparse_kernels.linear import SparseLinear
from esparse_kernels.pack import reference_linear, rel_frobenius_error


def test_probe_names_the_missing_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        hostcost.host_us_per_call(lambda: None)


def test_layers_cover_dense_and_both_sparse_inputs():
    layers = hostcost.layers_for(64, 128, [1, 128], "cpu")
    assert set(layers) == {"dense", "sparse", "sparse_perm"}
    assert isinstance(layers["sparse"], SparseLinear) and layers["sparse"].perm is None
    assert layers["sparse_perm"].perm is not None
    x = torch.randn(3, 128, dtype=torch.float16)
    for name in ("sparse", "sparse_perm"):
        assert rel_frobenius_error(layers[name](x), reference_linear(x, layers[name].packed)) < 1e-3


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                    reason="needs a compute-capability 9.0 GPU")
def test_probe_writes_a_row_per_layer_and_token_count(tmp_path):
    from esparse.io import read_json

    out = tmp_path / "hostcost.json"
    assert hostcost.main(["--shape", "256x512", "--tokens", "1,128", "--out", str(out)]) == 0
    rows = read_json(out)["rows"]
    assert [(r["layer"], r["tokens"]) for r in rows] == [(n, t) for t in (1, 128)
                                                         for n in ("dense", "sparse", "sparse_perm")]
    assert all(r["host_us_per_call"] > 0 for r in rows)
    assert {r["backend"] for r in rows if r["layer"] != "dense"} == {"ours_cuda", "ours_cutlass"}
