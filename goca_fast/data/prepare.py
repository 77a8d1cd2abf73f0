"""`goca-prepare`: raw UCF101 / HMDB51 / Kinetics-400 / class-folder trees -> a prepared dataset root.

Every usable input is decoded with PyAV (any codec FFmpeg reads: H.264, XviD/MPEG-4 part 2, MJPEG,
Cinepak, ...), brought to constant frame rate, resized to a short side of 256 (even width and
height) and re-encoded by `video_io.VideoWriter` as CFR H.264 yuv420p with a fixed short GOP and no
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
import heapq
import json
import logging
import os
import sys
import time
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Iterator, Optional, Sequence

import av
import numpy as np
from av.video.reformatter import Interpolation

from goca_fast.atomic import remove_stale_temps, write_atomic
from goca_fast.cli_help import HelpFormatter
from goca_fast.data.datasets import SCANNERS, SourceDataset, SplitFileError, safe_name, scan_dataset
from goca_fast.data.index import MASTER_EXCLUDED, MASTER_INDEX, VideoRecord, write_index
from goca_fast.data.video_io import (VideoReadError, VideoWriter, _configure_decoder, probe_video,
                                     set_decoder_threads)
from goca_fast.flow.dataset import check_flow_file, flow_rel_path
from goca_fast.parallel import run_parallel

log = logging.getLogger(__name__)

PARAMS_FILE = "prepare.json"
REPORT_FILE = "prepare_report.json"
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


_REORDER_WINDOW = 16  # decoders emit frames in display order; packed/B-frame timestamps are off by < 16 frames


class TimestampSorter:
    """Pair frames (which a decoder emits in display order) with their timestamps in sorted order.

    Why: AVI has no presentation timestamps, and for MPEG-4 part 2 with packed B-frames FFmpeg
    stamps decoded frames 1,3,2,5,4,... although the pictures come out in display order. The
    timestamps are still a permutation of the right ones, so the k-th frame gets the k-th
    smallest timestamp (what video_io's readers do with the packet table). A timestamp that goes
    back further than the window (a reset, spliced streams) raises ExcludedInput.
    """

    def __init__(self, window: int = _REORDER_WINDOW):
        self.window, self.last, self.fixed = window, -np.inf, 0
        self._heap: list[float] = []
        self._items: deque = deque()
        self._max = -np.inf

    def push(self, t: float, item) -> list[tuple[float, object]]:
        if t < self.last:
            raise ExcludedInput(f"VFR that cannot be fixed: timestamps go backwards by {self.last - t:.2f}s "
                                f"(more than {self.window} frames; a timestamp reset?)")
        if t < self._max:
            self.fixed += 1  # out of order, but within the window: sorted back
        self._max = max(self._max, t)
        heapq.heappush(self._heap, t)
        self._items.append(item)
        return self._release(self.window)

    def finish(self) -> list[tuple[float, object]]:
        return self._release(0)

    def _release(self, keep: int) -> list[tuple[float, object]]:
        out = []
        while len(self._items) > keep:
            self.last = heapq.heappop(self._heap)
            out.append((self.last, self._items.popleft()))
        return out


class CfrResampler:
    """Online nearest-neighbour resampling onto t0 + k/fps (FFmpeg's fps filter; ties to the earlier frame).

    Fed frames in time order, it emits each output frame as soon as its nearest input is known,
    so memory does not grow with the video. Output frames cover [t0, t_last + 0.5/fps): a
    regular input at the same rate comes out unchanged; dropped frames are repeated into the
    gap. A gap longer than max_gap raises ExcludedInput.
    """

    def __init__(self, fps: float, max_gap: float):
        self.fps, self.max_gap = float(fps), float(max_gap)
        self.t0: Optional[float] = None
        self.k = 0              # next output slot
        self.n_in = 0
        self.identity = True    # every input emitted exactly once, in order
        self._prev: Optional[tuple[float, int, object]] = None

    def _emit(self, idx: int, item, out: list) -> None:
        self.identity &= idx == self.k
        out.append(item)
        self.k += 1

    def push(self, t: float, item) -> list:
        out: list = []
        idx, self.n_in = self.n_in, self.n_in + 1
        if self._prev is None:
            self.t0, self._prev = t, (t, idx, item)
            return out
        tp, ip, itp = self._prev
        if t - tp > self.max_gap:
            raise ExcludedInput(f"VFR that cannot be fixed: {t - tp:.2f}s without frames at t={tp - self.t0:.2f}s")
        while True:
            g = self.t0 + self.k / self.fps
            if g > t + 1e-9:
                break
            if g - tp <= (t - g) + 1e-6:
                self._emit(ip, itp, out)
            else:
                self._emit(idx, item, out)
        self._prev = (t, idx, item)
        return out

    def finish(self) -> list:
        out: list = []
        if self._prev is None:
            return out
        tp, ip, itp = self._prev
        n = int(np.ceil((tp - self.t0) * self.fps + 0.5 - 1e-6))
        while self.k < n:
            self._emit(ip, itp, out)
        self.identity &= self.k == self.n_in
        return out


def cfr_indices(times: np.ndarray, fps: float, max_gap: float) -> Optional[np.ndarray]:
    """Indices of the input frames that make a constant-rate sequence at `fps` (reference for the stream path).

    `times` are in decode-output order (sorted here as TimestampSorter does). None when every
    frame is kept once, in order. Raises ExcludedInput for timestamps that cannot be fixed.
    """
    sorter, rs, out = TimestampSorter(), CfrResampler(fps, max_gap), []
    for i, t in enumerate(np.asarray(times, dtype=np.float64)):
        for ts, k in sorter.push(float(t), i):
            out += rs.push(ts, k)
    for ts, k in sorter.finish():
        out += rs.push(ts, k)
    out += rs.finish()
    return None if rs.identity else np.asarray(out, dtype=np.int64)


# Rates cameras and broadcast use; a VFR clip's measured rate within 1% of one of them is that rate.
_STANDARD_RATES = tuple(float(Fraction(r)) for r in ("24000/1001", "24", "25", "30000/1001", "30", "48", "50",
                                                     "60000/1001", "60", "12", "12.5", "15", "20", "90", "100",
                                                     "120", "240"))


def nominal_fps(times: np.ndarray, container_fps: float) -> float:
    """The rate to resample to when the user gives none: the container's, unless frames are mostly closer.

    Why: for dropped frames (AVI empty chunks) the container rate is the nominal one and the
    frames sit on its grid. A phone's VFR MP4 declares only its average rate (27.9 for a 30 fps
    clip with drops), while the typical frame spacing gives the real one: each interval counted in
    periods of the median spacing, the rate fitted over the whole clip, snapped to a standard rate.
    """
    t = np.unique(np.asarray(times, dtype=np.float64))
    d = np.diff(t)
    ok = 1.0 <= container_fps <= 240.0
    if len(d) == 0:
        if ok:
            return container_fps
        raise ExcludedInput(f"VFR that cannot be fixed: no usable frame rate ({container_fps:.3g})")
    r_med = 1.0 / float(np.median(d))
    if ok and r_med <= 1.02 * container_fps:
        return container_fps
    m = np.maximum(1.0, np.rint(d * r_med))  # each interval in frame periods (a drop spans several)
    r = float(m.sum() / d.sum())
    snap = min(_STANDARD_RATES, key=lambda s: abs(s - r) / s)
    r = snap if abs(snap - r) <= 0.01 * snap else r
    if not 1.0 <= r <= 240.0:
        raise ExcludedInput(f"VFR that cannot be fixed: no usable frame rate ({r:.3g})")
    return r


# ----------------------------------------------------------------------------- decode + encode


def _open_source(path: str) -> tuple["av.container.InputContainer", "av.video.stream.VideoStream"]:
    """The container and the video stream FFmpeg would play (av_find_best_stream skips cover art)."""
    if not os.path.isfile(path):
        raise ExcludedInput("missing source file")
    if os.path.getsize(path) == 0:
        raise ExcludedInput("undecodable: empty file")
    try:
        container = av.open(path, mode="r")
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types
        raise ExcludedInput(f"undecodable: cannot open ({type(e).__name__}: {e})") from None
    try:
        stream = container.streams.best("video") if container.streams.video else None
    except Exception:  # noqa: BLE001
        stream = None
    if stream is None:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        container.close()
        raise ExcludedInput(f"undecodable: no video stream (streams: {', '.join(kinds)})")
    return container, stream


def _declared_seconds(stream, fps: float) -> Optional[float]:
    """The video stream's declared duration, if any: the longest of its duration (MP4 track, MKV
    DURATION tag) and its frame count at the container rate (an AVI header's length in frame slots,
    which a truncated file still carries while FFmpeg derives `duration` from what is left)."""
    cands = []
    if stream.duration and stream.time_base:
        cands.append(float(stream.duration * stream.time_base))
    tag = (stream.metadata or {}).get("DURATION")
    if tag:
        try:
            h, m, sec = tag.split(":")
            cands.append(int(h) * 3600 + int(m) * 60 + float(sec))
        except ValueError:
            pass
    if stream.frames and fps > 0:
        cands.append(stream.frames / fps)
    return max(cands) if cands else None


def _packet_times(container, stream) -> np.ndarray:
    """Presentation times (s) of the coded pictures, from a demux-only pass (no decoding, cheap)."""
    tb = float(stream.time_base)
    out = []
    for p in container.demux(stream):
        if p.size == 0:  # flush packets and AVI's empty chunks (dropped frames) carry no picture
            continue
        ts = p.pts if p.pts is not None else p.dts
        if ts is not None:
            out.append(ts * tb)
    return np.sort(np.asarray(out, dtype=np.float64))


_CHUNK = 32  # output frames handed to the encoder at once (bounded memory)


def transcode(path: str, out: Optional[str], opts: PrepareOptions) -> dict:
    """Decode, resize, bring to CFR and encode one source, streaming; out=None decodes only (--check).

    Returns {"frames", "fps", "width", "height", "codec", "src_frames", "resampled", ...}.
    Raises ExcludedInput with the reason for inputs that cannot be used; a partial output never
    appears under `out`.
    """
    container, stream = _open_source(path)
    try:
        container_fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)
        declared = _declared_seconds(stream, container_fps)
        try:
            ptimes = _packet_times(container, stream)
        except Exception:  # noqa: BLE001 - a broken tail; the decode below says what it is
            ptimes = np.zeros(0)
        sidx = stream.index
    finally:
        container.close()
    fps = float(opts.fps) if opts.fps else nominal_fps(ptimes, container_fps)
    container = av.open(path, mode="r")
    writer: Optional[VideoWriter] = None
    try:
        stream = container.streams[sidx]
        _configure_decoder(stream.codec_context)
        codec = stream.codec_context.name
        sorter, rs = TimestampSorter(), CfrResampler(fps, opts.max_gap)
        chunk: list = []
        size: Optional[tuple[int, int]] = None
        turns = n_dec = corrupt = n_out = 0
        first_t = last_t = None
        error = None

        def emit(frames: list) -> None:
            nonlocal n_out
            n_out += len(frames)
            if out is None:
                return
            chunk.extend(frames)
            if len(chunk) >= _CHUNK:
                writer.write(np.stack(chunk))
                chunk.clear()

        try:
            for fr in container.decode(stream):
                if size is None:
                    sar = stream.codec_context.sample_aspect_ratio or stream.sample_aspect_ratio
                    size = target_size(fr.width, fr.height, opts.short_side, float(sar) if sar else 1.0, opts.upscale)
                    turns = int(round((getattr(fr, "rotation", 0) or 0) / 90.0)) % 4  # display matrix
                    if out is not None:
                        w, h = size[::-1] if turns % 2 else size
                        writer = VideoWriter(out, w, h, fps, gop=opts.gop, crf=opts.crf)
                img = None
                if out is not None:
                    img = fr.reformat(width=size[0], height=size[1], format="rgb24",
                                      interpolation=_RESIZE).to_ndarray()
                    if turns:
                        img = np.ascontiguousarray(np.rot90(img, turns))
                t = fr.time
                if t is None:  # no timestamp: the next slot at the nominal rate
                    t = (last_t + 1.0 / fps) if last_t is not None else 0.0
                last_t = t if last_t is None else max(last_t, t)
                first_t = t if first_t is None else min(first_t, t)
                n_dec += 1
                corrupt += bool(getattr(fr, "is_corrupt", False))
                for ts, it in sorter.push(t, img):
                    emit(rs.push(ts, it))
        except ExcludedInput:
            raise
        except Exception as e:  # noqa: BLE001 - PyAV/FFmpeg raise many error types
            error = f"{type(e).__name__}: {e}"
        if n_dec == 0:
            raise ExcludedInput(f"undecodable: zero frames decoded{f' ({error})' if error else ''}")
        if error is not None:
            raise ExcludedInput(f"truncated or corrupt: decoding stopped after {n_dec} frames ({error})")
        for ts, it in sorter.finish():
            emit(rs.push(ts, it))
        emit(rs.finish())
        span = last_t - first_t + 1.0 / fps
        if declared and declared - span > max(3.0 / fps, 0.1 * declared):  # clearly short, not a trailing drop
            raise ExcludedInput(f"truncated: decoded {span:.2f}s of the declared {declared:.2f}s "
                                f"({n_dec} frames)")
        if n_out < opts.min_frames:
            raise ExcludedInput(f"too short: {n_out} frames < {opts.min_frames}")
        if writer is not None:
            if chunk:
                writer.write(np.stack(chunk))
            writer.close()
        w, h = size[::-1] if turns % 2 else size
        return {"frames": n_out, "fps": fps, "width": int(w), "height": int(h), "codec": codec,
                "src_frames": n_dec, "src_fps": container_fps, "resampled": not rs.identity,
                "reordered_timestamps": sorter.fixed, "corrupt_frames": corrupt, "rotation": 90 * turns}
    finally:
        if writer is not None:
            writer.abort()  # no-op after close()
        container.close()


@dataclass
class Job:
    src: str
    out_root: str
    rel: str
    id: str


def process_one(job: Job, opts: PrepareOptions, check: bool = False) -> dict:
    """Encode one video unless its output already exists; never raises (failures -> 'excluded').

    check=True decodes the source only (nothing is written) and reports what would be kept.
    """
    t0 = time.perf_counter()
    out = os.path.join(job.out_root, job.rel)
    res = {"id": job.id, "src": job.src, "rel": job.rel}
    if not check and os.path.isfile(out):
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
        info = transcode(job.src, None if check else out, opts)
        return {**res, **info, "status": "checked" if check else "encoded",
                "bytes": 0 if check else os.path.getsize(out), "src_bytes": os.path.getsize(job.src),
                "seconds": time.perf_counter() - t0}
    except ExcludedInput as e:
        return {**res, "status": "excluded", "reason": str(e), "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - one bad video never stops the run
        return {**res, "status": "excluded", "reason": f"failed: {type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0}


def _worker_init() -> None:
    set_decoder_threads(1)
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def _run_jobs(jobs: list[Job], opts: PrepareOptions, workers: int, progress: bool,
              check: bool = False) -> Iterator[dict]:
    return run_parallel(process_one, [(j, opts, check) for j in jobs], workers, "check" if check else "prepare",
                        progress, _worker_init, preload=["goca_fast.data.prepare"])


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
    write_atomic(path, json.dumps(want, indent=1) + "\n")


def write_master(out: str, records: Sequence[VideoRecord], excluded: Sequence[dict]) -> None:
    write_atomic(os.path.join(out, MASTER_INDEX), "".join(json.dumps(r.to_json()) + "\n" for r in records))
    write_atomic(os.path.join(out, MASTER_EXCLUDED), "".join(json.dumps(e) + "\n" for e in excluded))


def keep_valid_flow(out: str, records: Sequence[VideoRecord], reencoded: set[str]) -> tuple[list[VideoRecord], dict]:
    """Records with their flow path where a flow video from an earlier goca-flow still matches.

    Why: index.jsonl is rewritten on every run; without this a rerun of goca-prepare on a
    dataset with flow would set every "flow" to null and pretraining would skip every video.
    A flow video whose RGB was re-encoded in this run was computed from other pixels: it is
    deleted, so goca-flow recomputes it. Returns (records, {"kept", "recompute": {reason: n}}).
    """
    kept, recompute, result = 0, Counter(), []
    for rec in records:
        path = os.path.join(out, flow_rel_path(rec))
        if not os.path.isfile(path):
            result.append(rec)
            continue
        why = "RGB re-encoded in this run" if rec.id in reencoded else check_flow_file(out, rec)
        if why is None:
            kept += 1
            result.append(replace(rec, flow=flow_rel_path(rec)))
            continue
        os.unlink(path)
        recompute[_reason_kind(why)] += 1
        result.append(rec)
    return result, {"kept": kept, "recompute": dict(recompute)}


def prepare_dataset(source: SourceDataset, out: str, opts: PrepareOptions = PrepareOptions(), workers: int = 1,
                    progress: bool = False, force: bool = False, limit: Optional[int] = None,
                    check: bool = False) -> dict:
    """Encode `source` into the prepared root `out`; write index + report; return the report dict.

    check=True only decodes every source and returns the report of what would be kept or
    excluded and why; nothing is written.
    """
    opts.check()
    out = os.path.abspath(out)
    if not check:
        _check_params(out, opts, force)
        remove_stale_temps(os.path.join(out, "rgb"))
    videos = source.videos[:limit] if limit else source.videos
    jobs = [Job(v.path, out, f"rgb/{safe_name(v.cls)}/{v.id}.mp4", v.id) for v in videos]
    by_id = {v.id: v for v in videos}
    label = {c: i for i, c in enumerate(source.classes)}
    t0 = time.time()
    results = list(_run_jobs(jobs, opts, workers, progress, check))
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
    flow = {"kept": 0, "recompute": {}}
    if not check:
        write_master(out, records, excluded)
        indexed, flow = keep_valid_flow(out, records, {r["id"] for r in results if r["status"] == "encoded"})
        write_index(out, indexed, source.classes, excluded)
    enc = [r for r in results if r["status"] in ("encoded", "checked")]
    report = {
        "videos": len(jobs), "kept": len(records), "encoded": sum(r["status"] == "encoded" for r in results),
        "skipped_existing": sum(r["status"] == "skipped" for r in results),
        "excluded": len(excluded),
        "excluded_by_reason": dict(Counter(_reason_kind(e["reason"]) for e in excluded)),
        "splits": dict(Counter(s for rec in records for s in rec.splits)),
        "flow_kept": flow["kept"], "flow_to_recompute": flow["recompute"],
        "wall_seconds": round(time.time() - t0, 2), "workers": workers,
        "encode_cpu_seconds_per_video": round(float(np.mean([r["seconds"] for r in enc])), 3) if enc else None,
        "output_bytes_per_video": int(np.mean([r["bytes"] for r in enc])) if enc and not check else None,
        "source_bytes_per_video": int(np.mean([r["src_bytes"] for r in enc])) if enc else None,
        "frames_per_video": round(float(np.mean([r["frames"] for r in enc])), 1) if enc else None,
        "resampled_to_cfr": sum(bool(r.get("resampled")) for r in enc),
        "reordered_timestamps": sum(bool(r.get("reordered_timestamps")) for r in enc),
        "options": asdict(opts),
    }
    if check:
        report["check"] = True
        report["would_keep"] = [{"id": r["id"], "frames": r["frames"], "fps": round(r["fps"], 3),
                                 "size": f"{r['width']}x{r['height']}", "resampled": r["resampled"]}
                                for r in results if r["status"] == "checked"]
        report["would_exclude"] = [{"id": e["id"], "path": e["path"], "reason": e["reason"]} for e in excluded]
    else:
        write_atomic(os.path.join(out, REPORT_FILE), json.dumps(report, indent=1) + "\n")
    return report


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary ("too short: 12 frames < 31" -> "too short")."""
    return reason.split(":")[0].split(" (")[0]


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goca-prepare", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="exit status: 0 when at least one video is usable, 1 when none is, "
                                       "2 for usage errors")
    p.add_argument("--dataset", required=True, choices=sorted(SCANNERS), help="source layout")
    p.add_argument("--src", required=True, help="raw dataset root (class folders of videos)")
    p.add_argument("--out", default=None, help="prepared dataset root to write (required unless --check)")
    p.add_argument("--check", action="store_true",
                   help="decode-only dry run: print what would be kept or excluded and why; write nothing")
    p.add_argument("--splits-dir", default=None,
                   help="split/annotation files (UCF ucfTrainTestlist, HMDB testTrainMulti_7030_splits, "
                        "K400 CSVs); default: searched under --src")
    p.add_argument("--short-side", type=int, default=256, help="output short side in pixels (aspect kept)")
    p.add_argument("--gop", type=int, default=16, help="keyframe interval of the H.264 output (frames)")
    p.add_argument("--crf", type=float, default=18, help="libx264 quality (lower = better, larger files)")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the source's)")
    p.add_argument("--min-frames", type=int, default=31, help="shorter videos are excluded")
    p.add_argument("--max-gap", type=float, default=1.0, help="longest timestamp gap (s) CFR resampling may fill")
    p.add_argument("--no-upscale", action="store_true", help="keep sources smaller than --short-side as they are")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--limit", type=int, default=None, help="only the first N videos (a trial run)")
    p.add_argument("--force", action="store_true", help="re-encode if --out was prepared with other parameters")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _print_check(report: dict) -> None:
    """Per reason, what a real run would keep or exclude."""
    print(f"goca-prepare --check: {report['kept']} of {report['videos']} videos would be kept, "
          f"{report['excluded']} excluded (nothing written)")
    for v in report["would_keep"]:
        print(f"  keep     {v['id']}: {v['frames']} frames at {v['fps']} fps, {v['size']}"
              f"{' (resampled to CFR)' if v['resampled'] else ''}")
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for e in report["would_exclude"]:
        by_kind[_reason_kind(e["reason"])].append(e)
    for kind, items in sorted(by_kind.items()):
        print(f"  exclude  {kind} ({len(items)}):")
        for e in items:
            print(f"    {e['id']}: {e['reason']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    opts = PrepareOptions(short_side=a.short_side, gop=a.gop, crf=a.crf, fps=a.fps, min_frames=a.min_frames,
                          max_gap=a.max_gap, upscale=not a.no_upscale)
    try:
        opts.check()
        if a.workers < 1:
            raise ValueError(f"workers must be >= 1, got {a.workers}")
        if a.out is None and not a.check:
            raise ValueError("--out is required (or --check for a dry run)")
        source = scan_dataset(a.dataset, a.src, a.splits_dir)
    except (SplitFileError, ValueError) as e:
        parser.error(str(e))
    if not source.videos:
        print(f"goca-prepare: nothing usable: no videos found for {a.dataset} under {a.src} "
              f"({len(source.problems)} problems, e.g. {source.problems[:1]})", file=sys.stderr)
        return 1
    try:
        report = prepare_dataset(source, a.out or a.src, opts, workers=a.workers, progress=not a.no_progress,
                                 force=a.force, limit=a.limit, check=a.check)
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:  # e.g. --out on a read-only file system
        print(f"goca-prepare: error: cannot write {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    if a.check:
        _print_check(report)
    else:
        print(f"goca-prepare: {report['kept']} videos kept ({report['encoded']} encoded, "
              f"{report['skipped_existing']} already done), {report['excluded']} excluded "
              f"{report['excluded_by_reason']} -> {os.path.abspath(a.out)}")
        print(f"goca-prepare: splits {report['splits']}; see excluded.jsonl and {REPORT_FILE}")
        if report["flow_kept"] or report["flow_to_recompute"]:
            lost = sum(report["flow_to_recompute"].values())
            new = report["kept"] - report["flow_kept"] - lost
            print(f"goca-prepare: flow kept for {report['flow_kept']} videos"
                  + (f"; FLOW MUST BE RECOMPUTED for {lost} ({report['flow_to_recompute']})" if lost else "")
                  + (f"; {new} still without flow" if new else "")
                  + (f": run goca-flow --root {os.path.abspath(a.out)}" if lost or new else ""))
    if report["kept"] == 0:
        print(f"goca-prepare: nothing usable: all {report['videos']} inputs excluded "
              f"{report['excluded_by_reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
