"""`goca-prepare`: raw UCF101 / HMDB51 / Kinetics-400 / class-folder trees -> a prepared dataset root.

Every usable input is decoded with PyAV (any codec FFmpeg reads: H.264, XviD/MPEG-4 part 2, MJPEG,
Cinepak, ...), brought to constant frame rate, resized to a short side of 256 (even width and
height) and re-encoded by `video_io.write_video` as CFR H.264 yuv420p with a fixed short GOP and no
B-frames (what NVDEC/DALI and our seeking reader want). Output layout:

    <out>/rgb/<class>/<id>.mp4          re-encoded videos (written to a temp file, then renamed)
    <out>/index.jsonl, classes.txt      the index (all splits), read by every loader
    <out>/excluded.jsonl                every input left out, with the reason
    <out>/prepare.json                  the encoding parameters (a rerun with others is refused)
    <out>/prepare_index.jsonl           RGB-only master index (goca-flow builds index.jsonl from it)
    <out>/prepare_report.json           counts by reason, sizes and timings

Resumable: a finished output exists only under its final name, so a rerun probes and reuses it and
encodes only what is missing. Nothing here raises on a bad input; it is excluded and reported.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional, Sequence

import av
import numpy as np
from av.video.reformatter import Interpolation

from goca_fast.data.datasets import SCANNERS, SourceDataset, SplitFileError, safe_name, scan_dataset
from goca_fast.data.index import VideoRecord, _write_atomic, write_index
from goca_fast.data.video_io import VideoReadError, probe_video, set_decoder_threads, write_video

log = logging.getLogger(__name__)

PARAMS_FILE = "prepare.json"
MASTER_INDEX = "prepare_index.jsonl"
MASTER_EXCLUDED = "prepare_excluded.jsonl"
REPORT_FILE = "prepare_report.json"
TEMP_PREFIX = ".tmp_"
_VERSION = 1

# Area-averaging downscale (no aliasing) with accurate chroma, in one swscale pass per frame.
_RESIZE = Interpolation.AREA | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND


@dataclass(frozen=True)
class PrepareOptions:
    """Encoding and admission parameters (the first four fix the output; see prepare.json)."""
    short_side: int = 256          # official README: flow (and so RGB) at 256
    gop: int = 16
    crf: float = 18
    fps: Optional[float] = None    # None: keep each video's native rate (the official loader does)
    min_frames: int = 31           # official: > 30 frames; (16-1)*2+1 = 31 spans the longest default clip
    max_gap: float = 1.0           # seconds without frames that resampling to CFR may not paper over
    upscale: bool = True           # resize sources whose short side is below short_side, too

    def encoding(self) -> dict:
        return {"version": _VERSION, "short_side": self.short_side, "gop": self.gop, "crf": self.crf,
                "fps": self.fps, "upscale": self.upscale}

    def check(self) -> None:
        if self.short_side < 16 or self.short_side % 2:
            raise ValueError(f"short side must be an even number >= 16, got {self.short_side}")
        if self.gop < 1:
            raise ValueError(f"gop must be >= 1, got {self.gop}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        if self.fps is not None and not 1 <= self.fps <= 240:
            raise ValueError(f"fps must be in [1, 240], got {self.fps}")
        if self.min_frames < 1:
            raise ValueError(f"min frames must be >= 1, got {self.min_frames}")


class ExcludedInput(Exception):
    """An input that cannot be used (the message is the reason written to the report)."""


# ----------------------------------------------------------------------------- pure helpers


def target_size(width: int, height: int, short_side: int, sar: float = 1.0,
                upscale: bool = True) -> tuple[int, int]:
    """(W, H) with the short side = short_side and even dims, preserving the display aspect ratio."""
    dw = width * (sar if sar and sar > 0 else 1.0)
    short, long_ = min(dw, height), max(dw, height)
    s = short_side if (upscale or short > short_side) else 2 * int(short // 2)
    long_t = max(2, int(round(long_ * s / short / 2.0)) * 2)
    return (long_t, s) if dw >= height else (s, long_t)


def cfr_indices(times: np.ndarray, fps: float, max_gap: float) -> Optional[np.ndarray]:
    """Indices of the input frames that make a constant-rate sequence at `fps`.

    None when the input already is CFR at that rate (keep every frame). Otherwise each output
    time t0 + k/fps takes the nearest input frame (drop or repeat), like FFmpeg's fps filter.
    Raises ExcludedInput for timestamps that cannot be fixed: decreasing, or gaps > max_gap.
    """
    times = np.asarray(times, dtype=np.float64)
    if len(times) < 2:
        return None
    d = np.diff(times)
    if np.any(d < 0):
        raise ExcludedInput(f"VFR that cannot be fixed: timestamps go backwards ({int((d < 0).sum())} times)")
    if d.max() > max_gap:
        raise ExcludedInput(f"VFR that cannot be fixed: {d.max():.2f}s without frames at t={times[np.argmax(d)]:.2f}s")
    nominal = 1.0 / fps
    if np.all(np.abs(d - nominal) <= 0.25 * nominal):
        return None
    duration = times[-1] - times[0] + float(d[d > 0].min(initial=nominal))  # + the last frame (shortest interval)
    n_out = max(1, int(np.floor(duration * fps + 0.5)))
    t = times[0] + np.arange(n_out) / fps
    pos = np.clip(np.searchsorted(times, t), 1, len(times) - 1)
    left_closer = (t - times[pos - 1]) <= (times[pos] - t) + 1e-6  # ties: the earlier frame
    return np.where(left_closer, pos - 1, pos)


def _native_fps(stream, times: Sequence[float]) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if not 1.0 <= fps <= 240.0 and len(times) > 1:
        d = np.diff(np.asarray(times, dtype=np.float64))
        d = d[d > 0]
        fps = 1.0 / float(np.median(d)) if len(d) else 0.0
    if not 1.0 <= fps <= 240.0:
        raise ExcludedInput(f"VFR that cannot be fixed: no usable frame rate ({fps:.3g})")
    return fps


# ----------------------------------------------------------------------------- decode + encode


def decode_for_prepare(path: str, opts: PrepareOptions) -> tuple[np.ndarray, float, dict]:
    """Decode, resize and bring a source video to CFR -> (T×H×W×3 uint8, fps, info).

    Raises ExcludedInput with the reason for inputs that cannot be used.
    """
    if not os.path.isfile(path):
        raise ExcludedInput("missing source file")
    if os.path.getsize(path) == 0:
        raise ExcludedInput("undecodable: empty file")
    try:
        container = av.open(path, mode="r")
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types
        raise ExcludedInput(f"undecodable: cannot open ({type(e).__name__}: {e})") from None
    try:
        if not container.streams.video:
            raise ExcludedInput("undecodable: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        codec = stream.codec_context.name
        declared = int(stream.frames or 0)
        frames: list[np.ndarray] = []
        times: list[Optional[float]] = []
        size: Optional[tuple[int, int]] = None
        turns, corrupt = 0, 0
        error = None
        try:
            for fr in container.decode(stream):
                if size is None:
                    sar = stream.codec_context.sample_aspect_ratio or stream.sample_aspect_ratio
                    size = target_size(fr.width, fr.height, opts.short_side,
                                       float(sar) if sar else 1.0, opts.upscale)
                    turns = int(round((getattr(fr, "rotation", 0) or 0) / 90.0)) % 4  # display matrix
                img = fr.reformat(width=size[0], height=size[1], format="rgb24", interpolation=_RESIZE).to_ndarray()
                frames.append(np.ascontiguousarray(np.rot90(img, turns)) if turns else img)
                times.append(fr.time)
                corrupt += bool(getattr(fr, "is_corrupt", False))
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        n = len(frames)
        if n == 0:
            raise ExcludedInput(f"undecodable: zero frames decoded{f' ({error})' if error else ''}")
        if error is not None:
            raise ExcludedInput(f"truncated or corrupt: decoding stopped after {n} frames ({error})")
        if declared > 0 and n < declared - max(2, int(0.02 * declared)):
            raise ExcludedInput(f"truncated: decoded {n} of {declared} frames")
        native = _native_fps(stream, [t for t in times if t is not None])
        nominal = float(stream.guessed_rate or stream.base_rate or 0)
    finally:
        container.close()
    fps = float(opts.fps) if opts.fps else native
    if any(t is None for t in times):
        if opts.fps and abs(opts.fps - native) > 1e-3 * native:
            raise ExcludedInput("VFR that cannot be fixed: frames without timestamps")
        idx = None  # no timestamps: trust the declared constant rate
    else:
        idx = cfr_indices(np.array(times), fps, opts.max_gap)
        if idx is not None and not opts.fps and native < nominal <= 60:
            # VFR from dropped frames: the nominal rate keeps every frame and repeats into the gaps,
            # where the (lower) average rate would drop some frames and repeat others
            fps = nominal
            idx = cfr_indices(np.array(times), fps, opts.max_gap)
    video = np.stack(frames) if idx is None else np.stack([frames[i] for i in idx])
    info = {"codec": codec, "src_frames": n, "src_fps": native, "resampled": idx is not None,
            "corrupt_frames": corrupt}
    return video, fps, info


@dataclass
class Job:
    src: str
    out_root: str
    rel: str
    id: str


def process_one(job: Job, opts: PrepareOptions) -> dict:
    """Encode one video unless its output already exists; never raises (failures -> 'excluded')."""
    t0 = time.perf_counter()
    out = os.path.join(job.out_root, job.rel)
    res = {"id": job.id, "src": job.src, "rel": job.rel}
    if os.path.isfile(out):
        try:
            info = probe_video(out)
            if info.frames < opts.min_frames:  # kept from a run with a lower --min-frames
                return {**res, "status": "excluded", "reason": f"too short: {info.frames} frames < {opts.min_frames}",
                        "seconds": time.perf_counter() - t0}
            return {**res, "status": "skipped", "frames": info.frames, "fps": info.fps, "width": info.width,
                    "height": info.height, "bytes": os.path.getsize(out), "seconds": time.perf_counter() - t0}
        except VideoReadError:
            os.unlink(out)  # cannot happen with atomic writes, unless the disk lied: redo it
    try:
        video, fps, info = decode_for_prepare(job.src, opts)
        if len(video) < opts.min_frames:
            raise ExcludedInput(f"too short: {len(video)} frames < {opts.min_frames}")
        write_video(out, video, fps, gop=opts.gop, crf=opts.crf)
        t, h, w, _ = video.shape
        return {**res, **info, "status": "encoded", "frames": int(t), "fps": float(fps), "width": int(w),
                "height": int(h), "bytes": os.path.getsize(out), "src_bytes": os.path.getsize(job.src),
                "seconds": time.perf_counter() - t0}
    except ExcludedInput as e:
        return {**res, "status": "excluded", "reason": str(e), "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - one bad video never stops the run
        return {**res, "status": "excluded", "reason": f"failed: {type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0}


def process_pool(workers: int, initializer=None, initargs: tuple = (), preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """A process pool safe to start from a process that already ran OpenMP/OpenCV/torch threads.

    Plain fork copies thread-pool state whose threads do not exist in the child (a deadlock we hit
    in practice); forkserver forks workers from a clean server that preloads our modules once.
    """
    import multiprocessing as mp
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["goca_fast.data.prepare", *preload])
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs)


def _worker_init() -> None:
    set_decoder_threads(1)
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def run_parallel(fn: Callable, args: Sequence[tuple], workers: int, desc: str, progress: bool,
                 initializer=None, initargs: tuple = (), preload: Sequence[str] = ()) -> Iterator[dict]:
    """fn(*a) for every a in `args`, in this process or a forkserver pool, with a progress bar.

    Results are yielded as they complete, so callers can record each one before the next (resumability).
    """
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(args), desc=desc, unit="video", file=sys.stderr)
    try:
        if workers <= 1:
            for a in args:
                r = fn(*a)
                if bar:
                    bar.update(1)
                yield r
        else:
            with process_pool(workers, initializer, initargs, preload) as ex:
                for f in as_completed([ex.submit(fn, *a) for a in args]):
                    if bar:
                        bar.update(1)
                    yield f.result()
    finally:
        if bar:
            bar.close()


def _run_jobs(jobs: list[Job], opts: PrepareOptions, workers: int, progress: bool) -> Iterator[dict]:
    return run_parallel(process_one, [(j, opts) for j in jobs], workers, "prepare", progress, _worker_init)


def remove_stale_temps(root: str, older_than: float = 120.0) -> int:
    """Delete temp files a killed run left (not modified for `older_than` s; a live writer keeps them fresh)."""
    n, now = 0, time.time()
    for d, _, files in os.walk(root):
        for f in files:
            if f.startswith(TEMP_PREFIX):
                p = os.path.join(d, f)
                try:
                    if now - os.path.getmtime(p) > older_than:
                        os.unlink(p)
                        n += 1
                except OSError:
                    pass
    return n


def _check_params(out: str, opts: PrepareOptions, force: bool) -> None:
    path = os.path.join(out, PARAMS_FILE)
    want = opts.encoding()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            have = json.load(f)
        if have != want and not force:
            diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
            raise ValueError(f"{out} was prepared with other parameters {diff} (old, new); "
                             f"use another --out, or --force to re-encode everything")
        if have != want and force:
            import shutil
            shutil.rmtree(os.path.join(out, "rgb"), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    _write_atomic(path, json.dumps(want, indent=1) + "\n")


def write_master(out: str, records: Sequence[VideoRecord], excluded: Sequence[dict]) -> None:
    _write_atomic(os.path.join(out, MASTER_INDEX), "".join(json.dumps(r.to_json()) + "\n" for r in records))
    _write_atomic(os.path.join(out, MASTER_EXCLUDED), "".join(json.dumps(e) + "\n" for e in excluded))


def prepare_dataset(source: SourceDataset, out: str, opts: PrepareOptions = PrepareOptions(), workers: int = 1,
                    progress: bool = False, force: bool = False, limit: Optional[int] = None) -> dict:
    """Encode `source` into the prepared root `out`; write index + report; return the report dict."""
    opts.check()
    out = os.path.abspath(out)
    _check_params(out, opts, force)
    remove_stale_temps(os.path.join(out, "rgb"))
    videos = source.videos[:limit] if limit else source.videos
    jobs = [Job(v.path, out, f"rgb/{safe_name(v.cls)}/{v.id}.mp4", v.id) for v in videos]
    by_id = {v.id: v for v in videos}
    label = {c: i for i, c in enumerate(source.classes)}
    t0 = time.time()
    results = list(_run_jobs(jobs, opts, workers, progress))
    records, excluded = [], list(source.problems)
    for r in results:
        v = by_id[r["id"]]
        if r["status"] == "excluded":
            excluded.append({"id": r["id"], "path": r["src"], "reason": r["reason"]})
            continue
        records.append(VideoRecord(id=v.id, rgb=r["rel"], flow=None, label=label[v.cls], cls=v.cls,
                                   frames=int(r["frames"]), fps=float(r["fps"]), width=int(r["width"]),
                                   height=int(r["height"]), splits=list(v.splits)))
    order = {v.id: i for i, v in enumerate(videos)}
    records.sort(key=lambda rec: order[rec.id])
    write_master(out, records, excluded)
    write_index(out, records, source.classes, excluded)
    enc = [r for r in results if r["status"] == "encoded"]
    report = {
        "videos": len(jobs), "kept": len(records), "encoded": len(enc),
        "skipped_existing": sum(r["status"] == "skipped" for r in results),
        "excluded": len(excluded),
        "excluded_by_reason": dict(Counter(_reason_kind(e["reason"]) for e in excluded)),
        "splits": dict(Counter(s for rec in records for s in rec.splits)),
        "wall_seconds": round(time.time() - t0, 2), "workers": workers,
        "encode_cpu_seconds_per_video": round(float(np.mean([r["seconds"] for r in enc])), 3) if enc else None,
        "output_bytes_per_video": int(np.mean([r["bytes"] for r in enc])) if enc else None,
        "source_bytes_per_video": int(np.mean([r["src_bytes"] for r in enc])) if enc else None,
        "frames_per_video": round(float(np.mean([r["frames"] for r in enc])), 1) if enc else None,
        "resampled_to_cfr": sum(bool(r.get("resampled")) for r in enc),
        "options": asdict(opts),
    }
    _write_atomic(os.path.join(out, REPORT_FILE), json.dumps(report, indent=1) + "\n")
    return report


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary ("too short: 12 frames < 31" -> "too short")."""
    return reason.split(":")[0].split(" (")[0]


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goca-prepare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(SCANNERS), help="source layout")
    p.add_argument("--src", required=True, help="raw dataset root (class folders of videos)")
    p.add_argument("--out", required=True, help="prepared dataset root to write")
    p.add_argument("--splits-dir", default=None,
                   help="split/annotation files (UCF ucfTrainTestlist, HMDB testTrainMulti_7030_splits, "
                        "K400 CSVs); default: searched under --src")
    p.add_argument("--short-side", type=int, default=256)
    p.add_argument("--gop", type=int, default=16)
    p.add_argument("--crf", type=float, default=18)
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: native)")
    p.add_argument("--min-frames", type=int, default=31, help="shorter videos are excluded")
    p.add_argument("--max-gap", type=float, default=1.0, help="longest timestamp gap (s) CFR resampling may fill")
    p.add_argument("--no-upscale", action="store_true", help="keep sources smaller than --short-side as they are")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--limit", type=int, default=None, help="only the first N videos (a trial run)")
    p.add_argument("--force", action="store_true", help="re-encode if --out was prepared with other parameters")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    opts = PrepareOptions(short_side=a.short_side, gop=a.gop, crf=a.crf, fps=a.fps, min_frames=a.min_frames,
                          max_gap=a.max_gap, upscale=not a.no_upscale)
    try:
        opts.check()
        if a.workers < 1:
            raise ValueError(f"workers must be >= 1, got {a.workers}")
        source = scan_dataset(a.dataset, a.src, a.splits_dir)
        if not source.videos:
            raise ValueError(f"no usable videos found for {a.dataset} under {a.src} "
                             f"({len(source.problems)} problems, e.g. {source.problems[:1]})")
        report = prepare_dataset(source, a.out, opts, workers=a.workers, progress=not a.no_progress,
                                 force=a.force, limit=a.limit)
    except (SplitFileError, ValueError) as e:
        parser.error(str(e))
    print(f"goca-prepare: {report['kept']} videos kept ({report['encoded']} encoded, "
          f"{report['skipped_existing']} already done), {report['excluded']} excluded "
          f"{report['excluded_by_reason']} -> {os.path.abspath(a.out)}")
    print(f"goca-prepare: splits {report['splits']}; see excluded.jsonl and {REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
