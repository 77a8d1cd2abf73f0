"""Nearest-neighbour video retrieval (the standard protocol of CoCLR/ViCC/GOCA): test queries against the train
gallery by cosine similarity; R@k = % of queries with at least one same-class video among the k nearest.

Ties in similarity are broken by gallery order (a stable sort), so results are deterministic.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (1, 5, 10, 20, 50)


def recall_at_k(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                gallery_labels: torch.Tensor, ks: Sequence[int] = DEFAULT_KS, chunk: int = 1024) -> dict[int, float]:
    """R@k in percent for every k (k larger than the gallery is clamped to its size)."""
    order, _ = nearest_neighbours(query, gallery, max(ks), chunk)
    match = gallery_labels[order] == query_labels[:, None]
    return {k: 100.0 * float(match[:, :min(k, order.shape[1])].any(dim=1).float().mean()) for k in ks}


def nearest_neighbours(query: torch.Tensor, gallery: torch.Tensor, k: int,
                       chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar gallery rows per query (Q×k indices, Q×k similarities), ties in gallery order.

    Same ordering as :func:`recall_at_k`, so a retrieval grid shows exactly the neighbours that were scored.
    """
    if query.shape[0] == 0 or gallery.shape[0] == 0:
        raise ValueError("retrieval needs at least one query and one gallery video")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query features are {query.shape[1]}-d but gallery features {gallery.shape[1]}-d")
    q = F.normalize(query.float(), dim=1)
    g = F.normalize(gallery.float(), dim=1)
    k = min(int(k), g.shape[0])
    idx, sims = [], []
    for start in range(0, q.shape[0], chunk):
        sim = q[start:start + chunk] @ g.t()
        order = torch.sort(-sim, dim=1, stable=True).indices[:, :k]
        idx.append(order)
        sims.append(torch.gather(sim, 1, order))
    return torch.cat(idx), torch.cat(sims)


def combine_streams(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """RGB+flow retrieval feature: the mean of the L2-normalised per-stream features (official: averaged)."""
    return torch.stack([F.normalize(f.float(), dim=1) for f in features.values()]).mean(0)


def format_table(rows: dict[str, dict[str, dict[int, float]]], ks: Sequence[int]) -> str:
    """rows: model name → stream → {k: R@k}. A plain-text table for the terminal and the README."""
    head = f"{'model':<14}{'stream':<10}" + "".join(f"{'R@' + str(k):>8}" for k in ks)
    lines = [head, "-" * len(head)]
    for model, per_stream in rows.items():
        for stream, rec in per_stream.items():
            lines.append(f"{model:<14}{stream:<10}" + "".join(f"{rec[k]:>8.1f}" for k in ks))
    return "\n".join(lines)
