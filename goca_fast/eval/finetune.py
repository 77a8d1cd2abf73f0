"""End-to-end fine-tuning for action recognition, CoCLR-style (the recipe: `goca_fast.eval.finetune_recipe`).

Each stream's pretrained backbone gets a classifier (BN1d → dropout → Linear, the `RegLog` of the linear probe) and
the whole network is trained with SGD; the backbone's LR is the classifier's / 10; linear warm-up, then a step
schedule (×0.1 at epochs 60 and 80, the official eval milestones) or cosine to 0. Both streams train in one run on
the same clips (their losses are summed and nothing is shared, so each stream learns as it would alone on those
clips, at half the decoding cost) and are reported alone and late-fused (class probabilities averaged), as CoCLR
reports two-stream results. Test: 10 uniformly spaced clips × 3 crops per video, softmax averaged over views.

AMP and DDP as in pretraining (`torchrun ... -m goca_fast.eval finetune ...`; SyncBN under DDP on GPUs). The run
directory holds checkpoints/latest.pth (every epoch, and on SIGTERM/SIGUSR1 at the next batch), tensorboard/,
metrics.jsonl and finetune.json; starting the same command again resumes exactly (data order and augmentation are
functions of seed, epoch and video; RNG states are saved, `goca_fast.train.run_dir`). Its `model` state dict uses
GocaModel's backbone key names, so `goca-eval knn` / `export` also work on a fine-tuned checkpoint.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from goca_fast.train import checkpoint as ckpt
from goca_fast.train.checkpoint import preserve_rng
from goca_fast.data.augment import ClipAugment
from goca_fast.data.cpu_loader import (EvalClipDataset, TrainClipDataset, batches_per_rank, make_eval_loader,
                                       make_train_loader)
from goca_fast.runtime.device import resolve_amp
from goca_fast.runtime.distributed import DistInfo, cleanup
from goca_fast.data.index import read_index
from goca_fast.data.views import plural
from goca_fast.eval import EvalError
from goca_fast.eval.finetune_recipe import (FinetuneModel, FinetuneResult, FinetuneSettings, finetune_lr,
                                            param_groups)
from goca_fast.eval.linear import BOTH, fuse_probabilities, topk_accuracy
from goca_fast.eval.loading import EvalSetup
from goca_fast.eval.splits import check_disjoint_records, class_check, split_records
from goca_fast.train.run_dir import RunDirectory, StopRequested
from goca_fast.runtime.stop_signals import RunStopped

log = logging.getLogger("goca_fast.eval")


@dataclass
class FinetuneStart:
    """Where a fine-tuning run starts (made by `goca_fast.plan.evaluation.finetune_start`)."""

    info: DistInfo
    setup: EvalSetup                          # the pretrained checkpoint (fresh) and its config's defaults
    run_dir: Path
    resume: Optional[tuple[Path, dict]] = None  # the run's own checkpoint and its state, to continue from


def find_resume(run_dir: Path) -> Optional[tuple[Path, dict]]:
    """The fine-tuning checkpoint in `run_dir` to continue from, or None; another kind of run there is an error."""
    path = ckpt.find_latest(run_dir)
    if path is None:
        return None
    state = ckpt.load_checkpoint(path, map_location="cpu")
    if state.get("kind") != "finetune":
        raise EvalError(f"{run_dir} holds a {state.get('kind', 'pretraining')} run, not a fine-tuning one; choose "
                        f"another --out")
    return path, state


def finetune_augment(setup: EvalSetup, settings: FinetuneSettings) -> ClipAugment:
    """Fine-tuning's clip augmentation: the pretraining geometry and flip rate (0 where a mirror changes the
    class), the recipe's colour changes."""
    return ClipAugment(crop_size=setup.crop_size, scale_range=setup.scale_range, hflip_prob=setup.hflip_prob,
                       jitter_prob=settings.color_jitter_p, grayscale_prob=settings.grayscale_p,
                       flow_mode=setup.views.flow_mode)


class Finetuner:
    """One fine-tuning run (one process of it): `Finetuner.fresh` from a pretrained checkpoint, or
    `Finetuner.resumed` from the run's own checkpoint."""

    def __init__(self, start: FinetuneStart, settings: FinetuneSettings, streams: list[str], source: str):
        """What both paths build alike: data, a freshly initialised network (from the global RNG as it stands),
        its placement, optimiser and scaler. Use `fresh` or `resumed`."""
        self.info, self.setup, self.settings = start.info, start.setup, settings
        self.device = self.info.device
        self.run = RunDirectory(start.run_dir, self.info)
        self.streams, self.source = streams, source
        setup, s = self.setup, settings
        index = read_index(setup.root)
        self.train_recs = split_records(setup.root, setup.train_split, streams, index)
        self.test_recs = split_records(setup.root, setup.test_split, streams, index)
        check_disjoint_records(self.train_recs, self.test_recs, roles=("train", "test"))
        self.classes = self.train_recs.classes
        self.warnings = class_check([r.label for r in self.train_recs.records],
                                    [r.label for r in self.test_recs.records], self.classes, setup.train_split,
                                    setup.test_split)
        template = setup.new_model()
        backbones = nn.ModuleDict({st: template.backbones[st] for st in streams})
        self.model = FinetuneModel(backbones, template.feature_dim, len(self.classes), s.dropout)
        self.epoch, self.iteration, self.step = 0, 0, 0
        self.history: list[dict] = []

    def _place(self) -> None:
        """Device, SyncBN and DDP, then the optimiser over the placed parameters."""
        s = self.settings
        model = self.model.to(self.device)
        if self.info.enabled and self.device.type == "cuda":  # SyncBN needs CUDA; CPU ranks keep per-rank BN
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[self.device]
                                                        if self.device.type == "cuda" else None)
                    if self.info.enabled else None)
        self.optimizer = torch.optim.SGD(param_groups(model, s.lr, s.backbone_lr_ratio), lr=s.lr,
                                         momentum=s.momentum, weight_decay=s.weight_decay)
        self.amp = resolve_amp(s.amp, self.device, "--amp")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.dataset = self._train_dataset()
        self.iters = batches_per_rank(len(self.dataset), self.info.world_size, s.batch_size)
        if s.max_iters_per_epoch > 0:
            self.iters = min(self.iters, s.max_iters_per_epoch)
        if self.iters < 1:
            raise EvalError(f"finetune: the train split ({len(self.dataset)} videos) yields no full batch of "
                            f"{s.batch_size} per process; lower --batch-size")

    @classmethod
    def fresh(cls, start: FinetuneStart, settings: FinetuneSettings) -> "Finetuner":
        """A new run: classifier init and dropout reproducible from `settings.seed`, backbones pretrained."""
        s, loaded = settings.check(), start.setup.loaded
        random.seed(s.seed)
        np.random.seed(s.seed)
        torch.manual_seed(s.seed)
        ft = cls(start, s, loaded.streams, str(loaded.checkpoint))
        for st in ft.streams:
            ft.model.backbones[st].load_state_dict(loaded.model.backbones[st].state_dict())
        torch.manual_seed(s.seed + ft.info.rank)  # dropout masks differ between ranks
        ft._place()
        return ft

    @classmethod
    def resumed(cls, start: FinetuneStart, settings: FinetuneSettings) -> "Finetuner":
        """The run continued exactly where its checkpoint stopped (weights, optimiser, scaler, counters, RNG)."""
        path, state = start.resume
        saved = {**state["finetune"], "milestones": tuple(state["finetune"]["milestones"])}
        new = asdict(settings.check())
        changed = [k for k in new if k in saved and saved[k] != new[k]]
        if changed:
            log.warning("resuming %s with changed settings: %s", path,
                        ", ".join(f"{k} {saved[k]} -> {new[k]}" for k in changed))
        ft = cls(start, settings, list(state["streams"]), state.get("source_checkpoint", ""))
        ft.model.load_state_dict(state["model"])
        ft._place()
        ft.optimizer.load_state_dict(state["optimizer"])
        ft.scaler.load_state_dict(state["scaler"])
        ft.epoch, ft.iteration, ft.step = state["epoch"], state["iteration"], state["step"]
        ft.history = list(state.get("history", []))
        ft.run.restore_rng(state)
        if ft.info.is_main:
            log.info("resumed fine-tuning from %s at epoch %d, iteration %d", path, ft.epoch, ft.iteration)
        return ft

    # ------------------------------------------------------------------------------------------ data
    def _train_dataset(self) -> TrainClipDataset:
        s, setup = self.settings, self.setup
        aug = finetune_augment(setup, s)
        return TrainClipDataset(setup.root, self.train_recs.records, clip_lengths=[setup.views.clip_length],
                                stride=setup.views.stride, min_distance=0, augment=aug,
                                with_flow="flow" in self.streams, seed=s.seed, min_frames=1)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        self.run.save({"kind": "finetune", "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                       "scaler": self.scaler.state_dict(), "epoch": self.epoch, "iteration": self.iteration,
                       "step": self.step, "config": self.setup.config, "finetune": asdict(self.settings),
                       "streams": self.streams, "classes": self.classes, "source_checkpoint": self.source,
                       "history": self.history})

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> FinetuneResult:
        """Train to `epochs` (resuming where the run directory stopped), then run the full test. Raises
        StopRequested after a stop signal (checkpoint written)."""
        s = self.settings
        t0 = time.time()
        self.run.signals.install()
        writer = None
        if self.info.is_main:
            self.run.path.mkdir(parents=True, exist_ok=True)
            writer = self.run.tensorboard(purge_step=self.step)
        try:
            while self.epoch < s.epochs:
                entry = self._train_epoch(writer)
                if s.eval_every > 0 and self.epoch % s.eval_every == 0 and self.epoch < s.epochs:
                    with preserve_rng():
                        acc, _ = self.evaluate(clips=1, crops=1)
                    entry["val_top1"] = {k: v[1] for k, v in acc.items()}
                    if writer is not None:
                        for k, v in acc.items():
                            writer.add_scalar(f"finetune/val_top1_{k}", v[1], self.epoch)
                self.history.append(entry)
                if self.info.is_main:
                    log.info("finetune epoch %d/%d: %s", self.epoch, s.epochs, json.dumps(entry))
                self.run.append_metrics(entry)
                self.save()
        finally:
            if writer is not None:
                writer.flush()
            self.run.signals.restore()
        acc, counts = self.evaluate(s.test_clips, s.test_crops)
        if writer is not None:
            for k, v in acc.items():
                writer.add_scalar(f"finetune/test_top1_{k}", v[1], self.epoch)
            writer.close()
        protocol = {"train_split": self.setup.train_split, "test_split": self.setup.test_split,
                    "test": f"{plural(s.test_clips, 'clip')} × {plural(s.test_crops, 'crop')} of "
                            f"{plural(self.setup.views.clip_length, 'frame')}, "
                            f"softmax averaged over views; two streams late-fused (probabilities averaged)",
                    "settings": asdict(s), "source_checkpoint": self.source, "arch": self.setup.arch,
                    "dataset": str(self.setup.root), "world_size": self.info.world_size,
                    "num_classes": len(self.classes)}
        return FinetuneResult(acc, counts, protocol, self.history, self.warnings, time.time() - t0)

    def _train_epoch(self, writer) -> dict:
        """The rest of the current epoch; returns its history entry (loss and videos over all ranks)."""
        s, net = self.settings, self.ddp or self.model
        self.model.train()
        losses, seen = [], 0
        loader = make_train_loader(self.dataset, s.batch_size, self.setup.workers, rank=self.info.rank,
                                   world_size=self.info.world_size, seed=s.seed, epoch=self.epoch,
                                   start_batch=self.iteration)
        with preserve_rng():  # an iterator draws a seed from torch's RNG: keep resume exact mid-epoch
            it = iter(loader)
        while self.iteration < self.iters:
            self.run.stop_if_requested(self.save)
            try:
                batch = next(it)
            except StopIteration:
                break
            progress = self.epoch + self.iteration / self.iters
            for g in self.optimizer.param_groups:
                g["lr"] = finetune_lr(g["base_lr"], progress, s.epochs, s.warmup_epochs, s.schedule,
                                      s.milestones, s.gamma)
            if batch is not None and batch.batch_size >= 2:
                loss = self._train_step(net, batch)
                losses.append(loss)
                seen += batch.batch_size
                if writer is not None:
                    writer.add_scalar("finetune/loss", loss, self.step)
                    writer.add_scalar("finetune/lr", self.optimizer.param_groups[1]["lr"], self.step)
            self.iteration += 1
            self.step += 1
        self.epoch += 1
        self.iteration = 0
        tot = torch.tensor([sum(losses), len(losses), seen], dtype=torch.float64, device=self.device)
        if self.info.enabled:
            dist.all_reduce(tot)
        return {"epoch": self.epoch, "loss": float(tot[0] / max(tot[1], 1)), "videos": int(tot[2])}

    def _train_step(self, net: nn.Module, batch) -> float:
        clips = {st: getattr(batch, st)[0].to(self.device, non_blocking=True) for st in self.streams}
        y = batch.label.to(self.device)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            logits = net(clips)
        loss = sum(F.cross_entropy(logits[st].float(), y) for st in self.streams)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, clips: int, crops: int) -> tuple[dict[str, dict[int, float]], dict[str, int]]:
        """Top-1/5 per stream and late-fused over `clips` × `crops` views per test video (sharded over ranks)."""
        views = replace(self.setup.views, num_clips=clips, crops=crops)
        ds = EvalClipDataset(self.setup.root, self.test_recs.records, views, with_flow="flow" in self.streams)
        loader = make_eval_loader(ds, max(1, self.settings.batch_size // max(1, clips * crops)), self.setup.workers,
                                  rank=self.info.rank, world_size=self.info.world_size)
        self.model.eval()
        probs: dict[str, list[torch.Tensor]] = {st: [] for st in self.streams}
        index, labels, padded = [], [], []
        for b in loader:
            if b is None:
                continue
            n, v = b.rgb.shape[:2]
            x = {st: getattr(b, st).flatten(0, 1).to(self.device, non_blocking=True) for st in self.streams}
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                logits = self.model(x)
            for st in self.streams:
                probs[st].append(F.softmax(logits[st].float(), dim=1).view(n, v, -1).mean(1).cpu())
            index.append(b.index)
            labels.append(b.label)
            padded.append(b.padded)
        self.model.train()
        local = {"probs": {st: torch.cat(p) if p else torch.empty(0, len(self.classes)) for st, p in probs.items()},
                 "index": torch.cat(index) if index else torch.empty(0, dtype=torch.int64),
                 "labels": torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64),
                 "padded": torch.cat(padded) if padded else torch.empty(0, dtype=torch.bool)}
        parts = [local]
        if self.info.enabled:
            parts = [None] * self.info.world_size
            dist.all_gather_object(parts, local)
        index = torch.cat([p["index"] for p in parts])
        if index.numel() == 0:
            raise EvalError(f"finetune: none of the {len(self.test_recs.records)} test videos could be decoded")
        labels = torch.cat([p["labels"] for p in parts])
        per = {st: torch.cat([p["probs"][st] for p in parts]) for st in self.streams}
        acc = {st: topk_accuracy(p, labels) for st, p in per.items()}
        if len(self.streams) == 2:
            acc[BOTH] = topk_accuracy(fuse_probabilities(per), labels)
        got = set(index.tolist())
        counts = {"videos": self.test_recs.total, "evaluated": len(got), "missing_files": len(self.test_recs.missing),
                  "unreadable": len(self.test_recs.records) - len(got),
                  "padded_short": int(torch.cat([p["padded"] for p in parts]).sum())}
        return acc, counts


def run_finetune(start: FinetuneStart, settings: Optional[FinetuneSettings] = None, *,
                 quiet: bool = False) -> FinetuneResult:
    """`goca-eval finetune`: train (or resume) and test; writes finetune.json in the run directory.

    Raises RunStopped when stopped by a signal or Ctrl-C (a checkpoint was written; the same command resumes)."""
    settings = settings or FinetuneSettings()
    try:
        ft = (Finetuner.fresh if start.resume is None else Finetuner.resumed)(start, settings)
        res = ft.fit()
    except StopRequested:
        raise RunStopped(ft.run.signals, str(start.run_dir / "checkpoints")) from None
    finally:
        cleanup(start.info)
    if start.info.is_main:
        (start.run_dir / "finetune.json").write_text(json.dumps(res.to_json(), indent=2))
        if not quiet:
            print(f"Fine-tuning ({plural(ft.settings.epochs, 'epoch')}, {', '.join(ft.streams)}):\n"
                  f"{res.table(start.setup.name)}\n"
                  f"written: {start.run_dir / 'finetune.json'}")
    return res
