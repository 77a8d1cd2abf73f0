"""CPU data path: PyAV decoding + torch augmentation -> ClipBatch.

Reproducibility: every random choice for dataset item i in epoch e comes from generators
seeded by (seed, e, i), never from worker-global state, so a batch does not depend on the
number of workers, on which worker served it, or on the rank count (the official code seeds
every rank alike: docs/official_behaviour.md#data-order-and-seeds).
Bad videos never crash a run: the item is dropped with a warning (once per video and
process) and counted in `ClipBatch.skipped`.
"""
from __future__ import annotations

import gc
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from goca_fast.data.augment import ClipAugment, eval_crops
from goca_fast.data.batch import ClipBatch
from goca_fast.data.index import RecordTable, VideoRecord
from goca_fast.data.sampling import sample_train_clips, uniform_eval_clips
from goca_fast.data.views import ViewSpec
from goca_fast.video.io import VideoReadError, read_frames, set_decoder_threads
from goca_fast.video.flow_codec import read_flow_frames
from goca_fast.runtime.stop_signals import ignore_interrupts_in_worker

log = logging.getLogger(__name__)


def _seeds(*entropy: int) -> tuple[int, int]:
    a, b = np.random.SeedSequence([int(x) for x in entropy]).generate_state(2, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1


def item_seeds(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """Two independent 63-bit seeds (numpy sampling, torch augmentation) for one item."""
    return _seeds(seed, epoch, index, 1)  # trailing tag separates item streams from the sampler's


def _to_tchw(frames: np.ndarray) -> torch.Tensor:
    """N×H×W×C uint8 numpy -> N×C×H×W uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


class _SkipMixin:
    """Shared 'skip with a warning, once per video, and count' behaviour."""

    def _init_skip(self) -> None:
        self.num_skipped = 0
        self._warned: set[str] = set()

    def _skip(self, record: VideoRecord, reason: str) -> None:
        self.num_skipped += 1
        if record.id not in self._warned:
            self._warned.add(record.id)
            log.warning("skipping video %s: %s", record.id, reason)


def _read_clip_frames(root: str, record: VideoRecord, indices: np.ndarray,
                      with_flow: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """RGB (and flow at the SAME indices) as N×3×H×W / N×2×H×W uint8."""
    rgb = _to_tchw(read_frames(os.path.join(root, record.rgb), indices))
    flow = None
    if with_flow:
        flow = _to_tchw(read_flow_frames(os.path.join(root, record.flow), indices))
        if flow.shape[-2:] != rgb.shape[-2:]:
            raise VideoReadError(f"{record.flow}: flow frame size {tuple(flow.shape[-2:])} "
                                 f"!= rgb {tuple(rgb.shape[-2:])}")
    return rgb, flow


# --------------------------------------------------------------------------- training


@dataclass
class TrainItem:
    """One video: per-clip augmented tensors (C×T×H×W) in clip_lengths order."""

    rgb: list[torch.Tensor]
    flow: Optional[list[torch.Tensor]]
    label: int
    index: int
    frames: list[np.ndarray]  # sampled frame indices per clip (for checks and debugging)


class TrainClipDataset(_SkipMixin, Dataset):
    """Temporal multi-crop training clips of indexed videos (RGB and optionally flow)."""

    def __init__(self, root: str | os.PathLike, records: Sequence[VideoRecord], clip_lengths: Sequence[int],
                 stride: int, min_distance: int, augment: ClipAugment, with_flow: bool, seed: int,
                 min_frames: Optional[int] = None):
        self.root = os.fspath(root)
        self.records = RecordTable(records)
        self.clip_lengths = [int(L) for L in clip_lengths]
        if not self.clip_lengths:
            raise ValueError("clip_lengths is empty")
        self.stride, self.min_distance = int(stride), int(min_distance)
        self.augment, self.with_flow, self.seed = augment, bool(with_flow), int(seed)
        self.min_frames = max(self.clip_lengths) if min_frames is None else int(min_frames)
        self.epoch = 0
        self._init_skip()

    def set_epoch(self, epoch: int) -> None:
        """Call before creating the epoch's DataLoader iterator (workers copy the dataset)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def clip_indices(self, index: int) -> list[np.ndarray]:
        """The frame indices item `index` uses this epoch (deterministic from seed/epoch/index)."""
        rec = self.records[index]
        rng = np.random.default_rng(item_seeds(self.seed, self.epoch, index)[0])
        return sample_train_clips(rec.frames, self.clip_lengths, self.stride, self.min_distance, rng)

    def __getitem__(self, index: int) -> Optional[TrainItem]:
        rec = self.records[index]
        if self.with_flow and rec.flow is None:
            self._skip(rec, "no flow video in the index")
            return None
        if rec.frames < self.min_frames:
            self._skip(rec, f"too short ({rec.frames} < {self.min_frames} frames)")
            return None
        clips = self.clip_indices(index)
        flat = np.concatenate(clips)
        try:
            rgb, flow = _read_clip_frames(self.root, rec, flat, self.with_flow)
        except VideoReadError as e:
            self._skip(rec, str(e))
            return None
        g = torch.Generator().manual_seed(item_seeds(self.seed, self.epoch, index)[1])
        out_rgb, out_flow, pos = [], [] if self.with_flow else None, 0
        for L in self.clip_lengths:
            r, f = self.augment(rgb[pos:pos + L], None if flow is None else flow[pos:pos + L], g)
            out_rgb.append(r)
            if out_flow is not None:
                out_flow.append(f)
            pos += L
        return TrainItem(out_rgb, out_flow, rec.label, index, clips)


def collate_clips(items: Sequence[Optional[TrainItem]]) -> Optional[ClipBatch]:
    """Stack items clip by clip; dropped (None) items are counted in `skipped`.

    Returns None when every item of the batch was dropped (the engine skips the step).
    """
    good = [it for it in items if it is not None]
    skipped = len(items) - len(good)
    if not good:
        return None
    n_clips = len(good[0].rgb)
    rgb = [torch.stack([it.rgb[c] for it in good]) for c in range(n_clips)]
    flow = None
    if good[0].flow is not None:
        flow = [torch.stack([it.flow[c] for it in good]) for c in range(n_clips)]
    return ClipBatch(rgb=rgb, flow=flow,
                     label=torch.tensor([it.label for it in good], dtype=torch.int64),
                     index=torch.tensor([it.index for it in good], dtype=torch.int64),
                     skipped=skipped)


class EpochSampler(Sampler[int]):
    """Deterministic distributed sampler with exact mid-epoch resume.

    The permutation comes from a torch.Generator seeded by (seed, epoch), so it is the same on
    every rank (the official sampler used the epoch only and ignored --seed). Semantics of
    drop_last follow torch's DistributedSampler: True drops the tail so every rank gets
    floor(N/W) distinct items; False pads by wrap-around to a multiple of W (the official
    behaviour). Rank r takes positions r, r+W, r+2W, ...
    """

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if drop_last and num_items < world_size:
            raise ValueError(f"{num_items} items cannot feed {world_size} ranks with drop_last=True")
        self.num_items, self.rank, self.world_size = int(num_items), int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """New epoch: new permutation, resume offset cleared."""
        self.epoch, self.start = int(epoch), 0

    def set_start(self, batch_index: int, batch_size: int) -> None:
        """Skip the first `batch_index` batches of this rank's epoch (exact resume)."""
        self.start = int(batch_index) * int(batch_size)

    def rank_indices(self) -> list[int]:
        """This rank's full index list for the current epoch (before the resume offset)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(_seeds(self.seed, self.epoch, 0, 2)[0])
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        w = self.world_size
        if self.drop_last:
            order = order[:self.num_items // w * w]
        else:
            total = math.ceil(self.num_items / w) * w
            order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank::w]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start:])

    def __len__(self) -> int:
        per_rank = self.num_items // self.world_size if self.drop_last else math.ceil(self.num_items / self.world_size)
        return max(0, per_rank - self.start)


def batches_per_rank(num_videos: int, world_size: int, batch_size: int) -> int:
    """Full batches each rank gets per epoch from `EpochSampler(drop_last=True)`: every rank takes
    floor(N / W) videos, and the last incomplete batch is dropped."""
    return num_videos // world_size // batch_size


def _freeze_before_fork(num_workers: int) -> None:
    """Move the objects alive now (the index's records above all) out of the garbage collector's reach before the
    loader forks its workers: a collection in a worker would otherwise write to every one of them and so copy the
    parent's memory page by page (the datasets hold their own records in a RecordTable, which workers only read)."""
    if num_workers > 0:
        gc.collect()
        gc.freeze()


def _worker_init(_: int) -> None:
    # Workers already parallelise across items; intra-op torch threads and per-video decoder
    # threads would oversubscribe the cores (measured equal speed on 2 cores, and it bounds the
    # thread count at workers x 1 on big machines).
    # (cv2's thread pool, used by the RGB conversion, is left alone: cv2.setNumThreads in a forked
    # child whose parent had already run a parallel cv2 op once deadlocked here.)
    torch.set_num_threads(1)
    set_decoder_threads(1)
    ignore_interrupts_in_worker()  # Ctrl-C reaches the whole process group; the main process stops the run


def _loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from. Without one it draws from the global RNG at
    every epoch, so model code after it (dropout, a probe's initialisation) would depend on how many loaders ran.
    Our items never use the worker seed (every draw comes from item_seeds), so only the global RNG is protected."""
    return torch.Generator().manual_seed(_seeds(seed, epoch, rank, 3)[0])


def make_train_loader(dataset: TrainClipDataset, batch_size: int, num_workers: int, rank: int,
                      world_size: int, seed: int, epoch: int, start_batch: int = 0,
                      shuffle: bool = True) -> DataLoader:
    """Loader for one epoch (create a new one each epoch); start_batch resumes mid-epoch."""
    dataset.set_epoch(epoch)
    sampler = EpochSampler(len(dataset), rank, world_size, seed, shuffle=shuffle, drop_last=True)
    sampler.set_epoch(epoch)
    sampler.set_start(start_batch, batch_size)
    _freeze_before_fork(num_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_clips, drop_last=True, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init if num_workers > 0 else None,
                      persistent_workers=False, generator=_loader_generator(seed, epoch, rank))


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalItem:
    """All views of one video: V = num_clips × crops (clip-major), each C×T×h×w."""

    rgb: torch.Tensor            # V×3×T×h×w
    flow: Optional[torch.Tensor]  # V×2×T×h×w (V×3×... in official flow mode) or None
    label: int
    index: int
    padded: bool
    frames: list[np.ndarray]


@dataclass
class EvalBatch:
    rgb: torch.Tensor            # N×V×3×T×h×w
    flow: Optional[torch.Tensor]
    label: torch.Tensor
    index: torch.Tensor
    padded: torch.Tensor         # N bool
    skipped: int = 0


class EvalClipDataset(_SkipMixin, Dataset):
    """Deterministic eval views: num_clips uniform clips × crops spatial crops per video."""

    def __init__(self, root: str | os.PathLike, records: Sequence[VideoRecord], views: ViewSpec, with_flow: bool):
        if views.crops not in (1, 3):
            raise ValueError(f"crops must be 1 (centre) or 3 (left/centre/right), got {views.crops}")
        self.root, self.records = os.fspath(root), RecordTable(records)
        self.views, self.with_flow = views, bool(with_flow)
        self.positions = (1,) if views.crops == 1 else (0, 1, 2)
        self._init_skip()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Optional[EvalItem]:
        rec = self.records[index]
        if self.with_flow and rec.flow is None:
            self._skip(rec, "no flow video in the index")
            return None
        v = self.views
        ev = uniform_eval_clips(rec.frames, v.clip_length, v.stride, v.num_clips)
        try:
            rgb, flow = _read_clip_frames(self.root, rec, np.concatenate(ev.indices), self.with_flow)
        except VideoReadError as e:
            self._skip(rec, str(e))
            return None
        L, views_rgb, views_flow = v.clip_length, [], []
        for c in range(len(ev.indices)):
            sl = slice(c * L, (c + 1) * L)
            views_rgb.append(eval_crops(rgb[sl], v.short_side, v.crop_size, self.positions))
            if flow is not None:
                views_flow.append(eval_crops(flow[sl], v.short_side, v.crop_size, self.positions,
                                             kind="flow", flow_mode=v.flow_mode))
        return EvalItem(torch.cat(views_rgb), torch.cat(views_flow) if flow is not None else None,
                        rec.label, index, ev.padded, ev.indices)


def collate_eval(items: Sequence[Optional[EvalItem]]) -> Optional[EvalBatch]:
    good = [it for it in items if it is not None]
    if not good:
        return None
    return EvalBatch(rgb=torch.stack([it.rgb for it in good]),
                     flow=None if good[0].flow is None else torch.stack([it.flow for it in good]),
                     label=torch.tensor([it.label for it in good], dtype=torch.int64),
                     index=torch.tensor([it.index for it in good], dtype=torch.int64),
                     padded=torch.tensor([it.padded for it in good], dtype=torch.bool),
                     skipped=len(items) - len(good))


class ShardSampler(Sampler[int]):
    """In-order, no padding: rank r gets r, r+W, ... (eval must not count any video twice)."""

    def __init__(self, num_items: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.indices = list(range(rank, num_items, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_eval_loader(dataset: EvalClipDataset, batch_size: int, num_workers: int, rank: int = 0,
                     world_size: int = 1) -> DataLoader:
    _freeze_before_fork(num_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world_size),
                      num_workers=num_workers, collate_fn=collate_eval, drop_last=False,
                      pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init if num_workers > 0 else None,
                      generator=_loader_generator(0, 0, rank))
