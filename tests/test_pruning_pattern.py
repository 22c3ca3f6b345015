"""SparsityPattern parsing, naming and validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from esparse.errors import ConfigError
from esparse.pruning.pattern import SparsityPattern, check_layer_width


@pytest.mark.parametrize(
    "text, n, m",
    [("2:4", 2, 4), ("4:8", 4, 8), ("2of4", 2, 4), ("4OF8", 4, 8), (" 1:2 ", 1, 2), ("16:32", 16, 32)],
)
def test_parse_nm(text, n, m):
    pattern = SparsityPattern.parse(text)
    assert pattern.is_nm and (pattern.n, pattern.m) == (n, m)
    assert pattern.sparsity == pytest.approx(1 - n / m)
    assert pattern.slug == f"{n}of{m}"
    assert pattern.label == f"{n}:{m}"


@pytest.mark.parametrize(
    "text, sparsity, slug, label",
    [
        ("unstructured", 0.5, "unstructured50", "unstructured-50%"),
        ("unstructured50", 0.5, "unstructured50", "unstructured-50%"),
        ("unstructured:0.6", 0.6, "unstructured60", "unstructured-60%"),
        ("unstructured-50%", 0.5, "unstructured50", "unstructured-50%"),
        ("unstructured:0.625", 0.625, "unstructured62p5", "unstructured-62.5%"),
    ],
)
def test_parse_unstructured(text, sparsity, slug, label):
    pattern = SparsityPattern.parse(text)
    assert not pattern.is_nm
    assert pattern.sparsity == pytest.approx(sparsity)
    assert pattern.slug == slug
    assert pattern.label == label


@pytest.mark.parametrize(
    "text",
    ["5:4", "4:4", "0:4", "2:1", "unstructured:0", "unstructured:1", "unstructured:1.5", "unstructured0",
     "unstructured100", "unstructured150", "half", "", "2-4", "2:4:8", "structured50"],
)
def test_parse_rejects_with_allowed_forms(text):
    with pytest.raises(ConfigError) as error:
        SparsityPattern.parse(text)
    assert repr(text) in str(error.value)


def test_n_greater_than_m_message_names_values():
    with pytest.raises(ConfigError, match="5:4"):
        SparsityPattern.parse("5:4")
    with pytest.raises(ConfigError, match="between 0 and 1"):
        SparsityPattern.unstructured(1.0)
    with pytest.raises(ConfigError):
        SparsityPattern.unstructured(True)
    with pytest.raises(ConfigError):
        SparsityPattern(n=2, m=4, unstructured_sparsity=0.5)
    with pytest.raises(ConfigError, match="string"):
        SparsityPattern.parse(24)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 31), extra=st.integers(1, 32))
def test_slug_and_label_round_trip_nm(n, extra):
    pattern = SparsityPattern.nm(n, n + extra)
    assert SparsityPattern.parse(pattern.slug) == pattern
    assert SparsityPattern.parse(pattern.label) == pattern
    assert hash(pattern) == hash(SparsityPattern.parse(pattern.slug))


@settings(max_examples=60, deadline=None)
@given(percent=st.integers(1, 99))
def test_slug_round_trip_unstructured(percent):
    pattern = SparsityPattern.unstructured(percent / 100)
    assert SparsityPattern.parse(pattern.slug).sparsity == pytest.approx(pattern.sparsity)
    assert SparsityPattern.parse(pattern.label).sparsity == pytest.approx(pattern.sparsity)


def test_pruned_counts():
    assert SparsityPattern.parse("2:4").pruned_per_row(576) == 288
    assert SparsityPattern.parse("4:8").pruned_per_row(1536) == 768
    assert SparsityPattern.parse("unstructured").pruned_per_row(577) == 288  # Wanda: int(width * s)
    # floor(100 * 0.29) must be 29 despite 100 * 0.29 == 28.999999999999996 in binary
    assert SparsityPattern.unstructured(0.29).pruned_per_row(100) == 29
    assert SparsityPattern.unstructured(0.5).pruned_total(10 * 7) == 35


def test_check_layer_width():
    check_layer_width(SparsityPattern.parse("2:4"), 576)
    check_layer_width(SparsityPattern.parse("unstructured"), 577)
    with pytest.raises(ConfigError, match="does not divide the layer input width 578"):
        check_layer_width(SparsityPattern.parse("4:8"), 578)
    with pytest.raises(ConfigError):
        check_layer_width(SparsityPattern.parse("2:4"), 0)
