"""Locates the CUDA Sinkhorn extension (sources in `kernels/`) and says clearly why it is unavailable.

The torch path in `goca_fast.assign` is the reference; `backend="auto"` uses the extension only on CUDA tensors
when it imports.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Optional[object], str]:
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    try:
        from goca_fast import _sinkhorn_cuda  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"the compiled extension goca_fast._sinkhorn_cuda is not installed ({e})"
    return _sinkhorn_cuda, ""


def available() -> tuple[bool, str]:
    """(True, "") when the CUDA extension can be used, else (False, reason)."""
    ext, why = _load()
    return ext is not None, why


def goca_codes(scores_rgb, scores_flow, epsilon, prior_epsilon, iterations, cycles, sign, group, keep_last):
    ext, why = _load()
    if ext is None:
        raise RuntimeError(f"CUDA Sinkhorn extension unavailable: {why}")
    return ext.goca_codes(scores_rgb, scores_flow, epsilon, prior_epsilon, iterations, cycles, sign, group,
                          keep_last)
