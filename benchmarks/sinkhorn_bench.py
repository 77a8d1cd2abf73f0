"""Time the GOCA assignment: `goca_codes` (two streams, prior, cycles=1, 3 iterations) on the torch path against
the official-style eager computation (4 Sinkhorn calls, materialised exp-matrices, fp32), same process, same threads.

    python benchmarks/sinkhorn_bench.py [--device cpu|cuda|all] [--repeats N] [--sizes 640x1000,4096x3000]

Writes benchmarks/results/sinkhorn-<device>.{json,md}. Target on CPU: torch path ≥ 2× official at B=4096, K=3000.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import device_name, write_results  # noqa: E402
from goca_fast.assign import goca_codes, official_goca_reference  # noqa: E402

EPS, EPS2, ITERS = 0.05, 0.03, 3


def make_inputs(B: int, K: int, n_sets: int, device: torch.device, seed: int = 0):
    """Realistic cosine scores (unit embeddings × unit prototypes, D=128), RGB/flow correlated; several sets so
    repeated calls do not find the inputs in cache."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(K, 128, generator=g), dim=1)
    sets = []
    for _ in range(n_sets):
        e = torch.randn(B, 128, generator=g)
        r = F.normalize(e, dim=1) @ protos.t()
        f = F.normalize(e + torch.randn(B, 128, generator=g), dim=1) @ protos.t()
        sets.append((r.to(device), f.to(device)))
    return sets


def _once(fn, args, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def time_methods(methods: dict, inputs, device: torch.device, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call for every method, interleaved (A, B, A, B, ...) so that background load affects all
    methods alike; inputs rotate between calls so that repeated calls do not find them in cache."""
    for i in range(warmup):
        for fn in methods.values():
            fn(*inputs[i % len(inputs)])
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(repeats):
        for name, fn in methods.items():
            times[name].append(_once(fn, inputs[i % len(inputs)], device))
    return times


METHODS = {
    "official-style eager": lambda r, f: official_goca_reference(r, f, EPS, EPS2, ITERS),
    "goca_fast torch": lambda r, f: goca_codes(r, f, EPS, EPS2, ITERS, backend="torch"),
}


def bench(device: torch.device, sizes: list[tuple[int, int]], repeats: int) -> list[dict]:
    rows = []
    for B, K in sizes:
        times = time_methods(METHODS, make_inputs(B, K, 3, device), device, repeats)
        base = times["official-style eager"]
        for name, t in times.items():
            med = statistics.median(t)
            ratio = statistics.median(b / x for b, x in zip(base, t))  # per-repeat ratio: robust to load drift
            rows.append({"device": device.type, "B": B, "K": K, "method": name, "ms": med * 1e3,
                         "speedup_vs_official": ratio})
            print(f"{device.type:5s} B={B:6d} K={K:5d} {name:24s} {med * 1e3:9.2f} ms  x{ratio:.2f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sizes", default="640x1000,640x3000,4096x1000,4096x3000")
    a = p.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split("x")) for s in a.sizes.split(",")]
    devices = []
    if a.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if a.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    elif a.device == "cuda":
        print("no CUDA device", file=sys.stderr)
        return 2
    for dev in devices:
        rows = bench(dev, sizes, a.repeats)
        path = write_results("sinkhorn", rows, ["B", "K", "method", "ms", "speedup_vs_official"],
                             {"device": device_name(dev), "device_tag": dev.type, "epsilon": EPS,
                              "prior_epsilon": EPS2, "iterations": ITERS, "cycles": 1,
                              "timing": "median of interleaved repeats after warm-up, 3 rotating input sets; speed-up = median of per-repeat ratios"})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
