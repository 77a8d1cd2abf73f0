"""DALI training loader: aligned RGB + flow multi-clip batches as `ClipBatch`, on the GPU or the DALI CPU backend.

    factory = dali_train_loaders(spec, cpu_dataset)      # spec: TrainPipelineSpec (goca_fast.plan makes both)
    for batch in factory(epoch, start_batch): ...

One pipeline serves the whole run, in the training process: its sample n is position n of an endless sequence of
epochs (each this rank's `EpochSampler` order: sharded by rank, reshuffled every epoch, drop-last), so prefetching
runs on across epoch boundaries. Asking for another position (a resume, or an epoch cut short) builds a new pipeline
there; since all randomness comes from (seed, epoch, video), the batches are the same either way (exact resume).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from dali_pipelines import graph
from dali_pipelines.seeking import SeekingTrainSource
from dali_pipelines.source import TrainSampling, TrainSource
from goca_fast.data.batch import ClipBatch
from goca_fast.data.cpu_loader import EpochSampler, TrainClipDataset, collate_clips

log = logging.getLogger(__name__)

_TORCH_DTYPE = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16}


def source_dtypes(num_clips: int, with_flow: bool, per_clip: Sequence) -> list:
    """dtypes of a file-handing source's outputs: the encoded RGB [and flow] file, the frame list, meta, then
    `per_clip` for every clip."""
    return [types.UINT8] * (2 if with_flow else 1) + [types.INT32, types.INT64] + list(per_clip) * num_clips


@pipeline_def
def train_pipeline(source: TrainSource, num_clips: int, with_flow: bool, crop: Sequence[int], official_flow: bool,
                   blur_window: int, out_dtype, gpu: bool):
    """Outputs: meta (N×3 int64: label, index, keep), the RGB clips, then the flow clips (config order).

    A `SeekingTrainSource` (the CPU backend) hands over each RGB clip resized and coloured and each flow clip's
    frames (`_decoded_clips`); otherwise the source hands over the files and DALI decodes them (NVDEC on the
    GPU)."""
    if isinstance(source, SeekingTrainSource):
        return _decoded_clips(source, num_clips, with_flow, crop, official_flow, blur_window, out_dtype)
    per_clip = [types.INT32, types.FLOAT] * (2 if with_flow else 1)
    dtypes = source_dtypes(num_clips, with_flow, per_clip)
    outs = list(fn.external_source(source=source, num_outputs=len(dtypes), batch=False, dtype=dtypes))
    rgb_frames, flow_frames = graph.decode_streams(outs, with_flow, gpu)
    meta = outs.pop(0)
    rgb, flow = [], []
    for _ in range(num_clips):
        order, params = outs.pop(0), outs.pop(0)
        rgb.append(graph.train_rgb_clip(graph.take_frames(rgb_frames, order), params, crop, blur_window, out_dtype))
        if with_flow:
            order, params = outs.pop(0), outs.pop(0)
            flow.append(_flow_clip(graph.flow_planes(graph.take_frames(flow_frames, order)), params, crop,
                                   official_flow, blur_window, out_dtype))
    return (meta, *rgb, *flow)


def _flow_clip(uv, params, crop, official_flow: bool, blur_window: int, out_dtype):
    if official_flow:
        return graph.train_rgb_clip(graph.official_flow_image(uv), params, crop, blur_window, out_dtype)
    return graph.train_flow_clip(uv, params, crop, out_dtype)


def _decoded_clips(source: SeekingTrainSource, num_clips: int, with_flow: bool, crop: Sequence[int],
                   official_flow: bool, blur_window: int, out_dtype):
    """`train_pipeline`'s outputs from a `SeekingTrainSource`, which runs in the pipeline's Python worker processes:
    each RGB clip arrives resized and colour-jittered, each flow clip as its own frames cut to its crop's box."""
    per_clip = [types.UINT8, types.FLOAT] + ([types.UINT8, types.FLOAT] if with_flow else [])
    layouts = ["FHWC", ""] + (["FHWC", ""] if with_flow else [])
    outs = list(fn.external_source(source=source, num_outputs=1 + len(per_clip) * num_clips, batch=False,
                                   dtype=[types.INT64] + per_clip * num_clips, layout=[""] + layouts * num_clips,
                                   parallel=True))
    meta = outs.pop(0)
    rgb, flow = [], []
    for _ in range(num_clips):
        clip, params = outs.pop(0), outs.pop(0)
        rgb.append(graph.finish_rgb_clip(clip, params, blur_window, out_dtype))
        if with_flow:
            uv, params = outs.pop(0), outs.pop(0)
            flow.append(_flow_clip(uv, params, crop, official_flow, blur_window, out_dtype))
    return (meta, *rgb, *flow)


def to_torch(tensor_list, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A uniform DALI TensorList (CPU or GPU) -> a new torch tensor on `device`, in one copy."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tensor_list.as_tensor()
    torch_dtype, shape = _TORCH_DTYPE.get(t.dtype, torch.int64), t.shape()
    out = torch.empty(shape, dtype=torch_dtype, device=device)
    if device.type == "cuda":
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    else:
        feed_ndarray(t, out)
    return out if dtype is None or not out.is_floating_point() else out.to(dtype)


def outputs_to_batch(outs, num_clips: int, with_flow: bool, device: torch.device,
                     dtype: Optional[torch.dtype]) -> Optional[ClipBatch]:
    """Pipeline outputs -> ClipBatch without the rows of too-short videos (None if none is left, as the CPU
    loader's collate does)."""
    meta = torch.from_numpy(np.array(outs[0].as_tensor())).reshape(-1, 3)
    keep = meta[:, 2].bool()
    skipped = int((~keep).sum())
    if skipped == len(keep):
        return None
    clips = [to_torch(o, device, dtype) for o in outs[1:1 + num_clips * (2 if with_flow else 1)]]
    if skipped:
        sel = keep.nonzero().flatten().to(device)
        clips = [c.index_select(0, sel) for c in clips]
        meta = meta[keep]
    return ClipBatch(rgb=clips[:num_clips], flow=clips[num_clips:] if with_flow else None,
                     label=meta[:, 0].to(device), index=meta[:, 1].to(device), skipped=skipped)


@dataclass(kw_only=True)
class TrainPipelineSpec:
    """Everything needed to build the training pipeline at any position: what to sample, and how DALI runs."""

    sampling: TrainSampling
    official_flow: bool
    blur_window: int
    half_output: bool          # DALI writes fp16 (GPU + AMP), else fp32
    device: torch.device
    torch_dtype: Optional[torch.dtype]
    threads: int

    def pipeline(self, epoch: int, start_batch: int):
        sp, gpu = self.sampling, self.device.type == "cuda"
        # DALI's CPU decoder does not seek: on the CPU backend the frames come from the seeking PyAV reader, run in
        # `threads` Python worker processes (forked: the CPU backend has no CUDA context to lose)
        src = (TrainSource if gpu else SeekingTrainSource)(sp, start_epoch=epoch, start_batch=start_batch)
        workers = {} if gpu else {"py_num_workers": max(1, self.threads), "py_start_method": "fork"}
        return train_pipeline(src, len(sp.clip_lengths), sp.with_flow, sp.augment.crop, self.official_flow,
                              self.blur_window, types.FLOAT16 if self.half_output else types.FLOAT,
                              gpu, batch_size=sp.batch_size,
                              num_threads=max(1, self.threads), device_id=device_index(self.device),
                              seed=sp.seed, prefetch_queue_depth=2, **workers)

    def next_position(self, epoch: int, batch: int) -> tuple[int, int]:
        return (epoch, batch + 1) if batch + 1 < self.sampling.batches_per_epoch else (epoch + 1, 0)

    def produce(self, epoch: int, batch: int) -> Iterator[tuple]:
        """Endless ("batch", epoch, b, ClipBatch) or ("error", epoch, b, reason) from (epoch, batch) on. A DALI
        error (a file that broke since validation) leaves the pipeline unusable, so it is rebuilt at the next
        position."""
        pipe = None
        while True:
            if pipe is None:
                pipe = self.pipeline(epoch, batch)
                pipe.build()
            try:
                outs = pipe.run()
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses with backend messages
                pipe = None
                yield ("error", epoch, batch, error_reason(e))
            else:
                sp = self.sampling
                yield ("batch", epoch, batch, outputs_to_batch(outs, len(sp.clip_lengths), sp.with_flow, self.device,
                                                                 self.torch_dtype))
            epoch, batch = self.next_position(epoch, batch)


class DaliTrainLoaders:
    """The loader factory the engine calls as factory(epoch, start_batch) -> iterable of ClipBatch.

    Batches come from one pipeline stream positioned at (epoch, batch); asking for another position (resume, an
    epoch cut short) restarts the stream there. If DALI fails on a batch, `fallback(epoch, indices)` decodes that
    batch with the CPU loader (which drops the broken video and counts it) and the run goes on.
    """

    def __init__(self, spec: TrainPipelineSpec, batch_indices: Callable[[int, int], list[int]],
                 fallback: Optional[Callable[[int, list[int]], Optional[ClipBatch]]] = None):
        self.spec, self.batches = spec, spec.sampling.batches_per_epoch
        self.batch_indices, self.fallback = batch_indices, fallback
        self._stream: Optional[Iterator[tuple]] = None
        self._next: Optional[tuple[int, int]] = None
        self.rebuilds = 0  # streams opened (1 for a run that never jumps)
        self.failed_batches = 0

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None

    def __call__(self, epoch: int, start_batch: int = 0) -> Iterator[Optional[ClipBatch]]:
        return self._iterate(int(epoch), int(start_batch))

    def _iterate(self, epoch: int, start: int) -> Iterator[Optional[ClipBatch]]:
        for b in range(start, self.batches):
            if self._stream is None or self._next != (epoch, b):
                self.close()
                self._stream = self.spec.produce(epoch, b)
                self.rebuilds += 1
            kind, e, bb, payload = next(self._stream)
            if (e, bb) != (epoch, b):
                raise RuntimeError(f"DALI stream out of step: got batch {(e, bb)}, expected {(epoch, b)}")
            self._next = self.spec.next_position(epoch, b)
            if kind == "error":
                self.failed_batches += 1
                log.warning("DALI failed on epoch %d batch %d (%s); this batch is decoded by the CPU loader",
                            epoch, b, payload)
                batch = self.fallback(epoch, self.batch_indices(epoch, b)) if self.fallback else None
                yield batch if batch is None else batch.to(self.spec.device, self.spec.torch_dtype)
                continue
            yield payload


def error_reason(e: Exception) -> str:
    """The informative line of a DALI error (its first lines are a generic header and a C++ location)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("[/")]
    return lines[-1][:300] if lines else type(e).__name__


def device_index(device: torch.device) -> Optional[int]:
    """DALI device_id: the CUDA ordinal, or None for the DALI CPU backend."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def output_dtype(device: torch.device, amp: Optional[torch.dtype]) -> tuple[bool, Optional[torch.dtype]]:
    """(DALI writes fp16, the torch dtype the batch is finally cast to or None = keep) for the autocast dtype `amp`
    (None = fp32).

    DALI (1.53 included) has no bfloat16 output type: on the GPU with AMP it writes fp16 (more mantissa than bf16,
    so no loss) and the copy into torch casts to the training dtype."""
    if device.type == "cuda" and amp is not None:
        return True, amp
    return False, None


def dali_train_loaders(spec: TrainPipelineSpec, cpu_dataset: TrainClipDataset) -> DaliTrainLoaders:
    """The training loader factory of `spec`; a batch DALI fails on is decoded by `cpu_dataset` (the same videos,
    augmentation and seed) instead."""
    sp = spec.sampling

    def batch_indices(epoch: int, b: int) -> list[int]:
        sampler = EpochSampler(len(cpu_dataset), sp.rank, sp.world_size, sp.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return sampler.rank_indices()[b * sp.batch_size:(b + 1) * sp.batch_size]

    def fallback(epoch: int, indices: list[int]) -> Optional[ClipBatch]:
        cpu_dataset.set_epoch(epoch)
        return collate_clips([cpu_dataset[i] for i in indices])

    return DaliTrainLoaders(spec, batch_indices, fallback)
