"""End-to-end fine-tuning for action recognition, CoCLR-style.

Each stream's pretrained backbone gets a classifier (BN1d → dropout → Linear, the `RegLog` of the linear probe) and
the whole network is trained with SGD; the backbone's LR is the classifier's / 10; linear warm-up, then a step
schedule (×0.1 at epochs 60 and 80, the official eval milestones) or cosine to 0. Both streams train in one run on
the same clips (their losses are summed and nothing is shared, so each stream learns as it would alone on those
clips, at half the decoding cost) and are reported alone and late-fused (class probabilities averaged), as CoCLR
reports two-stream results. Test: 10 uniformly spaced clips × 3 crops per video, softmax averaged over views.

AMP and DDP as in pretraining (`torchrun ... -m goca_fast.eval finetune ...`; SyncBN under DDP on GPUs). The run
directory holds checkpoints/latest.pth (every epoch, and on SIGTERM/SIGUSR1 at the next batch), tensorboard/,
metrics.jsonl and finetune.json; starting the same command again resumes exactly (data order and augmentation are
functions of seed, epoch and video; RNG states are saved). Its `model` state dict uses GocaModel's backbone key
names, so `goca-eval knn` / `export` also work on a fine-tuned checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from goca_fast import checkpoint as ckpt
from goca_fast.builders import build_model
from goca_fast.stop_signals import RunStopped, StopSignals
from goca_fast.eval.common import (EvalError, check_disjoint_records, class_check, config_from_dict, dataset_root_for,
                                   default_output_dir, load_model, preserve_rng, resolve_amp, split_records,
                                   plural, view_spec_from_config)
from goca_fast.eval.linear import BOTH, RegLog, accuracy_table, fuse_probabilities, topk_accuracy

log = logging.getLogger("goca_fast.eval")


@dataclass
class FinetuneSettings:
    """The fine-tuning recipe. lr is the classifier's (per process batch `batch_size`); the backbone gets
    lr × backbone_lr_ratio."""

    epochs: int = 100
    lr: float = 0.1
    backbone_lr_ratio: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 16
    warmup_epochs: float = 5.0
    schedule: str = "step"              # "step" | "cosine"
    milestones: tuple[int, ...] = (60, 80)
    gamma: float = 0.1
    dropout: float = 0.5
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    test_clips: int = 10
    test_crops: int = 3
    eval_every: int = 0                 # epochs between cheap (1 clip × 1 crop) validations; 0 = only the final test
    amp: str = "auto"
    seed: int = 0
    max_iters_per_epoch: int = 0        # 0 = full epochs (smoke tests cut them short)

    def check(self) -> "FinetuneSettings":
        if self.epochs < 1 or self.batch_size < 1:
            raise EvalError("finetune: epochs and batch size must be >= 1")
        if not self.lr > 0 or not 0 < self.backbone_lr_ratio <= 1 or self.weight_decay < 0:
            raise EvalError("finetune: lr must be > 0, backbone_lr_ratio in (0, 1] and weight decay >= 0")
        if self.schedule not in ("step", "cosine"):
            raise EvalError(f"finetune: schedule must be step or cosine, got {self.schedule!r}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise EvalError(f"finetune: warmup epochs ({self.warmup_epochs}) must lie in [0, epochs ({self.epochs})]")
        if not 0 <= self.dropout < 1:
            raise EvalError(f"finetune: dropout must lie in [0, 1), got {self.dropout}")
        if self.test_crops not in (1, 3) or self.test_clips < 1:
            raise EvalError("finetune: test_clips must be >= 1 and test_crops 1 or 3")
        return self


def finetune_lr(base: float, progress: float, epochs: int, warmup_epochs: float, schedule: str,
                milestones: Sequence[int] = (60, 80), gamma: float = 0.1) -> float:
    """LR at `progress` epochs (fractional): linear warm-up, then step (×gamma per milestone) or cosine to 0."""
    if warmup_epochs > 0 and progress < warmup_epochs:
        return base * max(progress / warmup_epochs, 0.01)  # from 1% of the LR, so the first step is not wasted
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-9)
        return 0.5 * base * (1 + math.cos(math.pi * min(1.0, (progress - warmup_epochs) / span)))
    return base * gamma ** sum(progress >= m for m in milestones)


class FinetuneModel(nn.Module):
    """Backbones (GocaModel's key names: backbones.<stream>.*) + one classifier per stream."""

    def __init__(self, backbones: nn.ModuleDict, feature_dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.backbones = backbones
        self.classifiers = nn.ModuleDict({s: RegLog(feature_dim, num_classes, dropout=dropout) for s in backbones})

    @property
    def streams(self) -> list[str]:
        return list(self.backbones.keys())

    def forward(self, clips: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {s: self.classifiers[s](self.backbones[s](clips[s])) for s in self.streams}


def param_groups(model: FinetuneModel, lr: float, backbone_ratio: float) -> list[dict]:
    """Backbone parameters at lr × ratio, classifier parameters at lr (the `base_lr` key drives the schedule)."""
    bb = [p for n, p in model.named_parameters() if n.startswith("backbones.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbones.")]
    return [{"params": bb, "base_lr": lr * backbone_ratio, "lr": lr * backbone_ratio},
            {"params": head, "base_lr": lr, "lr": lr}]


@dataclass
class FinetuneResult:
    accuracy: dict[str, dict[int, float]]
    test: dict[str, int]
    protocol: dict
    history: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, name: str = "model") -> str:
        return accuracy_table(self.accuracy, name) + (
            f"\n{self.test['evaluated']} of {plural(self.test['videos'], 'test video')} "
            f"({self.protocol['test_split']}), {self.protocol['test']}")

    def to_json(self) -> dict:
        return {"accuracy": {s: {f"top{k}": v for k, v in a.items()} for s, a in self.accuracy.items()},
                "test": self.test, "protocol": self.protocol, "history": self.history, "warnings": self.warnings,
                "seconds": round(self.seconds, 2)}


class _Stop(Exception):
    pass


class Finetuner:
    """One fine-tuning run (one process of it)."""

    def __init__(self, source: Optional[str], run_dir: Path, settings: FinetuneSettings, data_root: Optional[str],
                 train_split: Optional[str], test_split: Optional[str], streams: Optional[Sequence[str]],
                 workers: Optional[int], device: str, fresh: bool = False, config_path: Optional[str] = None,
                 expect_arch: Optional[str] = None):
        from goca_fast.distributed import init_distributed
        self.info = init_distributed(device)
        self.device = self.info.device
        self.run_dir = Path(run_dir)
        resume_from = None if fresh else ckpt.find_latest(self.run_dir)
        state = None
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, map_location="cpu")
            if state.get("kind") != "finetune":
                raise EvalError(f"{self.run_dir} holds a {state.get('kind', 'pretraining')} run, not a fine-tuning "
                                f"one; choose another --out")
            saved = {**state["finetune"], "milestones": tuple(state["finetune"]["milestones"])}
            new = asdict(settings.check())
            changed = [k for k in new if k in saved and saved[k] != new[k]]
            if changed:
                log.warning("resuming %s with changed settings: %s", resume_from,
                            ", ".join(f"{k} {saved[k]} -> {new[k]}" for k in changed))
            self.settings = settings
            cfg = config_from_dict(state["config"])
            self.source = state.get("source_checkpoint", "")
            self.streams = list(state["streams"])
        else:
            if not source:
                raise EvalError("finetune needs a pretrained checkpoint or run directory")
            self.settings = settings.check()
            loaded = load_model(source, "cpu", streams, expect_arch=expect_arch, config_path=config_path)
            cfg, self.source, self.streams = loaded.config, str(loaded.checkpoint), loaded.streams
            pre_backbones = loaded.model.backbones
        s = self.settings
        if state is None:  # classifier init and dropout reproducible from the seed (a resume restores the RNG)
            random.seed(s.seed)
            np.random.seed(s.seed)
            torch.manual_seed(s.seed)
        self.cfg = cfg
        self.root = dataset_root_for(cfg, data_root)
        self.train_split = train_split or cfg.data.train_split
        self.test_split = test_split or cfg.data.test_split
        self.train_recs = split_records(self.root, self.train_split, self.streams)
        self.test_recs = split_records(self.root, self.test_split, self.streams)
        check_disjoint_records(self.train_recs, self.test_recs, roles=("train", "test"))
        self.classes = self.train_recs.classes
        self.warnings = class_check([r.label for r in self.train_recs.records],
                                    [r.label for r in self.test_recs.records], self.classes, self.train_split,
                                    self.test_split)
        self.workers = cfg.data.workers if workers is None else workers
        self.spec = view_spec_from_config(cfg)
        bcfg = copy.deepcopy(cfg)
        bcfg.model.prototypes_path = ""
        template = build_model(bcfg)
        backbones = nn.ModuleDict({st: template.backbones[st] for st in self.streams})
        model = FinetuneModel(backbones, template.feature_dim, len(self.classes), s.dropout)
        if state is None:
            for st in self.streams:
                model.backbones[st].load_state_dict(pre_backbones[st].state_dict())
        else:
            model.load_state_dict(state["model"])
        if state is None:
            torch.manual_seed(s.seed + self.info.rank)  # dropout masks differ between ranks
        model = model.to(self.device)
        if self.info.enabled and self.device.type == "cuda":  # SyncBN needs CUDA; CPU ranks keep per-rank BN
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.ddp = (nn.parallel.DistributedDataParallel(model, device_ids=[self.device]
                                                        if self.device.type == "cuda" else None)
                    if self.info.enabled else None)
        self.optimizer = torch.optim.SGD(param_groups(model, s.lr, s.backbone_lr_ratio), lr=s.lr,
                                         momentum=s.momentum, weight_decay=s.weight_decay)
        self.amp = resolve_amp(s.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.epoch, self.iteration, self.step = 0, 0, 0
        self.history: list[dict] = []
        self.signals = StopSignals()
        self.dataset = self._train_dataset()
        per_rank = len(self.dataset) // self.info.world_size
        self.iters = per_rank // s.batch_size
        if s.max_iters_per_epoch > 0:
            self.iters = min(self.iters, s.max_iters_per_epoch)
        if self.iters < 1:
            raise EvalError(f"finetune: the train split ({len(self.dataset)} videos) yields no full batch of "
                            f"{s.batch_size} per process; lower --batch-size")
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.iteration, self.step = state["epoch"], state["iteration"], state["step"]
            self.history = list(state.get("history", []))
            rng = state["rng"]
            ckpt.set_rng_state(rng[self.info.rank] if len(rng) == self.info.world_size else rng[0])
            if self.info.is_main:
                log.info("resumed fine-tuning from %s at epoch %d, iteration %d", resume_from, self.epoch,
                         self.iteration)
        self.resumed = state is not None

    # ------------------------------------------------------------------------------------------ data
    def _train_dataset(self):
        from goca_fast.data.augment import ClipAugment
        from goca_fast.data.cpu_loader import TrainClipDataset
        s, d = self.settings, self.cfg.data
        aug = ClipAugment(crop_size=d.crop_size, scale_range=tuple(d.scale_range), jitter_prob=s.color_jitter_p,
                          grayscale_prob=s.grayscale_p, flow_mode=d.flow_mode)
        return TrainClipDataset(self.root, self.train_recs.records, [self.spec.clip_length], self.spec.stride, 0,
                                aug, "flow" in self.streams, s.seed, min_frames=1)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        rng = ckpt.rng_state()
        rngs = [rng]
        if self.info.enabled:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
        if not self.info.is_main:
            return
        ckpt.save_checkpoint(ckpt.latest_path(self.run_dir), {
            "kind": "finetune", "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch": self.epoch, "iteration": self.iteration, "step": self.step,
            "rng": rngs, "config": self.cfg.to_dict(), "finetune": asdict(self.settings), "streams": self.streams,
            "classes": self.classes, "source_checkpoint": self.source, "history": self.history})

    def _stop_requested(self) -> bool:
        return self.signals.seen_on_any_rank(self.device)

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> FinetuneResult:
        """Train to `epochs` (resuming where the run directory stopped), then run the full test."""
        from goca_fast.data.cpu_loader import make_train_loader
        s = self.settings
        t0 = time.time()
        self.signals.install()
        writer = None
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step)
        net = self.ddp or self.model
        try:
            while self.epoch < s.epochs:
                self.model.train()
                losses, seen = [], 0
                loader = make_train_loader(self.dataset, s.batch_size, self.workers, self.info.rank,
                                           self.info.world_size, s.seed, self.epoch, self.iteration)
                with preserve_rng():  # an iterator draws a seed from torch's RNG: keep resume exact mid-epoch
                    it = iter(loader)
                while self.iteration < self.iters:
                    if self._stop_requested():
                        self.save()
                        raise _Stop()
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
                entry = {"epoch": self.epoch, "loss": float(tot[0] / max(tot[1], 1)), "videos": int(tot[2])}
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
                    with open(self.run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(entry) + "\n")
                self.save()
        finally:
            if writer is not None:
                writer.flush()
            self.signals.restore()
        acc, counts = self.evaluate(s.test_clips, s.test_crops)
        if writer is not None:
            for k, v in acc.items():
                writer.add_scalar(f"finetune/test_top1_{k}", v[1], self.epoch)
            writer.close()
        protocol = {"train_split": self.train_split, "test_split": self.test_split,
                    "test": f"{plural(s.test_clips, 'clip')} × {plural(s.test_crops, 'crop')} of "
                            f"{plural(self.spec.clip_length, 'frame')}, "
                            f"softmax averaged over views; two streams late-fused (probabilities averaged)",
                    "settings": asdict(s), "source_checkpoint": self.source, "arch": self.cfg.model.arch,
                    "dataset": str(self.root), "world_size": self.info.world_size, "num_classes": len(self.classes)}
        return FinetuneResult(acc, counts, protocol, self.history, self.warnings, time.time() - t0)

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
        from goca_fast.data.cpu_loader import EvalClipDataset, make_eval_loader
        sp = self.spec
        ds = EvalClipDataset(self.root, self.test_recs.records, sp.clip_length, sp.stride, clips, sp.crop_size,
                             sp.short_side, "flow" in self.streams, crops=crops, flow_mode=sp.flow_mode)
        loader = make_eval_loader(ds, max(1, self.settings.batch_size // max(1, clips * crops)), self.workers,
                                  self.info.rank, self.info.world_size)
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


def run_finetune(source: Optional[str], out_dir: Optional[str] = None, settings: Optional[FinetuneSettings] = None,
                 data_root: Optional[str] = None, train_split: Optional[str] = None, test_split: Optional[str] = None,
                 streams: Optional[Sequence[str]] = None, workers: Optional[int] = None, device: str = "auto",
                 fresh: bool = False, config_path: Optional[str] = None, expect_arch: Optional[str] = None,
                 quiet: bool = False) -> FinetuneResult:
    """`goca-eval finetune`: train (or resume) and test; writes finetune.json in the run directory.

    Raises RunStopped when stopped by a signal or Ctrl-C (a checkpoint was written; the same command resumes)."""
    if out_dir:
        run_dir = Path(out_dir)
    elif source:
        from goca_fast.eval.common import resolve_checkpoint
        run_dir = default_output_dir(resolve_checkpoint(source)[1]) / "finetune"
    else:
        raise EvalError("finetune needs a checkpoint (or --out of a fine-tuning run to resume)")
    ft = Finetuner(source, run_dir, settings or FinetuneSettings(), data_root, train_split, test_split, streams,
                   workers, device, fresh, config_path, expect_arch)
    try:
        res = ft.fit()
    except _Stop:
        raise RunStopped(ft.signals, str(run_dir / "checkpoints")) from None
    finally:
        from goca_fast.distributed import cleanup
        cleanup(ft.info)
    if ft.info.is_main:
        (run_dir / "finetune.json").write_text(json.dumps(res.to_json(), indent=2))
        if not quiet:
            print(f"Fine-tuning ({plural(ft.settings.epochs, 'epoch')}, {', '.join(ft.streams)}):\n"
                  f"{res.table(ft.cfg.name)}\n"
                  f"written: {run_dir / 'finetune.json'}")
    return res
