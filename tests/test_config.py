"""Configuration: presets, schema validation and semantic checks give one clear message."""

import pytest

from esparse.config import resolve_config
from esparse.errors import ConfigError, DataError


def test_presets_resolve(data_mirror):
    for preset in ("smoke", "default", "paper"):
        config = resolve_config({"preset": preset, "data_mirror": str(data_mirror)})
        assert config["preset"] == preset
    smoke = resolve_config({"preset": "smoke"})
    assert smoke["calibration"]["nsamples"] == 4 and smoke["calibration"]["seed"] == 0
    paper = resolve_config({"preset": "paper"})
    assert paper["calibration"] == {"dataset": "c4_calibration", "nsamples": 128, "seqlen": 2048, "seed": 0}
    assert paper["perplexity"]["max_windows"] is None


def test_command_line_strings_are_read_as_numbers():
    """snakemake --config calibration='{nsamples: 64}' passes '64' as a string."""
    config = resolve_config({"calibration": {"nsamples": "64", "seed": "3"}, "perplexity": {"max_windows": "null"},
                             "patterns": ["2:4", "4:8"]})
    assert config["calibration"]["nsamples"] == 64 and config["calibration"]["seed"] == 3
    assert config["perplexity"]["max_windows"] is None
    assert config["patterns"] == ["2:4", "4:8"]


def test_user_overrides_beat_the_preset():
    config = resolve_config({"preset": "smoke", "calibration": {"nsamples": 7}})
    assert config["calibration"]["nsamples"] == 7 and config["calibration"]["seqlen"] == 128


@pytest.mark.parametrize("override, message", [
    ({"preset": "nope"}, r"unknown preset 'nope': allowed presets are default, paper, smoke"),
    ({"calibration": {"nsamples": 1.5}}, r"calibration.nsamples: 1.5 is not of type 'integer'"),
    ({"calibration": {"nsamples": "eight"}}, r"calibration.nsamples: 'eight' is not of type 'integer'"),
    ({"methods": ["dense", "obc"]}, r"methods.1: 'obc' is not allowed; allowed values: 'dense', 'magnitude'"),
    ({"patterns": ["4:2"]}, r"4:2"),
    ({"patterns": ["unstructured:1.5"]}, r"1.5"),
    ({"models": ["not a model"]}, r"unknown model 'not a model'"),
    ({"calibration": {"seqlen": 9000}}, r"calibration.seqlen 9000 exceeds the context length 8192 of model 'smollm2-135m'"),
    ({"perplexity": {"seqlen": 10000}}, r"perplexity.seqlen 10000 exceeds the context length 8192"),
    ({"device": "tpu"}, r"device: 'tpu' is not allowed; allowed values: 'auto', 'cpu', 'cuda'"),
    ({"gpus_per_job": 0}, r"gpus_per_job: 0 is less than the minimum of 1"),
    ({"surprise": 1}, r"Additional properties are not allowed \('surprise'"),
    ({"method_settings": {"esparse": {"alpha": "x"}}}, r"alpha"),
])
def test_bad_values_name_the_value(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(override)


def test_mirror_checks(tmp_path, data_mirror):
    with pytest.raises(ConfigError, match="is not a data mirror: no SHA256SUMS"):
        resolve_config({"data_mirror": str(tmp_path)})
    # A copy of the mirror with one corrupted file the run would read.
    import shutil

    copy = tmp_path / "mirror"
    shutil.copytree(data_mirror, copy, ignore=shutil.ignore_patterns("hellaswag", "boolq", "arc_*"))
    (copy / "wikitext-2-raw-v1" / "wiki.test.raw").chmod(0o644)
    with open(copy / "wikitext-2-raw-v1" / "wiki.test.raw", "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 1]))
    with pytest.raises(DataError, match=r"wiki.test.raw is corrupt"):
        resolve_config({"data_mirror": str(copy)})
    (copy / "wikitext-2-raw-v1" / "wiki.test.raw").unlink()
    with pytest.raises(DataError, match=r"wiki.test.raw is missing"):
        resolve_config({"data_mirror": str(copy)})
