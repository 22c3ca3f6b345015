"""Device and software versions recorded with every plan and benchmark."""

from __future__ import annotations

import platform
import subprocess

import torch


def software_versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    from . import cslt

    out["cusparselt"] = cslt.version()
    return out


def device_info(device: torch.device | str | None = None) -> dict:
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return {"type": "cpu", "name": platform.processor() or platform.machine()}
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    info = {
        "type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count, "memory_bytes": props.total_memory,
        "l2_bytes": int(getattr(props, "L2_cache_size", 0)),
    }
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if res.returncode == 0:
            driver, sm, mem = (p.strip() for p in res.stdout.strip().splitlines()[0].split(","))
            info.update({"driver": driver, "max_sm_clock": sm, "max_mem_clock": mem})
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    return info


def measure_ceilings(device: torch.device | str | None = None, reps: int = 10) -> dict:
    """Measured device-to-device copy bandwidth (read + write bytes) and fp16 dense matmul rate."""
    import statistics

    dev = device or "cuda"
    nbytes = 2 * 2**30
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=dev).normal_()
    b = torch.empty_like(a)
    times = []
    for i in range(reps + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e) / 1000)
    copy_bw = 2 * nbytes / statistics.median(times)
    del a, b
    n = 8192
    x = torch.randn(n, n, dtype=torch.float16, device=dev)
    w = torch.randn(n, n, dtype=torch.float16, device=dev)
    o = torch.empty(n, n, dtype=torch.float16, device=dev)
    times = []
    for i in range(reps + 3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.mm(x, w.t(), out=o)
        e.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1000)
    flops = 2 * n**3 / statistics.median(times)
    del x, w, o
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy_bw, "fp16_dense_flops_per_s": flops,
            "method": f"median of {reps}: 2 GiB device copy (read+write bytes); 8192^3 fp16 torch.mm on random data"}
