"""Training-loader throughput: DALI (GPU / CPU backend), our CPU PyAV loader, and an official-style loader.

    python benchmarks/loader_bench.py [--loaders dali_cpu,cpu,official] [--workers 2] [--batches 30]

Same dataset for all (generated once into --cache: --videos videos of 340×256, 10 s at 25 fps, H.264 GOP 16, with
their flow videos), same recipe (2×16 + 4×8 frames at stride 2, scale 128-160, crop 112, jitter/grey as the
official code), same worker/thread count. The official-style loader is what the released code does per sample
(spec §3.2): PyAV-decode the *whole* RGB and flow videos, convert the sampled frames with to_rgb, then run the torch
augmentation on RGB and, independently, on the 3-channel flow image. Reported per loader: clips/s, ms/batch, CPU
utilisation (process + workers + DALI producer CPU time / wall / cores), peak host RSS (main process and the largest
finished child), and the RSS of the main process plus its live DALI producers at the first and the last timed batch
(a leak shows as growth). `--dali-process-batches` picks the DALI producer mode (-1 = in-process). Writes
benchmarks/results/loader-<device>.{json,md}. Each loader runs in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import device_name, write_results  # noqa: E402

RECIPE = ["data.train_split=train", "data.clips_per_group=[2,4]", "data.frames_per_group=[16,8]", "data.stride=2", "data.min_distance=16",
          "data.crop_size=112", "data.scale_range=[128,160]", "data.modalities=rgb_flow", "engine.amp=off"]


def make_dataset(root: Path, videos: int, frames: int = 250, height: int = 256, width: int = 340) -> Path:
    """Textured scenes panning at varying speed (realistic H.264 bitrate), their exact flow, an index."""
    import cv2
    from goca_fast.data.index import VideoRecord, write_index
    from goca_fast.data.video_io import write_video
    from goca_fast.flow.codec import quantise_flow, write_flow_video

    if (root / "index.jsonl").is_file():
        return root
    recs = []
    for i in range(videos):
        rng = np.random.default_rng(i)
        scene = cv2.GaussianBlur((rng.random((height * 2, width * 3, 3)) * 255).astype(np.uint8), (0, 0), 1.5)
        vx = 1.0 + 1.5 * np.sin(np.arange(frames) / 20 + i)
        x = np.concatenate([[0.0], np.cumsum(vx[:-1])])
        y = 20 + 10 * np.sin(np.arange(frames) / 31)
        rgb = np.stack([scene[int(y[t]):int(y[t]) + height, int(x[t]) % width:int(x[t]) % width + width]
                        for t in range(frames)])
        flow = np.zeros((frames, height, width, 2), np.float32)
        flow[:-1, ..., 0] = -np.diff(np.floor(x))[:, None, None]
        flow[:-1, ..., 1] = -np.diff(np.floor(y))[:, None, None]
        yy, xx = np.mgrid[0:height, 0:width] / 40.0
        flow += (0.8 * np.sin(xx + i) * np.cos(yy))[None, ..., None].astype(np.float32)  # smooth, like TV-L1 flow
        cls = f"c{i % 4}"
        write_video(root / f"rgb/{i:03d}.mp4", rgb, 25, gop=16)
        write_flow_video(root / f"flow/{i:03d}.mp4", quantise_flow(flow), 25, gop=16)
        recs.append(VideoRecord(f"{i:03d}", f"rgb/{i:03d}.mp4", f"flow/{i:03d}.mp4", i % 4, cls, frames, 25.0, width,
                                height, ["train"]))
        print(f"  made video {i + 1}/{videos}", file=sys.stderr)
    write_index(root, recs, [f"c{k}" for k in range(4)])
    return root


# ----------------------------------------------------------------------------- official-style loader


class OfficialStyleDataset(torch.utils.data.Dataset):
    """Per sample: whole-video PyAV decode of RGB and flow (thread_type AUTO), to_rgb of the sampled frames only,
    torch augmentation of RGB and of the flow image, each with its own draw (spec §3.2-3.4)."""

    def __init__(self, root: Path, records, clip_lengths, stride, min_distance, augment, seed: int = 0):
        self.root, self.records, self.clip_lengths = root, records, clip_lengths
        self.stride, self.min_distance, self.augment, self.seed = stride, min_distance, augment, seed

    def __len__(self) -> int:
        return len(self.records)

    @staticmethod
    def _decode_all(path: Path) -> list:
        import av
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            return sorted(c.decode(s), key=lambda f: f.pts)

    def __getitem__(self, i: int):
        from goca_fast.data.augment import official_flow_image
        from goca_fast.data.sampling import sample_train_clips
        rec = self.records[i]
        rng = np.random.default_rng([self.seed, i])
        clips = sample_train_clips(rec.frames, self.clip_lengths, self.stride, self.min_distance, rng)
        rgb_frames = self._decode_all(self.root / rec.rgb)
        flow_frames = self._decode_all(self.root / rec.flow)
        need = sorted(set(np.concatenate(clips).tolist()))
        rgb = {k: torch.from_numpy(rgb_frames[k].to_rgb().to_ndarray()) for k in need}
        flow = {}
        for k in need:
            y = flow_frames[k].to_ndarray(format="gray")
            h = y.shape[0] // 2
            flow[k] = torch.from_numpy(np.stack([y[:h], y[h:]], -1))
        g = torch.Generator().manual_seed(i)
        out_rgb, out_flow = [], []
        for c in clips:
            r = torch.stack([rgb[k] for k in c.tolist()]).permute(0, 3, 1, 2)
            f = torch.stack([flow[k] for k in c.tolist()]).permute(0, 3, 1, 2)
            out_rgb.append(self.augment.apply_rgb(r, self.augment.draw(r.shape[2], r.shape[3], g)))
            fi = official_flow_image(f)
            out_flow.append(self.augment.apply_rgb(fi, self.augment.draw(r.shape[2], r.shape[3], g)))
        return out_rgb, out_flow


def _collate(items):
    n = len(items[0][0])
    return [torch.stack([it[0][c] for it in items]) for c in range(n)], \
        [torch.stack([it[1][c] for it in items]) for c in range(n)]


# ----------------------------------------------------------------------------- measurement


def _rss_mib(pid="self") -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (FileNotFoundError, ProcessLookupError):
        return 0.0  # a producer that has just exited


def _cpu_seconds(pid) -> float:
    """User + system CPU time of a live process and its waited-for children (0 if it has gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def measure(name: str, batches_iter, n_batches: int, warmup: int, clips_per_video: int, batch_size: int,
            on_cuda: bool, helper_pids=lambda: ()) -> dict:
    """Time `n_batches` after `warmup`; host RSS is this process plus the live `helper_pids()` (DALI producers)."""
    it = iter(batches_iter)
    for _ in range(warmup):
        next(it)
    if on_cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), os.times()
    helpers_cpu0 = {p: _cpu_seconds(p) for p in helper_pids()}
    rss, gpu_free = [], []
    for b in range(n_batches):
        batch = next(it)
        if on_cuda:
            torch.cuda.synchronize()
            gpu_free.append(torch.cuda.mem_get_info()[0] / 2**20)
        rss.append(_rss_mib() + sum(_rss_mib(p) for p in helper_pids()))
        del batch
    wall = time.perf_counter() - t0
    helpers_cpu = sum(_cpu_seconds(p) - helpers_cpu0.get(p, 0.0) for p in helper_pids())
    del it
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) + \
        (c1.children_system - c0.children_system) + helpers_cpu
    clips = n_batches * batch_size * clips_per_video
    return {"loader": name, "clips_per_s": clips / wall, "videos_per_s": n_batches * batch_size / wall,
            "ms_per_batch": 1e3 * wall / n_batches, "cpu_util_pct": 100 * cpu / wall / os.cpu_count(),
            "peak_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "rss_first_mib": rss[0], "rss_last_mib": rss[-1], "timed_batches": n_batches,
            # growth over the second half of the run: warm-up allocations are over by then, a leak is not
            "rss_growth_2nd_half_mib": rss[-1] - rss[len(rss) // 2],
            "gpu_used_growth_2nd_half_mib": (gpu_free[len(gpu_free) // 2] - gpu_free[-1]) if gpu_free else None}


def endless(factory):
    epoch = 0
    while True:
        for b in factory(epoch, 0):
            yield b
        epoch += 1


def run_loader(kind: str, cfg, root: Path, n_batches: int, warmup: int) -> dict:
    from goca_fast.data.index import read_index
    from goca_fast.distributed import DistInfo
    from goca_fast.pretrain import build_train_loader, train_augment
    clips = len(cfg.clip_lengths)
    bs = cfg.data.batch_size
    if kind in ("dali_cpu", "dali_gpu"):
        from dali_pipelines.train import build_dali_train_loader
        dev = torch.device("cuda", 0) if kind == "dali_gpu" else torch.device("cpu")
        factory, _ = build_dali_train_loader(cfg, DistInfo(device=dev), root)
        res = measure(kind, endless(factory), n_batches, warmup, clips, bs, dev.type == "cuda",
                      helper_pids=lambda: factory.producers[-2:])
        factory.close()
        res["producers"] = len(factory.producers)
        return res
    if kind == "cpu":
        factory, _ = build_train_loader(cfg, DistInfo(), root)
        return measure(kind, endless(factory), n_batches, warmup, clips, bs, False)
    if kind == "official":
        recs, _ = read_index(root)
        ds = OfficialStyleDataset(root, recs, cfg.clip_lengths, cfg.data.stride, cfg.data.min_distance,
                                  train_augment(cfg))

        def factory(epoch, start):
            return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=cfg.data.workers,
                                               collate_fn=_collate, drop_last=True,
                                               worker_init_fn=lambda _: torch.set_num_threads(1))
        return measure(kind, endless(factory), n_batches, warmup, clips, bs, False)
    raise ValueError(f"unknown loader {kind!r}")


def main(argv=None) -> int:
    from goca_fast.config import load_config
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loaders", default="dali_gpu,dali_cpu,cpu,official",
                    help="comma list of dali_gpu, dali_cpu, cpu, official (dali_gpu is skipped without CUDA)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per loader")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/goca_fast/loader_bench"))
    ap.add_argument("--dali-process-batches", type=int, default=0,
                    help="batches per DALI producer process (0 = the config's auto, -1 = in-process)")
    ap.add_argument("--name", default="loader", help="results file name (e.g. loader-longrun for a leak check)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    root = make_dataset(Path(a.cache), a.videos)
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "ucf101_r2plus1d.yaml"),
                      RECIPE + [f"data.root={root}", f"data.workers={a.workers}", f"data.batch_size={a.batch_size}",
                               f"data.dali_process_batches={a.dali_process_batches}"])
    if a.one:  # child mode: one loader in a fresh process, so peak RSS and CPU time are its own
        print(json.dumps(run_loader(a.one, cfg, root, a.batches, a.warmup)))
        return 0
    rows = []
    for kind in a.loaders.split(","):
        if kind == "dali_gpu" and not torch.cuda.is_available():
            print("dali_gpu: skipped (no CUDA device)", file=sys.stderr)
            continue
        print(f"{kind}: timing {a.batches} batches ...", file=sys.stderr)
        extra = sys.argv[1:] if argv is None else list(argv)
        out = subprocess.run([sys.executable, __file__, *extra, "--one", kind], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{kind}: benchmark process failed (exit {out.returncode})")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    base = next((r["clips_per_s"] for r in rows if r["loader"] == "official"), None)
    for r in rows:
        r["speedup_vs_official"] = r["clips_per_s"] / base if base else float("nan")
    gpu = torch.cuda.is_available() and any(r["loader"] == "dali_gpu" for r in rows)
    dev = torch.device("cuda", 0) if gpu else torch.device("cpu")
    path = write_results(a.name, rows, ["loader", "clips_per_s", "ms_per_batch", "speedup_vs_official",
                                          "cpu_util_pct", "peak_rss_main_mib", "peak_rss_worker_mib",
                                          "rss_first_mib", "rss_last_mib", "rss_growth_2nd_half_mib",
                                          "producers"],
                         {"device": device_name(dev), "device_tag": dev.type, "workers": a.workers,
                          "batch_size": a.batch_size, "timed_batches": a.batches, "warmup_batches": a.warmup,
                          "dataset": f"{a.videos} videos 340x256, 250 frames at 25 fps, H.264 GOP 16 + flow videos",
                          "recipe": "2x16 + 4x8 frames, stride 2, min distance 16, scale 128-160, crop 112",
                          "dali_process_batches": a.dali_process_batches,
                          "rss": "host RSS of the loader process plus its live DALI producer processes",
                          "cpu_util": "(process + worker + DALI producer CPU seconds) / wall / cores"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
