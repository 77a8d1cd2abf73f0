"""Video files through PyAV (no ffmpeg binary): write CFR H.264, probe, read frames by index.

Frame index i means "the i-th frame in presentation order", the same thing a plain sequential decode would count.
Files on a constant timestamp grid (everything goca-prepare and goca-flow write) are read by seeking to the
keyframe before the wanted frames and naming frames by timestamp, so a clip costs the same wherever it starts.
Other files are read through the demuxed packet table (presentation timestamps sorted -> rank = index), never
through container metadata, which can lie about frame counts and timing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Iterator, Optional, Sequence

import av
import cv2
import numpy as np
from av.video.reformatter import ColorRange, Colorspace, Interpolation

from goca_fast.runtime.atomic import temp_beside

# swscale's default YUV->RGB path (no accurate rounding, chroma not interpolated) costs ~2.9
# grey levels of mean error on a colourful 4:2:0 round trip; these flags plus our own
# RGB->YUV (below) bring it to ~0.5 for < 1 ms per 256x320 frame.
_TO_RGB = Interpolation.BICUBIC | Interpolation.FULL_CHR_H_INT | Interpolation.ACCURATE_RND

# BT.601 limited range, what swscale assumes for untagged SD video (both directions).
_RGB2YUV = np.array([[65.481, 128.553, 24.966],
                     [-37.797, -74.203, 112.0],
                     [112.0, -93.786, -18.214]], dtype=np.float32) / 255.0


def rgb_to_yuv420(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """T×H×W×3 uint8 RGB -> (Y T×H×W, U, V T×H/2×W/2) uint8, BT.601 limited, centre-sited chroma.

    Vectorised over the whole clip: ~10x faster than per-frame accurate swscale, and matches
    its luma to within rounding.
    """
    t, h, w, _ = frames.shape
    yuv = frames.astype(np.float32) @ _RGB2YUV.T
    yuv += np.array([16.0, 128.0, 128.0], dtype=np.float32)
    y = np.clip(np.rint(yuv[..., 0]), 0, 255).astype(np.uint8)
    c = yuv[..., 1:].reshape(t, h // 2, 2, w // 2, 2, 2).mean(axis=(2, 4))  # 2×2 box = centre siting
    c = np.clip(np.rint(c), 0, 255).astype(np.uint8)
    return y, c[..., 0], c[..., 1]


def _planes_frame(planes: Sequence[np.ndarray], width: int, height: int) -> "av.VideoFrame":
    """A yuv420p VideoFrame from three uint8 planes (rows padded to the frame's line size)."""
    vf = av.VideoFrame(width, height, "yuv420p")
    for dst, src in zip(vf.planes, planes):
        rows, cols = src.shape
        if dst.line_size != cols:
            buf = np.zeros((rows, dst.line_size), dtype=np.uint8)
            buf[:, :cols] = src
            src = buf
        dst.update(np.ascontiguousarray(src))
    return vf


_decoder_threads = 0  # 0: FFmpeg's choice (one per core), frame + slice threading


def set_decoder_threads(threads: int) -> None:
    """Decoder threads per open video in this process (0 = FFmpeg's automatic choice).

    Loader workers set 1: they already decode several videos in parallel, and extra decoder
    threads on few cores fight the workers (and torch's OpenMP pool) for the CPU.
    """
    global _decoder_threads
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    _decoder_threads = int(threads)


def _configure_decoder(ctx) -> None:
    if _decoder_threads == 1:
        ctx.thread_type = "NONE"
        ctx.thread_count = 1
    else:
        ctx.thread_type = "AUTO"
        ctx.thread_count = _decoder_threads


class VideoReadError(RuntimeError):
    """A video cannot be used: missing, unreadable, truncated, or index out of range."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int
    codec: str


def _fps_fraction(fps: float) -> Fraction:
    if not fps or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return Fraction(fps).limit_denominator(1001)


# H.264 entropy coders. CAVLC decodes with about a third less CPU than CABAC at the same quality (measured on the
# loader benchmark's 340x256 videos: 0.47 -> 0.31 ms per frame with the RGB conversion, PSNR equal) for files about
# 14% (RGB) and 55% (flow) larger: goca-prepare and goca-flow write it, since prepared videos are decoded on every
# epoch. The writers' own default stays CABAC, so the procedural datasets behind measured results keep their bytes.
ENTROPY_CODERS = ("cavlc", "cabac")
PREPARED_ENTROPY = "cavlc"
WRITER_ENTROPY = "cabac"


def check_entropy(entropy: str) -> None:
    """A one-line ValueError unless `entropy` is one of `ENTROPY_CODERS`."""
    if entropy not in ENTROPY_CODERS:
        raise ValueError(f"entropy must be one of {', '.join(ENTROPY_CODERS)}, got {entropy!r}")


def _x264_params(gop: int, entropy: str) -> str:
    # Fixed GOP, no scene-cut keyframes, no B-frames: every keyframe is a closed-GOP entry
    # point at a predictable index and decode order equals presentation order.
    # chromaloc=1 (centre) tags the chroma siting swscale used when converting from RGB;
    # untagged H.264 is read back as left-sited, a 1/4-pixel chroma shift (~1 grey level).
    # threads=1: x264's frame threads made the bytes depend on scheduling (under CPU load about
    # 1 encode in 40 differed). One thread differs less often but is not bit-exact either (1 in 80
    # on a quiet machine, cause not found). Speed is kept by encoding videos in parallel processes
    # (the --workers of goca-prepare and goca-flow).
    check_entropy(entropy)
    cabac = int(entropy == "cabac")
    return f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:chromaloc=1:threads=1:cabac={cabac}"


def _temp_output(path: str | os.PathLike) -> tuple[str, str]:
    """(final path, temp file beside it) for an atomic video write (`goca_fast.runtime.atomic`)."""
    return os.fspath(path), temp_beside(path, os.path.splitext(os.fspath(path))[1] or ".mp4")


def _check_h264_size(width: int, height: int, gop: int) -> None:
    if width % 2 or height % 2:
        raise ValueError(f"H.264 yuv420p needs even width and height, got {width}x{height}")
    if gop < 1:
        raise ValueError(f"gop must be >= 1, got {gop}")


def _add_h264_stream(container, width: int, height: int, fps: float, gop: int, crf: float, entropy: str,
                     full_range: bool = False):
    """The project's H.264 stream (CFR yuv420p, fixed GOP, `_x264_params`) on an output container: the one
    encoding setup every writer shares."""
    stream = container.add_stream("libx264", rate=_fps_fraction(fps))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if full_range:
        stream.codec_context.color_range = av.video.reformatter.ColorRange.JPEG
    stream.codec_context.gop_size = gop
    stream.options = {"crf": str(crf), "preset": "medium", "x264-params": _x264_params(gop, entropy)}
    return stream


def _encode(path: str | os.PathLike, width: int, height: int, fps: float, gop: int, crf: float,
            frames: Callable[[], Iterable["av.VideoFrame"]], full_range: bool, entropy: str = WRITER_ENTROPY) -> None:
    """Shared H.264 writer: temp file in the target dir, then os.replace (atomic)."""
    _check_h264_size(width, height, gop)
    final, tmp = _temp_output(path)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = _add_h264_stream(container, width, height, fps, gop, crf, entropy, full_range)
            for frame in frames():
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class VideoWriter:
    """Streaming CFR H.264 writer, the same encoding as `write_video`, fed chunk by chunk.

    Memory stays bounded by the chunk the caller passes, whatever the video length. The file
    appears under its final name only on `close()`; `abort()` (or an exception inside a `with`
    block) deletes the temp file.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float, gop: int = 16,
                 crf: float = 18, entropy: str = WRITER_ENTROPY):
        _check_h264_size(width, height, gop)
        self.width, self.height, self.frames = width, height, 0
        self._final, self._tmp = _temp_output(path)
        try:
            self._container = av.open(self._tmp, mode="w", format="mp4")
            self._stream = _add_h264_stream(self._container, width, height, fps, gop, crf, entropy)
        except BaseException:
            self.abort()
            raise

    def write(self, frames: np.ndarray) -> None:
        """Append T×H×W×3 uint8 RGB frames (any T >= 0)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames must be T×{self.height}×{self.width}×3 uint8, got {frames.dtype} {frames.shape}")
        for start in range(0, len(frames), 64):  # the float YUV conversion of 64 frames at a time
            y, u, v = rgb_to_yuv420(frames[start:start + 64])
            for k in range(len(y)):
                vf = _planes_frame((y[k], u[k], v[k]), self.width, self.height)
                vf.pts = self.frames
                self.frames += 1
                for packet in self._stream.encode(vf):
                    self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and rename the finished file into place."""
        if self._container is None:
            return
        try:
            if self.frames == 0:
                raise ValueError("no frames written")
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None
            os.replace(self._tmp, self._final)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop the partial output (nothing appears under the final name)."""
        c, self._container = getattr(self, "_container", None), None
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - an unfinished mp4 may fail to finalise; it is deleted anyway
                pass
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, gop: int = 16,
                crf: float = 18, entropy: str = WRITER_ENTROPY) -> None:
    """Write T×H×W×3 uint8 RGB as CFR H.264 yuv420p mp4 with a fixed GOP (atomic); `entropy`: see
    `ENTROPY_CODERS`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty T×H×W×3 uint8 array, got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    with VideoWriter(path, w, h, fps, gop=gop, crf=crf, entropy=entropy) as writer:
        writer.write(frames)


# --------------------------------------------------------------------------- reading


def open_container(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a video for reading; a missing, empty or unopenable file is a one-line VideoReadError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: empty file")
    try:
        container = av.open(path, mode="r")
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types
        raise VideoReadError(f"{path}: cannot open ({type(e).__name__}: {e})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: no video stream")
    return container


# Packets demuxed beyond the last wanted frame: more than any H.264/HEVC reorder depth (DPB <= 16),
# so the presentation ranks of all frames up to the wanted one are final.
_REORDER_MARGIN = 32


def _packet_table(container, path: str, need: Optional[int] = None) -> tuple[list, np.ndarray]:
    """Video packets in decode order, plus each packet's presentation rank (frame index).

    need=None demuxes everything; need=k stops once frames 0..k-1 are surely ranked, so a
    clip near the start of a long video does not read the whole file.
    """
    stream = container.streams.video[0]
    packets = []
    stop = None if need is None else need + _REORDER_MARGIN
    try:
        for p in container.demux(stream):
            if p.size == 0:  # flush/empty packets carry no frame
                continue
            packets.append(p)
            if stop is not None and len(packets) >= stop:
                break
    except Exception as e:  # noqa: BLE001
        raise VideoReadError(f"{path}: demux failed ({type(e).__name__}: {e})") from None
    if not packets:
        raise VideoReadError(f"{path}: no video packets")
    if any(p.pts is None for p in packets):
        rank = np.full(len(packets), -1, dtype=np.int64)  # unknown: fall back to sequential decode
    else:
        pts = np.array([p.pts for p in packets], dtype=np.int64)
        order = np.argsort(pts, kind="stable")
        rank = np.empty(len(packets), dtype=np.int64)
        rank[order] = np.arange(len(packets))
    return packets, rank


def _fps_of(stream) -> float:
    rate = stream.average_rate or stream.base_rate or stream.guessed_rate
    return float(rate) if rate else 0.0


def probe_video(path: str | os.PathLike, decode: bool = False) -> VideoInfo:
    """Frame count from the packet table (decode=False, fast) or a full decode (decode=True).

    Container metadata (nb_frames, duration) is not trusted. decode=True additionally
    proves every frame decodes, which is what dataset validation wants.
    """
    path = os.fspath(path)
    container = open_container(path)
    try:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        codec = stream.codec_context.name
        fps = _fps_of(stream)
        if decode:
            _configure_decoder(stream.codec_context)
            n = 0
            try:
                for _ in container.decode(stream):
                    n += 1
            except Exception as e:  # noqa: BLE001
                raise VideoReadError(f"{path}: decode failed after {n} frames ({type(e).__name__}: {e})") from None
        else:
            packets, _ = _packet_table(container, path)
            n = len(packets)
    finally:
        container.close()
    if n == 0:
        raise VideoReadError(f"{path}: no decodable frames")
    return VideoInfo(frames=n, fps=fps, width=width, height=height, codec=codec)


# Until the reader has seen the GOP, a wanted frame further than this past the last decoded one is reached by
# seeking instead of decoding through the gap.
_SEEK_GAP = 32


def _frame_grid(stream) -> Optional[tuple[int, int]]:
    """(timestamp of frame 0, timestamp step per frame) when frame i is stamped start + i × step: constant frame
    rate and no reordering, as goca-prepare and goca-flow write. Then a seek can land on a frame index without
    the packet table. None for anything else."""
    rate, tb, start = stream.average_rate, stream.time_base, stream.start_time
    if not rate or not tb or start is None or stream.codec_context.has_b_frames:
        return None
    step = 1 / (Fraction(rate) * Fraction(tb))
    return (int(start), int(step)) if step.denominator == 1 and step > 0 else None


def _seek_pays(position: int, target: int, gop: Optional[int]) -> bool:
    """Whether seeking to `target` decodes fewer frames than going on from `position`: a keyframe lies between
    (fixed GOPs from frame 0, as the project writes them), or, before the GOP is known, the gap is long."""
    if gop is None:
        return target - position > _SEEK_GAP
    return target // gop * gop > position + 1


def _decoded(container, stream) -> Iterator["av.VideoFrame"]:
    for packet in container.demux(stream):
        yield from packet.decode()


def _decode_seeking(container, stream, grid: tuple[int, int], wanted: Sequence[int],
                    convert: Callable[["av.VideoFrame"], np.ndarray]) -> Optional[dict[int, np.ndarray]]:
    """The sorted distinct `wanted` frames, seeking to the keyframe before a wanted frame whenever that skips
    frames, so the cost of a clip does not grow with where it starts and clips far apart cost only themselves.
    Frames are identified by their timestamp on the frame grid; any surprise (a timestamp off the grid, a seek
    that lands past the frame, a frame missing, the stream ending early) returns None and the caller decodes
    through the packet table instead."""
    start, step = grid
    got: dict[int, np.ndarray] = {}
    pending = list(wanted)
    frames, position, last_key, gop = None, -1, None, None
    while pending:
        if frames is None or _seek_pays(position, pending[0], gop):
            container.seek(start + pending[0] * step, stream=stream, backward=True, any_frame=False)
            frames, position, last_key = _decoded(container, stream), None, None
        for frame in frames:
            if frame.pts is None:
                return None
            index, off = divmod(frame.pts - start, step)
            if off or index > pending[0] or (position is not None and index != position + 1):
                return None
            position = index
            if frame.key_frame:
                gop = gop if last_key is None else index - last_key
                last_key = index
            if index == pending[0]:
                got[index] = convert(frame)
                pending.pop(0)
                if not pending or _seek_pays(position, pending[0], gop):
                    break
        else:
            return None  # the stream ended first
    return got


def _decode_table(container, stream, path: str, idx: np.ndarray,
                  convert: Callable[["av.VideoFrame"], np.ndarray]) -> dict[int, np.ndarray]:
    """Decode once, from the last safe keyframe before min(idx) up to max(idx), frames identified by the
    presentation rank of their timestamp in the demuxed packet table: exact for any stream. Starting at a
    keyframe is safe when decode order equals presentation order; if the stream reorders frames (B-frames,
    possibly open GOP) it starts one keyframe earlier so leading pictures are intact; without timestamps it
    decodes from the start and counts frames."""
    lo, hi = int(idx.min()), int(idx.max())
    packets, rank = _packet_table(container, path, need=hi + 1)
    n = len(packets)
    if lo < 0 or hi >= n:
        raise VideoReadError(f"{path}: frame index out of range [{lo}, {hi}] for {n} frames")
    wanted = set(int(i) for i in idx)
    got: dict[int, np.ndarray] = {}
    has_pts = bool(rank[0] >= 0)

    first = 0
    if has_pts:
        keys = [k for k, p in enumerate(packets) if p.is_keyframe and rank[k] <= lo]
        reorders = bool(np.any(np.diff(rank) != 1))
        if reorders:
            keys = keys[:-1]  # one GOP of margin for open-GOP leading pictures
        first = keys[-1] if keys else 0
    pts_to_rank = {packets[k].pts: int(rank[k]) for k in range(n)} if has_pts else {}

    ctx = stream.codec_context
    count = 0

    def take(frames) -> bool:
        nonlocal count
        for fr in frames:
            r = pts_to_rank.get(fr.pts, -1) if has_pts else count
            count += 1
            if r in wanted and r not in got:
                got[r] = convert(fr)
        return len(got) == len(wanted)

    if not any(take(ctx.decode(p)) for p in packets[first:]):
        take(ctx.decode(None))
    missing = wanted - set(got)
    if missing:
        raise VideoReadError(f"{path}: could not decode frames {sorted(missing)[:5]} (truncated or corrupt)")
    return got


def _decode_at(path: str | os.PathLike, indices: Sequence[int],
               convert: Callable[["av.VideoFrame"], np.ndarray]) -> list[np.ndarray]:
    """convert(frame) for each requested frame index (unsorted and repeated indices allowed; each distinct frame
    is decoded and converted once). Streams on a constant frame grid (everything the project writes) are read by
    seeking per run of nearby frames; others, and any grid stream that surprises the seeking reader, through the
    packet table."""
    path = os.fspath(path)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        return []
    got = None
    for seeking in (True, False):
        container = open_container(path)
        try:
            stream = container.streams.video[0]
            _configure_decoder(stream.codec_context)
            grid = _frame_grid(stream)
            if seeking and (grid is None or idx.min() < 0):
                continue
            if seeking:
                got = _decode_seeking(container, stream, grid, sorted(set(idx.tolist())), convert)
            else:  # a fresh container: the table reader demuxes from the first packet
                got = _decode_table(container, stream, path, idx, convert)
        except VideoReadError:
            raise
        except Exception as e:  # noqa: BLE001 - PyAV/FFmpeg raise many error types
            raise VideoReadError(f"{path}: decode failed ({type(e).__name__}: {e})") from None
        finally:
            container.close()
        if got is not None:
            break
    return [got[int(i)] for i in idx]


# BT.601 limited range YUV -> RGB (the inverse of _RGB2YUV and its offsets) as a 3×4 affine map [M | t] (what
# cv2.transform takes; the same matrix as DALI's color_space_conversion YCbCr -> RGB)
YUV_TO_RGB = np.concatenate([np.linalg.inv(_RGB2YUV), -np.linalg.inv(_RGB2YUV) @ np.array([[16.0], [128.0], [128.0]])],
                          axis=1).astype(np.float32)
_BT601_OR_UNTAGGED = {2, 5, 6}  # AVCOL_SPC_UNSPECIFIED, BT470BG, SMPTE170M: what swscale treats as BT.601
_LIMITED_OR_UNTAGGED = {0, 1}   # AVCOL_RANGE_UNSPECIFIED, MPEG


def _is_bt601_limited_420(frame: "av.VideoFrame") -> bool:
    """8-bit 4:2:0 in BT.601 limited range (or untagged): what goca-prepare writes and the readers here convert
    themselves."""
    return (frame.format.name == "yuv420p" and frame.colorspace in _BT601_OR_UNTAGGED
            and frame.color_range in _LIMITED_OR_UNTAGGED)


def _plane(plane, rows: int, cols: int) -> np.ndarray:
    return np.frombuffer(plane, dtype=np.uint8).reshape(-1, plane.line_size)[:rows, :cols]


def to_rgb(frame: "av.VideoFrame") -> np.ndarray:
    """Decoded frame -> H×W×3 uint8 RGB.

    8-bit 4:2:0 BT.601 limited range, what goca-prepare writes, is converted here: chroma upsampled bicubically
    (centre-sited, as the writer subsamples), then one affine map. It is 2-3x faster than swscale's accurate
    path, which made RGB conversion most of a training clip's CPU cost, and at least as close to the source
    (benchmarks/notes/decoding.md). Any other format goes through swscale with accurate rounding and interpolated
    chroma."""
    if not _is_bt601_limited_420(frame):
        return frame.to_ndarray(format="rgb24", interpolation=_TO_RGB)
    h, w = frame.height, frame.width
    y = _plane(frame.planes[0], h, w)
    uv = cv2.merge([_plane(frame.planes[1], (h + 1) // 2, (w + 1) // 2),
                    _plane(frame.planes[2], (h + 1) // 2, (w + 1) // 2)])
    uv = cv2.resize(uv, (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.transform(cv2.merge([y, uv]), YUV_TO_RGB)


def read_frames(path: str | os.PathLike, indices: Sequence[int]) -> np.ndarray:
    """RGB frames at arbitrary indices -> len(indices)×H×W×3 uint8 (decodes each frame once)."""
    frames = _decode_at(path, indices, to_rgb)
    if not frames:
        raise VideoReadError(f"{os.fspath(path)}: no frame indices requested")
    return np.stack(frames)


def yuv420_planes(frame: "av.VideoFrame") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoded frame -> copies of its planes Y H×W, Cb and Cr ceil(H/2)×ceil(W/2) uint8, BT.601 limited range 4:2:0
    (what `to_rgb` converts). Copies, not views: a view keeps its frame alive, and with a clip's frames held the
    decoder cannot reuse its frame buffers and allocates fresh ones (measured: the copies make a training sample's
    decode 6 ms cheaper). A frame in another format, matrix or range is first converted to that by swscale."""
    if not _is_bt601_limited_420(frame):
        frame = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU601, dst_color_range=ColorRange.MPEG,
                               interpolation=_TO_RGB)
    h, w = frame.height, frame.width
    ch, cw = (h + 1) // 2, (w + 1) // 2
    return (_plane(frame.planes[0], h, w).copy(), _plane(frame.planes[1], ch, cw).copy(),
            _plane(frame.planes[2], ch, cw).copy())


def read_yuv420(path: str | os.PathLike, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Frames at arbitrary indices as their unconverted 4:2:0 planes (`yuv420_planes`), one (Y, Cb, Cr) per index:
    for a consumer that crops and resizes, which then converts only the pixels it keeps."""
    planes = _decode_at(path, indices, yuv420_planes)
    if not planes:
        raise VideoReadError(f"{os.fspath(path)}: no frame indices requested")
    return planes


def read_all_frames(path: str | os.PathLike) -> np.ndarray:
    """Every frame by plain sequential decode (reference path for tests and small tools)."""
    container = open_container(path)
    try:
        stream = container.streams.video[0]
        try:
            frames = [to_rgb(f) for f in container.decode(stream)]
        except Exception as e:  # noqa: BLE001
            raise VideoReadError(f"{os.fspath(path)}: decode failed ({type(e).__name__}: {e})") from None
    finally:
        container.close()
    if not frames:
        raise VideoReadError(f"{os.fspath(path)}: no decodable frames")
    return np.stack(frames)
