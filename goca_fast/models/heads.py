"""Projection heads and the shared prototype layer."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


HEADS = ("mlp", "linear")


def projection_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, kind: str = "mlp") -> nn.Module:
    """kind "mlp": enc → hidden → hidden → out with BN+ReLU on the hidden layers (the official 3-linear MLP).
    kind "linear": enc → out, one linear map (no hidden_dim): the codes' gradient then shapes the pooled backbone
    features directly, which the guidance benchmark measured to matter for what kNN on those features sees."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind != "mlp":
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class Prototypes(nn.Module):
    """K×D prototype matrix (no bias) shared by both streams; rows are L2-normalised before every step."""

    def __init__(self, dim: int, count: int, init: Optional[np.ndarray] = None, frozen: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(count, dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default, as in the official code
        if init is not None:
            if init.shape != (count, dim):
                raise ValueError(f"precomputed prototypes have shape {init.shape}, expected {(count, dim)} "
                                 f"(model.num_prototypes × model.embed_dim)")
            with torch.no_grad():
                self.weight.copy_(torch.from_numpy(np.asarray(init, dtype=np.float32)))
        self.frozen = frozen
        if frozen:
            self.weight.requires_grad_(False)

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """fp32 scores z·Wᵀ whatever the autocast: the codes are computed from them at ε ≈ 0.02, where bf16's
        0.4 % rounding of a cosine score becomes ~1 % code error and argmax flips (the backbone may stay bf16)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return z.float() @ self.weight.float().t()


def load_prototypes(path: str) -> np.ndarray:
    """Read a K×D `.npy` of precomputed (e.g. hyperspherical) prototypes with a clear error."""
    try:
        arr = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read prototypes file {path}: {e}") from None
    if arr.ndim != 2 or not np.isfinite(arr).all():
        raise ValueError(f"prototypes file {path} must hold a finite 2-D K×D array, got shape {arr.shape}")
    return arr


def max_cosine(unit: torch.Tensor) -> torch.Tensor:
    """mean_i max_{j≠i} cos(p_i, p_j) for unit rows p: how close each prototype's nearest neighbour is (the Mettes et
    al. objective minus its constant 1; `goca-prototypes` minimises it)."""
    cos = unit @ unit.T
    cos = cos - 3.0 * torch.eye(len(unit), device=unit.device, dtype=unit.dtype)  # the diagonal never wins the max
    return cos.max(dim=1).values.mean()


def prototype_separation(weight: torch.Tensor) -> torch.Tensor:
    """mean_i max_{j≠i} (1 + cos(c_i, c_j)) of the normalised rows: the official regulariser that spreads
    prototypes apart."""
    return 1.0 + max_cosine(F.normalize(weight, dim=1))
