"""Video-level features for evaluation: backbone features of every clip × crop view, averaged per video."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from goca_fast.models.goca_model import GocaModel


@torch.no_grad()
def extract_video_features(model: GocaModel, batches: Iterable, device: torch.device,
                           amp: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """batches: EvalBatch-like objects with .rgb (and .flow) of shape N×V×C×T×H×W (V views per video), .label.

    Returns (stream → N_total×F features: per-view backbone features, L2-normalised, averaged over the V views),
    labels. Batches that are None (every video unreadable, already reported by the loader) are skipped.
    """
    model.eval()
    feats: dict[str, list[torch.Tensor]] = {s: [] for s in model.streams}
    labels = []
    for b in batches:
        if b is None:
            continue
        n, v = b.rgb.shape[:2]
        clips = {s: [getattr(b, s).flatten(0, 1).to(device, non_blocking=True)] for s in model.streams}
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model.features(clips)
        for s in model.streams:
            f = F.normalize(out[s].float(), dim=1).view(n, v, -1).mean(dim=1)
            feats[s].append(f.cpu())
        labels.append(torch.as_tensor(b.label).cpu())
    return {s: torch.cat(f) for s, f in feats.items()}, torch.cat(labels)
