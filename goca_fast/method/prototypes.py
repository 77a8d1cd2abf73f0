"""`goca-prototypes`: hyperspherical prototypes (Mettes et al., NeurIPS 2019) for `model.prototypes_path`.

K unit vectors in D dimensions spread as evenly as possible: minimise the mean over prototypes of
each one's largest cosine similarity to any other, L = mean_i max_{j≠i} cos(p_i, p_j), by gradient
steps on the sphere (renormalised after every step). The official script does this with plain
gradient descent (lr 0.1) for 50000 steps on a CPU, one K×K similarity matrix per step; here it
is the same vectorised objective with SGD + momentum 0.9 (the official script meant to use
momentum, but rebuilt its optimiser every step), on the GPU when present, converging in a few
thousand steps. Writes a float32 K×D `.npy` of unit rows that `models.heads.load_prototypes` reads,
prints the nearest-neighbour angles and saves a PNG histogram against random prototypes.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from goca_fast.models.heads import max_cosine


def nearest_neighbour_angles(p: np.ndarray | torch.Tensor) -> np.ndarray:
    """Angle in degrees from each row to its nearest other row (rows normalised first)."""
    t = F.normalize(torch.as_tensor(np.asarray(p), dtype=torch.float64), dim=1)
    cos = t @ t.T
    cos.fill_diagonal_(-2.0)
    return np.degrees(np.arccos(cos.max(dim=1).values.clamp(-1, 1).numpy()))


def random_prototypes(num: int, dim: int, seed: int = 0) -> np.ndarray:
    """Uniform random unit vectors (the baseline hyperspherical prototypes must beat)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num, dim, generator=g, dtype=torch.float64), dim=1).float().numpy()


def hyperspherical_prototypes(num: int, dim: int, steps: int = 3000, lr: float = 0.1, momentum: float = 0.9,
                              seed: int = 300, device: str = "cpu", log_every: int = 0) -> np.ndarray:
    """Optimise `num` unit prototypes in `dim` dimensions; returns float32 num×dim unit rows."""
    if num < 2 or dim < 2:
        raise ValueError(f"need at least 2 prototypes in at least 2 dimensions, got {num}×{dim}")
    if steps < 0 or lr <= 0:
        raise ValueError("steps must be >= 0 and lr > 0")
    g = torch.Generator().manual_seed(seed)
    p = F.normalize(torch.randn(num, dim, generator=g), dim=1).to(device).requires_grad_(True)
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum)
    for step in range(steps):
        loss = max_cosine(p)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            p.div_(p.norm(dim=1, keepdim=True))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step}: mean max cos {loss.item():.4f}", file=sys.stderr)
    return F.normalize(p.detach().double(), dim=1).float().cpu().numpy()
