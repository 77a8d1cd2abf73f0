"""Video-level features for evaluation: backbone (or head) features of every clip × crop view, averaged per video.

Order of operations (the official feature module is missing from its repository, so this is our choice, the one
CoCLR uses): each view's feature is L2-normalised, the V views of a video are averaged, and retrieval normalises
that mean again. Averaging unit vectors keeps one loud view from dominating the video's feature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import torch
import torch.nn.functional as F

from goca_fast.models.goca_model import GocaModel

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


@torch.no_grad()
def extract_video_features(model: GocaModel, batches: Iterable, device: torch.device,
                           amp: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """batches: EvalBatch-like objects with .rgb (and .flow) of shape N×V×C×T×H×W (V views per video), .label.

    Returns (stream → N_total×F features: per-view backbone features, L2-normalised, averaged over the V views),
    labels. Batches that are None (every video unreadable, already reported by the loader) are skipped.
    """
    out = extract_features(model, batches, device, amp)
    return out.features, out.labels
