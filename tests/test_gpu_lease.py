"""The local GPU lease with fake device slots: exclusive, freed on exit and on kill, no-op without GPUs."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from esparse.errors import ConfigError
from esparse.gpu_lease import acquire_gpus, gpu_lease, lease_slots, main, visible_devices

REPO = Path(__file__).resolve().parents[1]

# A child process that leases GPUs from fake slots, reports what it got, then holds the lease until
# told to stop (a file appears) or is killed.
HOLDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from esparse.gpu_lease import gpu_lease
    lease_dir, devices, count, report, stop = sys.argv[1:6]
    with gpu_lease(int(count), devices=devices.split(","), lease_dir=lease_dir, timeout_s=30):
        Path(report).write_text(os.environ["CUDA_VISIBLE_DEVICES"])
        while not Path(stop).exists():
            time.sleep(0.05)
""")


def start_holder(tmp_path, name, devices, count=1):
    report, stop = tmp_path / f"{name}.got", tmp_path / f"{name}.stop"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "leases"), ",".join(devices), str(count),
                             str(report), str(stop)], cwd=REPO, env={**os.environ, "SLURM_JOB_ID": ""})
    return proc, report, stop


def wait_for_file(path, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"holder exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path.name} not written in {timeout}s"
        time.sleep(0.05)
    return path.read_text()


def test_concurrent_processes_never_share_a_slot(tmp_path):
    holders = [start_holder(tmp_path, f"h{i}", ["0", "1", "2"]) for i in range(3)]
    try:
        got = [wait_for_file(report, proc) for proc, report, _ in holders]
        assert sorted(got) == ["0", "1", "2"]
    finally:
        for proc, _, stop in holders:
            stop.touch()
            proc.wait(timeout=30)


def test_second_job_waits_until_the_first_releases(tmp_path):
    first, first_report, first_stop = start_holder(tmp_path, "first", ["7"])
    second = None
    try:
        assert wait_for_file(first_report, first) == "7"
        second, second_report, second_stop = start_holder(tmp_path, "second", ["7"])
        time.sleep(1.5)
        assert not second_report.exists(), "a second job got a slot that was held"
        first_stop.touch()
        first.wait(timeout=30)
        assert wait_for_file(second_report, second) == "7"
        second_stop.touch()
        second.wait(timeout=30)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()


def test_slot_is_freed_when_the_holder_is_killed(tmp_path):
    holder, report, _ = start_holder(tmp_path, "victim", ["0"])
    assert wait_for_file(report, holder) == "0"
    with pytest.raises(TimeoutError):
        acquire_gpus(1, ["0"], lease_dir=tmp_path / "leases", timeout_s=0.3, poll_s=0.05)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lease = acquire_gpus(1, ["0"], lease_dir=tmp_path / "leases", timeout_s=5, poll_s=0.05)
    assert lease.devices == ["0"]
    lease.release()


def test_context_sets_and_restores_visible_devices_and_frees_on_exception(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "3,5"}
    with pytest.raises(ValueError):
        with gpu_lease(1, lease_dir=tmp_path, env=env) as devices:
            assert devices == ["3"] and env["CUDA_VISIBLE_DEVICES"] == "3"
            with gpu_lease(1, lease_dir=tmp_path, env=dict(env, CUDA_VISIBLE_DEVICES="3,5")) as other:
                assert other == ["5"]  # the held slot is skipped
            raise ValueError("step failed")
    assert env == {"CUDA_VISIBLE_DEVICES": "3,5"}
    lease = acquire_gpus(1, ["3"], lease_dir=tmp_path, timeout_s=1, poll_s=0.05)
    lease.release()


def test_multi_gpu_job_gets_distinct_devices_all_or_nothing(tmp_path):
    held = acquire_gpus(1, ["0", "1", "2"], lease_dir=tmp_path)
    pair = acquire_gpus(2, ["0", "1", "2"], lease_dir=tmp_path)
    assert held.devices == ["0"] and pair.devices == ["1", "2"]
    with pytest.raises(TimeoutError):
        acquire_gpus(2, ["0", "1", "2"], lease_dir=tmp_path, timeout_s=0.2, poll_s=0.05)
    held.release()
    # The failed attempt gave back the slot it had taken, so one GPU is still free.
    single = acquire_gpus(1, ["0", "1", "2"], lease_dir=tmp_path, timeout_s=1, poll_s=0.05)
    assert single.devices == ["0"]
    for lease in (pair, single):
        lease.release()


def test_no_op_without_gpu_request_without_devices_and_under_slurm(tmp_path):
    env = {}
    with gpu_lease(0, lease_dir=tmp_path, env=env) as devices:
        assert devices == [] and env == {}
    with gpu_lease(1, devices=[], lease_dir=tmp_path, env=env) as devices:
        assert devices == [] and env == {}
    slurm_env = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "0"}
    with gpu_lease(1, lease_dir=tmp_path, env=slurm_env) as devices:
        assert devices == ["0"] and slurm_env["CUDA_VISIBLE_DEVICES"] == "0"
    assert not list(tmp_path.iterdir()), "no lock may be taken in these cases"


def test_slots_are_the_first_k_visible_devices():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "ESPARSE_GPU_SLOTS": "2"}
    assert visible_devices(env) == ["4", "5", "6", "7"]
    assert lease_slots(env) == ["4", "5"]
    assert lease_slots({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert lease_slots({"CUDA_VISIBLE_DEVICES": "1,2"}) == ["1", "2"]
    with pytest.raises(ConfigError, match="ESPARSE_GPU_SLOTS='two'"):
        lease_slots({"ESPARSE_GPU_SLOTS": "two"})


def test_asking_for_more_gpus_than_slots_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="asked for 3 GPU"):
        acquire_gpus(3, ["0", "1"], lease_dir=tmp_path)


def test_command_line_wrapper_holds_the_lease_for_the_command(tmp_path):
    leases = tmp_path / "leases"
    script = ("import os, sys, fcntl; from esparse.gpu_lease import acquire_gpus\n"
              "print(os.environ['CUDA_VISIBLE_DEVICES'])\n"
              f"try:\n    acquire_gpus(1, ['1'], lease_dir={str(leases)!r}, timeout_s=0.2, poll_s=0.05)\n"
              "except TimeoutError:\n    print('held')\n")
    proc = subprocess.run([sys.executable, "-m", "esparse.gpu_lease", "--gpus", "1", "--lease-dir", str(leases),
                           "--", sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_ID": ""}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "held"]
    lease = acquire_gpus(1, ["1"], lease_dir=leases, timeout_s=1, poll_s=0.05)  # freed at exit
    lease.release()
    with pytest.raises(SystemExit):
        main(["--gpus", "1"])


def test_snakemake_gpu_resource_sets_the_slot_count(monkeypatch):
    from esparse.gpu_lease import SLOTS_ENV, export_slots

    class Parsed:  # Snakemake's parsed resource wrapper
        def __init__(self, value):
            self.value = value

    monkeypatch.delenv(SLOTS_ENV, raising=False)
    assert export_slots({"_cores": Parsed(8)}) == 0 and SLOTS_ENV not in os.environ
    assert export_slots({"gpu": Parsed(2)}) == 2 and os.environ[SLOTS_ENV] == "2"
    assert export_slots({"gpu": 3}) == 3 and os.environ[SLOTS_ENV] == "3"
