"""Per-sample inputs of the DALI pipelines: the encoded files, the frames to decode, and augmentation parameters.

Every random choice is made here, in Python, from the same seeds as the CPU loader
(`goca_fast.data.cpu_loader.item_seeds(seed, epoch, index)`): the clip frame indices come from
`sample_train_clips` and the augmentation draws from `ClipAugment.draw`, in the same order. So a DALI batch shows
the same videos, the same frames and the same crops/flips/jitter draws as the CPU loader's batch, it does not
depend on thread count, rank count or on where a run was resumed, and the DALI graph itself has no random
operator. A sample hands DALI the whole encoded file and the sorted distinct frame indices its clips need
(`decoders.video(frames=...)` decodes just those, seeking by keyframe); each clip then picks its frames from that
decode by position (stride, repeats and time reversal included). RGB and flow share the one frame list. On DALI's
CPU backend, whose decoder does not seek, `dali_pipelines.seeking.SeekingTrainSource` decodes with the project's
seeking reader instead and hands over each RGB clip resized and coloured, each flow clip as its frames.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from goca_fast.data.augment import AugParams, ClipAugment, _eval_offsets, resized_size
from goca_fast.data.cpu_loader import EpochSampler, item_seeds
from goca_fast.data.index import VideoRecord
from goca_fast.data.sampling import sample_train_clips, uniform_eval_clips
from goca_fast.data.views import ViewSpec

log = logging.getLogger(__name__)

# Layout of the float32 parameter vector of one clip of one stream (see dali_pipelines.graph).
# P_ROI is the crop window in source pixels (y0, x0, y1, x1): resizing just that window to the crop size gives the
# resize-then-crop result (measured: within 6e-4 of 255) while computing only the crop's pixels.
P_ROI, P_FLIP, P_JITTER, P_BLUR, P_SIGN = slice(0, 4), 4, slice(5, 9), 9, slice(10, 12)
NUM_PARAMS = 12


@dataclass(frozen=True)
class VideoMeta:
    """What the source needs of one index record (small and picklable). `height`, `width`: of the RGB video."""

    rgb: str
    flow: Optional[str]
    frames: int
    label: int
    id: str
    height: int
    width: int


def video_metas(root: str | os.PathLike, records: Sequence[VideoRecord]) -> list[VideoMeta]:
    root = os.fspath(root)
    return [VideoMeta(os.path.join(root, r.rgb), os.path.join(root, r.flow) if r.flow else None, int(r.frames),
                      int(r.label), r.id, int(r.height), int(r.width)) for r in records]


def read_encoded(path: str) -> np.ndarray:
    """The whole encoded file as uint8 (what the decoder demuxes). A file that cannot be read gives an empty
    buffer, which the decoder rejects with an error for the batch it is in. Raising here would not do: the source
    runs up to `prefetch_queue_depth` batches ahead, so its exception would surface on an earlier batch."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        log.warning("cannot read %s: %s", path, e)
        return np.zeros(0, np.uint8)


def frame_plan(clips: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(sorted distinct frame indices to decode, each clip's positions in that decode). Decoding each frame once,
    in order, never makes the decoder seek backwards, however the clips overlap, repeat or reverse."""
    frames, inverse = np.unique(np.concatenate(clips), return_inverse=True)
    bounds = np.cumsum([0] + [len(c) for c in clips])
    return frames.astype(np.int32), [inverse[a:b].astype(np.int32) for a, b in zip(bounds[:-1], bounds[1:])]


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


@dataclass
class TrainSampling:
    """What the training source samples: this rank's share of `metas`, the clips of each video and their
    augmentation draws (the CPU loader's `TrainClipDataset` and `EpochSampler` settings, so both give the same
    batches)."""

    metas: list[VideoMeta]
    clip_lengths: list[int]
    stride: int
    min_distance: int
    augment: ClipAugment
    with_flow: bool
    seed: int
    rank: int
    world_size: int
    batch_size: int
    batches_per_epoch: int


class TrainSource:
    """Sample-mode callable for `fn.external_source(batch=False)`.

    Sample g (DALI's running `idx_in_epoch`; the pipeline never ends an epoch) is position g + base of an endless
    sequence of epochs, each `batches * batch_size` samples of this rank's `EpochSampler` order. Returns
    (rgb file, [flow file], frames int32, meta int64 [label, index, keep], then per clip: rgb positions, rgb
    params, [flow positions, flow params]). keep = 0 for a video shorter than the longest clip, which the CPU
    loader drops (`TrainClipDataset.min_frames`); it is decoded anyway, so the batch keeps its shape, and the
    adapter drops its row. A file that cannot be read or decoded fails its batch in the decoder (the loader then
    decodes that batch with the CPU loader).
    """

    def __init__(self, sampling: TrainSampling, start_epoch: int, start_batch: int):
        sp = sampling
        self.metas = list(sp.metas)
        self.clip_lengths = [int(L) for L in sp.clip_lengths]
        self.stride, self.min_distance = int(sp.stride), int(sp.min_distance)
        self.augment, self.with_flow, self.seed = sp.augment, bool(sp.with_flow), int(sp.seed)
        self.rank, self.world_size, self.batch_size = int(sp.rank), int(sp.world_size), int(sp.batch_size)
        self.per_epoch = int(sp.batches_per_epoch) * self.batch_size
        self.base = int(start_epoch) * self.per_epoch + int(start_batch) * self.batch_size
        self.min_frames = max(self.clip_lengths)
        self._order_epoch, self._order = -1, []
        self._warned: set[str] = set()

    def position(self, sample: int) -> tuple[int, int]:
        """(epoch, dataset index) of the pipeline's sample number `sample`."""
        epoch, pos = divmod(self.base + int(sample), self.per_epoch)
        if epoch != self._order_epoch:
            sampler = EpochSampler(len(self.metas), self.rank, self.world_size, self.seed, drop_last=True)
            sampler.set_epoch(epoch)
            self._order_epoch, self._order = epoch, sampler.rank_indices()
        return epoch, self._order[pos]

    def clips(self, epoch: int, index: int) -> list[np.ndarray]:
        """Clip frame indices, exactly as `TrainClipDataset.clip_indices` makes them."""
        rng = np.random.default_rng(item_seeds(self.seed, epoch, index)[0])
        return sample_train_clips(self.metas[index].frames, self.clip_lengths, self.stride, self.min_distance, rng)

    def draws(self, epoch: int, index: int) -> tuple[list[AugParams], list[AugParams]]:
        """Per clip (rgb draw, flow draw), in `ClipAugment.__call__`'s order (flow shares the RGB draw unless the
        official flow mode draws its own)."""
        meta = self.metas[index]
        g = torch.Generator().manual_seed(item_seeds(self.seed, epoch, index)[1])
        rgb, flow = [], []
        for _ in self.clip_lengths:
            p = self.augment.draw(meta.height, meta.width, g)
            rgb.append(p)
            own = self.with_flow and self.augment.flow_mode == "official"
            flow.append(self.augment.draw(meta.height, meta.width, g) if own else p)
        return rgb, flow

    def plan(self, sample: int) -> SamplePlan:
        """Everything sample number `sample` is made of: its video, frames, and each clip's frame order and
        parameters (RGB, and flow when it trains)."""
        epoch, index = self.position(sample)
        meta = self.metas[index]
        frames, positions = frame_plan(self.clips(epoch, index))
        p_rgb, p_flow = self.draws(epoch, index)
        h, w, crop = meta.height, meta.width, self.augment.crop
        keep = meta.frames >= self.min_frames
        if not keep and meta.id not in self._warned:
            self._warned.add(meta.id)
            log.warning("skipping video %s: too short (%d < %d frames)", meta.id, meta.frames, self.min_frames)
        clips = []
        for pos, pr, pf in zip(positions, p_rgb, p_flow):
            flow = None
            if self.with_flow:
                sign = (-1.0 if pf.flip else 1.0, 1.0)
                if pf.reverse:  # backward in time: the motion between frames is reversed
                    sign = (-sign[0], -sign[1])
                flow = (pos[::-1].copy() if pf.reverse else pos, clip_params(pf, h, w, crop, sign))
            clips.append((pos[::-1].copy() if pr.reverse else pos, clip_params(pr, h, w, crop), flow))
        return SamplePlan(meta, np.array([meta.label, index, int(keep)], np.int64), frames, clips)

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        sp = self.plan(info.idx_in_epoch)
        out = [read_encoded(sp.meta.rgb)] + ([read_encoded(sp.meta.flow)] if self.with_flow else [])
        out += [sp.frames, sp.row]
        for order, params, flow in sp.clips:
            out += [order, params] + (list(flow) if flow is not None else [])
        return tuple(out)


@dataclass
class SamplePlan:
    """One training sample: its video, meta row [label, index, keep], the sorted distinct frames to decode, and per
    clip (RGB positions in that decode, RGB params, (flow positions, flow params) or None)."""

    meta: VideoMeta
    row: np.ndarray
    frames: np.ndarray
    clips: list[tuple[np.ndarray, np.ndarray, Optional[tuple[np.ndarray, np.ndarray]]]]


class EvalSource:
    """Sample-mode callable for the eval pipeline: sample g is video g (from `start`) of `indices`, padded by
    repeating the last video so every batch is full (padding rows have valid = 0).

    Returns (rgb file, [flow file], frames int32, meta int64 [label, index, valid, padded_short], then per clip:
    positions, then per crop: float32 anchor [top, left], then float32 [resized h, resized w]).
    """

    def __init__(self, metas: Sequence[VideoMeta], indices: Sequence[int], views: ViewSpec, with_flow: bool,
                 start: int = 0):
        self.metas, self.indices, self.start = list(metas), list(indices), int(start)
        self.views, self.with_flow = views, bool(with_flow)
        self.positions = (1,) if views.crops == 1 else tuple(range(views.crops))

    def __len__(self) -> int:
        return len(self.indices)

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        k = self.start + int(info.idx_in_epoch)
        valid = k < len(self.indices)
        index = self.indices[min(k, len(self.indices) - 1)]
        meta = self.metas[index]
        v = self.views
        ev = uniform_eval_clips(meta.frames, v.clip_length, v.stride, v.num_clips)
        frames, positions = frame_plan(ev.indices)
        out = [read_encoded(meta.rgb)] + ([read_encoded(meta.flow)] if self.with_flow else [])
        out += [frames, np.array([meta.label, index, int(valid), int(ev.padded)], np.int64), *positions]
        rh, rw = resized_size(meta.height, meta.width, v.short_side)
        out += [np.array(_eval_offsets(rh, rw, v.crop_size, pos), np.float32) for pos in self.positions]
        out.append(np.array([rh, rw], np.float32))
        return tuple(out)
