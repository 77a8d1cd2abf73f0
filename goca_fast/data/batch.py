"""The batch contract between every loader (CPU PyAV, DALI) and the model.

Both loaders yield exactly this, so the engine cannot tell them apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ClipBatch:
    """A batch of N videos, each cut into several clips.

    rgb:   list over clips (config order, groups of equal length), each N×3×T×H×W float.
    flow:  same layout with 2 channels (u, v in [-1, 1]), or None for RGB-only runs.
           Clip i of flow covers exactly the frame indices of clip i of rgb.
    label: N int64 class ids (unused by pretraining, used by monitors/eval).
    index: N int64 dataset indices (for bookkeeping and exact resume checks).
    skipped: how many videos of this batch were dropped as unreadable (reported, never fatal).
    """

    rgb: list[torch.Tensor]
    flow: Optional[list[torch.Tensor]]
    label: torch.Tensor
    index: torch.Tensor
    skipped: int = 0

    @property
    def batch_size(self) -> int:
        return int(self.rgb[0].shape[0])

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None,
           non_blocking: bool = True) -> "ClipBatch":
        """Move every clip to `device` (optionally casting float clips to `dtype`)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype, non_blocking=non_blocking)

        return ClipBatch(
            rgb=[move(c) for c in self.rgb],
            flow=None if self.flow is None else [move(c) for c in self.flow],
            label=self.label.to(device, non_blocking=non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
            skipped=self.skipped,
        )
