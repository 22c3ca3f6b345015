"""The sbatch flags workflow/profiles/slurm produces for every rule.

Snakemake itself resolves each job's resources (rules + profile, model-size expressions included) in
a dry run with the profile; the plugin's own `get_submit_command` and `set_gres_string` then render
the sbatch call from them, exactly as `--executor slurm` does at submission. No cluster is needed.
The dry run passes a large --cores because the SLURM executor does not cap threads by local cores.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
MB = 2**20

plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
from snakemake_executor_plugin_slurm.submit_string import get_submit_command  # noqa: E402
from snakemake_executor_plugin_slurm.utils import set_gres_string  # noqa: E402


class Resources(dict):
    """The resource view the plugin reads: `.get(name)` and attribute access, like Snakemake's."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def parse_dry_run(text: str) -> list[SimpleNamespace]:
    """Jobs of a dry run as the plugin sees them: rule name, wildcards, threads, resources."""
    jobs, current = [], None
    for line in text.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if match:
            current = {"rule": match.group(1), "threads": 1, "resources": Resources(), "has_output": False}
            jobs.append(current)
        elif current is not None and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            if key == "output":
                current["has_output"] = True
            elif key == "threads":
                current["threads"] = int(value)
            elif key == "wildcards":
                current["wildcards"] = dict(item.split("=", 1) for item in value.split(", "))
            elif key == "resources":
                for item in value.split(", "):
                    name, raw = item.split("=", 1)
                    if " " not in raw:  # skip human-readable duplicates such as "mem=5.03 GB"
                        current["resources"][name] = int(raw) if raw.lstrip("-").isdigit() else raw
        elif not line.startswith(" "):
            current = None
    return [SimpleNamespace(name=j["rule"], threads=j["threads"], resources=j["resources"],
                            wildcards=list(j.get("wildcards", {}).values()))
            for j in jobs if j["has_output"]]


def sbatch_call(job, account="", partition=""):
    params = {"run_uuid": "RUN", "slurm_logfile": "LOG", "comment_str": f"rule_{job.name}",
              "account": account, "partition": partition, "workdir": "WORKDIR"}
    settings = SimpleNamespace(requeue=False, no_requeue=False, qos=None, reservation=None)
    return get_submit_command(job, params, settings=settings) + set_gres_string(job)


def flags(call: str) -> dict:
    """sbatch options of a call, `--key value`, `--key=value` and `-k value` alike."""
    tokens = call.split()
    out, i = {}, 1
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-"):
            if "=" in token:
                key, value = token.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                key, value = token, tokens[i + 1]
                i += 1
            else:
                key, value = token, True
            out[key] = value
        i += 1
    return out


def fake_model(resources_dir: Path, weights_bytes: int) -> None:
    """A prepared-model directory whose weights file has the given size (sparse, no disk used)."""
    model = resources_dir / "models" / "smollm2-135m"
    model.mkdir(parents=True)
    with open(model / "model.safetensors", "wb") as handle:
        handle.truncate(weights_bytes)
    (model / "config.json").write_text("{}")


@pytest.fixture(scope="module")
def profile():
    return yaml.safe_load((PROFILE / "config.yaml").read_text())


@pytest.fixture(scope="module")
def smoke_jobs(tmp_path_factory, data_mirror):
    """The smoke DAG's jobs on a model directory the size of float32 SmolLM2-135M (540 MB)."""
    tmp_path = tmp_path_factory.mktemp("smoke")
    resources_dir = tmp_path / "resources"
    fake_model(resources_dir, 540 * MB)
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE), "--dry-run", "--cores", "1024",
           "--config", "preset=smoke", f"data_mirror={data_mirror}", f"results_dir={tmp_path / 'results'}",
           f"resources_dir={resources_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SNAKEMAKE_SLURM_PARTITIONS": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = parse_dry_run(proc.stdout + proc.stderr)
    assert jobs, proc.stdout[-3000:]
    return jobs


def profile_resource(profile, rule: str, name: str, model_dir: Path) -> int:
    """A rule's resource from the profile, evaluated the way Snakemake evaluates --set-resources."""
    from snakemake.iocontainers import Namedlist
    from snakemake.resources import Resource

    value = profile["set-resources"][rule][name]
    if isinstance(value, int):
        return value
    return Resource.cli_evaluator(name, value, wildcards={}, input=Namedlist(fromdict={"model": str(model_dir)}),
                                  attempt=1, threads=2, async_run=None)


def by_rule(jobs):
    """One job per rule whose resources are resolved (a pruned model's perplexity is to-be-determined
    until the model exists; the dense one is resolved)."""
    out = {}
    for job in jobs:
        if "<TBD>" not in (str(job.resources.get("mem_mb")), str(job.resources.get("runtime"))):
            out.setdefault(job.name, job)
    return out


def test_every_rule_of_the_workflow_has_measured_resources(profile):
    sources = [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]
    pattern = re.compile(r"^(?:rule|checkpoint) (\w+):", re.M)
    rules = {m.group(1) for path in sources for m in pattern.finditer(path.read_text())}
    assert {"prune", "perplexity"} <= rules
    # profiling's memory depends on the run's device (32 GB on CUDA, 2 GB on CPU where it only records
    # "not measured"); the profile cannot see the device, so the rule itself sets it.
    missing = rules - {"all", "profiling"} - set(profile["set-resources"])
    assert not missing, f"rules without an entry in the SLURM profile's set-resources: {sorted(missing)}"
    for rule, resources in profile["set-resources"].items():
        assert {"mem_mb", "runtime"} <= set(resources), f"{rule}: mem_mb and runtime are both needed"


def test_profile_selects_the_slurm_executor_and_leaves_site_keys_to_the_site(profile):
    assert profile["executor"] == "slurm"
    assert profile["default-resources"]["mem_mb"] > 0 and profile["default-resources"]["runtime"] > 0
    text = (PROFILE / "config.yaml").read_text()
    for key in ("slurm_account", "slurm_partition", "gpu_model"):
        assert re.search(rf"#\s*{key}:.*SITE", text) or re.search(rf"#\s+{key}:", text), key
        assert key not in profile["default-resources"], f"{key} must stay a commented site edit"


def test_smoke_jobs_render_to_the_expected_sbatch_flags(smoke_jobs):
    # A pruned model's jobs evaluate the model-size expressions once prune has written the model
    # (Snakemake re-evaluates them then); the dense model exists, so its jobs are resolved here.
    jobs = by_rule(smoke_jobs)
    assert {"calibrate", "prune", "perplexity", "ppl_table"} <= set(jobs)
    w = 540  # MB of the fake model directory
    expected = {  # rule: (--mem in MB, --time in minutes, --cpus-per-task), as the profile documents
        "calibrate": (2000, 20, 2),
        "prune": (4000 + w * 5 // 2, 60 + w // 20, 2),
        "perplexity": (3000 + 2 * w, 30 + w // 40, 2),
        "ppl_table": (1000, 10, 1),
    }
    for rule, (mem, minutes, cpus) in expected.items():
        got = flags(sbatch_call(jobs[rule]))
        assert got["--mem"] == str(mem), (rule, got)
        assert got["-t"] == str(minutes), (rule, got)
        assert got["--cpus-per-task"] == str(cpus), (rule, got)
        assert got["--ntasks"] == "1", (rule, got)
        assert "--gpus" not in got and "--gres" not in got, f"{rule}: a CPU run must not ask for GPUs"
    for job in smoke_jobs:  # every job has memory and a time limit, or gets them once its input exists
        got = flags(sbatch_call(job))
        for flag in ("--mem", "-t"):
            if "<TBD>" in got[flag]:
                assert job.name in ("prune", "perplexity", "ablation_variant", "zeroshot"), (job.name, flag)
            else:
                assert int(got[flag]) >= 10, (job.name, got)


def test_memory_and_runtime_scale_with_the_model(profile, tmp_path):
    small, large, missing = tmp_path / "small", tmp_path / "large", tmp_path / "not-prepared-yet"
    fake_model(small, 540 * MB)
    fake_model(large, 27000 * MB)  # float32 7B, as a sparse file
    small, large = small / "models" / "smollm2-135m", large / "models" / "smollm2-135m"
    for rule in ("prune", "perplexity", "ablation_variant"):
        for name in ("mem_mb", "runtime"):
            bigger = profile_resource(profile, rule, name, large) > profile_resource(profile, rule, name, small)
            assert bigger, (rule, name)
        assert profile_resource(profile, rule, "mem_mb", large) >= 2 * 27000, f"{rule}: 7B weights twice at least"
    assert profile_resource(profile, "prune", "mem_mb", large) == 4000 + 27000 * 5 // 2
    # Runtimes stay under the caps that common partitions allow, however large the model.
    huge = tmp_path / "huge"
    fake_model(huge, 300000 * MB)
    huge = huge / "models" / "smollm2-135m"
    assert profile_resource(profile, "prune", "runtime", huge) == 2880
    assert profile_resource(profile, "perplexity", "runtime", huge) == 1440
    # Before the model exists, Snakemake postpones the evaluation (to-be-determined) until the input
    # is there, rather than submitting with the bare floor.
    from snakemake.common.tbdstring import TBDString

    assert isinstance(profile_resource(profile, "prune", "mem_mb", missing), TBDString)


def test_gpu_rules_render_gpu_requests(smoke_jobs):
    """On a CUDA run the rules set gpu=1 (a CPU machine cannot resolve device=cuda, so set it here)."""
    prune = by_rule(smoke_jobs)["prune"]
    gpu_job = SimpleNamespace(name=prune.name, threads=prune.threads, wildcards=prune.wildcards,
                              resources=Resources(prune.resources, gpu=1))
    got = flags(sbatch_call(gpu_job))
    assert got["--gpus"] == "1" and got["--cpus-per-task"] == "2" and "--ntasks" not in got
    typed = SimpleNamespace(**{**vars(gpu_job), "resources": Resources(gpu_job.resources, gpu_model="h100")})
    assert flags(sbatch_call(typed))["--gpus"] == "h100:1"
    gres = SimpleNamespace(**{**vars(prune), "resources": Resources(prune.resources, gres="gpu:h100:1")})
    assert flags(sbatch_call(gres))["--gres"] == "gpu:h100:1"


def test_site_partition_key_reaches_sbatch(smoke_jobs):
    """`slurm_partition` (the profile's SITE key) becomes -p through the plugin's partition logic."""
    prune = by_rule(smoke_jobs)["prune"]
    edited = SimpleNamespace(**{**vars(prune), "resources": Resources(prune.resources, slurm_partition="gpu")})
    executor = SimpleNamespace(_partitions=None, _fallback_partition=None, logger=None)
    partition = plugin.Executor.get_partition_arg(executor, edited)
    assert flags(sbatch_call(edited, partition=partition))["-p"] == "gpu"
