"""Swapped-prediction loss (SwAV / GOCA): each assigned clip's codes are predicted from every other clip's scores."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def swapped_prediction(scores: list[torch.Tensor], codes: dict[int, torch.Tensor], temperature: float) -> torch.Tensor:
    """mean over assigned clips i of  1/(N−1) · Σ_{v≠i} mean_b( −Σ_k q_i[b,k] · log softmax(s_v[b]/τ)_k ).

    scores: N blocks of bs×K (with grad); codes: assigned block index → bs×K codes (no grad).
    The sum over v≠i is computed as (Σ_v log p_v) − log p_i, so the cost is one log-softmax per block.
    """
    n = len(scores)
    if n < 2:
        raise ValueError("swapped prediction needs at least two clips")
    if not codes:
        raise ValueError("no assigned clips")
    logp = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    total_logp = torch.stack(logp).sum(dim=0)
    loss = scores[0].new_zeros((), dtype=torch.float32)
    for i, q in codes.items():
        others = total_logp - logp[i]
        loss = loss + (-(q * others).sum(dim=1).mean()) / (n - 1)
    return loss / len(codes)
