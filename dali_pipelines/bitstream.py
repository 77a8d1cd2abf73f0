"""GOP-aligned H.264 segments of one video file, as Annex-B bytes DALI's video decoder accepts.

DALI 1.34 has no CPU operator that decodes chosen frames of a file per sample (`readers.video` with a file list is
GPU-only and yields one sequence per sample). Its `experimental.decoders.video` (CPU and mixed/NVDEC) decodes a
whole in-memory stream. So we hand it only what is needed: for one video, the union of the GOPs that hold the
frames of all its clips, concatenated. Every GOP of our dataset starts with an IDR picture and has no B-frames
(`goca_fast.data.video_io` writes closed fixed GOPs, bframes=0), so decoded frame k of the segment is simply the
k-th packet we put in, and each needed frame is decoded once however many clips overlap it.

Packets are read straight from the MP4 by byte position (found once per video with a PyAV demux, no decoding) and
converted from length-prefixed (avcC) to start-code (Annex-B) NAL units, with the SPS/PPS from the container's
extradata before every GOP.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

_START_CODE = b"\x00\x00\x00\x01"


class BitstreamError(ValueError):
    """The file cannot be cut into decodable GOP segments (reason in the message)."""


@dataclass(frozen=True)
class PacketTable:
    """Where every frame's packet lies in the file, in decode (= presentation) order."""

    path: str
    pos: np.ndarray        # int64 byte offset per packet
    size: np.ndarray       # int64 byte size per packet
    keyframes: np.ndarray  # int64 indices of keyframe packets, ascending, first is 0
    header: bytes          # Annex-B SPS/PPS to put before every GOP ("" for in-band parameter sets)
    length_size: int       # NAL length prefix bytes (0 = packets are already Annex-B)
    width: int
    height: int
    fps: float
    codec: str

    @property
    def frames(self) -> int:
        return len(self.pos)


def _parse_avcc(extradata: bytes) -> tuple[bytes, int]:
    """avcC box -> (Annex-B SPS+PPS, NAL length size). Raises BitstreamError when malformed."""
    if len(extradata) < 7 or extradata[0] != 1:
        raise BitstreamError("malformed avcC extradata")
    length_size = (extradata[4] & 3) + 1
    out, i = bytearray(), 5
    try:
        for count_mask in (0x1F, 0xFF):  # SPS count (5 bits), then PPS count (8 bits)
            count = extradata[i] & count_mask
            i += 1
            for _ in range(count):
                n = int.from_bytes(extradata[i:i + 2], "big")
                nal = extradata[i + 2:i + 2 + n]
                if len(nal) != n:
                    raise IndexError
                out += _START_CODE + nal
                i += 2 + n
    except IndexError:
        raise BitstreamError("truncated avcC extradata") from None
    return bytes(out), length_size


def packet_table(path: str | os.PathLike) -> PacketTable:
    """Demux (no decode) one video and check it can be cut into GOP segments.

    Raises BitstreamError with a one-line reason for anything the segment path cannot handle: not H.264, no byte
    positions, reordered frames (B-frames), a first packet that is not a keyframe, empty or missing file.
    """
    from goca_fast.data.video_io import VideoReadError, open_container

    try:
        container = open_container(path)
    except VideoReadError as e:
        raise BitstreamError(str(e)) from None
    try:
        if not container.streams.video:
            raise BitstreamError(f"{path}: no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        codec = ctx.name
        if codec != "h264":
            raise BitstreamError(f"{path}: codec {codec} (the DALI loader reads H.264; re-encode with goca-prepare)")
        rate = stream.average_rate or stream.base_rate or stream.guessed_rate
        rows = []
        try:
            for p in container.demux(stream):
                if p.size:
                    rows.append((p.pos, p.size, p.is_keyframe, p.pts if p.pts is not None else -1))
        except Exception as e:  # noqa: BLE001
            raise BitstreamError(f"{path}: demux failed after {len(rows)} packets ({type(e).__name__})") from None
        extradata = bytes(ctx.extradata or b"")
        width, height = ctx.width, ctx.height
    finally:
        container.close()
    if not rows:
        raise BitstreamError(f"{path}: no video packets")
    table = np.array(rows, dtype=np.int64)
    pos, size, key, pts = table.T
    if (pos < 0).any():
        raise BitstreamError(f"{path}: the container gives no packet byte positions; re-encode with goca-prepare")
    if (pts < 0).any() or (np.diff(pts) <= 0).any():
        raise BitstreamError(f"{path}: frames are reordered (B-frames) or lack timestamps; re-encode with goca-prepare")
    if not key[0]:
        raise BitstreamError(f"{path}: the first packet is not a keyframe")
    step = np.diff(pts)
    if step.size and step.max() > step.min() * 1.01 + 1:  # one tick of slack for rounded time bases
        raise BitstreamError(f"{path}: variable frame rate (frame durations {step.min()}..{step.max()} ticks); "
                             f"re-encode to constant frame rate with goca-prepare")
    if width % 2 or height % 2:
        raise BitstreamError(f"{path}: odd frame size {width}x{height} (4:2:0 decoders need even sizes)")
    if extradata[:1] == b"\x01":
        header, length_size = _parse_avcc(extradata)
    else:  # Annex-B in the container (in-band SPS/PPS)
        header, length_size = b"", 0
    return PacketTable(path, pos, size, np.flatnonzero(key), header, length_size, int(width), int(height),
                       float(rate) if rate else 0.0, codec)


def gop_runs(table: PacketTable, frames: np.ndarray) -> list[tuple[int, int]]:
    """[first, stop) packet ranges covering `frames`: whole GOPs from the keyframe before each needed frame to the
    last needed frame of that GOP, merged when consecutive. Pure; the decoded segment is their concatenation."""
    idx = np.unique(np.asarray(frames, dtype=np.int64))
    if idx.size == 0:
        return []
    if idx[0] < 0 or idx[-1] >= table.frames:
        raise BitstreamError(f"{table.path}: frame {int(idx[-1] if idx[-1] >= 0 else idx[0])} outside "
                             f"0..{table.frames - 1}")
    gop = np.searchsorted(table.keyframes, idx, side="right") - 1  # GOP number of every needed frame
    runs: list[tuple[int, int]] = []
    for g in np.unique(gop):
        first = int(table.keyframes[g])
        stop = int(idx[gop == g].max()) + 1
        if runs and runs[-1][1] == first:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((first, stop))
    return runs


def segment_positions(runs: Sequence[tuple[int, int]], frames: np.ndarray) -> np.ndarray:
    """Position of every frame index of `frames` in the decoded segment made of `runs` (same shape as frames)."""
    frames = np.asarray(frames, dtype=np.int64)
    out = np.full(frames.shape, -1, dtype=np.int64)
    offset = 0
    for first, stop in runs:
        inside = (frames >= first) & (frames < stop)
        out[inside] = frames[inside] - first + offset
        offset += stop - first
    if (out < 0).any():
        raise ValueError("some frames are not covered by the runs")
    return out


def _to_annexb(data: bytearray, length_size: int, path: str) -> bytearray:
    """Length-prefixed NAL units -> start codes (in place when the prefix is 4 bytes, the usual case)."""
    if length_size == 4:
        i, n = 0, len(data)
        while i < n:
            nal = int.from_bytes(data[i:i + 4], "big")
            if nal <= 0 or i + 4 + nal > n:
                raise BitstreamError(f"{path}: corrupt NAL length in packet data")
            data[i:i + 4] = _START_CODE
            i += 4 + nal
        return data
    out, i, n = bytearray(), 0, len(data)
    while i < n:
        nal = int.from_bytes(data[i:i + length_size], "big")
        if nal <= 0 or i + length_size + nal > n:
            raise BitstreamError(f"{path}: corrupt NAL length in packet data")
        out += _START_CODE + data[i + length_size:i + length_size + nal]
        i += length_size + nal
    return out


def read_segment(table: PacketTable, runs: Sequence[tuple[int, int]]) -> np.ndarray:
    """The Annex-B bytes of `runs` (uint8 array), header before each run, ready for DALI's video decoder."""
    out = bytearray()
    try:
        with open(table.path, "rb") as f:
            for first, stop in runs:
                out += table.header
                for k in range(first, stop):
                    f.seek(int(table.pos[k]))
                    pkt = bytearray(f.read(int(table.size[k])))
                    if len(pkt) != table.size[k]:
                        raise BitstreamError(f"{table.path}: file truncated at packet {k}")
                    out += _to_annexb(pkt, table.length_size, table.path) if table.length_size else pkt
    except OSError as e:
        raise BitstreamError(f"{table.path}: read failed ({e.strerror or e})") from None
    return np.frombuffer(bytes(out), dtype=np.uint8)
