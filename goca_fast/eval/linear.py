"""Linear probe: a frozen backbone, the official `RegLog` classifier (optional L2 norm → BN1d → dropout → Linear),
SGD for 100 epochs with the LR divided by 10 at epochs 60 and 80 (the official eval
defaults, docs/official_behaviour.md#evaluation-protocol).

Two ways to feed it:
  * fast path (default, no augmentation): the raw backbone features of every train view (clips × crops per video)
    are extracted once (and cached); each view is one training sample, so the probe still sees several temporal
    positions and crops per video. 100 epochs then take seconds.
  * `--augment`: every epoch draws a random clip per train video with random resized crop + flip and runs it through
    the frozen backbone (eval mode: BN statistics frozen too). Slower by the cost of 100 backbone passes.
Test: softmax per view, averaged over the clips × crops views of a video (default 10 × 3), top-1 / top-5. With two
streams one probe is trained per stream and "both" averages their class probabilities (late fusion).

Defaults: lr 0.1 and weight decay 0 (see docs/readme-evaluating.md for why), momentum 0.9, batch 256 views.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from goca_fast.data.augment import ClipAugment
from goca_fast.data.cpu_loader import TrainClipDataset, make_train_loader
from goca_fast.data.index import read_index
from goca_fast.data.views import ViewOverrides, ViewSpec, plural
from goca_fast.runtime.device import resolve_amp
from goca_fast.eval import EvalError
from goca_fast.eval.cache import FeatureCache, split_features
from goca_fast.eval.features import ExtractSettings, SplitFeatures
from goca_fast.eval.loading import EvalSetup, default_output_dir
from goca_fast.eval.splits import SplitRecords, check_disjoint_records, class_check, split_records

log = logging.getLogger("goca_fast.eval")

BOTH = "both"


class RegLog(nn.Module):
    """The official classifier: [L2 norm] → [BN1d(weight 1, bias 0)] → [dropout] → Linear(N(0, 0.01), bias 0).

    The BN in front makes one probe LR work whatever the scale of the backbone's features."""

    def __init__(self, in_dim: int, num_classes: int, l2norm: bool = False, use_bn: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.l2norm = l2norm
        self.bn = nn.BatchNorm1d(in_dim, momentum=0.1) if use_bn else nn.Identity()
        if use_bn:
            nn.init.ones_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.linear.weight, 0.0, 0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.l2norm:
            x = F.normalize(x, dim=1)
        return self.linear(self.drop(self.bn(x)))


@dataclass
class ProbeSettings:
    """Optimisation of the probe (official: 100 epochs, ×0.1 at 60 and 80)."""

    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (60, 80)
    gamma: float = 0.1
    batch_size: int = 256
    l2norm: bool = False
    use_bn: bool = True
    dropout: float = 0.0
    seed: int = 0

    def check(self) -> "ProbeSettings":
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise EvalError("linear probe: epochs and batch size must be >= 1, lr > 0 and weight decay >= 0")
        if not 0 <= self.dropout < 1:
            raise EvalError(f"linear probe: dropout must lie in [0, 1), got {self.dropout}")
        return self


# ------------------------------------------------------------------------------------------------ pure metrics
def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent (k clamped to the number of classes); ties broken by class order."""
    if probs.shape[0] == 0:
        raise ValueError("accuracy of zero samples is undefined")
    order = torch.sort(-probs.float(), dim=1, stable=True).indices
    hit = order == labels.view(-1, 1)
    return {k: 100.0 * float(hit[:, :min(k, probs.shape[1])].any(dim=1).float().mean()) for k in ks}


def fuse_probabilities(per_stream: dict[str, torch.Tensor]) -> torch.Tensor:
    """Late fusion of two streams: the mean of their class probabilities (as CoCLR reports two-stream results)."""
    return torch.stack(list(per_stream.values())).mean(0)


def multistep_lr(base: float, epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """Step schedule: base × gamma^(number of milestones reached)."""
    return base * gamma ** sum(epoch >= m for m in milestones)


# ------------------------------------------------------------------------------------------------ training
def _sgd(probe: nn.Module, s: ProbeSettings) -> torch.optim.SGD:
    return torch.optim.SGD(probe.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                           nesterov=False)


def train_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, settings: ProbeSettings,
                device: torch.device = torch.device("cpu"),
                progress: Optional[Callable[[int, float, float], None]] = None) -> RegLog:
    """Train a RegLog on fixed samples x (M×F) with labels y (M); deterministic given settings.seed."""
    s = settings.check()
    if x.shape[0] == 0:
        raise EvalError("linear probe: no training samples")
    torch.manual_seed(s.seed)  # init of the probe's weights (reproducible runs)
    probe = RegLog(x.shape[1], num_classes, s.l2norm, s.use_bn, s.dropout).to(device)
    opt = _sgd(probe, s)
    g = torch.Generator().manual_seed(s.seed)
    n = x.shape[0]
    bs = min(s.batch_size, n)
    for epoch in range(s.epochs):
        for group in opt.param_groups:
            group["lr"] = multistep_lr(s.lr, epoch, s.milestones, s.gamma)
        probe.train()
        perm = torch.randperm(n, generator=g)
        tot, correct, seen = 0.0, 0, 0
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            if idx.numel() < 2 and s.use_bn:  # BN cannot train on a batch of one
                continue
            xb, yb = x[idx].to(device).float(), y[idx].to(device)
            logits = probe(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * idx.numel()
            correct += int((logits.argmax(1) == yb).sum())
            seen += idx.numel()
        if progress is not None:
            progress(epoch, tot / max(seen, 1), 100.0 * correct / max(seen, 1))
    if s.use_bn:
        precise_bn_(probe, x)
    return probe.eval()


@torch.no_grad()
def precise_bn_(probe: RegLog, x: torch.Tensor) -> None:
    """Set the BN running statistics to the exact mean / (unbiased) variance of the training samples.

    The features are fixed, so these are the statistics the running averages converge to; computing them exactly
    removes the dependence on the number of steps (with few steps the running variance still remembers its
    initial 1, which can be orders of magnitude off for small-scale features)."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], 65536):  # chunked: x may be large and fp16
        z = x[start:start + 65536].float()
        z = (F.normalize(z, dim=1) if probe.l2norm else z).double()
        total += z.sum(0)
        squares += (z * z).sum(0)
    n = x.shape[0]
    mean = total / n
    var = (squares - n * mean * mean).clamp_min(0) / max(n - 1, 1)
    probe.bn.running_mean.copy_(mean.to(probe.bn.running_mean))
    probe.bn.running_var.copy_(var.to(probe.bn.running_var))


@torch.no_grad()
def predict_views(probe: nn.Module, views: torch.Tensor, device: torch.device = torch.device("cpu"),
                  batch: int = 256) -> torch.Tensor:
    """N×V×F view features → N×C: softmax per view, averaged over the V views of each video."""
    probe.eval()
    out = []
    for start in range(0, views.shape[0], batch):
        v = views[start:start + batch].to(device).float()
        n, nv = v.shape[:2]
        out.append(F.softmax(probe(v.flatten(0, 1)), dim=1).view(n, nv, -1).mean(1).cpu())
    return torch.cat(out)


def accuracy_table(accuracy: dict[str, dict[int, float]], name: str = "model") -> str:
    """Top-1/top-5 per stream as a terminal table (shared by the linear probe and fine-tuning)."""
    head = f"{'model':<14}{'stream':<10}{'top-1':>8}{'top-5':>8}"
    lines = [head, "-" * len(head)]
    for s, acc in accuracy.items():
        lines.append(f"{name:<14}{s:<10}{acc[1]:>8.1f}{acc[5]:>8.1f}")
    return "\n".join(lines)


def accuracy_json(accuracy: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    """{stream: {1: top-1, 5: top-5}} as written to linear.json / finetune.json: {stream: {"top1": .., "top5": ..}}."""
    return {s: {f"top{k}": v for k, v in a.items()} for s, a in accuracy.items()}


@dataclass
class LinearResult:
    accuracy: dict[str, dict[int, float]]   # stream / "both" → {1: top-1, 5: top-5}
    train: dict[str, int]
    test: dict[str, int]
    protocol: dict
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, name: str = "model") -> str:
        return accuracy_table(self.accuracy, name) + (
            f"\n{self.test['evaluated']} of {plural(self.test['videos'], 'test video')} "
            f"({self.protocol['test_split']}); probe trained on {self.train['evaluated']} of "
            f"{plural(self.train['videos'], 'video')} ({self.protocol['train_split']})")

    def to_json(self) -> dict:
        return {"accuracy": accuracy_json(self.accuracy), "train": self.train, "test": self.test,
                "protocol": self.protocol, "warnings": self.warnings, "seconds": round(self.seconds, 2)}


def _log_progress(stream: str, every: int = 10) -> Callable[[int, float, float], None]:
    def cb(epoch: int, loss: float, acc: float) -> None:
        if (epoch + 1) % every == 0 or epoch == 0:
            log.info("probe %s: epoch %d loss %.4f train acc %.1f%%", stream, epoch + 1, loss, acc)
    return cb


def linear_probe_features(train: SplitFeatures, test: SplitFeatures, streams: Sequence[str], num_classes: int,
                          settings: ProbeSettings, device: torch.device = torch.device("cpu"),
                          ) -> tuple[dict[str, dict[int, float]], dict[str, RegLog]]:
    """The fast path: one probe per stream on the train views, scored on the test views (top-1/top-5)."""
    if train.views is None or test.views is None:
        raise ValueError("linear_probe_features needs per-view features (extract with keep_views=True)")
    probs, probes = {}, {}
    for s in streams:
        v = train.views[s]
        x = v.flatten(0, 1)
        y = train.labels.repeat_interleave(v.shape[1])
        probes[s] = train_probe(x, y, num_classes, settings, device, _log_progress(s))
        probs[s] = predict_views(probes[s], test.views[s], device)
    acc = {s: topk_accuracy(p, test.labels) for s, p in probs.items()}
    if len(streams) == 2:
        acc[BOTH] = topk_accuracy(fuse_probabilities(probs), test.labels)
    return acc, probes


def probe_augment(setup: EvalSetup, spec: ViewSpec) -> ClipAugment:
    """The augmented probe's clip augmentation: resized crop and flip as in pretraining (a pretraining run that did
    not flip, because a mirror turns one class into another, is probed without flips too), no colour changes."""
    return ClipAugment(crop_size=setup.crop_size, scale_range=tuple(setup.scale_range), hflip_prob=setup.hflip_prob,
                       jitter_prob=0.0, grayscale_prob=0.0, flow_mode=spec.flow_mode)


def linear_probe_clips(model, setup: EvalSetup, train_recs: SplitRecords, test: SplitFeatures, num_classes: int,
                       spec: ViewSpec, *, settings: ProbeSettings, amp: Optional[torch.dtype] = None
                       ) -> tuple[dict[str, dict[int, float]], dict[str, RegLog]]:
    """The augmented path: random clip + resized crop + flip per train video every epoch, frozen backbone; the
    augmentation geometry, device, loader and seed are the setup's (its pretraining config's)."""
    s = settings.check()
    streams = list(model.streams)
    device, workers, seed = setup.device, setup.workers, setup.seed
    aug = probe_augment(setup, spec)
    ds = TrainClipDataset(setup.root, train_recs.records, clip_lengths=[spec.clip_length], stride=spec.stride,
                          min_distance=0, augment=aug, with_flow="flow" in streams, seed=seed,
                          min_frames=1)  # short videos are padded (last frame repeated), as at test time
    if len(ds) < 2:
        raise EvalError("linear probe: the train split needs at least 2 videos")
    bs = min(max(setup.batch_size, 2), len(ds))
    torch.manual_seed(s.seed)
    probes = {st: RegLog(model.feature_dim, num_classes, s.l2norm, s.use_bn, s.dropout).to(device) for st in streams}
    opts = {st: _sgd(p, s) for st, p in probes.items()}
    model.eval()
    for epoch in range(s.epochs):
        lr = multistep_lr(s.lr, epoch, s.milestones, s.gamma)
        seen, loss_sum = 0, {st: 0.0 for st in streams}
        for st in streams:
            probes[st].train()
            for g in opts[st].param_groups:
                g["lr"] = lr
        for batch in make_train_loader(ds, bs, workers, rank=0, world_size=1, seed=seed, epoch=epoch):
            if batch is None or batch.batch_size < 2:
                continue
            with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                feats = model.features({st: [getattr(batch, st)[0].to(device, non_blocking=True)]
                                        for st in streams})
            y = batch.label.to(device)
            for st in streams:
                loss = F.cross_entropy(probes[st](feats[st].float()), y)
                opts[st].zero_grad(set_to_none=True)
                loss.backward()
                opts[st].step()
                loss_sum[st] += float(loss.detach()) * batch.batch_size
            seen += batch.batch_size
        if (epoch + 1) % 10 == 0 or epoch == 0:
            log.info("probe epoch %d: %s", epoch + 1,
                     ", ".join(f"{st} loss {loss_sum[st] / max(seen, 1):.4f}" for st in streams))
    probs = {st: predict_views(probes[st], test.views[st], device) for st in streams}
    acc = {st: topk_accuracy(p, test.labels) for st, p in probs.items()}
    if len(streams) == 2:
        acc[BOTH] = topk_accuracy(fuse_probabilities(probs), test.labels)
    return acc, probes


@dataclass(frozen=True)
class LinearOptions:
    """`goca-eval linear`'s own knobs: the probe's optimisation, the train/test views (fast path) and autocast."""

    settings: ProbeSettings = field(default_factory=ProbeSettings)
    augment: bool = False              # random augmented clips each epoch instead of cached view features
    train_clips: int = 5
    train_crops: int = 3
    test_clips: int = 10
    test_crops: int = 3
    clip_length: Optional[int] = None  # None: the setup's protocol
    stride: Optional[int] = None
    amp: str = "off"

    @property
    def train_view(self) -> ViewOverrides:
        return ViewOverrides(self.train_clips, self.train_crops, self.clip_length, self.stride)

    @property
    def test_view(self) -> ViewOverrides:
        return ViewOverrides(self.test_clips, self.test_crops, self.clip_length, self.stride)


def run_linear(setup: EvalSetup, options: Optional[LinearOptions] = None, *, out_dir: Optional[str] = None,
               use_cache: bool = True, quiet: bool = False) -> LinearResult:
    """`goca-eval linear`: frozen-backbone linear probe; prints a table, writes linear.json and the probe weights."""
    t0 = time.time()
    o = options or LinearOptions()
    settings, augment = o.settings.check(), o.augment
    unreached = [m for m in settings.milestones if m >= settings.epochs]
    if unreached:
        log.warning("linear probe: --milestones %s not below --epochs %d: the LR never drops there "
                    "(pass smaller --milestones for a short run)", ",".join(map(str, unreached)), settings.epochs)
    loaded, dev, root = setup.loaded, setup.device, setup.root
    amp_dt = resolve_amp(o.amp, dev, "--amp")
    out = Path(out_dir) if out_dir else default_output_dir(loaded.run_dir)
    cache = FeatureCache(out / "features") if use_cache else None
    extract = ExtractSettings(dev, setup.batch_size, setup.workers, amp=amp_dt, keep_views=True)
    train_name, test_name = setup.train_split, setup.test_split
    test_spec = setup.views.with_overrides(o.test_view)
    index = read_index(root)
    train_recs = split_records(root, train_name, loaded.streams, index)
    test_recs = split_records(root, test_name, loaded.streams, index)
    check_disjoint_records(train_recs, test_recs, roles=("train", "test"))
    num_classes = len(test_recs.classes)
    test = split_features(loaded, root, test_recs, test_spec, extract, cache)
    if augment:
        warnings = class_check([r.label for r in train_recs.records], test.labels.tolist(), test.classes,
                               train_name, test_name)
        acc, probes = linear_probe_clips(loaded.model, setup, train_recs, test, num_classes, test_spec,
                                         settings=settings, amp=amp_dt)
        n_train = len(train_recs.records)
        train_counts = {"videos": train_recs.total, "evaluated": n_train, "missing_files": len(train_recs.missing),
                        "unreadable": 0, "padded_short": sum(r.frames < test_spec.clip_length
                                                             for r in train_recs.records)}
        train_desc = (f"1 random clip of {plural(test_spec.clip_length, 'frame')} per video per epoch, "
                      f"resized crop + flip")
    else:
        train_spec = setup.views.with_overrides(o.train_view)
        train = split_features(loaded, root, train_recs, train_spec, extract, cache)
        warnings = class_check(train.labels.tolist(), test.labels.tolist(), test.classes, train_name, test_name)
        acc, probes = linear_probe_features(train, test, loaded.streams, num_classes, settings, dev)
        train_counts = train.counts()
        train_desc = f"cached features of {train_spec.describe()}, each view one sample"
    protocol = {"train_split": train_name, "test_split": test_name, "train": train_desc,
                "test": f"{test_spec.describe()}, softmax averaged over views", "augment": augment,
                "settings": asdict(settings), "checkpoint": str(loaded.checkpoint), "epoch": loaded.epoch,
                "arch": setup.arch, "dataset": str(root), "num_classes": num_classes}
    res = LinearResult(acc, train_counts, test.counts(), protocol, warnings, time.time() - t0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear.json").write_text(json.dumps(res.to_json(), indent=2))
    torch.save({s: p.state_dict() for s, p in probes.items()}, out / "linear_probe.pth")
    if not quiet:
        print(f"Linear probe ({'augmented clips' if augment else 'cached features'}, "
              f"{plural(settings.epochs, 'epoch')}, "
              f"lr {settings.lr}, milestones {list(settings.milestones)}):\n{res.table(setup.name)}\n"
              f"written: {out / 'linear.json'}")
    return res
