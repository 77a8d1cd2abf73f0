"""Nearest-neighbour video retrieval (the standard protocol of CoCLR/ViCC/GOCA): test queries against the train
gallery by cosine similarity; R@k = % of queries with at least one same-class video among the k nearest.

Ties in similarity are broken by gallery order (a stable sort), so results are deterministic.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (1, 5, 10, 20, 50)


QUERY_CHUNK = 1024        # queries scored at once
GALLERY_CHUNK = 16384     # gallery rows normalised and scored at once: with the query chunk, ~64 MiB of scores


def recall_at_k(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                gallery_labels: torch.Tensor, ks: Sequence[int] = DEFAULT_KS, chunk: int = QUERY_CHUNK,
                gallery_chunk: int = GALLERY_CHUNK) -> dict[int, float]:
    """R@k in percent for every k (k larger than the gallery is clamped to its size)."""
    order, _ = nearest_neighbours(query, gallery, max(ks), chunk, gallery_chunk)
    match = gallery_labels[order] == query_labels[:, None]
    return {k: 100.0 * float(match[:, :min(k, order.shape[1])].any(dim=1).float().mean()) for k in ks}


def nearest_neighbours(query: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = QUERY_CHUNK,
                       gallery_chunk: int = GALLERY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most cosine-similar gallery rows per query (Q×k indices, Q×k similarities), ties in gallery order.

    Scored in blocks of `chunk` queries × `gallery_chunk` gallery rows, each block keeping its top k and merging
    them into a running top k per query: memory is set by the block sizes, not the gallery (a 240k gallery would
    be ~1 GB of scores per 1,000 queries at once), time is linear in gallery × queries. Exact: rows whose k-th
    score is tied beyond k inside a block are ranked by a stable sort, so the order is the one a stable sort of
    the whole row gives. Same ordering as :func:`recall_at_k`, so a retrieval grid shows the neighbours scored.
    """
    if query.shape[0] == 0 or gallery.shape[0] == 0:
        raise ValueError("retrieval needs at least one query and one gallery video")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query features are {query.shape[1]}-d but gallery features {gallery.shape[1]}-d")
    q = F.normalize(query.float(), dim=1)
    k = min(int(k), gallery.shape[0])
    best_sim = torch.full((q.shape[0], 0), float("-inf"))
    best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for g0 in range(0, gallery.shape[0], gallery_chunk):
        g = F.normalize(gallery[g0:g0 + gallery_chunk].float(), dim=1)
        sims, idxs = [], []
        for q0 in range(0, q.shape[0], chunk):
            sim, idx = _block_top_k(q[q0:q0 + chunk] @ g.t(), k)
            sim, idx = _merge_top_k(torch.cat([best_sim[q0:q0 + chunk], sim], 1),
                                    torch.cat([best_idx[q0:q0 + chunk], idx + g0], 1), k)
            sims.append(sim)
            idxs.append(idx)
        best_sim, best_idx = torch.cat(sims), torch.cat(idxs)
    return best_idx, best_sim


def _block_top_k(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top min(k, width) of each row of one score block, ties at the cut taken in column order."""
    k = min(k, sim.shape[1])
    top, idx = sim.topk(k, dim=1)
    tied = ((sim >= top[:, -1:]).sum(1) > k).nonzero().squeeze(1)   # topk's choice among ties is arbitrary
    if len(tied):
        order = torch.sort(-sim[tied], dim=1, stable=True).indices[:, :k]
        idx[tied] = order
        top[tied] = torch.gather(sim[tied], 1, order)
    return top, idx


def _merge_top_k(sim: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best candidates per row by (score descending, gallery index ascending)."""
    by_index = torch.sort(idx, dim=1, stable=True).indices
    sim, idx = torch.gather(sim, 1, by_index), torch.gather(idx, 1, by_index)
    by_score = torch.sort(-sim, dim=1, stable=True).indices[:, :k]
    return torch.gather(sim, 1, by_score), torch.gather(idx, 1, by_score)


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
