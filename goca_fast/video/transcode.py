"""One raw video -> one prepared video: decode with PyAV (any codec FFmpeg reads), bring it to a constant frame
rate, resize to the short side, re-encode as CFR H.264 (`video_io.VideoWriter`). `goca_fast.prepare.build` runs it
over a dataset.

Variable frame rates and shuffled timestamps (packed B-frames, broken muxers) are repaired by sorting frames in a
small window and resampling to the nominal rate; an input that cannot be repaired (gaps longer than `max_gap`, no
usable rate, too short) raises `ExcludedInput` with the reason the report shows.
"""
from __future__ import annotations

import heapq
import os
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import av
import numpy as np
from av.video.reformatter import Interpolation

from goca_fast.video.io import PREPARED_ENTROPY, VideoWriter, _configure_decoder, check_entropy

_VERSION = 1

# Area-averaging downscale (no aliasing) with accurate chroma, in one swscale pass per frame.
_RESIZE = Interpolation.AREA | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND


@dataclass(frozen=True)
class PrepareOptions:
    """Encoding and admission parameters (`encoding()` fixes the output; see prepare.json)."""
    short_side: int = 256          # official README: flow (and so RGB) at 256
    gop: int = 16
    crf: float = 18
    entropy: str = PREPARED_ENTROPY  # H.264 entropy coder (goca_fast.video.io.ENTROPY_CODERS)
    fps: Optional[float] = None    # None: keep each video's native rate (the official loader does)
    min_frames: int = 31           # official: > 30 frames; (16-1)*2+1 = 31 spans the longest default clip
    max_gap: float = 1.0           # seconds without frames that resampling to CFR may not paper over
    upscale: bool = True           # resize sources whose short side is below short_side, too

    def encoding(self) -> dict:
        return {"version": _VERSION, "short_side": self.short_side, "gop": self.gop, "crf": self.crf,
                "entropy": self.entropy, "fps": self.fps, "upscale": self.upscale}

    def check(self) -> None:
        if self.short_side < 16 or self.short_side % 2:
            raise ValueError(f"short side must be an even number >= 16, got {self.short_side}")
        if self.gop < 1:
            raise ValueError(f"gop must be >= 1, got {self.gop}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {self.crf}")
        check_entropy(self.entropy)
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
                        writer = VideoWriter(out, w, h, fps, gop=opts.gop, crf=opts.crf, entropy=opts.entropy)
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
