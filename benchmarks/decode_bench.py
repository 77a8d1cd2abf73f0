"""CPU clip decoding: what one training clip costs by where it starts, per decode path, on long videos.

    python benchmarks/decode_bench.py [--readers pyav_seek,pyav_table,decord2,dali_cpu] [--lengths 300 750]
        [--clips 500] [--reps 10]

Videos: 340×256 at 25 fps, H.264 GOP 16, CAVLC unless --entropy cabac (what goca-prepare writes), 300 and 750
frames (Kinetics 10 s; a long UCF101 video), a textured scene panning under a band that carries each frame's
index in binary, so every decoded frame is checked to be the frame asked for. A clip is 16 consecutive frames. Readers, each single-threaded:

- pyav_seek: the project's reader (`goca_fast.video.io.read_frames`): seeks to the keyframe before the clip,
  frames identified by their timestamp on the frame grid, RGB converted by the project's own conversion;
- pyav_table: the same reader forced onto its fallback for files off a frame grid (demuxes the packet table
  up to the clip, decodes from the keyframe before it);
- decord2: `decord.VideoReader(...).get_batch` (its own FFmpeg), a new reader per clip as a loader item makes;
- dali_cpu: DALI 1.53's CPU decoder, `fn.experimental.decoders.video(frames=...)`, as the DALI pipelines use it.

Per reader and length: the median CPU ms (this process, all its threads) per clip starting at frame 0, in the
middle and at the end (of --reps reads), end / start, then --clips clips with the start drawn uniformly: clips per
CPU-second and per wall second, the frames that were not the frame asked for (must be 0), and this process's RSS
before and after. CPU time is the figure to compare on a shared machine; clips/s only on a quiet one. Each reader runs in its own process. Writes
benchmarks/results/decode-cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.report import write_results  # noqa: E402
from goca_fast.video.io import ENTROPY_CODERS, PREPARED_ENTROPY  # noqa: E402

HEIGHT, WIDTH, FPS, GOP, CLIP = 256, 340, 25, 16, 16
BITS, BAND = 10, 40  # frame index in 10 stripes of the 40 leftmost columns
READERS = ("pyav_seek", "pyav_table", "decord2", "dali_cpu")


def index_frames(n: int, seed: int = 0) -> np.ndarray:
    """n frames: a blurred random scene panning 3 px a frame; the left band shows the frame index, bit k bright
    (235) or dark (16) in horizontal stripe k."""
    import cv2
    rng = np.random.default_rng(seed)
    scene = cv2.GaussianBlur((rng.random((HEIGHT, WIDTH + 3 * n, 3)) * 255).astype(np.uint8), (0, 0), 1.5)
    frames = np.stack([scene[:, 3 * t:3 * t + WIDTH] for t in range(n)])
    rows = HEIGHT // BITS
    for t in range(n):
        for k in range(BITS):
            frames[t, k * rows:(k + 1) * rows, :BAND] = 235 if (t >> k) & 1 else 16
    return frames


def frame_number(frame: np.ndarray) -> int:
    """The index `index_frames` wrote into an H×W×3 RGB frame (each stripe read at its centre)."""
    rows = HEIGHT // BITS
    bits = [frame[k * rows + 2:(k + 1) * rows - 2, 4:BAND - 4].mean() > 125 for k in range(BITS)]
    return sum(int(b) << k for k, b in enumerate(bits))


def make_videos(cache: Path, lengths, entropy: str) -> dict[int, Path]:
    from goca_fast.video.io import write_video
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for n in lengths:
        path = cache / f"index_{n}_{entropy}.mp4"
        if not path.is_file():
            write_video(path, index_frames(n, seed=n), FPS, gop=GOP, entropy=entropy)
        out[n] = path
    return out


def reader(name: str) -> Callable[[Path, np.ndarray], np.ndarray]:
    """name -> read(path, frame indices) -> N×H×W×3 uint8 RGB."""
    if name in ("pyav_seek", "pyav_table"):
        from goca_fast.video import io as video_io
        video_io.set_decoder_threads(1)
        if name == "pyav_table":
            mock.patch.object(video_io, "_frame_grid", lambda stream: None).start()
        return video_io.read_frames
    if name == "decord2":
        import decord

        def read(path, idx):
            return decord.VideoReader(str(path), num_threads=1).get_batch(list(idx)).asnumpy()
        return read
    if name == "dali_cpu":
        return _dali_reader()
    raise ValueError(f"unknown reader {name!r}; known: {', '.join(READERS)}")


def _dali_reader():
    from nvidia.dali import fn, pipeline_def
    feed = {}

    def source(_info):
        return feed["file"], feed["frames"]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, exec_dynamic=True)
    def pipe():
        encoded, frames = fn.external_source(source=source, num_outputs=2, batch=False)
        return fn.experimental.decoders.video(encoded, frames=frames, device="cpu")

    p = pipe(prefetch_queue_depth=1)
    p.build()

    def read(path, idx):
        feed["file"], feed["frames"] = np.fromfile(path, np.uint8), np.asarray(idx, np.int32)
        out, = p.run()
        return np.asarray(out.as_tensor())[0]
    return read


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(name: str, videos: dict[int, Path], clips: int, reps: int) -> list[dict]:
    read = reader(name)
    rows = []
    for n, path in videos.items():
        read(path, np.arange(CLIP))  # warm-up: libraries loaded, first file opened
        row = {"reader": name, "frames": n}
        for where, start in (("start", 0), ("middle", (n - CLIP) // 2), ("end", n - CLIP)):
            idx = np.arange(start, start + CLIP)
            times = []
            for _ in range(reps):
                t = time.process_time()
                got = read(path, idx)
                times.append(time.process_time() - t)
            row[f"cpu_ms_{where}"] = 1e3 * float(np.median(times))
            row.setdefault("wrong_frames", 0)
            row["wrong_frames"] += int(sum(frame_number(f) != int(i) for f, i in zip(got, idx)))
        row["end_over_start"] = row["cpu_ms_end"] / row["cpu_ms_start"]
        rng = np.random.default_rng(n)
        starts = rng.integers(0, n - CLIP + 1, clips)
        row["rss_first_mib"] = _rss_mib()
        t, c = time.perf_counter(), time.process_time()
        for s in starts:
            got = read(path, np.arange(s, s + CLIP))
            row["wrong_frames"] += int(sum(frame_number(f) != s + k for k, f in enumerate(got)))
        wall = time.perf_counter() - t
        cpu = time.process_time() - c
        row.update(clips_per_s=clips / wall, clips_per_cpu_s=clips / cpu, cpu_util_pct=100 * cpu / wall,
                   rss_last_mib=_rss_mib(), uniform_clips=clips)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[300, 750])
    ap.add_argument("--clips", type=int, default=500, help="clips with a uniformly drawn start, per length")
    ap.add_argument("--reps", type=int, default=10, help="reads per fixed start (the median is reported)")
    ap.add_argument("--entropy", choices=ENTROPY_CODERS, default=PREPARED_ENTROPY,
                    help="H.264 entropy coder of the videos (default: what goca-prepare writes)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/goca_fast/decode_bench"))
    ap.add_argument("--name", default="decode")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    videos = make_videos(Path(a.cache), a.lengths, a.entropy)
    if a.one:  # child: one reader in a fresh process, so its RSS is its own
        print(json.dumps(measure(a.one, videos, a.clips, a.reps)))
        return 0
    rows = []
    for name in a.readers.split(","):
        extra = sys.argv[1:] if argv is None else list(argv)
        out = subprocess.run([sys.executable, __file__, *extra, "--one", name], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{name}: failed (exit {out.returncode}), left out:\n{out.stderr[-1500:]}", file=sys.stderr)
            continue
        rows += json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[-1], file=sys.stderr)
    if not rows:
        raise SystemExit("no reader ran")
    bad = [f"{r['reader']} ({r['frames']} frames)" for r in rows if r["wrong_frames"]]
    versions = {}
    for mod in ("av", "decord", "nvidia.dali"):
        try:
            versions[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            versions[mod] = "not installed"
    path = write_results(a.name, rows, ["reader", "frames", "cpu_ms_start", "cpu_ms_middle", "cpu_ms_end",
                                        "end_over_start", "clips_per_cpu_s", "clips_per_s", "cpu_util_pct", "wrong_frames", "rss_first_mib",
                                        "rss_last_mib"],
                         {"device": f"CPU, one decoding thread ({os.cpu_count()} cores)", "device_tag": "cpu",
                          "videos": f"{WIDTH}x{HEIGHT} at {FPS} fps, H.264 GOP {GOP} ({a.entropy.upper()}), "
                                    f"lengths {a.lengths}",
                          "clip": f"{CLIP} consecutive frames", "reps": a.reps, "uniform_clips": a.clips,
                          "versions": versions, "readers_with_wrong_frames": bad})
    print(f"wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
