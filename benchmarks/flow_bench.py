"""Flow accuracy and speed: torch TV-L1 vs OpenCV DualTVL1 (defaults), table + JSON in benchmarks/results/.

Accuracy, at OpenCV's default parameters:
  * synthetic pairs with exact ground truth (goca_fast.data.synthetic: a smooth random texture under
    translation / rotation / zoom, 256×340): endpoint error (EPE) of each method against the truth,
    and the mean EPE between the two methods;
  * real frame pairs: consecutive frames of the sample videos found on this machine (the first
    readable ones among --real paths), where only torch-vs-OpenCV EPE can be measured.
Speed, frame pairs per second at 256×340: OpenCV with 1 process, OpenCV with one process per core,
torch on the CPU (batched), torch on CUDA (batched, eager and torch.compile'd, per batch size of --batch) when a GPU
is present. --compile-only: just the compiled CUDA rows (a separate, separately time-boxed run; use --name).

  python -m benchmarks.flow_bench [--pairs 8] [--batch 16,32,64,128] [--real a.mp4 b.avi ...] [--quick]
                                  [--no-compile | --compile-only] [--name flow]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import device_name, write_results  # noqa: E402
from goca_fast.data.synthetic import Motion, random_texture, render_motion_video  # noqa: E402
from goca_fast.video.tvl1 import opencv_tvl1, tvl1_flow  # noqa: E402

H, W = 256, 340


def synthetic_pairs(kind: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n grey pairs (n×2×H×W uint8) with exact flow (n×H×W×2): textures moved by known warps."""
    rng = np.random.default_rng(seed)
    grey, flows = [], []
    for _ in range(n):
        if kind == "translate":
            m = Motion(np.ones(2), np.zeros(2), np.array([[0.0, 0.0], rng.uniform(-4, 4, 2)]))
        elif kind == "rotate":
            m = Motion(np.ones(2), np.array([0.0, np.deg2rad(rng.uniform(-3, 3))]), np.zeros((2, 2)))
        else:
            m = Motion(np.array([1.0, rng.uniform(0.97, 1.03)]), np.zeros(2), np.zeros((2, 2)))
        frames, flow = render_motion_video(random_texture(rng), m, H, W)
        grey.append([cv2.cvtColor(np.round(f * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY) for f in frames])
        flows.append(flow[0])
    return np.array(grey, np.uint8), np.array(flows, np.float32)


def real_pairs(paths: list[str], n: int) -> tuple[np.ndarray, str]:
    """Up to n consecutive grey pairs resized to 256×340 from the first readable videos in `paths`."""
    from goca_fast.video.io import VideoReadError, read_all_frames
    out, used = [], []
    for p in paths:
        try:
            frames = read_all_frames(p)
        except (VideoReadError, OSError):
            continue
        used.append(p)
        step = max(1, (len(frames) - 1) // max(1, n))
        for i in range(0, len(frames) - 1, step):
            a, b = (cv2.cvtColor(cv2.resize(f, (W, H), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)
                    for f in (frames[i], frames[i + 1]))
            out.append([a, b])
            if len(out) >= n:
                return np.array(out, np.uint8), ", ".join(used)
    return np.array(out, np.uint8).reshape(-1, 2, H, W), ", ".join(used)


def find_real_videos() -> list[str]:
    """Sample videos shipped with packages installed here (no downloads)."""
    roots = [Path(cv2.__file__).parent, Path(sys.prefix)]
    found = []
    for r in roots:
        for ext in ("*.avi", "*.mp4", "*.mkv", "*.mov"):
            found += [str(p) for p in r.rglob(ext) if p.stat().st_size > 50_000]
    return sorted(set(found))[:4]


def epe(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, axis=-1).mean())


def run_opencv(pairs: np.ndarray) -> np.ndarray:
    tv = opencv_tvl1()
    return np.stack([tv.calc(p[0], p[1], None) for p in pairs])


def _cv_one(p: np.ndarray) -> np.ndarray:
    cv2.setNumThreads(1)
    return opencv_tvl1().calc(p[0], p[1], None)


def run_torch(pairs: np.ndarray, device: str, batch: int, compile: bool = False) -> np.ndarray:
    t = torch.from_numpy(pairs).to(device)
    out = []
    for s in range(0, len(t), batch):
        out.append(tvl1_flow(t[s:s + batch, 0], t[s:s + batch, 1], compile=compile).permute(0, 2, 3, 1))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return torch.cat(out).cpu().numpy()


def timed(fn, *args) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    r = fn(*args)
    return r, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flow_bench")
    ap.add_argument("--pairs", type=int, default=8, help="pairs per synthetic motion kind (and real pairs)")
    ap.add_argument("--speed-pairs", type=int, default=0,
                    help="pairs for the speed rows (default: 4 on CPU; on GPU max(256, 2 x the largest batch))")
    ap.add_argument("--batch", default="64", help="torch pairs per batch on GPU, a comma list (CPU uses 4)")
    ap.add_argument("--real", nargs="*", default=None, help="real videos (default: sample videos found on disk)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows on GPU")
    ap.add_argument("--compile-only", action="store_true", help="only the torch.compile rows on GPU")
    ap.add_argument("--quick", action="store_true", help="2 pairs per kind (a smoke run)")
    ap.add_argument("--name", default="flow", help="results file name")
    a = ap.parse_args(argv)
    try:
        batches = [int(b) for b in a.batch.split(",")]
    except ValueError:
        ap.error(f"--batch takes a comma list of integers, got {a.batch!r}")
    if a.compile_only and a.no_compile:
        ap.error("--compile-only and --no-compile exclude each other")
    n = 2 if a.quick else a.pairs
    cuda = torch.cuda.is_available()
    rows = []
    # ---------------------------------------------------------------- accuracy at OpenCV defaults (CPU torch is
    # the same arithmetic as on the GPU; the GPU rows below re-check the EPE against OpenCV)
    acc_dev = "cuda" if cuda else "cpu"
    for kind in (() if a.compile_only else ("translate", "rotate", "zoom")):
        pairs, gt = synthetic_pairs(kind, n)
        ref = run_opencv(pairs)
        ours = run_torch(pairs, acc_dev, batches[0] if cuda else 4)
        e_cv, e_t = epe(ref, gt), epe(ours, gt)
        rows.append({"test": f"synthetic {kind}", "pairs": n, "epe_opencv_px": e_cv, "epe_torch_px": e_t,
                     "torch_over_opencv": e_t / e_cv, "epe_torch_vs_opencv_px": epe(ours, ref)})
        print(rows[-1], flush=True)
    videos = [] if a.compile_only else a.real if a.real is not None else find_real_videos()
    real, used = real_pairs(videos, n) if videos else (np.zeros((0, 2, H, W), np.uint8), "")
    if len(real):
        ref = run_opencv(real)
        ours = run_torch(real, acc_dev, batches[0] if cuda else 4)
        rows.append({"test": "real pairs", "pairs": len(real), "epe_torch_vs_opencv_px": epe(ours, ref),
                     "source": used})
        print(rows[-1], flush=True)
    # ---------------------------------------------------------------- speed at 256x340
    ns = a.speed_pairs or (max(256, 2 * max(batches)) if cuda else 4)
    pairs = real[:ns] if len(real) >= ns else synthetic_pairs("rotate", ns, seed=1)[0]
    src = "real" if len(real) >= ns else "synthetic rotate"
    cv2.setNumThreads(1)
    n1 = max(2, ns // 8 if cuda else ns) if not a.compile_only else 2  # the compiled run only needs the 1-process base
    _, t1 = timed(run_opencv, pairs[:n1])
    cv1 = n1 / t1
    cv2.setNumThreads(-1)
    cores = os.cpu_count() or 1
    speed = [("opencv, 1 process", cv1)]
    if not a.compile_only:
        from goca_fast.runtime.parallel import process_pool
        with process_pool(cores) as ex:
            list(ex.map(_cv_one, pairs[:cores]))  # warm the workers
            _, tn = timed(lambda p: list(ex.map(_cv_one, p)), pairs[:max(cores, ns // 4 if cuda else ns)])
        speed.append((f"opencv, {cores} processes", max(cores, ns // 4 if cuda else ns) / tn))
        torch_cpu_pairs = pairs[:4]
        _, tc = timed(run_torch, torch_cpu_pairs, "cpu", 4)
        speed.append((f"torch cpu ({torch.get_num_threads()} threads, batch 4)", len(torch_cpu_pairs) / tc))
    if cuda:
        for comp in ([True] if a.compile_only else [False] if a.no_compile else [False, True]):
            for b in batches:
                run_torch(pairs[:b], "cuda", b, comp)  # warm-up / compile (one graph per batch size)
                sel = pairs[:max(1, len(pairs) // b) * b]  # whole batches only
                res, tg = timed(run_torch, sel, "cuda", b, comp)
                speed.append((f"torch cuda batch {b}{' compiled' if comp else ''}", len(sel) / tg))
                print(f"{speed[-1][0]}: {speed[-1][1]:.1f} pairs/s", flush=True)
    for name, pps in speed:
        rows.append({"test": f"speed 256x340 ({src})", "method": name, "pairs_per_s": pps, "x_opencv_1proc": pps / cv1})
        print(rows[-1], flush=True)
    dev = torch.device("cuda" if cuda else "cpu")
    meta = {"device": device_name(dev), "device_tag": "cuda" if cuda else "cpu", "cpu_cores": os.cpu_count(),
            "params": "OpenCV DualTVL1 defaults", "opencv": cv2.__version__, "size": f"{H}x{W}",
            "load_average": os.getloadavg()[0],
            "note": "CPU timings on a shared machine; GPU rows only when CUDA is present"}
    js = write_results(a.name, rows, ["test", "method", "pairs", "epe_opencv_px", "epe_torch_px", "torch_over_opencv",
                                      "epe_torch_vs_opencv_px", "pairs_per_s", "x_opencv_1proc", "source"], meta)
    print(f"wrote {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
