"""Shared fixtures: the offline data mirror and tiny random models of several architectures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_mirror() -> Path:
    """The offline mirror; CI and tests point at ../shared/data unless ESPARSE_DATA_MIRROR says otherwise."""
    path = Path(os.environ.get("ESPARSE_DATA_MIRROR", REPO_ROOT.parent / "shared" / "data")).resolve()
    if not (path / "SHA256SUMS").is_file():
        pytest.fail(f"data mirror not found at {path} (set ESPARSE_DATA_MIRROR)")
    return path


@pytest.fixture(scope="session")
def wikitext_rows(data_mirror) -> list[str]:
    from esparse.data import load_records

    return list(load_records("wikitext2", data_mirror)["text"])


@pytest.fixture(scope="session")
def tiny_tokenizer(wikitext_rows):
    from esparse.models import build_tiny_tokenizer

    return build_tiny_tokenizer([row for row in wikitext_rows[:3000] if row], vocab_size=384)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, wikitext_rows) -> dict:
    """Tiny random LLaMA and OPT models saved as HF directories with a trained tokenizer."""
    from esparse.models import save_tiny_model

    texts = [row for row in wikitext_rows[:3000] if row]
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: save_tiny_model(arch, root / arch, texts, seed=0) for arch in ("llama", "opt")}
