"""DALI training loader: aligned RGB + flow multi-clip batches as `ClipBatch`, on the GPU or the DALI CPU backend.

    factory, batches_per_epoch = build_dali_train_loader(cfg, info, root)
    for batch in factory(epoch, start_batch): ...

One pipeline serves the whole run: its sample n is position n of an endless sequence of epochs (each this rank's
`EpochSampler` order: sharded by rank, reshuffled every epoch, drop-last), so prefetching runs on across epoch
boundaries. Asking for another position (a resume, or an epoch cut short) builds a new pipeline there; since all
randomness comes from (seed, epoch, video), the batches are the same either way (exact resume).
"""
from __future__ import annotations

import logging
import math
import os
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types

from dali_pipelines import graph
from dali_pipelines.source import TrainSource, video_metas
from goca_fast.data.augment import ClipAugment
from goca_fast.data.batch import ClipBatch

log = logging.getLogger(__name__)

_TORCH_DTYPE = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16}


def source_dtypes(num_clips: int, with_flow: bool, per_clip: Sequence) -> list:
    """dtypes of the external source's outputs: segment(s), meta, then `per_clip` for every clip."""
    return [types.UINT8] * (2 if with_flow else 1) + [types.INT64] + list(per_clip) * num_clips


@pipeline_def
def train_pipeline(source: TrainSource, num_clips: int, with_flow: bool, crop: Sequence[int], official_flow: bool,
                   blur_window: int, out_dtype, gpu: bool, parallel: bool):
    """Outputs: meta (N×3 int64: label, index, valid), the RGB clips, then the flow clips (config order)."""
    per_clip = [types.INT32, types.FLOAT] * (2 if with_flow else 1)
    dtypes = source_dtypes(num_clips, with_flow, per_clip)
    outs = list(fn.external_source(source=source, num_outputs=len(dtypes), batch=False, parallel=parallel,
                                   dtype=dtypes))
    rgb_frames = graph.decode(outs.pop(0), gpu)
    flow_frames = graph.decode(outs.pop(0), gpu) if with_flow else None
    meta = outs.pop(0)
    rgb, flow = [], []
    for _ in range(num_clips):
        order, params = outs.pop(0), outs.pop(0)
        rgb.append(graph.train_rgb_clip(graph.take_frames(rgb_frames, order), params, crop, blur_window, out_dtype))
        if with_flow:
            order, params = outs.pop(0), outs.pop(0)
            uv = graph.flow_planes(graph.take_frames(flow_frames, order))
            if official_flow:
                flow.append(graph.train_rgb_clip(graph.official_flow_image(uv), params, crop, blur_window,
                                                 out_dtype))
            else:
                flow.append(graph.train_flow_clip(uv, params, crop, out_dtype))
    return (meta, *rgb, *flow)


def _empty_shared(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in shared memory: sending it to another process then copies nothing."""
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)  # what torch's own multiprocessing uses
    if new_shared is None:
        return torch.empty(tuple(shape), dtype=dtype).share_memory_()
    return torch.empty(0, dtype=dtype).set_(new_shared(math.prod(shape) * dtype.itemsize), 0, tuple(shape))


def to_torch(tensor_list, device: torch.device, dtype: Optional[torch.dtype] = None,
             shared: bool = False) -> torch.Tensor:
    """A uniform DALI TensorList (CPU or GPU) -> a new torch tensor on `device`, in one copy (in shared memory if
    `shared` and on the CPU, for a producer process)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tensor_list.as_tensor()
    torch_dtype, shape = _TORCH_DTYPE.get(t.dtype, torch.int64), t.shape()
    if device.type == "cuda":
        out = torch.empty(shape, dtype=torch_dtype, device=device)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device))
    else:
        out = _empty_shared(shape, torch_dtype) if shared else torch.empty(shape, dtype=torch_dtype)
        feed_ndarray(t, out)
    return out if dtype is None or not out.is_floating_point() else out.to(dtype)


def outputs_to_batch(outs, num_clips: int, with_flow: bool, device: torch.device,
                     dtype: Optional[torch.dtype], shared: bool = False) -> Optional[ClipBatch]:
    """Pipeline outputs -> ClipBatch without the placeholder rows of failed videos (None if all failed)."""
    meta = torch.from_numpy(np.array(outs[0].as_tensor())).reshape(-1, 3)
    keep = meta[:, 2].bool()
    skipped = int((~keep).sum())
    if skipped == len(keep):
        return None
    clips = [to_torch(o, device, dtype, shared) for o in outs[1:1 + num_clips * (2 if with_flow else 1)]]
    if skipped:
        sel = keep.nonzero().flatten().to(device)
        clips = [c.index_select(0, sel) for c in clips]
        meta = meta[keep]
    return ClipBatch(rgb=clips[:num_clips], flow=clips[num_clips:] if with_flow else None,
                     label=meta[:, 0].to(device), index=meta[:, 1].to(device), skipped=skipped)


@dataclass
class TrainPipelineSpec:
    """Everything needed to build the training pipeline at any position (picklable: a producer process gets it)."""

    metas: list
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
    official_flow: bool
    blur_window: int
    half_output: bool          # DALI writes fp16 (GPU + AMP), else fp32
    device: torch.device
    torch_dtype: Optional[torch.dtype]
    workers: int

    def pipeline(self, epoch: int, start_batch: int):
        gpu = self.device.type == "cuda"
        src = TrainSource(self.metas, self.clip_lengths, self.stride, self.min_distance, self.augment,
                          self.with_flow, self.seed, self.rank, self.world_size, self.batch_size,
                          self.batches_per_epoch, epoch, start_batch)
        return train_pipeline(src, len(self.clip_lengths), self.with_flow, self.augment.crop, self.official_flow,
                              self.blur_window, types.FLOAT16 if self.half_output else types.FLOAT, gpu,
                              self.workers > 0, batch_size=self.batch_size, num_threads=max(1, self.workers),
                              device_id=device_index(self.device), seed=self.seed, prefetch_queue_depth=2,
                              py_num_workers=max(1, self.workers), py_start_method="spawn" if gpu else "fork")

    def next_position(self, epoch: int, batch: int) -> tuple[int, int]:
        return (epoch, batch + 1) if batch + 1 < self.batches_per_epoch else (epoch + 1, 0)

    def produce(self, epoch: int, batch: int, count: Optional[int] = None, shared: bool = False) -> Iterator[tuple]:
        """("batch", epoch, b, ClipBatch | None) or ("error", epoch, b, reason) for `count` positions from
        (epoch, batch) on (endless when None); after a DALI error the pipeline is rebuilt at the next position.
        `shared`: CPU batches are written into shared memory (a producer process sends them without a copy)."""
        pipe = None
        done = 0
        while count is None or done < count:
            if pipe is None:
                pipe = self.pipeline(epoch, batch)
                pipe.build()
            try:
                outs = pipe.run()
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses with backend messages
                pipe = None
                yield ("error", epoch, batch, _reason(e))
            else:
                yield ("batch", epoch, batch, outputs_to_batch(outs, len(self.clip_lengths), self.with_flow,
                                                                 self.device, self.torch_dtype, shared))
            epoch, batch = self.next_position(epoch, batch)
            done += 1


class _LocalStream:
    """The pipeline in this process (tests, debugging, and where the decoder leak does not matter)."""

    def __init__(self, spec: TrainPipelineSpec, epoch: int, batch: int):
        self._gen = spec.produce(epoch, batch)
        self.left: Optional[int] = None

    def get(self) -> tuple:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()


AHEAD = 2  # batches a producer may send before the trainer has taken them (as a Queue(maxsize=2) would)


def _producer_main(spec: TrainPipelineSpec, epoch: int, batch: int, count: int, out, control) -> None:
    """Send `count` batches on `out`, at most AHEAD untaken; then stay until released (tensors sent by CUDA IPC or
    shared memory must outlive their use in the parent). A closed `control` (parent gone) ends it at once."""
    if spec.device.type == "cuda":
        torch.cuda.set_device(spec.device)
    untaken = 0
    try:
        for msg in spec.produce(epoch, batch, count, shared=True):
            while untaken >= AHEAD:
                control.recv()  # "took"; the parent only ever sends that, or closes (end-of-file)
                untaken -= 1
            out.send(msg)
            untaken += 1
        while True:  # until released (end-of-file)
            control.recv()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return


class _ProcessStream:
    """The pipeline in a child process that exits after `count` batches.

    DALI 1.34's video decoder leaks about 72 KB of host memory per decoded sample (measured here, constant per call;
    DALI issue 5775, fixed upstream in 1.45, which has no cuda110 wheel), i.e. gigabytes per Kinetics epoch. Memory a
    process leaks is returned when it exits, so the pipeline lives in a process that is replaced every `count`
    batches; the next one is started a few batches early, so the switch does not stall training. A producer that
    dies (a decoder crash) costs only the batch it was on, which the CPU loader then decodes.

    Both directions are one-way pipes whose other end only one process holds, so a dead peer shows as end-of-file
    (never a wait on a lock or condition the dead process held, as a multiprocessing Queue or Event can leave).
    """

    def __init__(self, spec: TrainPipelineSpec, epoch: int, batch: int, count: int):
        ctx = torch.multiprocessing.get_context("spawn")
        self.batches, out = ctx.Pipe(duplex=False)
        control_in, self.control = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_producer_main, args=(spec, epoch, batch, count, out, control_in))
        self.proc.start()
        out.close()  # the child holds the only writing end, so its death is end-of-file here
        control_in.close()
        self.left = count
        self.position = (epoch, batch)
        # closed when dropped and at interpreter exit: a waiting producer would otherwise hold up the exit
        self.close = weakref.finalize(self, _release_producer, self.proc, self.batches, self.control)

    def get(self) -> tuple:
        while not self.batches.poll(2.0):
            if not self.proc.is_alive():
                break
        try:
            msg = self.batches.recv()
        except (EOFError, OSError):
            self.proc.join(timeout=5)
            raise ProducerDied(f"DALI producer process exited with code {self.proc.exitcode}") from None
        try:
            self.control.send("took")
        except OSError:
            pass  # it has died since sending; the next get() reports it
        self.left -= 1  # the trainer switches to the next producer when this reaches 0
        return msg


def _release_producer(proc, *ends) -> None:
    for end in ends:
        end.close()  # end-of-file releases the child
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
        proc.join()


class ProducerDied(RuntimeError):
    """The producer process ended without sending its batches (crash or kill)."""


class DaliTrainLoaders:
    """The loader factory the engine calls as factory(epoch, start_batch) -> iterable of ClipBatch.

    Batches come from a stream positioned at (epoch, batch): in-process (`process_batches=0`) or from recycled
    producer processes (`process_batches` batches each). Asking for another position (resume, an epoch cut short)
    restarts the stream there. If DALI fails on a batch, `fallback(epoch, indices)` decodes that batch with the
    CPU loader and the run goes on.
    """

    def __init__(self, spec: TrainPipelineSpec, batch_indices: Callable[[int, int], list[int]],
                 fallback: Optional[Callable[[int, list[int]], Optional[ClipBatch]]] = None,
                 process_batches: int = 0, prestart: int = 4):
        self.spec, self.batches = spec, spec.batches_per_epoch
        self.batch_indices, self.fallback = batch_indices, fallback
        self.process_batches, self.prestart = int(process_batches), int(prestart)
        self._stream = self._spare = None
        self._next: Optional[tuple[int, int]] = None
        self.rebuilds = 0
        self.producers: list = []  # process ids of the producers started (for tests and logs)

    def _open(self, epoch: int, batch: int):
        self.rebuilds += 1
        if self.process_batches <= 0:
            return _LocalStream(self.spec, epoch, batch)
        stream = _ProcessStream(self.spec, epoch, batch, self.process_batches)
        self.producers.append(stream.proc.pid)
        return stream

    def close(self) -> None:
        for s in (self._stream, self._spare):
            if s is not None:
                s.close()
        self._stream = self._spare = None

    def _ensure(self, epoch: int, batch: int) -> None:
        if self._stream is not None and self._next == (epoch, batch) and self._stream.left != 0:
            return
        old, spare = self._stream, self._spare
        self._stream, self._spare = None, None
        if spare is not None and spare.position == (epoch, batch):
            self._stream = spare
        elif spare is not None:
            spare.close()
        if old is not None:
            old.close()
        if self._stream is None:
            self._stream = self._open(epoch, batch)
        self._next = (epoch, batch)

    def _maybe_prestart(self, epoch: int, batch: int) -> None:
        s = self._stream
        threshold = min(self.prestart, self.process_batches // 2)
        if self._spare is None and s.left is not None and s.left == threshold and threshold > 0:
            pos = (epoch, batch)
            for _ in range(s.left):
                pos = self.spec.next_position(*pos)
            self._spare = self._open(*pos)

    def __call__(self, epoch: int, start_batch: int = 0) -> Iterator[Optional[ClipBatch]]:
        return self._iterate(int(epoch), int(start_batch))

    def _iterate(self, epoch: int, start: int) -> Iterator[Optional[ClipBatch]]:
        for b in range(start, self.batches):
            self._ensure(epoch, b)
            self._maybe_prestart(epoch, b)
            try:
                kind, e, bb, payload = self._stream.get()
            except ProducerDied as err:
                kind, e, bb, payload = "error", epoch, b, str(err)
                self._stream.close()
                self._stream = None
            if (e, bb) != (epoch, b):
                raise RuntimeError(f"DALI stream out of step: got batch {(e, bb)}, expected {(epoch, b)}")
            self._next = self.spec.next_position(epoch, b)
            if kind == "error":
                log.warning("DALI failed on epoch %d batch %d (%s); this batch is decoded by the CPU loader",
                            epoch, b, payload)
                batch = self.fallback(epoch, self.batch_indices(epoch, b)) if self.fallback else None
                yield batch if batch is None else batch.to(self.spec.device, self.spec.torch_dtype)
                continue
            yield payload


def _reason(e: Exception) -> str:
    """The informative line of a DALI error (its first lines are a generic header and a C++ location)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("[/")]
    return lines[-1][:300] if lines else type(e).__name__


def device_index(device: torch.device) -> Optional[int]:
    """DALI device_id: the CUDA ordinal, or None for the DALI CPU backend."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


DECODER_LEAK_KB = 72  # measured per decoded sample with nvidia-dali-cuda110 1.34 (tests/test_dali.py checks it)


def producer_batches(setting: int, batch_size: int, with_flow: bool, budget_mb: int = 1024) -> int:
    """Batches per producer process: `setting` if > 0, in-process if < 0, and for 0 (auto) as many as leak about
    `budget_mb` in the decoder."""
    if setting != 0:
        return max(0, setting)
    per_batch_kb = DECODER_LEAK_KB * batch_size * (2 if with_flow else 1)
    return max(50, budget_mb * 1024 // per_batch_kb)


def output_dtype(device: torch.device, amp: str):
    """DALI output dtype, and the torch dtype the batch is finally cast to (None = keep).

    DALI 1.34 has no bfloat16: on the GPU with AMP it writes fp16 (more mantissa than bf16, so no loss) and the
    copy into torch casts to the training dtype."""
    if device.type == "cuda" and amp in ("auto", "bf16", "fp16"):
        return types.FLOAT16, (torch.float16 if amp == "fp16" else torch.bfloat16)
    return types.FLOAT, None


def build_dali_train_loader(cfg, info, root: str | os.PathLike):
    """(factory(epoch, start_batch) -> iterable of ClipBatch, batches per epoch), from the whole config."""
    from dali_pipelines.validate import validate_for_dali
    from goca_fast.config import ConfigError
    from goca_fast.data.cpu_loader import EpochSampler, TrainClipDataset, collate_clips
    from goca_fast.data.index import read_index, select_split
    from goca_fast.pretrain import train_augment

    d = cfg.data
    with_flow = d.modalities != "rgb"
    records, _ = read_index(root)
    train = select_split(records, d.train_split)
    train, _excluded = validate_for_dali(root, train, with_flow, workers=max(1, d.workers),
                                         cache_dir=None, progress=info.is_main)
    per_rank = len(train) // info.world_size
    batches = per_rank // d.batch_size
    if batches < 1:
        raise ConfigError(f"{len(train)} readable training videos cannot fill one batch of {d.batch_size} "
                          f"on each of {info.world_size} ranks")
    augment: ClipAugment = train_augment(cfg)
    out_dtype, torch_dtype = output_dtype(info.device, cfg.engine.amp)
    spec = TrainPipelineSpec(video_metas(root, train), list(cfg.clip_lengths), d.stride, d.min_distance, augment,
                             with_flow, cfg.seed, info.rank, info.world_size, d.batch_size, batches,
                             d.flow_mode == "official", augment.blur_kernel if d.blur_p > 0 else 0,
                             out_dtype == types.FLOAT16, info.device, torch_dtype, d.workers)
    gpu = info.device.type == "cuda"

    def batch_indices(epoch: int, b: int) -> list[int]:
        sampler = EpochSampler(len(train), info.rank, info.world_size, cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return sampler.rank_indices()[b * d.batch_size:(b + 1) * d.batch_size]

    cpu_ds = TrainClipDataset(root, train, cfg.clip_lengths, d.stride, d.min_distance, augment, with_flow, cfg.seed)

    def fallback(epoch: int, indices: list[int]) -> Optional[ClipBatch]:
        cpu_ds.set_epoch(epoch)
        return collate_clips([cpu_ds[i] for i in indices])

    loaders = DaliTrainLoaders(spec, batch_indices, fallback, producer_batches(d.dali_process_batches,
                                                                              d.batch_size, with_flow))
    log.info("DALI %s loader: %d videos, %d batches per epoch per rank", "GPU" if gpu else "CPU", len(train),
             batches)
    return loaders, batches
