"""The two-stream GOCA network: RGB and flow backbones → projection heads → L2-normalised embeddings → scores
against one prototype matrix shared by both streams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from goca_fast.models.backbones import build_backbone
from goca_fast.models.heads import Prototypes, projection_head

STREAMS = ("rgb", "flow")


@dataclass
class StreamOutput:
    """One stream's outputs for all clips; rows [v·bs, (v+1)·bs) belong to clip v."""
    embeddings: torch.Tensor  # (N_clips·bs)×D, unit norm, float32
    scores: torch.Tensor      # (N_clips·bs)×K, cosine similarities to the prototypes, float32 (also under autocast)


def run_grouped(backbone: nn.Module, clips: list[torch.Tensor]) -> torch.Tensor:
    """Run consecutive clips of equal length through the backbone in one pass (SwAV/official multi-crop).

    BN statistics are therefore per group of equal-length clips, exactly as in the official code.
    """
    outs, start = [], 0
    while start < len(clips):
        end = start + 1
        while end < len(clips) and clips[end].shape[2:] == clips[start].shape[2:]:
            end += 1
        outs.append(backbone(torch.cat(clips[start:end], dim=0)))
        start = end
    return torch.cat(outs, dim=0)


@dataclass(frozen=True)
class ModelSpec:
    """The network's shape (config section `model`, plus the input it sees)."""

    arch: str                       # a goca_fast.models.BACKBONES name
    modalities: str = "rgb_flow"    # rgb_flow | rgb | flow
    pool: str = "1x2x2"
    hidden_dim: int = 2048
    embed_dim: int = 128
    num_prototypes: int = 1000
    shared_head: bool = False
    flow_channels: int = 2          # 3 for the official flow encoding (u, v, magnitude)
    merge: str = "prior"            # prior | mix | avg (avg: one merged stream)
    head: str = "mlp"


class GocaModel(nn.Module):
    """Separate RGB/flow backbones, shared or separate heads, one shared prototype layer.

    merge="prior"/"mix": each stream is scored separately. merge="avg": the official AvgRgbFlow model — backbone
    features averaged before a shared head, or head outputs averaged when heads are separate (then normalised:
    the official returns the unnormalised average, docs/official_behaviour.md#merge-modes).
    """

    def __init__(self, spec: ModelSpec, prototypes_init: Optional[np.ndarray] = None):
        """`prototypes_init`: fixed prototypes (K×D, e.g. hyperspherical ones); they are then not trained."""
        super().__init__()
        self.spec = spec
        if spec.modalities not in ("rgb_flow", "rgb", "flow"):
            raise ValueError(f"modalities must be rgb_flow, rgb or flow, got {spec.modalities!r}")
        self.streams = [s for s in STREAMS if s in spec.modalities.split("_")]
        self.merge = spec.merge
        self.backbones = nn.ModuleDict({
            s: build_backbone(spec.arch, 3 if s == "rgb" else spec.flow_channels, spec.pool) for s in self.streams})
        self.feature_dim = self.backbones[self.streams[0]].out_dim
        n_heads = 1 if (spec.shared_head or len(self.streams) == 1) else len(self.streams)
        self.heads = nn.ModuleList([projection_head(self.feature_dim, spec.hidden_dim, spec.embed_dim, spec.head)
                                    for _ in range(n_heads)])
        self.prototypes = Prototypes(spec.embed_dim, spec.num_prototypes, prototypes_init,
                                     frozen=prototypes_init is not None)

    def head(self, stream: str) -> nn.Module:
        return self.heads[0] if len(self.heads) == 1 else self.heads[self.streams.index(stream)]

    def features(self, clips: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pooled backbone features per stream ((N_clips·bs)×F), the representation used for evaluation."""
        return {s: run_grouped(self.backbones[s], clips[s]) for s in self.streams}

    def _score(self, emb: torch.Tensor) -> StreamOutput:
        # normalised in fp32 (autocast off): the scores, hence the codes and the loss logits, must not carry
        # the bf16 rounding of the head's output norm either
        with torch.autocast(device_type=emb.device.type, enabled=False):
            z = F.normalize(emb.float(), dim=1)
        return StreamOutput(z, self.prototypes(z))

    def forward(self, clips: dict[str, list[torch.Tensor]]) -> dict[str, StreamOutput]:
        feats = self.features(clips)
        if self.merge == "avg" and len(self.streams) == 2:
            if len(self.heads) == 1:
                emb = self.heads[0]((feats["rgb"] + feats["flow"]) / 2)
            else:
                emb = (self.heads[0](feats["rgb"]) + self.heads[1](feats["flow"])) / 2
            return {"avg": self._score(emb)}
        return {s: self._score(self.head(s)(feats[s])) for s in self.streams}
