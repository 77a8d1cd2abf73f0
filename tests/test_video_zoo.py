"""goca-prepare on a zoo of real-world containers and codecs, all made here with PyAV's encoders.

Every frame carries its own index as a code (a bright marker cell at the top-left of the display
picture and 7 bit cells), so each kept output is checked frame by frame against the sequence of
source frames it must show, computed independently from the known timestamps; plus frame count,
rate, size, and pixels against a reference decode of the source (PyAV + OpenCV resize).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import av
import cv2
import numpy as np
import pytest

from goca_fast.prepare.datasets import scan_dataset
from goca_fast.prepare.build import prepare_dataset
from goca_fast.video.transcode import PrepareOptions
from goca_fast.video.io import read_all_frames
from helpers import encode_rgb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTS = PrepareOptions(short_side=48, min_frames=8)
HAVE = set(av.codecs_available)


# ----------------------------------------------------------------------------- frame codes


def code_frame(i: int, h: int, w: int) -> np.ndarray:
    """h×w RGB showing index i: 8 cells (2×4 landscape, 4×2 portrait), cell 0 bright, cells 1-7 = bits of i."""
    rows, cols = (4, 2) if h > w else (2, 4)
    img = np.empty((h, w, 3), np.uint8)
    for c in range(8):
        r, q = divmod(c, cols)
        on = c == 0 or (i >> (c - 1)) & 1
        img[r * h // rows:(r + 1) * h // rows, q * w // cols:(q + 1) * w // cols] = (205, 200, 195) if on else (50, 55, 60)
    return img


def read_code(img: np.ndarray) -> int:
    """The index a code_frame shows; -1 if the marker is not at the top-left (wrong orientation)."""
    h, w = img.shape[:2]
    rows, cols = (4, 2) if h > w else (2, 4)
    grey = img.astype(np.float32).mean(axis=2)
    bits = []
    for c in range(8):
        r, q = divmod(c, cols)
        y0, y1, x0, x1 = r * h / rows, (r + 1) * h / rows, q * w / cols, (q + 1) * w / cols
        dy, dx = (y1 - y0) * 0.25, (x1 - x0) * 0.25
        bits.append(grey[int(y0 + dy):int(y1 - dy), int(x0 + dx):int(x1 - dx)].mean() > 127)
    return sum(1 << (c - 1) for c in range(1, 8) if bits[c]) if bits[0] else -1


def nearest(times: np.ndarray, fps: float, n: int) -> list[int]:
    """For output slot k at times[0] + k/fps, the input nearest in time (ties: the earlier); plain argmin."""
    out = []
    for k in range(n):
        d = np.abs(times - (times[0] + k / fps))
        out.append(int(np.flatnonzero(d <= d.min() + 1e-9)[0]))
    return out


# ----------------------------------------------------------------------------- writers


def _encode(path, codec, frames, fps, pix, fmt=None, pts=None, time_base=None, options=None, bframes=None,
            sar=None, bit_rate=2_000_000):
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix
        s.bit_rate = bit_rate
        if bframes is not None:
            s.codec_context.max_b_frames = bframes
        if sar is not None:
            s.codec_context.sample_aspect_ratio = sar
        if time_base is not None:
            s.codec_context.time_base = time_base
        if options:
            s.options = options
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i if pts is None else int(pts[i])
            if time_base is not None:
                vf.time_base = time_base
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def _codes(n, h, w, start=0):
    return [code_frame(start + i, h, w) for i in range(n)]


def _nvop(resolution: int) -> bytes:
    """An MPEG-4 part 2 not-coded P-VOP: the placeholder chunk XviD/DivX write after a packed B-frame."""
    bits = "01" + "0" + "1" + "0" * max(1, (resolution - 1).bit_length()) + "1" + "0"  # type P, time, vop_coded=0
    bits += "0"
    bits += "1" * (-len(bits) % 8)
    return b"\x00\x00\x01\xb6" + int(bits, 2).to_bytes(len(bits) // 8, "big")


def write_packed_bframes_avi(path, frames, fps):
    """MPEG-4 part 2 in AVI with XviD-style packed B-frames: [P+B] chunks, each followed by an N-VOP.

    FFmpeg's mpeg4 encoder writes B-frames unpacked; repacking its packets is what XviD/DivX did
    (the 'p' in the DivX user data tells decoders). Decoding stamps these frames 1,3,2,5,4,...
    """
    h, w = frames[0].shape[:2]
    enc = av.CodecContext.create("mpeg4", "w")
    enc.width, enc.height, enc.pix_fmt = w, h, "yuv420p"
    enc.time_base, enc.framerate = 1 / fps, fps
    enc.max_b_frames, enc.gop_size, enc.bit_rate = 1, 300, 2_000_000
    pk = []
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format="rgb24")
        vf.pts = i
        pk += [bytes(p) for p in enc.encode(vf)]
    pk += [bytes(p) for p in enc.encode(None)]
    chunks: list[bytes] = []
    for d in pk:
        if d[d.find(b"\x00\x00\x01\xb6") + 4] >> 6 == 2:  # a B-VOP: packed behind the P-VOP it follows
            chunks[-1] += d
            chunks.append(_nvop(enc.time_base.denominator))
        else:
            chunks.append(d)
    assert b"\x00\x00\x01\xb2" in chunks[0]
    chunks[0] = chunks[0].replace(b"\x00\x00\x01\xb2", b"\x00\x00\x01\xb2DivX503b1393p\x00\x00\x01\xb2", 1)
    with av.open(str(path), "w", format="avi") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for k, d in enumerate(chunks):
            p = av.Packet(d)
            p.stream, p.pts, p.dts, p.time_base = s, k, k, 1 / fps
            p.is_keyframe = k == 0
            c.mux(p)


def patch_rotation(path, degrees_cw: int = 90) -> None:
    """Set the MP4 track matrix (tkhd) to a phone's 'rotate 90' display matrix."""
    data = bytearray(open(path, "rb").read())
    ident = struct.pack(">9i", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = data.find(ident, data.find(b"tkhd"))
    assert at > 0 and degrees_cw == 90
    data[at:at + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    open(path, "wb").write(data)


def _audio(stream_codec="aac", seconds=1.0, rate=48000):
    n = int(seconds * rate) // 1024
    return [av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono") for _ in range(n)]


def write_with_audio(path, frames, fps, audio_first=True, video=True):
    with av.open(str(path), "w") as c:
        streams = []
        a = c.add_stream("aac", rate=48000) if audio_first or not video else None
        v = None
        if video:
            v = c.add_stream("libx264", rate=fps)
            v.width, v.height, v.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        if a is None:
            a = c.add_stream("aac", rate=48000)
        a.layout = "mono"
        streams = [a] + ([v] if v else [])
        for k, af in enumerate(_audio()):
            af.sample_rate, af.pts = 48000, k * 1024
            for p in a.encode(af):
                c.mux(p)
        if v is not None:
            for i, f in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(f, format="rgb24")
                vf.pts = i
                for p in v.encode(vf):
                    c.mux(p)
        for s in streams:
            for p in s.encode(None):
                c.mux(p)


def write_two_video_streams(path, a_frames, b_frames, fps):
    with av.open(str(path), "w") as c:
        ss = []
        for fr in (a_frames, b_frames):
            s = c.add_stream("libx264", rate=fps)
            s.width, s.height, s.pix_fmt = fr[0].shape[1], fr[0].shape[0], "yuv420p"
            ss.append((s, fr))
        for s, fr in ss:
            encode_rgb(c, s, fr)


# ----------------------------------------------------------------------------- the zoo


@dataclass
class Expect:
    """What goca-prepare must make of one zoo file: kept (frames, fps, size, codes) or a reason prefix."""
    codes: Optional[list[int]] = None     # the index each output frame shows (kept files)
    src: Optional[list[int]] = None       # the decoded source frame (display order) each output frame is
    fps: Optional[float] = None
    size: Optional[tuple[int, int]] = None
    reason: Optional[str] = None
    rotate_cw: int = 0                    # for the reference decode
    skip: Optional[str] = None
    notes: dict = field(default_factory=dict)


def build_zoo(d) -> dict[str, Expect]:
    z: dict[str, Expect] = {}
    cls = d / "zoo"
    cls.mkdir(parents=True)
    n = 30

    # 1. UCF101-era XviD: MPEG-4 part 2, packed B-frames, AVI, 23.976 fps
    fps = Fraction(24000, 1001)
    write_packed_bframes_avi(cls / "xvid_packed_bframes.avi", _codes(n, 72, 96), fps)
    z["xvid_packed_bframes"] = Expect(codes=list(range(n)), src=list(range(n)), fps=float(fps), size=(64, 48))

    # 2. Cinepak AVI with dropped frames: 20 coded pictures over 60 slots at 15 fps (gaps up to 7 slots)
    slots = np.array([0, 1, 2, 5, 9, 10, 14, 20, 21, 22, 29, 30, 31, 36, 40, 44, 45, 52, 53, 59])
    _encode(cls / "cinepak_dropped.avi", "cinepak", [code_frame(int(s), 64, 96) for s in slots], 15, "rgb24",
            pts=slots)
    src = nearest(slots / 15.0, 15.0, 60)
    z["cinepak_dropped"] = Expect(codes=[int(slots[i]) for i in src], src=src, fps=15.0, size=(72, 48))

    # 3. MJPEG AVI (yuvj420p, full range)
    _encode(cls / "mjpeg.avi", "mjpeg", _codes(24, 64, 96), 25, "yuvj420p")
    z["mjpeg"] = Expect(codes=list(range(24)), src=list(range(24)), fps=25.0, size=(72, 48))

    # 4-5. Matroska VP8, WebM VP9 (Kinetics has WebM)
    rt = {"deadline": "realtime", "cpu-used": "8"}
    _encode(cls / "vp8.mkv", "libvpx", _codes(24, 64, 96), 30, "yuv420p", options=rt)
    z["vp8"] = Expect(codes=list(range(24)), src=list(range(24)), fps=30.0, size=(72, 48))
    _encode(cls / "vp9.webm", "libvpx-vp9", _codes(24, 64, 96), 25, "yuv420p", options=rt)
    z["vp9"] = Expect(codes=list(range(24)), src=list(range(24)), fps=25.0, size=(72, 48))

    # 6. H.264 with B-frames starting at t = 1 s (MP4 edit list)
    _encode(cls / "h264_bframes_start1s.mp4", "libx264", _codes(40, 64, 96), 25, "yuv420p",
            pts=np.arange(40) + 25, options={"x264-params": "bframes=3:keyint=12"})
    z["h264_bframes_start1s"] = Expect(codes=list(range(40)), src=list(range(40)), fps=25.0, size=(72, 48))

    # 7. HEVC MP4
    if "libx265" in HAVE:
        _encode(cls / "hevc.mp4", "libx265", _codes(24, 64, 96), 25, "yuv420p",
                options={"x265-params": "log-level=error:bframes=2"})
        z["hevc"] = Expect(codes=list(range(24)), src=list(range(24)), fps=25.0, size=(72, 48))
    else:
        z["hevc"] = Expect(skip="this PyAV build has no libx265 encoder")

    # 8. A portrait phone clip: coded landscape 96x64, track matrix 'rotate 90' -> displayed 64x96
    portrait = _codes(24, 96, 64)
    _encode(cls / "phone_rotated.mp4", "libx264", [np.ascontiguousarray(np.rot90(f, 1)) for f in portrait], 30,
            "yuv420p")
    patch_rotation(cls / "phone_rotated.mp4")
    z["phone_rotated"] = Expect(codes=list(range(24)), src=list(range(24)), fps=30.0, size=(48, 72), rotate_cw=90)

    # 9. Odd size 321x241 in 4:4:4
    _encode(cls / "odd_321x241_yuv444.mkv", "libx264", _codes(24, 241, 321), 25, "yuv444p")
    z["odd_321x241_yuv444"] = Expect(codes=list(range(24)), src=list(range(24)), fps=25.0, size=(64, 48))

    # 10. Non-square pixels: 352x288 at SAR 12:11 displays as 384x288 (4:3)
    _encode(cls / "mpeg4_sar12_11.avi", "mpeg4", _codes(24, 288, 352), 25, "yuv420p", sar=Fraction(12, 11))
    z["mpeg4_sar12_11"] = Expect(codes=list(range(24)), src=list(range(24)), fps=25.0, size=(64, 48))

    # 11. 10-bit
    _encode(cls / "h264_10bit.mp4", "libx264", _codes(24, 64, 96), 25, "yuv420p10le")
    z["h264_10bit"] = Expect(codes=list(range(24)), src=list(range(24)), fps=25.0, size=(72, 48))

    # 12. A phone-style VFR MP4: 30 fps nominal, 1/600 time base, timestamps jittered by up to 0.2 frame,
    #     five frames dropped; the first and last frame on the grid (so the clip's rate is exactly 30)
    rng = np.random.default_rng(7)
    grid = np.array([g for g in range(60) if g not in (11, 12, 30, 41, 42)])
    ticks = np.round((grid + rng.uniform(-0.2, 0.2, len(grid))) * 20).astype(int)
    ticks[0], ticks[-1] = 0, grid[-1] * 20
    _encode(cls / "phone_vfr.mp4", "libx264", [code_frame(int(g), 64, 96) for g in grid], 30, "yuv420p",
            pts=ticks, time_base=Fraction(1, 600))
    src = nearest(ticks / 600.0, 30.0, 60)
    z["phone_vfr"] = Expect(codes=[int(grid[i]) for i in src], src=src, fps=30.0, size=(72, 48))

    # 13. 4K downscaled
    _encode(cls / "uhd_3840x2160.mp4", "libx264", _codes(10, 2160, 3840), 25, "yuv420p",
            options={"preset": "ultrafast"})
    z["uhd_3840x2160"] = Expect(codes=list(range(10)), src=list(range(10)), fps=25.0, size=(86, 48))

    # 14. Shorter than --min-frames
    _encode(cls / "short.mp4", "libx264", _codes(5, 64, 96), 25, "yuv420p")
    z["short"] = Expect(reason="too short: 5 frames < 8")

    # 15. Audio only
    write_with_audio(cls / "audio_only.mp4", None, 25, video=False)
    z["audio_only"] = Expect(reason="undecodable: no video stream (streams: audio)")

    # 16. Audio stream before the video stream
    write_with_audio(cls / "audio_first.mkv", _codes(24, 64, 96), 25, audio_first=True)
    z["audio_first"] = Expect(codes=list(range(24)), src=list(range(24)), fps=25.0, size=(72, 48))

    # 17. Two video streams: the first is the one FFmpeg plays (av_find_best_stream, equal dispositions)
    write_two_video_streams(cls / "two_video_streams.mkv", _codes(24, 64, 96), _codes(12, 48, 48, start=100), 25)
    z["two_video_streams"] = Expect(codes=list(range(24)), src=list(range(24)), fps=25.0, size=(72, 48))

    # 18. Truncated mid-GOP (MKV, GOP 10, cut at 55 % of the bytes)
    _encode(cls / "truncated_midgop.mkv", "libx264", _codes(40, 64, 96), 25, "yuv420p",
            options={"x264-params": "keyint=10:min-keyint=10"})
    data = (cls / "truncated_midgop.mkv").read_bytes()
    (cls / "truncated_midgop.mkv").write_bytes(data[: int(len(data) * 0.55)])
    z["truncated_midgop"] = Expect(reason="truncated")

    # 19-20. Zero bytes, random bytes
    (cls / "zero_bytes.mp4").write_bytes(b"")
    z["zero_bytes"] = Expect(reason="undecodable: empty file")
    (cls / "random_bytes.avi").write_bytes(np.random.default_rng(3).bytes(4000))
    z["random_bytes"] = Expect(reason="undecodable: cannot open")
    return z


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    expect = build_zoo(d)
    src = d / "src"
    (d / "zoo").rename(src / "zoo") if src.mkdir() is None else None
    source = scan_dataset("folders", str(src))
    report = prepare_dataset(source, str(d / "out"), OPTS, workers=2)
    with open(d / "out" / "index.jsonl") as f:
        kept = {r["id"]: r for r in map(json.loads, f)}
    with open(d / "out" / "excluded.jsonl") as f:
        excluded = {e["id"]: e["reason"] for e in map(json.loads, f)}
    return d, src, expect, kept, excluded, report


def _source_file(src, name):
    return next(os.path.join(src, "zoo", f) for f in os.listdir(os.path.join(src, "zoo")) if os.path.splitext(f)[0] == name)


def _reference(path: str, rotate_cw: int, size: tuple[int, int]) -> list[np.ndarray]:
    """The source decoded by PyAV in display order, rotated for display and area-resized by OpenCV."""
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    if rotate_cw:
        frames = [np.rot90(f, -rotate_cw // 90) for f in frames]
    return [cv2.resize(np.ascontiguousarray(f), size, interpolation=cv2.INTER_AREA) for f in frames]


ZOO_NAMES = ["xvid_packed_bframes", "cinepak_dropped", "mjpeg", "vp8", "vp9", "h264_bframes_start1s", "hevc",
             "phone_rotated", "odd_321x241_yuv444", "mpeg4_sar12_11", "h264_10bit", "phone_vfr", "uhd_3840x2160",
             "short", "audio_only", "audio_first", "two_video_streams", "truncated_midgop", "zero_bytes",
             "random_bytes"]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo(zoo, name):
    d, src, expect, kept, excluded, _ = zoo
    e = expect[name]
    if e.skip:
        pytest.skip(e.skip)
    if e.reason is not None:
        assert name not in kept
        assert excluded[name].startswith(e.reason), excluded[name]
        return
    assert name in kept, excluded.get(name)
    r = kept[name]
    assert (r["frames"], (r["width"], r["height"])) == (len(e.codes), e.size)
    assert r["fps"] == pytest.approx(e.fps, rel=1e-4)
    out = read_all_frames(d / "out" / r["rgb"])
    assert out.shape == (len(e.codes), e.size[1], e.size[0], 3)
    assert [read_code(f) for f in out] == e.codes
    ref = _reference(_source_file(src, name), e.rotate_cw, e.size)
    err = [np.abs(out[k].astype(np.int16) - ref[i]).mean() for k, i in enumerate(e.src)]
    assert max(err) < 12, (name, max(err))


@pytest.mark.slow
def test_zoo_check_mode_agrees_and_writes_nothing(zoo, tmp_path):
    d, src, expect, kept, excluded, _ = zoo
    out = tmp_path / "never"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-m", "goca_fast.cli.prepare", "--dataset", "folders", "--src", str(src),
                        "--out", str(out), "--check", "--short-side", "48", "--min-frames", "8", "--workers", "2",
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    assert f"{len(kept)} of {len(kept) + len(excluded)} videos would be kept" in r.stdout
    for name, rec in kept.items():
        assert f"keep     {name}: {rec['frames']} frames" in r.stdout
    for name, reason in excluded.items():
        assert f"    {name}: {reason}" in r.stdout
