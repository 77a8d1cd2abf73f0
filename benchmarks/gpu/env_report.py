"""Environment report for a GPU check: GPU, driver, torch/CUDA/cuDNN/triton, tools, SM clocks (nvidia-smi), and the
host-to-device, device-to-host and device-to-device copy bandwidth measured in this run (so the benchmark numbers of
the same run can be read against what the machine's memory system delivered at the time).

    python benchmarks/gpu/env_report.py --out DIR --tag TAG [--mib 256]

Writes DIR/env-TAG.{json,md}. Without CUDA it reports the CPU variant (host memcpy bandwidth), for dry runs.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

SMI_FIELDS = "name,driver_version,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit," \
             "temperature.gpu,persistence_mode,memory.total"


def _run(cmd: list[str]) -> str:
    """First lines of a tool's output, or why it could not run (a missing tool is information, not an error)."""
    if shutil.which(cmd[0]) is None:
        return f"{cmd[0]}: not found"
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        text = r.stdout.strip() or r.stderr.strip()
        return text.splitlines()[-1] if text else f"exit {r.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cmd[0]}: {e}"


def nvidia_smi() -> dict[str, str]:
    """One dict of SMI_FIELDS for GPU 0 (clocks as the driver reports them now, under no load)."""
    if shutil.which("nvidia-smi") is None:
        return {"nvidia-smi": "not found"}
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia-smi": str(e)}
    if r.returncode != 0 or not r.stdout.strip():
        return {"nvidia-smi": (r.stderr.strip() or f"exit {r.returncode}")[:200]}
    return dict(zip(SMI_FIELDS.split(","), (v.strip() for v in r.stdout.strip().splitlines()[0].split(","))))


def _median_seconds(fn: Callable[[], Any], cuda: bool, repeats: int) -> float:
    """Median time of fn after 2 warm-up calls: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth(mib: int, repeats: int) -> dict[str, float]:
    """GB/s (1e9 bytes) of one copy of `mib` MiB: bytes moved / time; the device-to-device figure is also given as
    bytes read + written per second, the convention of benchmarks/sinkhorn_bench.py's minimum-bytes time."""
    n = mib * 2**20
    if not torch.cuda.is_available():
        src, dst = torch.empty(n, dtype=torch.uint8).random_(), torch.empty(n, dtype=torch.uint8)
        return {"host_to_host_GBps": n / _median_seconds(lambda: dst.copy_(src), False, repeats) / 1e9}
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True).random_()
    dev, dev2 = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d = _median_seconds(lambda: dev.copy_(host, non_blocking=True), True, repeats)
    d2h = _median_seconds(lambda: host.copy_(dev, non_blocking=True), True, repeats)
    d2d = _median_seconds(lambda: dev2.copy_(dev), True, repeats)
    return {"host_to_device_pinned_GBps": n / h2d / 1e9, "device_to_host_pinned_GBps": n / d2h / 1e9,
            "device_to_device_GBps": n / d2d / 1e9, "device_to_device_read_plus_write_GBps": 2 * n / d2d / 1e9}


def report(mib: int, repeats: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": cuda, "cpu_cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "nvcc": _run(["nvcc", "--version"]), "compute-sanitizer": _run(["compute-sanitizer", "--version"]),
        "ncu": _run(["ncu", "--version"]), "ninja": _run(["ninja", "--version"]),
        "CUDA_HOME": os.environ.get("CUDA_HOME", ""),
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_count=torch.cuda.device_count(), capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count, gpu_memory_GiB=round(p.total_memory / 2**30, 1),
                    l2_MiB=round(getattr(p, "L2_cache_size", 0) / 2**20, 1), cudnn=torch.backends.cudnn.version())
        info["nvidia_smi"] = nvidia_smi()
    info["copy_bytes_MiB"] = mib
    info["bandwidth"] = {k: round(v, 1) for k, v in bandwidth(mib, repeats).items()}
    info["bandwidth_timing"] = ("CUDA events, median of %d after 2 warm-ups, pinned host memory" % repeats if cuda
                                else "perf_counter, median of %d after 2 warm-ups (CPU variant)" % repeats)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for env-TAG.{json,md}")
    ap.add_argument("--tag", required=True)
    ap.add_argument("--mib", type=int, default=256, help="copy size for the bandwidth figures")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args(argv)
    info = report(a.mib, a.repeats)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"env-{a.tag}.json").write_text(json.dumps(info, indent=2))
    lines = [f"- {k}: {v}" for k, v in info.items() if not isinstance(v, dict)]
    for k in ("nvidia_smi", "bandwidth"):
        lines += [f"- {k}.{kk}: {vv}" for kk, vv in info.get(k, {}).items()]
    (out / f"env-{a.tag}.md").write_text(f"# Environment ({a.tag})\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
