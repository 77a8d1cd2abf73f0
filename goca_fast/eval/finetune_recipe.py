"""The fine-tuning recipe (CoCLR-style): its settings, LR schedule, the network (backbones + one classifier per
stream) and the result it reports. `goca_fast.eval.finetune` runs it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from goca_fast.data.views import plural
from goca_fast.eval import EvalError
from goca_fast.eval.linear import RegLog, accuracy_json, accuracy_table


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
        return {"accuracy": accuracy_json(self.accuracy), "test": self.test, "protocol": self.protocol,
                "history": self.history, "warnings": self.warnings, "seconds": round(self.seconds, 2)}
