"""The training loop: AMP, LARC/SGD step, prototype normalisation, queue, logging, checkpoints, exact resume.

Exact resume rests on three facts: the data order and every augmentation draw are functions of
(seed, epoch, video index) only (see goca_fast.data.cpu_loader), checkpoints are written at iteration boundaries
with everything that changes during training (model, optimiser, scaler, queue, RNG states of every rank,
epoch + iteration), and nothing else in a step is random.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from goca_fast.train import checkpoint as ckpt
from goca_fast.data.batch import ClipBatch
from goca_fast.runtime.distributed import DistInfo, all_reduce_sum
from goca_fast.models import GocaModel, prototype_separation
from goca_fast.method.objective import GocaObjective, ObjectiveResult
from goca_fast.train.optim import OptimSettings, set_lr
from goca_fast.method.queue import FeatureQueue, local_queue_length
from goca_fast.train.run_dir import RunDirectory

log = logging.getLogger("goca_fast")

LoaderFactory = Callable[[int, int], Iterable[ClipBatch]]  # (epoch, start_batch) → batches of that epoch


@dataclass(frozen=True)
class TrainLoader:
    """A training loader as the engine sees it: batches of any epoch from any position, and how many per epoch."""

    make: LoaderFactory
    batches_per_epoch: int          # per process


class TrainingDiverged(RuntimeError):
    """Raised after `engine.max_bad_steps` consecutive non-finite losses."""


def clips_of(batch: ClipBatch, streams: list[str]) -> dict[str, list[torch.Tensor]]:
    out = {"rgb": batch.rgb}
    if "flow" in streams:
        if batch.flow is None:
            raise ValueError("the model has a flow stream but the loader returned no flow")
        out["flow"] = batch.flow
    return {s: out[s] for s in streams}


def code_statistics(result: ObjectiveResult, num_prototypes: int) -> dict[str, float]:
    """Prototype-usage entropy (1 = uniform use of all K) and RGB–flow argmax agreement of the codes."""
    stats: dict[str, float] = {}
    all_codes = [q for per in result.codes.values() for q in per.values()]
    if not all_codes:
        return stats
    hist = torch.bincount(torch.cat([q.argmax(1) for q in all_codes]), minlength=num_prototypes).float()
    p = hist / hist.sum()
    stats["proto_usage_entropy"] = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(num_prototypes))
    if "rgb" in result.codes and "flow" in result.codes:
        agree = [(result.codes["rgb"][i].argmax(1) == result.codes["flow"][i].argmax(1)).float().mean()
                 for i in result.codes["rgb"]]
        stats["rgb_flow_agreement"] = float(torch.stack(agree).mean())
    return stats


@dataclass
class TrainState:
    epoch: int = 0        # current epoch
    iteration: int = 0    # batches of `epoch` already consumed
    step: int = 0         # global optimiser steps attempted
    bad_in_row: int = 0
    bad_total: int = 0
    skipped_videos: int = 0


class NothingTrained(RuntimeError):
    """An epoch made no optimiser step (every batch skipped): nothing may be saved or reported as trained."""


@dataclass(frozen=True)
class LoopSettings:
    """How the training loop runs, as plain values (made by `goca_fast.plan` from the config)."""

    epochs: int
    batch_size: int                 # per process
    max_iters_per_epoch: int        # 0 = full epochs
    max_bad_steps: int              # consecutive non-finite losses before aborting
    checkpoint_minutes: float       # also write `latest` mid-epoch this often (0 = only at epoch ends)
    checkpoint_every_iters: int     # also write `latest` every N iterations (0 = off)
    snapshot_every_epochs: int
    log_every: int
    tensorboard: bool
    progress: bool
    channels_last: bool
    sync_bn: bool
    prototype_reg_weight: float
    freeze_prototypes_epochs: int
    freeze_prototypes_iters: int
    queue_length: int               # global; 0 = no queue
    queue_start_epoch: int


class Trainer:
    """Owns the model, optimiser and state of one pretraining run (one process of it)."""

    def __init__(self, *, model: GocaModel, objective: GocaObjective, optim: OptimSettings, loop: LoopSettings,
                 info: DistInfo, run_dir: Path, loader: TrainLoader, amp: Optional[torch.dtype], config: dict):
        """`model` freshly built (it is moved, converted and wrapped here); `config` is stored in checkpoints."""
        self.loop, self.info, self.run_dir, self.config = loop, info, Path(run_dir), config
        self.make_loader = loader.make
        limit, batches = loop.max_iters_per_epoch, loader.batches_per_epoch
        self.iters_per_epoch = min(batches, limit) if limit > 0 else batches
        if self.iters_per_epoch < 1:
            raise ValueError("the training split yields no full batch: lower data.batch_size or add videos")
        self.device = info.device
        self.amp = amp

        model = model.to(self.device)
        if loop.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        if info.enabled and loop.sync_bn:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif info.is_main:
                log.info("model.sync_bn: SyncBatchNorm needs CUDA; CPU processes keep per-process BatchNorm")
        self.model: GocaModel = model
        self.ddp = (nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None) if info.enabled else None)
        self.lr = optim.schedule(self.iters_per_epoch, loop.batch_size * info.world_size)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = optim.optimizer(params, float(self.lr[0]))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.objective = objective
        self.num_prototypes, self.embed_dim = model.prototypes.weight.shape
        self.queue: Optional[FeatureQueue] = None
        self.state = TrainState()
        self.run = RunDirectory(self.run_dir, info)
        self.writer = None
        self.timer = ckpt.CheckpointTimer(loop.checkpoint_minutes or None)
        self.monitor = None  # optional goca_fast.eval.monitor.KnnMonitor, set by pretrain (rank 0 only)
        self.current_lr = float(self.lr[0])

    # ------------------------------------------------------------------ queue
    def _maybe_create_queue(self) -> None:
        lp = self.loop
        if self.queue is not None or lp.queue_length <= 0 or self.state.epoch < lp.queue_start_epoch:
            return
        length = local_queue_length(lp.queue_length, lp.batch_size, self.info.world_size)
        if length <= 0:
            raise ValueError(f"goca.queue_length={lp.queue_length} is shorter than one global batch")
        streams, slots = self.objective.queue_shape(len(self.model.streams))
        self.queue = FeatureQueue(streams, slots, length, int(self.embed_dim), self.device)

    @property
    def signals(self):
        """The run's stop flag (`goca_fast.runtime.stop_signals.StopSignals`)."""
        return self.run.signals

    # ------------------------------------------------------------------ checkpoints
    def save(self, snapshot: bool = False) -> None:
        """Write `latest` (and a numbered snapshot) atomically. Collective: every rank's RNG state and feature queue
        (each rank queues the embeddings of its own share of the past global batches) go into rank 0's file."""
        s = self.state
        self.run.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "scaler": self.scaler.state_dict(), "queue": None, "epoch": s.epoch, "iteration": s.iteration,
                       "step": s.step, "bad_total": s.bad_total, "skipped_videos": s.skipped_videos,
                       "world_size": self.info.world_size, "config": self.config},
                      per_rank=None if self.queue is None else {"queue": self.queue.state_dict()},
                      snapshot_epoch=s.epoch if snapshot else None)
        self.timer.reset()

    def resume(self, path: Optional[Path] = None) -> bool:
        """Restore everything from `path` or the run directory's latest valid checkpoint; False if none."""
        path = path or self.run.latest()
        if path is None:
            return False
        state = ckpt.load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(ckpt.strip_ddp_prefix(state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        s = self.state
        s.epoch, s.iteration, s.step = state["epoch"], state["iteration"], state["step"]
        s.bad_total, s.skipped_videos = state["bad_total"], state["skipped_videos"]
        if state["queue"] is not None:
            self._maybe_create_queue()
            if self.queue is None:
                raise ValueError(f"{path} holds a feature queue but this config has none (goca.queue_length)")
            queues = state["queue"] if isinstance(state["queue"], list) else [state["queue"]]  # older: rank 0's only
            if len(queues) == self.info.world_size:
                self.queue.load_state_dict(queues[self.info.rank])
            elif self.info.is_main:
                log.warning("%s holds the feature queues of %d rank(s), this run has %d: the queue starts empty and "
                            "is used again once refilled", path, len(queues), self.info.world_size)
        self.run.restore_rng(state)
        if self.info.is_main:
            log.info("resumed from %s at epoch %d, iteration %d", path, s.epoch, s.iteration)
        return True

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1 and Ctrl-C stop at the next batch boundary with a checkpoint (goca_fast.runtime.stop_signals)."""
        self.signals.install()

    # ------------------------------------------------------------------ one step
    def global_iteration(self) -> int:
        """epoch·iters_per_epoch + batches of this epoch already consumed: the official schedule index.

        Unlike the optimiser-step count it does not drift when a step is skipped (non-finite loss, unreadable
        batch) or a loader ends an epoch early, and it is restored exactly on resume."""
        return self.state.epoch * self.iters_per_epoch + self.state.iteration

    def _freeze_prototypes(self) -> bool:
        lp = self.loop
        return (self.model.prototypes.frozen or self.state.epoch < lp.freeze_prototypes_epochs
                or self.global_iteration() < lp.freeze_prototypes_iters)

    def train_step(self, batch: ClipBatch) -> tuple[Optional[float], dict[str, float]]:
        """One optimiser step; returns (loss or None when skipped as non-finite, statistics)."""
        model = self.model
        net = self.ddp or model
        self.current_lr = float(self.lr[min(self.global_iteration(), len(self.lr) - 1)])
        set_lr(self.optimizer, self.current_lr)
        model.prototypes.normalize_()
        batch = batch.to(self.device)
        clips = clips_of(batch, model.streams)
        if self.loop.channels_last:
            clips = {s: [c.contiguous(memory_format=torch.channels_last_3d) for c in v] for s, v in clips.items()}
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            outputs = net(clips)
        self._maybe_create_queue()
        result = self.objective(outputs, model.prototypes.weight, self.state.epoch, self.queue)
        loss = result.loss
        reg = torch.zeros((), device=self.device)
        if self.loop.prototype_reg_weight > 0 and not model.prototypes.frozen:
            reg = prototype_separation(model.prototypes.weight)
            loss = loss + self.loop.prototype_reg_weight * reg
        # one all-reduce for two things: every rank must agree to skip, or DDP's gradient all-reduce would hang; and
        # the loss reported is the global batch's (the mean of the ranks' equal-sized batch means), as one process
        # with the whole batch would report it, not rank 0's share
        bad, loss_sum = all_reduce_sum(torch.stack([(~torch.isfinite(loss)).float(), loss.detach().float()]),
                                       self.info)
        self.optimizer.zero_grad(set_to_none=True)
        stats = code_statistics(result, int(self.num_prototypes))
        stats["prototype_separation"] = float(reg)
        self.state.step += 1
        if bad.item() > 0:
            self.state.bad_in_row += 1
            self.state.bad_total += 1
            if self.state.bad_in_row >= self.loop.max_bad_steps:
                raise TrainingDiverged(
                    f"loss was NaN/inf for {self.state.bad_in_row} steps in a row (epoch {self.state.epoch}, "
                    f"step {self.state.step}); lower optim.base_lr, check the data, or try engine.amp=off")
            return None, stats
        self.state.bad_in_row = 0
        if result.queue_update is not None:
            self.queue.push(result.queue_update)
        self.scaler.scale(loss).backward()
        if self._freeze_prototypes():
            model.prototypes.weight.grad = None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss_sum) / self.info.world_size, stats

    # ------------------------------------------------------------------ loop
    def _log_scalars(self, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, self.state.step)

    def fit(self) -> dict:
        """Train until `optim.epochs`; returns a summary. Raises StopRequested after a signal (checkpoint saved)."""
        lp = self.loop
        if lp.tensorboard:
            self.writer = self.run.tensorboard(purge_step=self.state.step)
        summary: dict = {}
        try:
            while self.state.epoch < lp.epochs:
                whole_epoch = self.state.iteration == 0
                summary = self._run_epoch()
                if whole_epoch and summary["optimizer_steps"] == 0:
                    raise NothingTrained(
                        f"epoch {self.state.epoch + 1} made no optimiser step: every batch was skipped "
                        f"({self.state.skipped_videos} videos unreadable or incomplete, {self.state.bad_total} "
                        f"non-finite losses so far); nothing was saved for it. Check the data (goca-prepare --check, "
                        f"goca-flow) and the log lines above")
                if self.monitor is not None and self.info.is_main:
                    r1 = self.monitor.maybe_run(self.model, self.state.epoch, self.writer, step=self.state.step)
                    if r1 is not None:
                        summary["knn_r1"] = r1
                        summary["monitor_seconds"] = round(self.monitor.last_seconds, 3)
                self.run.append_metrics(summary)
                if self.info.is_main:
                    log.info("epoch %d/%d: loss %.4f over %d steps, %.1f clips/s, data wait %.0f %%, %d videos "
                             "skipped so far", summary["epoch"], lp.epochs, summary["loss"],
                             summary["optimizer_steps"], summary["clips_per_s"], 100 * summary["data_time_frac"],
                             summary["skipped_videos"])
                self.state.epoch += 1
                self.state.iteration = 0
                every = lp.snapshot_every_epochs
                snap = (every > 0 and self.state.epoch % every == 0) or self.state.epoch == lp.epochs
                self.save(snapshot=snap)
        finally:
            if self.writer is not None:
                self.writer.flush()
        return summary

    def _run_epoch(self) -> dict:
        lp, s = self.loop, self.state
        n = self.iters_per_epoch
        bar = None
        if self.info.is_main and lp.progress and sys.stderr.isatty():  # a log file gets the epoch line
            bar = tqdm(total=n, initial=s.iteration, desc=f"epoch {s.epoch + 1}/{lp.epochs}",
                       dynamic_ncols=True, leave=True)
        losses: list[float] = []
        data_time = step_time = 0.0
        clips_done = 0
        self.model.train()
        t_start = time.perf_counter()
        loader = iter(self.make_loader(s.epoch, s.iteration))
        t_end = time.perf_counter()
        while s.iteration < n:
            self.run.stop_if_requested(self.save)
            try:
                batch = next(loader)
            except StopIteration:
                break
            t_data = time.perf_counter()
            if t_start is not None:
                if self.info.is_main:
                    log.info("first batch of epoch %d ready %.1f s after its loader was started", s.epoch + 1,
                             t_data - t_start)
                t_start = None
            if batch is None:  # every video of this batch was unreadable (each reported by the loader)
                s.skipped_videos += lp.batch_size
                s.iteration += 1
                t_end = time.perf_counter()
                continue
            s.skipped_videos += batch.skipped
            loss, stats = self.train_step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t_step = time.perf_counter()
            dt, iter_time = t_data - t_end, t_step - t_end
            data_time += dt
            step_time += iter_time
            clips = batch.batch_size * len(batch.rgb) * self.info.world_size
            clips_done += clips
            t_end = t_step
            s.iteration += 1
            if loss is not None:
                losses.append(loss)
            scalars = {"loss": loss if loss is not None else float("nan"), "lr": self.current_lr,
                       "clips_per_s": clips / max(iter_time, 1e-9), "data_time": dt,
                       "skipped_videos": s.skipped_videos, "bad_steps": s.bad_total, **stats}
            if s.step % max(lp.log_every, 1) == 0 or s.iteration == n:
                self._log_scalars(scalars)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{scalars['loss']:.3f}", lr=f"{scalars['lr']:.3g}",
                                clips_s=f"{clips_done / max(step_time, 1e-9):.1f}", data=f"{dt:.2f}s")
            if s.iteration < n and self._checkpoint_due():
                self.save()
        if bar is not None:
            bar.close()
        return {"epoch": s.epoch + 1, "loss": sum(losses) / max(len(losses), 1), "iterations": s.iteration,
                "optimizer_steps": len(losses),
                "clips_per_s": clips_done / max(step_time, 1e-9), "data_time_frac": data_time / max(step_time, 1e-9),
                "skipped_videos": s.skipped_videos, "bad_steps": s.bad_total}

    def _checkpoint_due(self) -> bool:
        every = self.loop.checkpoint_every_iters
        due = (every > 0 and self.state.step % every == 0) or self.timer.due()
        if self.info.enabled:  # decided on rank 0, so that every rank enters the gather in save()
            flag = torch.tensor([1.0 if due else 0.0], device=self.device)
            dist.broadcast(flag, 0)
            due = bool(flag.item())
        return due
