"""Training-loader throughput: DALI (GPU / CPU backend), our CPU PyAV loader, and an official-style loader.

    python benchmarks/loader_bench.py [--loaders dali_cpu,cpu,official] [--workers 2] [--batches 30] [--repeats 2]

Same dataset for all (generated once into --cache: --videos videos of 340×256, 10 s at 25 fps, with their flow
videos, encoded as goca-prepare and goca-flow encode: H.264 GOP 16, CAVLC unless --entropy cabac), same recipe
(2×16 + 4×8 frames at stride 2, scale 128-160, crop 112, jitter/grey as the official code), same worker/thread
count. The official-style loader is what the released code does per sample
(docs/official_behaviour.md#known-bugs-of-the-official-code): PyAV-decode the *whole* RGB and flow videos, convert
the sampled frames with to_rgb, then run the torch augmentation on RGB and, independently, on the 3-channel flow
image. Where DALI's time goes: `dali_decode` is the DALI source and the two decoders alone (no
augmentation, no copy into torch), `dali_graph` the whole training graph without the copy into torch, so
decode / augmentation / copy are the differences of `dali_decode`, `dali_graph` and `dali_cpu`. Reported per loader:
clips/s, clips per CPU-second (steadier than clips/s on a shared machine), ms/batch, CPU utilisation (process +
worker CPU time / wall / cores), peak host RSS (main process and the
largest finished child), the RSS of the loader process at the first and the last timed batch and its growth over
the second half of the run (a leak shows as growth), and the loader's live child processes (DataLoader workers;
none for DALI 1.53, which runs in the training process). Each loader runs in a fresh process; with `--repeats k` the
loaders run k times, interleaved (a, b, c, a, b, c), and each row is one run. Writes
benchmarks/results/<name>-<device>.{json,md}.
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
from goca_fast.video.io import ENTROPY_CODERS, PREPARED_ENTROPY  # noqa: E402

RECIPE = ["data.train_split=train", "data.clips_per_group=[2,4]", "data.frames_per_group=[16,8]", "data.stride=2", "data.min_distance=16",
          "data.crop_size=112", "data.scale_range=[128,160]", "data.modalities=rgb_flow", "engine.amp=off"]


def make_dataset(root: Path, videos: int, frames: int = 250, height: int = 256, width: int = 340,
                 entropy: str = PREPARED_ENTROPY) -> Path:
    """Textured scenes panning at varying speed (realistic H.264 bitrate), their exact flow, an index; encoded as
    goca-prepare and goca-flow encode (GOP 16, `entropy` coder)."""
    import cv2
    from goca_fast.data.index import VideoRecord, write_index
    from goca_fast.video.io import write_video
    from goca_fast.video.flow_codec import quantise_flow, write_flow_video

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
        write_video(root / f"rgb/{i:03d}.mp4", rgb, 25, gop=16, entropy=entropy)
        write_flow_video(root / f"flow/{i:03d}.mp4", quantise_flow(flow), 25, gop=16, entropy=entropy)
        recs.append(VideoRecord(f"{i:03d}", f"rgb/{i:03d}.mp4", f"flow/{i:03d}.mp4", i % 4, cls, frames, 25.0, width,
                                height, ["train"]))
        print(f"  made video {i + 1}/{videos}", file=sys.stderr)
    write_index(root, recs, [f"c{k}" for k in range(4)])
    return root


# ----------------------------------------------------------------------------- official-style loader


class OfficialStyleDataset(torch.utils.data.Dataset):
    """Per sample: whole-video PyAV decode of RGB and flow (thread_type AUTO), to_rgb of the sampled frames only,
    torch augmentation of RGB and of the flow image, each with its own draw
    (docs/official_behaviour.md#augmentation)."""

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


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _live_children() -> dict[str, float]:
    """Live child processes of this one -> their CPU seconds so far (user + system)."""
    me, out, tick = str(os.getpid()), {}, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def child_processes() -> int:
    """Live child processes of this one (DataLoader workers, DALI's parallel external source workers)."""
    return len(_live_children())


def measure(name: str, batches_iter, n_batches: int, warmup: int, clips_per_video: int, batch_size: int,
            on_cuda: bool, rss_every: int = 1, progress: int = 0) -> dict:
    """Time `n_batches` after `warmup`; host RSS of this process sampled every `rss_every` batches (and printed
    to stderr with the elapsed time every `progress` batches, so a long run that is cut short still tells)."""
    it = iter(batches_iter)
    for _ in range(warmup):
        next(it)
    if on_cuda:
        torch.cuda.synchronize()
    t0, c0, live0 = time.perf_counter(), os.times(), _live_children()
    rss, gpu_free = [], []
    for b in range(n_batches):
        batch = next(it)
        if on_cuda:
            torch.cuda.synchronize()
            gpu_free.append(torch.cuda.mem_get_info()[0] / 2**20)
        if b % rss_every == 0 or b == n_batches - 1:
            rss.append(_rss_mib())
        if progress and (b + 1) % progress == 0:
            print(f"batch {b + 1} rss_mib {_rss_mib():.1f} s {time.perf_counter() - t0:.1f}", file=sys.stderr,
                  flush=True)
        del batch
    wall = time.perf_counter() - t0
    live1 = _live_children()
    children = len(live1)
    del it
    c1 = os.times()
    # reaped children through os.times; children still alive (persistent workers) from /proc
    cpu = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) + \
        (c1.children_system - c0.children_system) + sum(t - live0.get(pid, 0.0) for pid, t in live1.items())
    clips = n_batches * batch_size * clips_per_video
    return {"loader": name, "clips_per_s": clips / wall, "clips_per_cpu_s": clips / cpu,
            "videos_per_s": n_batches * batch_size / wall,
            "ms_per_batch": 1e3 * wall / n_batches, "cpu_util_pct": 100 * cpu / wall / os.cpu_count(),
            "peak_rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "rss_first_mib": rss[0], "rss_last_mib": rss[-1], "timed_batches": n_batches,
            # growth over the second half of the run: warm-up allocations are over by then, a leak is not
            "rss_growth_2nd_half_mib": rss[-1] - rss[len(rss) // 2], "rss_samples_mib": rss,
            "child_processes": children,
            "gpu_used_growth_2nd_half_mib": (gpu_free[len(gpu_free) // 2] - gpu_free[-1]) if gpu_free else None}


def endless(factory):
    epoch = 0
    while True:
        for b in factory(epoch, 0):
            yield b
        epoch += 1


def dali_decode_only(spec):
    """Endless DALI CPU batches of the training source and its two decoders only (same files, frames, threads as
    the training pipeline `spec` builds)."""
    import dataclasses
    from nvidia.dali import fn, pipeline_def, types
    from dali_pipelines import graph
    from dali_pipelines.source import TrainSource
    from dali_pipelines.train import source_dtypes
    sp = dataclasses.replace(spec.sampling, with_flow=True)
    src = TrainSource(sp, start_epoch=0, start_batch=0)
    dtypes = source_dtypes(len(sp.clip_lengths), True, [types.INT32, types.FLOAT] * 2)

    @pipeline_def(batch_size=sp.batch_size, num_threads=max(1, spec.threads), device_id=None,
                  prefetch_queue_depth=2)
    def pipe():
        outs = list(fn.external_source(source=src, num_outputs=len(dtypes), batch=False, dtype=dtypes))
        return graph.decode_streams(outs, True, False)
    return graph_only(pipe())


def dali_native_batches(spec):
    """Endless ClipBatches of the DALI CPU training pipeline as it was before the loader fed it the seeking reader:
    the same graph, draws and copy into torch, the files decoded by DALI's own CPU decoder (which decodes each file
    from its first frame)."""
    from nvidia.dali import types
    from dali_pipelines.source import TrainSource
    from dali_pipelines.train import outputs_to_batch, train_pipeline
    sp = spec.sampling
    pipe = train_pipeline(TrainSource(sp, start_epoch=0, start_batch=0), len(sp.clip_lengths), sp.with_flow,
                          sp.augment.crop, spec.official_flow, spec.blur_window, types.FLOAT, False,
                          batch_size=sp.batch_size, num_threads=max(1, spec.threads), device_id=None, seed=sp.seed,
                          prefetch_queue_depth=2)
    pipe.build()
    while True:
        yield outputs_to_batch(pipe.run(), len(sp.clip_lengths), sp.with_flow, torch.device("cpu"), None)


def graph_only(pipe):
    """Endless raw outputs of a built-on-demand DALI pipeline (nothing copied into torch)."""
    pipe.build()
    while True:
        yield pipe.run()


def run_loader(kind: str, cfg, root: Path, n_batches: int, warmup: int, progress: int = 0) -> dict:
    from goca_fast.data.index import read_index
    from goca_fast.runtime.distributed import DistInfo
    from goca_fast.plan.loaders import cpu_train_loader, dali_train_loader
    from goca_fast.plan.run import plan_run
    from goca_fast.plan.settings import train_augment
    clips = len(cfg.clip_lengths)
    bs = cfg.data.batch_size
    every = max(1, n_batches // 500)
    if kind in ("dali_cpu", "dali_gpu"):
        dev = torch.device("cuda", 0) if kind == "dali_gpu" else torch.device("cpu")
        factory = dali_train_loader(plan_run(cfg, DistInfo(device=dev))).make
        res = measure(kind, endless(factory), n_batches, warmup, clips, bs, dev.type == "cuda", rss_every=every,
                      progress=progress)
        factory.close()
        return res
    if kind == "dali_cpu_native":
        factory = dali_train_loader(plan_run(cfg, DistInfo())).make
        return measure(kind, dali_native_batches(factory.spec), n_batches, warmup, clips, bs, False,
                       rss_every=every, progress=progress)
    if kind in ("dali_graph", "dali_decode"):
        factory = dali_train_loader(plan_run(cfg, DistInfo())).make
        batches = graph_only(factory.spec.pipeline(0, 0)) if kind == "dali_graph" else dali_decode_only(factory.spec)
        return measure(kind, batches, n_batches, warmup, clips, bs, False, rss_every=every)
    if kind == "cpu":
        factory = cpu_train_loader(plan_run(cfg, DistInfo())).make
        return measure(kind, endless(factory), n_batches, warmup, clips, bs, False, rss_every=every)
    if kind == "official":
        recs, _ = read_index(root)
        ds = OfficialStyleDataset(root, recs, cfg.clip_lengths, cfg.data.stride, cfg.data.min_distance,
                                  train_augment(cfg.data))

        def factory(epoch, start):
            return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=cfg.data.workers,
                                               collate_fn=_collate, drop_last=True,
                                               worker_init_fn=lambda _: torch.set_num_threads(1))
        return measure(kind, endless(factory), n_batches, warmup, clips, bs, False, rss_every=every)
    raise ValueError(f"unknown loader {kind!r}")


def _dali_version() -> str:
    try:
        import nvidia.dali
        return nvidia.dali.__version__
    except ImportError:
        return "not installed"


def main(argv=None) -> int:
    from goca_fast.config import load_config
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loaders", default="dali_gpu,dali_cpu,cpu,official",
                    help="comma list of dali_gpu, dali_cpu, dali_cpu_native, dali_graph, dali_decode, cpu, official (dali_gpu is "
                         "skipped without CUDA)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every loader, interleaved")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per loader")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--frames", type=int, default=250, help="frames per video (Kinetics: 250-300)")
    ap.add_argument("--entropy", choices=ENTROPY_CODERS, default=PREPARED_ENTROPY,
                    help="H.264 entropy coder of the videos (default: what goca-prepare writes)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/goca_fast/loader_bench"))
    ap.add_argument("--name", default="loader", help="results file name (e.g. loader-longrun for a leak check)")
    ap.add_argument("--progress", type=int, default=0, help="print RSS and time every N batches (stderr)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    root = make_dataset(Path(a.cache) / f"{a.videos}x{a.frames}-{a.entropy}", a.videos, frames=a.frames,
                        entropy=a.entropy)
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "ucf101_r2plus1d.yaml"),
                      RECIPE + [f"data.root={root}", f"data.workers={a.workers}", f"data.batch_size={a.batch_size}"])
    if a.one:  # child mode: one loader in a fresh process, so peak RSS and CPU time are its own
        print(json.dumps(run_loader(a.one, cfg, root, a.batches, a.warmup, a.progress)))
        return 0
    rows = []
    kinds = [k for k in a.loaders.split(",") if k != "dali_gpu" or torch.cuda.is_available()]
    for rep in range(a.repeats):
        for kind in kinds:
            print(f"{kind} (run {rep + 1}): timing {a.batches} batches ...", file=sys.stderr)
            extra = sys.argv[1:] if argv is None else list(argv)
            # with --progress the child's stderr (its progress lines) goes straight through, so a long run shows
            out = subprocess.run([sys.executable, __file__, *extra, "--one", kind], stdout=subprocess.PIPE,
                                 stderr=None if a.progress else subprocess.PIPE, text=True)
            if out.returncode != 0:
                print((out.stderr or "")[-3000:], file=sys.stderr)
                raise SystemExit(f"{kind}: benchmark process failed (exit {out.returncode})")
            rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "run": rep + 1})
            print({k: v for k, v in rows[-1].items() if k != "rss_samples_mib"}, file=sys.stderr)
    for r in rows:  # against the official-style run of the same round
        base = next((b["clips_per_s"] for b in rows if b["loader"] == "official" and b["run"] == r["run"]), None)
        r["speedup_vs_official"] = r["clips_per_s"] / base if base else float("nan")
    gpu = torch.cuda.is_available() and any(r["loader"] == "dali_gpu" for r in rows)
    dev = torch.device("cuda", 0) if gpu else torch.device("cpu")
    path = write_results(a.name, rows, ["loader", "run", "clips_per_s", "clips_per_cpu_s", "ms_per_batch",
                                          "speedup_vs_official",
                                          "cpu_util_pct", "peak_rss_main_mib", "peak_rss_worker_mib",
                                          "rss_first_mib", "rss_last_mib", "rss_growth_2nd_half_mib",
                                          "child_processes"],
                         {"device": device_name(dev), "device_tag": dev.type, "workers": a.workers,
                          "batch_size": a.batch_size, "timed_batches": a.batches, "warmup_batches": a.warmup,
                          "dataset": f"{a.videos} videos 340x256, {a.frames} frames at 25 fps, H.264 GOP 16 "
                                     f"({a.entropy.upper()}) + flow videos",
                          "recipe": "2x16 + 4x8 frames, stride 2, min distance 16, scale 128-160, crop 112",
                          "repeats": a.repeats, "dali": _dali_version(),
                          "rss": "host RSS of the loader process (DataLoader workers not included)",
                          "cpu_util": "(process + worker CPU seconds) / wall / cores"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
