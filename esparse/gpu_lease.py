"""One GPU per job on one machine: a file-lock lease that sets CUDA_VISIBLE_DEVICES.

`snakemake --cores N --resources gpu=K` bounds how many GPU jobs run at once but does not say which
device each should use, so two jobs would both land on device 0. Each GPU job therefore leases
device slots before CUDA starts: slots 0..K-1 (K from ESPARSE_GPU_SLOTS, which the workflow sets
from `--resources gpu=K`; default every device) are the first K visible devices
(CUDA_VISIBLE_DEVICES as set when snakemake started, else every /dev/nvidiaN), and a slot is held
by an exclusive `flock` on `<lease dir>/gpu-<device id>.lock`. The kernel drops the lock when the
holder exits, however it exits (return, exception, SIGKILL, OOM kill), so a crashed job never
strands a device.

No-op cases: the job asked for no GPU; the machine has no NVIDIA device; the job runs under SLURM
with its own allocation (SLURM_JOB_ID and CUDA_VISIBLE_DEVICES set: SLURM already chose).

Pipeline steps call `with gpu_lease(snakemake.resources.get("gpu", 0)): ...` before touching CUDA;
shell rules wrap their command: `python -m esparse.gpu_lease --gpus {resources.gpu} -- CMD ...`.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, MutableMapping, Sequence

from .errors import ConfigError

LEASE_DIR_ENV = "ESPARSE_GPU_LEASE_DIR"
SLOTS_ENV = "ESPARSE_GPU_SLOTS"      # K: lease among the first K visible devices only


def export_slots(global_resources) -> int:
    """Set ESPARSE_GPU_SLOTS from Snakemake's `--resources gpu=K` (its `workflow.global_resources`), so
    that the local jobs it starts, which inherit the environment, lease among the first K devices.
    Returns K (0: no gpu resource given, nothing set)."""
    value = (global_resources or {}).get("gpu")
    value = getattr(value, "value", value)  # Snakemake wraps parsed resources in objects with .value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        os.environ[SLOTS_ENV] = str(int(value))
        return int(value)
    return 0


def default_lease_dir() -> Path:
    """Per machine and user: GPUs are per machine, and users must not block each other's files."""
    return Path(os.environ.get(LEASE_DIR_ENV) or Path(tempfile.gettempdir()) / f"esparse-gpu-lease-{os.getuid()}")


def visible_devices(env: MutableMapping[str, str] | None = None) -> list[str]:
    """Device ids this machine lets a job use, without initialising CUDA.

    Reading /dev instead of asking torch matters: once CUDA is initialised in a process,
    CUDA_VISIBLE_DEVICES no longer has any effect on it.
    """
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    nodes = [p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)]
    return [str(i) for i in sorted(int(p[len("/dev/nvidia"):]) for p in nodes)]


def lease_slots(env: MutableMapping[str, str] | None = None) -> list[str]:
    """The devices behind slots 0..K-1: the first K visible ones (K = ESPARSE_GPU_SLOTS, else all)."""
    env = os.environ if env is None else env
    devices = visible_devices(env)
    raw = env.get(SLOTS_ENV, "").strip()
    if not raw:
        return devices
    try:
        slots = int(raw)
    except ValueError:
        raise ConfigError(f"{SLOTS_ENV}={raw!r} is not a number of GPU slots (an integer >= 0)") from None
    if slots < 0:
        raise ConfigError(f"{SLOTS_ENV}={raw!r} is not a number of GPU slots (an integer >= 0)")
    return devices[:slots]


def slurm_assigned(env: MutableMapping[str, str] | None = None) -> bool:
    """True inside a SLURM job whose GPUs SLURM already picked (it sets CUDA_VISIBLE_DEVICES)."""
    env = os.environ if env is None else env
    return bool(env.get("SLURM_JOB_ID")) and "CUDA_VISIBLE_DEVICES" in env


@dataclass
class GpuLease:
    """Held device slots; `release()` (or process exit) frees them."""

    devices: list[str]
    _handles: list = field(default_factory=list, repr=False)

    def release(self) -> None:
        for handle in self._handles:
            try:
                fcntl.flock(handle, fcntl.LOCK_UN)
            finally:
                handle.close()
        self._handles = []


def _safe(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", device)


def _try_lock(path: Path):
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def acquire_gpus(count: int, devices: Sequence[str], lease_dir: str | Path | None = None,
                 timeout_s: float | None = None, poll_s: float = 0.5) -> GpuLease:
    """Lease `count` of `devices` (all or nothing), waiting while they are held by other jobs.

    Raises ConfigError when more are asked for than exist and TimeoutError after `timeout_s`.
    """
    if count < 1:
        raise ConfigError(f"gpu count {count} must be at least 1 to lease devices")
    if count > len(devices):
        raise ConfigError(f"a job asked for {count} GPU(s) but only {len(devices)} are visible "
                          f"({', '.join(devices) or 'none'}); lower the rule's gpu resource or --resources gpu")
    directory = Path(lease_dir) if lease_dir is not None else default_lease_dir()
    directory.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        handles, taken = [], []
        for device in devices:
            # The lock file is named by device id, so that leases agree across runs whose visible
            # lists differ (e.g. one run sees 0,1 and another 1).
            handle = _try_lock(directory / f"gpu-{_safe(device)}.lock")
            if handle is not None:
                handles.append(handle)
                taken.append(device)
                if len(handles) == count:
                    return GpuLease(taken, handles)
        for handle in handles:  # partial: give them back so two multi-GPU jobs cannot deadlock
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no {count} free GPU(s) among {list(devices)} within {timeout_s}s "
                               f"(leases in {directory})")
        time.sleep(poll_s)


def _cuda_already_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


@contextmanager
def gpu_lease(count: int | None = 1, *, devices: Sequence[str] | None = None, lease_dir: str | Path | None = None,
              timeout_s: float | None = None, env: MutableMapping[str, str] | None = None) -> Iterator[list[str]]:
    """Run the body with CUDA_VISIBLE_DEVICES set to `count` leased devices; yields their ids.

    Yields [] and changes nothing when count is 0/None, under a SLURM GPU allocation (yields
    SLURM's devices) or when no device is visible. The previous CUDA_VISIBLE_DEVICES is restored
    and the slots are freed on exit; a killed process frees them through the kernel.
    """
    env = os.environ if env is None else env
    count = int(count or 0)
    if count <= 0:
        yield []
        return
    if slurm_assigned(env):
        yield visible_devices(env)
        return
    candidates = list(devices) if devices is not None else lease_slots(env)
    if not candidates:
        yield []
        return
    if _cuda_already_initialised():
        raise RuntimeError("gpu_lease must be entered before CUDA is initialised in this process; "
                           "CUDA_VISIBLE_DEVICES has no effect afterwards")
    lease = acquire_gpus(count, candidates, lease_dir=lease_dir, timeout_s=timeout_s)
    previous = env.get("CUDA_VISIBLE_DEVICES")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(lease.devices)
    try:
        yield lease.devices
    finally:
        if previous is None:
            env.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            env["CUDA_VISIBLE_DEVICES"] = previous
        lease.release()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m esparse.gpu_lease --gpus N -- CMD ...`: run CMD holding N leased GPUs.

    The command replaces this process (exec) and inherits the locked descriptors, so the lease
    lasts exactly as long as the command, and signals reach the command directly.
    """
    parser = argparse.ArgumentParser(prog="python -m esparse.gpu_lease", description=main.__doc__)
    parser.add_argument("--gpus", type=int, default=1, help="devices to lease (0: run CMD unchanged)")
    parser.add_argument("--lease-dir", default=None, help=f"lock directory (default ${LEASE_DIR_ENV} or a temp dir)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait for free devices")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (use: --gpus N -- CMD ...)")
    env = os.environ
    if args.gpus > 0 and not slurm_assigned(env) and lease_slots(env):
        lease = acquire_gpus(args.gpus, lease_slots(env), lease_dir=args.lease_dir, timeout_s=args.timeout)
        for handle in lease._handles:
            os.set_inheritable(handle.fileno(), True)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(lease.devices)
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
