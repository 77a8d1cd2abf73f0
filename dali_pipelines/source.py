"""Per-sample inputs of the DALI pipelines: encoded GOP segments, frame orders and augmentation parameters.

Every random choice is made here, in Python, from the same seeds as the CPU loader
(`goca_fast.data.cpu_loader.item_seeds(seed, epoch, index)`): the clip frame indices come from
`sample_train_clips` and the augmentation draws from `ClipAugment.draw`, in the same order. So a DALI batch shows
the same videos, the same frames and the same crops/flips/jitter draws as the CPU loader's batch, it does not
depend on worker count, rank count or on where a run was resumed, and the DALI graph itself has no random
operator. The callables are picklable so DALI's parallel external source can run them in worker processes.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from dali_pipelines.bitstream import BitstreamError, PacketTable, gop_runs, packet_table, read_segment, \
    segment_positions
from goca_fast.data.augment import AugParams, ClipAugment, _eval_offsets, resized_size
from goca_fast.data.cpu_loader import EpochSampler, item_seeds
from goca_fast.data.index import VideoRecord
from goca_fast.data.sampling import sample_train_clips, uniform_eval_clips

log = logging.getLogger(__name__)

# Layout of the float32 parameter vector of one clip of one stream (see dali_pipelines.graph).
# P_ROI is the crop window in source pixels (y0, x0, y1, x1): resizing just that window to the crop size gives the
# resize-then-crop result (measured: within 6e-4 of 255) while computing only the crop's pixels.
P_ROI, P_FLIP, P_JITTER, P_BLUR, P_SIGN = slice(0, 4), 4, slice(5, 9), 9, slice(10, 12)
NUM_PARAMS = 12


@dataclass(frozen=True)
class VideoMeta:
    """What a source worker needs of one index record (small and picklable)."""

    rgb: str
    flow: Optional[str]
    frames: int
    label: int
    id: str


def video_metas(root: str | os.PathLike, records: Sequence[VideoRecord]) -> list[VideoMeta]:
    root = os.fspath(root)
    return [VideoMeta(os.path.join(root, r.rgb), os.path.join(root, r.flow) if r.flow else None, int(r.frames),
                      int(r.label), r.id) for r in records]


def clip_segment(table: PacketTable, clips: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the GOPs holding all `clips`' frames as one Annex-B stream, each clip's frame positions in its decode)."""
    runs = gop_runs(table, np.concatenate(clips))
    return read_segment(table, runs), [segment_positions(runs, c).astype(np.int32) for c in clips]


class _TableCache:
    """Small per-process LRU of packet tables (a table is a few KB; demuxing costs ~3 ms per video)."""

    def __init__(self, capacity: int = 4096):
        self.capacity, self._d = capacity, OrderedDict()

    def get(self, path: str) -> PacketTable:
        t = self._d.get(path)
        if t is None:
            t = packet_table(path)
            self._d[path] = t
            if len(self._d) > self.capacity:
                self._d.popitem(last=False)
        else:
            self._d.move_to_end(path)
        return t


def _placeholder_segment(frames: int) -> np.ndarray:
    """A tiny all-grey H.264 segment fed in place of a video that failed (the adapter drops that sample): DALI's
    decoder must always get a stream it can open (it crashes the process on unparseable data)."""
    from goca_fast.data.video_io import write_video

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "placeholder.mp4")
        write_video(path, np.full((frames, 16, 16, 3), 128, np.uint8), 25, gop=max(1, frames))
        return read_segment(packet_table(path), [(0, frames)])


def clip_params(p: AugParams, height: int, width: int, crop: tuple[int, int],
                sign: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """One clip's augmentation draw (for a height×width video) -> the float32 vector the graph reads."""
    v = np.zeros(NUM_PARAMS, np.float32)
    rh, rw = resized_size(height, width, p.short_side)
    sy, sx = height / rh, width / rw
    v[P_ROI] = (p.top * sy, p.left * sx, (p.top + crop[0]) * sy, (p.left + crop[1]) * sx)
    v[P_FLIP] = float(p.flip)
    v[P_JITTER] = (1.0, 1.0, 1.0, 0.0)
    if p.jitter is not None:
        _, b, c, s, h = p.jitter
        v[P_JITTER] = (b, c, s, h * 360.0)  # DALI's hue is in degrees, torchvision's a fraction of the circle
    if p.gray:
        v[P_JITTER.start + 2] = 0.0  # saturation 0 = greyscale (same luma weights as torchvision)
    v[P_BLUR] = p.blur_sigma if p.blur_sigma is not None else 0.01  # σ=0.01: the kernel is exactly (.., 0, 1, 0, ..)
    v[P_SIGN] = sign
    return v


def _identity_draw(crop: tuple[int, int]) -> AugParams:
    """No-op draw for a crop-sized placeholder."""
    return AugParams(min(crop), 0, 0, False, False, None, False, None)


class TrainSource:
    """Sample-mode callable for `fn.external_source(parallel=True, batch=False)`.

    Sample g (DALI's running `idx_in_epoch`; the pipeline never ends an epoch) is position g + base of an endless
    sequence of epochs, each `batches * batch_size` samples of this rank's `EpochSampler` order. Returns
    (rgb segment, [flow segment], meta int64 [label, index, valid], then per clip: rgb order, rgb params,
    [flow order, flow params]).
    """

    def __init__(self, metas: Sequence[VideoMeta], clip_lengths: Sequence[int], stride: int, min_distance: int,
                 augment: ClipAugment, with_flow: bool, seed: int, rank: int, world_size: int, batch_size: int,
                 batches_per_epoch: int, start_epoch: int, start_batch: int):
        self.metas = list(metas)
        self.clip_lengths = [int(L) for L in clip_lengths]
        self.stride, self.min_distance = int(stride), int(min_distance)
        self.augment, self.with_flow, self.seed = augment, bool(with_flow), int(seed)
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)
        self.per_epoch = int(batches_per_epoch) * self.batch_size
        self.base = int(start_epoch) * self.per_epoch + int(start_batch) * self.batch_size
        self._order_epoch, self._order = -1, []
        self._tables: Optional[_TableCache] = None
        self._placeholder = None

    # -------------------------------------------------------------- schedule

    def position(self, sample: int) -> tuple[int, int]:
        """(epoch, dataset index) of the pipeline's sample number `sample`."""
        g = self.base + int(sample)
        epoch, pos = divmod(g, self.per_epoch)
        if epoch != self._order_epoch:
            sampler = EpochSampler(len(self.metas), self.rank, self.world_size, self.seed, drop_last=True)
            sampler.set_epoch(epoch)
            self._order_epoch, self._order = epoch, sampler.rank_indices()
        return epoch, self._order[pos]

    # -------------------------------------------------------------- one sample

    def clips(self, epoch: int, index: int) -> list[np.ndarray]:
        """Clip frame indices, exactly as `TrainClipDataset.clip_indices` makes them."""
        rng = np.random.default_rng(item_seeds(self.seed, epoch, index)[0])
        return sample_train_clips(self.metas[index].frames, self.clip_lengths, self.stride, self.min_distance, rng)

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        if self._tables is None:
            self._tables = _TableCache()
        epoch, index = self.position(info.idx_in_epoch)
        meta = self.metas[index]
        try:
            return self._sample(epoch, index, meta)
        except (BitstreamError, ValueError) as e:
            log.warning("skipping video %s: %s", meta.id, e)
            return self._failed(index, meta)

    def _draw_all(self, g: torch.Generator, height: int, width: int) -> tuple[list, list]:
        rgb, flow = [], []
        for _ in self.clip_lengths:
            p = self.augment.draw(height, width, g)
            rgb.append(p)
            if self.with_flow and self.augment.flow_mode == "official":
                flow.append(self.augment.draw(height, width, g))
            else:
                flow.append(p)
        return rgb, flow

    def _sample(self, epoch: int, index: int, meta: VideoMeta) -> tuple[np.ndarray, ...]:
        if self.with_flow and meta.flow is None:
            raise ValueError("no flow video in the index")
        clips = self.clips(epoch, index)
        t_rgb = self._tables.get(meta.rgb)
        rgb_buf, rgb_orders = clip_segment(t_rgb, clips)
        if t_rgb.frames != meta.frames:
            raise ValueError(f"{t_rgb.frames} frames in the file, {meta.frames} in the index")
        h, w = t_rgb.height, t_rgb.width
        g = torch.Generator().manual_seed(item_seeds(self.seed, epoch, index)[1])
        p_rgb, p_flow = self._draw_all(g, h, w)
        out = [rgb_buf]
        if self.with_flow:
            t_flow = self._tables.get(meta.flow)
            flow_buf, flow_orders = clip_segment(t_flow, clips)
            if (t_flow.width, t_flow.height) != (w, 2 * h) or t_flow.frames != t_rgb.frames:
                raise ValueError(f"flow video {t_flow.width}x{t_flow.height}, {t_flow.frames} frames does not "
                                 f"match rgb {w}x{h}, {t_rgb.frames} frames")
            out.append(flow_buf)
        out.append(np.array([meta.label, index, 1], np.int64))
        for c in range(len(clips)):
            order, pr = rgb_orders[c], p_rgb[c]
            if pr.reverse:
                order = order[::-1].copy()
            out += [order, clip_params(pr, h, w, self.augment.crop)]
            if self.with_flow:
                pf, f_order = p_flow[c], flow_orders[c]
                if pf.reverse:
                    f_order = f_order[::-1].copy()
                sign = (-1.0 if pf.flip else 1.0, 1.0)
                if pf.reverse:
                    sign = (-sign[0], -sign[1])
                out += [f_order, clip_params(pf, h, w, self.augment.crop, sign)]
        return tuple(out)

    def _failed(self, index: int, meta: VideoMeta) -> tuple[np.ndarray, ...]:
        """Placeholder sample (valid = 0): decodable, right shapes after the graph, dropped by the adapter."""
        if self._placeholder is None:
            self._placeholder = _placeholder_segment(max(self.clip_lengths))
        buf = self._placeholder
        crop = self.augment.crop
        p = clip_params(_identity_draw(crop), crop[0], crop[1], crop)
        out = [buf] + ([buf] if self.with_flow else []) + [np.array([meta.label, index, 0], np.int64)]
        for L in self.clip_lengths:
            order = np.zeros(L, np.int32)
            out += [order, p] + ([order, p] if self.with_flow else [])
        return tuple(out)


class EvalSource:
    """Sample-mode callable for the eval pipeline: sample g is this rank's g-th video (ShardSampler order),
    padded by repeating the last video so every batch is full (padding has valid = 0).

    Returns (rgb segment, [flow segment], meta int64 [label, index, valid, padded_short, batch padding], then per
    clip: rgb order,
    [flow order], then per crop: float32 anchor [top, left], then float32 [resized h, resized w]).
    """

    def __init__(self, metas: Sequence[VideoMeta], clip_length: int, stride: int, num_clips: int, crops: int,
                 crop_size: int, short_side: int, with_flow: bool, rank: int = 0, world_size: int = 1,
                 excluded: Sequence[int] = ()):
        self.metas = list(metas)
        self.excluded = frozenset(int(i) for i in excluded)  # failed validation: reported, never sent to DALI
        self.indices = list(range(rank, len(self.metas), world_size))
        self.clip_length, self.stride, self.num_clips = int(clip_length), int(stride), int(num_clips)
        self.positions = (1,) if crops == 1 else tuple(range(crops))
        self.crop_size, self.short_side, self.with_flow = int(crop_size), int(short_side), bool(with_flow)
        self._tables: Optional[_TableCache] = None
        self._placeholder = None

    def __len__(self) -> int:
        return len(self.indices)

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        if self._tables is None:
            self._tables = _TableCache()
        k = int(info.idx_in_epoch)
        pad = k >= len(self.indices)
        index = self.indices[min(k, len(self.indices) - 1)]
        meta = self.metas[index]
        if index in self.excluded:
            return self._failed(index, meta, pad=pad)
        try:
            return self._sample(index, meta, valid=not pad)
        except (BitstreamError, ValueError) as e:
            log.warning("skipping video %s: %s", meta.id, e)
            return self._failed(index, meta)

    def _sample(self, index: int, meta: VideoMeta, valid: bool) -> tuple[np.ndarray, ...]:
        if self.with_flow and meta.flow is None:
            raise ValueError("no flow video in the index")
        ev = uniform_eval_clips(meta.frames, self.clip_length, self.stride, self.num_clips)
        t_rgb = self._tables.get(meta.rgb)
        if t_rgb.frames != meta.frames:
            raise ValueError(f"{t_rgb.frames} frames in the file, {meta.frames} in the index")
        buf, rgb_orders = clip_segment(t_rgb, ev.indices)
        out, orders = [buf], [rgb_orders]
        if self.with_flow:
            t_flow = self._tables.get(meta.flow)
            if (t_flow.width, t_flow.height) != (t_rgb.width, 2 * t_rgb.height) or t_flow.frames != t_rgb.frames:
                raise ValueError("flow video size or frame count does not match its rgb video")
            buf, flow_orders = clip_segment(t_flow, ev.indices)
            out.append(buf)
            orders.append(flow_orders)
        out.append(np.array([meta.label, index, int(valid), int(ev.padded), int(not valid)], np.int64))
        for c in range(self.num_clips):
            out += [o[c] for o in orders]
        rh, rw = resized_size(t_rgb.height, t_rgb.width, self.short_side)
        for pos in self.positions:
            out.append(np.array(_eval_offsets(rh, rw, self.crop_size, pos), np.float32))
        out.append(np.array([rh, rw], np.float32))
        return tuple(out)

    def _failed(self, index: int, meta: VideoMeta, pad: bool = False) -> tuple[np.ndarray, ...]:
        if self._placeholder is None:
            self._placeholder = _placeholder_segment(self.clip_length)
        buf = self._placeholder
        out = [buf] + ([buf] if self.with_flow else []) + [np.array([meta.label, index, 0, 0, int(pad)], np.int64)]
        for _ in range(self.num_clips):
            out += [np.zeros(self.clip_length, np.int32)] * (2 if self.with_flow else 1)
        out += [np.zeros(2, np.float32) for _ in self.positions]
        out.append(np.array([self.short_side, self.short_side], np.float32))
        return tuple(out)
