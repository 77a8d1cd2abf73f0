"""Video-level features for evaluation: backbone (or head) features of every clip × crop view, averaged per video.

Order of operations (the official feature module is missing from its repository, so this is our choice, the one
CoCLR uses): each view's feature is L2-normalised, the V views of a video are averaged, and retrieval normalises
that mean again. Averaging unit vectors keeps one loud view from dominating the video's feature.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional

import torch
import torch.nn.functional as F

from goca_fast.data.cpu_loader import EvalClipDataset, make_eval_loader
from goca_fast.runtime.device import choose_loader
from goca_fast.data.views import ViewSpec, plural
from goca_fast.eval import EvalError
from goca_fast.eval.splits import SplitRecords
from goca_fast.models.goca_model import GocaModel

log = logging.getLogger("goca_fast.eval")

FeatureSource = Literal["backbone", "head"]


@dataclass
class VideoFeatures:
    """Features of the videos a loader delivered, in delivery order.

    features: stream → N×F float32, the mean over views of the L2-normalised view features.
    views:    stream → N×V×F float32, the raw per-view features (only when asked for; the linear probe uses them).
    labels, index: N int64 (index = position in the dataset's record list). padded: N bool (video shorter than one
    clip, last frame repeated). skipped: videos the loader dropped as unreadable (already warned about).
    """

    features: dict[str, torch.Tensor]
    views: Optional[dict[str, torch.Tensor]]
    labels: torch.Tensor
    index: torch.Tensor
    padded: torch.Tensor
    skipped: int


def view_features(model: GocaModel, clips: dict[str, torch.Tensor], source: FeatureSource = "backbone"
                  ) -> dict[str, torch.Tensor]:
    """Per-view features of a flat batch (stream → B×C×T×H×W): pooled backbone features or head embeddings.

    Only the streams in `clips` run (the monitor may watch one stream of a two-stream model)."""
    out = {s: model.backbones[s](c) for s, c in clips.items()}
    if source == "head":
        out = {s: model.head(s)(f) for s, f in out.items()}
    elif source != "backbone":
        raise ValueError(f"feature source must be 'backbone' or 'head', got {source!r}")
    return out


@torch.no_grad()
def extract_features(model: GocaModel, batches: Iterable, device: torch.device, amp: Optional[torch.dtype] = None,
                     source: FeatureSource = "backbone", keep_views: bool = False,
                     streams: Optional[list[str]] = None) -> VideoFeatures:
    """Run every view of every video through the model (eval mode) and average per video.

    batches: EvalBatch-like objects (.rgb/.flow N×V×C×T×H×W, .label, .index, .padded, .skipped) or None (every
    video of the batch unreadable). Callers that must count dropped videos exactly compare the delivered `index`
    with their record list (a None batch carries no count).
    """
    was_training = model.training
    model.eval()
    streams = list(streams or model.streams)
    feats: dict[str, list[torch.Tensor]] = {s: [] for s in streams}
    views: dict[str, list[torch.Tensor]] = {s: [] for s in streams}
    labels, index, padded, skipped = [], [], [], 0
    try:
        for b in batches:
            if b is None:
                continue
            n, v = b.rgb.shape[:2]
            clips = {}
            for s in streams:
                t = getattr(b, s)
                if t is None:
                    raise ValueError(f"the model's {s} stream needs {s} clips but the loader returned none")
                clips[s] = t.flatten(0, 1).to(device, non_blocking=True).float()
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = view_features(model, clips, source)
            for s in streams:
                f = out[s].float()
                feats[s].append(F.normalize(f, dim=1).view(n, v, -1).mean(dim=1).cpu())
                if keep_views:
                    views[s].append(f.view(n, v, -1).cpu())
            labels.append(torch.as_tensor(b.label).cpu())
            index.append(torch.as_tensor(getattr(b, "index", torch.arange(n))).cpu())
            padded.append(torch.as_tensor(getattr(b, "padded", torch.zeros(n, dtype=torch.bool))).cpu())
            skipped += int(getattr(b, "skipped", 0))
    finally:
        model.train(was_training)
    if not labels:
        return VideoFeatures({s: torch.empty(0, 0) for s in streams}, {s: torch.empty(0, 0, 0) for s in streams}
                             if keep_views else None, torch.empty(0, dtype=torch.int64),
                             torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.bool), skipped)
    return VideoFeatures({s: torch.cat(f) for s, f in feats.items()},
                         {s: torch.cat(f) for s, f in views.items()} if keep_views else None,
                         torch.cat(labels).long(), torch.cat(index).long(), torch.cat(padded).bool(), skipped)


@dataclass
class SplitFeatures:
    """Video features of one split plus the bookkeeping every reported number needs.

    features: stream → N×F float32 (mean of L2-normalised views). views: stream → N×V×F raw view features (fp16)
    or None.
    ids/labels/padded: per evaluated video. missing: ids whose files do not exist; unreadable: ids the decoder
    rejected. total = evaluated + missing + unreadable.
    """

    split: str
    ids: list[str]
    labels: torch.Tensor
    padded: torch.Tensor
    features: dict[str, torch.Tensor]
    views: Optional[dict[str, torch.Tensor]]
    total: int
    missing: list[str]
    unreadable: list[str]
    classes: list[str]

    @property
    def evaluated(self) -> int:
        return len(self.ids)

    def counts(self) -> dict[str, int]:
        return {"videos": self.total, "evaluated": self.evaluated, "missing_files": len(self.missing),
                "unreadable": len(self.unreadable), "padded_short": int(self.padded.sum())}


@dataclass(frozen=True)
class ExtractSettings:
    """How features are extracted (not what: that is the ViewSpec), so it stays out of the feature cache's key.

    loader: "cpu" (PyAV), "dali", or "auto" (DALI on a CUDA device when the pipelines import). amp: autocast
    dtype or None (fp32). source: "backbone" or "head". keep_views: also keep the raw per-view features."""

    device: torch.device
    batch_size: int
    workers: int
    loader: str = "auto"
    amp: Optional[torch.dtype] = None
    source: str = "backbone"
    keep_views: bool = False


def eval_loader(root: Path, split: SplitRecords, spec: ViewSpec, with_flow: bool, extract: ExtractSettings):
    """Iterable of EvalBatch over a split, from the CPU loader or the DALI pipeline (same views, same batches);
    `extract.loader` auto = DALI on a GPU when its pipelines import (`goca_fast.runtime.device.choose_loader`)."""
    if choose_loader(extract.loader, extract.device, "loader") == "dali":
        from dali_pipelines.eval import DaliEvalLoader
        return DaliEvalLoader(root, split.records, spec, with_flow, batch_size=extract.batch_size,
                              workers=extract.workers, device=extract.device)
    return make_eval_loader(EvalClipDataset(root, split.records, spec, with_flow), extract.batch_size,
                            extract.workers)


def compute_split_features(model: GocaModel, root: Path, split: SplitRecords, spec: ViewSpec,
                           extract: ExtractSettings) -> SplitFeatures:
    """Extract the features of one split under the view protocol `spec` (no cache)."""
    streams = list(model.streams)
    x = extract
    out = extract_features(model, eval_loader(root, split, spec, "flow" in streams, x), x.device, x.amp, x.source,
                           x.keep_views)
    order = torch.argsort(out.index)  # loader order is already record order; sorting makes it a guarantee
    got = set(out.index.tolist())
    unreadable = [r.id for i, r in enumerate(split.records) if i not in got]
    if not got:
        raise EvalError(f"split {split.name!r}: none of its {plural(len(split.records), 'video')} could be decoded")
    if unreadable:
        log.warning("split %r: %s could not be decoded and %s left out (e.g. %s)", split.name,
                    plural(len(unreadable), "video"), "is" if len(unreadable) == 1 else "are",
                    ", ".join(unreadable[:3]))
    ids = [split.records[i].id for i in out.index[order].tolist()]
    # view features are kept (and cached) at fp16: half the memory, and a cache hit gives the very same numbers
    return SplitFeatures(split.name, ids, out.labels[order], out.padded[order],
                         {s: f[order] for s, f in out.features.items()},
                         {s: v[order].half() for s, v in out.views.items()} if out.views is not None else None,
                         split.total, list(split.missing), unreadable, split.classes)
