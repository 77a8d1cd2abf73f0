"""Flow accuracy and speed: torch TV-L1 vs OpenCV DualTVL1 (defaults), table + JSON in benchmarks/results/.

Accuracy, at OpenCV's default parameters:
  * synthetic pairs with exact ground truth (goca_fast.data.synthetic: a smooth random texture under
    translation / rotation / zoom, 256×340): endpoint error (EPE) of each method against the truth,
    and the mean EPE between the two methods;
  * real frame pairs: consecutive frames of the sample videos found on this machine (the first
    readable ones among --real paths), where only torch-vs-OpenCV EPE can be measured.
Speed, frame pairs per second at 256×340: OpenCV with 1 process, OpenCV with one process per core,
torch on the CPU (batched), torch on CUDA (batched, eager and torch.compile'd) when a GPU is present.

  python -m benchmarks.flow_bench [--pairs 8] [--batch 32] [--real a.mp4 b.avi ...] [--quick]
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
from goca_fast.flow.tvl1 import opencv_tvl1, tvl1_flow  # noqa: E402

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
    from goca_fast.data.video_io import VideoReadError, read_all_frames
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
    ap.add_argument("--speed-pairs", type=int, default=0, help="pairs for the speed rows (default: 4 on CPU, 256 on GPU)")
    ap.add_argument("--batch", type=int, default=64, help="torch pairs per batch on GPU (CPU uses 4)")
    ap.add_argument("--real", nargs="*", default=None, help="real videos (default: sample videos found on disk)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows on GPU")
    ap.add_argument("--quick", action="store_true", help="2 pairs per kind (a smoke run)")
    a = ap.parse_args(argv)
    n = 2 if a.quick else a.pairs
    cuda = torch.cuda.is_available()
    rows = []
    # ---------------------------------------------------------------- accuracy at OpenCV defaults (CPU torch is
    # the same arithmetic as on the GPU; the GPU rows below re-check the EPE against OpenCV)
    acc_dev = "cuda" if cuda else "cpu"
    for kind in ("translate", "rotate", "zoom"):
        pairs, gt = synthetic_pairs(kind, n)
        ref = run_opencv(pairs)
        ours = run_torch(pairs, acc_dev, a.batch if cuda else 4)
        e_cv, e_t = epe(ref, gt), epe(ours, gt)
        rows.append({"test": f"synthetic {kind}", "pairs": n, "epe_opencv_px": e_cv, "epe_torch_px": e_t,
                     "torch_over_opencv": e_t / e_cv, "epe_torch_vs_opencv_px": epe(ours, ref)})
        print(rows[-1], flush=True)
    videos = a.real if a.real is not None else find_real_videos()
    real, used = real_pairs(videos, n) if videos else (np.zeros((0, 2, H, W), np.uint8), "")
    if len(real):
        ref = run_opencv(real)
        ours = run_torch(real, acc_dev, a.batch if cuda else 4)
        rows.append({"test": "real pairs", "pairs": len(real), "epe_torch_vs_opencv_px": epe(ours, ref),
                     "source": used})
        print(rows[-1], flush=True)
    # ---------------------------------------------------------------- speed at 256x340
    ns = a.speed_pairs or (256 if cuda else 4)
    pairs = real[:ns] if len(real) >= ns else synthetic_pairs("rotate", ns, seed=1)[0]
    src = "real" if len(real) >= ns else "synthetic rotate"
    cv2.setNumThreads(1)
    _, t1 = timed(run_opencv, pairs[:max(2, ns // 8 if cuda else ns)])
    cv1 = max(2, ns // 8 if cuda else ns) / t1
    cv2.setNumThreads(-1)
    cores = os.cpu_count() or 1
    from goca_fast.data.prepare import process_pool
    with process_pool(cores, preload=["benchmarks.flow_bench"]) as ex:
        list(ex.map(_cv_one, pairs[:cores]))  # warm the workers
        _, tn = timed(lambda p: list(ex.map(_cv_one, p)), pairs[:max(cores, ns // 4 if cuda else ns)])
    cvn = max(cores, ns // 4 if cuda else ns) / tn
    speed = [("opencv, 1 process", cv1), (f"opencv, {cores} processes", cvn)]
    torch_cpu_pairs = pairs[:4]
    _, tc = timed(run_torch, torch_cpu_pairs, "cpu", 4)
    speed.append((f"torch cpu ({torch.get_num_threads()} threads, batch 4)", len(torch_cpu_pairs) / tc))
    if cuda:
        for comp in ([False] if a.no_compile else [False, True]):
            run_torch(pairs[:a.batch], "cuda", a.batch, comp)  # warm-up / compile
            res, tg = timed(run_torch, pairs, "cuda", a.batch, comp)
            speed.append((f"torch cuda batch {a.batch}{' compiled' if comp else ''}", len(pairs) / tg))
    for name, pps in speed:
        rows.append({"test": f"speed 256x340 ({src})", "method": name, "pairs_per_s": pps, "x_opencv_1proc": pps / cv1})
        print(rows[-1], flush=True)
    dev = torch.device("cuda" if cuda else "cpu")
    meta = {"device": device_name(dev), "device_tag": "cuda" if cuda else "cpu", "cpu_cores": os.cpu_count(),
            "params": "OpenCV DualTVL1 defaults", "opencv": cv2.__version__, "size": f"{H}x{W}",
            "load_average": os.getloadavg()[0],
            "note": "CPU timings on a shared machine; GPU rows only when CUDA is present"}
    js = write_results("flow", rows, ["test", "method", "pairs", "epe_opencv_px", "epe_torch_px", "torch_over_opencv",
                                      "epe_torch_vs_opencv_px", "pairs_per_s", "x_opencv_1proc", "source"], meta)
    print(f"wrote {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
