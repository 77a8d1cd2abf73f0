"""Temporal sampling: which frame indices make up each clip.

Pure functions of plain numbers (no I/O, no config objects); randomness only from the
`np.random.Generator` passed in, so a caller can make sampling independent of worker
assignment by deriving the generator from (seed, epoch, item).

Behaviour follows the official GOCA code (its "strategy 1 / start 3", see
docs/official_behaviour.md#temporal-sampling) with two
documented deviations that only matter for degenerate inputs:
  * a video shorter than a clip's span (even after stride adaptation) gets valid indices
    (clamped to the last frame, i.e. the last frame is repeated) instead of an error;
  * eval with a single clip per video uses the centre start (the official code divides
    by zero there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def adapted_stride(num_frames: int, first_clip_length: int, stride: int) -> int:
    """Stride used for every clip of a video: shrunk only when the FIRST clip would not fit.

    Official rule (computed once, at the first clip): s if L0*s <= n else floor(n/L0),
    never below 1.
    """
    if first_clip_length * stride <= num_frames:
        return stride
    return max(1, num_frames // first_clip_length)


def _check_common(num_frames: int, stride: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")


def _clip_indices(start: int, length: int, stride: int, num_frames: int) -> np.ndarray:
    """start + k*stride, clamped so a too-short video repeats its last frame."""
    idx = start + stride * np.arange(length, dtype=np.int64)
    return np.minimum(idx, num_frames - 1)


def _max_allowed_distance(candidates: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """For each candidate x, the largest minn for which x is outside every [c-minn, c+minn).

    x is excluded by c iff -minn <= x-c < minn, so x is allowed iff minn <= x-c (x >= c)
    or minn <= c-x-1 (x < c).
    """
    if not starts:
        return np.full(candidates.shape, np.iinfo(np.int64).max, dtype=np.int64)
    d = candidates[:, None] - np.asarray(starts, dtype=np.int64)[None, :]
    per_start = np.where(d >= 0, d, -d - 1)
    return per_start.min(axis=1)


def sample_train_clips(num_frames: int, clip_lengths: Sequence[int], stride: int,
                       min_distance: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Official training temporal multi-crop: random starts kept `min_distance` apart.

    `clip_lengths` is the flat per-clip list in config order (e.g. [16, 16, 8, 8, 8, 8]).
    The stride is adapted once from the first clip; each start is uniform over the allowed
    part of [0, n-(L-1)*s); the exclusion radius shrinks (and stays shrunk for later clips,
    as in the official code) until some start is allowed. Clips may overlap.
    Returns one int64 array of L frame indices per clip, all in [0, n).
    """
    _check_common(num_frames, stride)
    if len(clip_lengths) == 0:
        raise ValueError("clip_lengths is empty")
    if any(int(L) < 1 for L in clip_lengths):
        raise ValueError(f"clip lengths must be >= 1, got {list(clip_lengths)}")
    if min_distance < 0:
        raise ValueError(f"min_distance must be >= 0, got {min_distance}")

    n = int(num_frames)
    s = adapted_stride(n, int(clip_lengths[0]), int(stride))
    minn = int(min_distance)
    starts: list[int] = []
    clips: list[np.ndarray] = []
    for L in clip_lengths:
        L = int(L)
        high = n - (L - 1) * s
        if high <= 0:
            # Video shorter than this clip's span: start at 0, clamp (repeat last frame).
            start = 0
        else:
            cand = np.arange(high, dtype=np.int64)
            best = _max_allowed_distance(cand, starts)
            minn = min(minn, int(best.max()))  # the official decrement-until-allowed, in one step
            allowed = cand[best >= minn]
            start = int(allowed[rng.integers(len(allowed))])
        starts.append(start)
        clips.append(_clip_indices(start, L, s, n))
    return clips


@dataclass(frozen=True)
class EvalClips:
    """Deterministic eval clips of one video.

    indices: one int64 array per clip. stride: the stride actually used.
    padded: True when the video had fewer frames than one clip (last frame repeated).
    """

    indices: list[np.ndarray]
    stride: int
    padded: bool


def uniform_eval_clips(num_frames: int, clip_length: int, stride: int,
                       num_clips: int) -> EvalClips:
    """Evenly spread eval clips (deterministic, so eval numbers are reproducible).

    Stride shrinks to max(1, floor(n/L)) when L*s > n (official rule). Starts are
    round(linspace(0, n-span-1, num_clips)) so every clip lies inside the video; one clip
    is centred. A video shorter than L frames is padded by repeating its last frame.
    """
    _check_common(num_frames, stride)
    if clip_length < 1 or num_clips < 1:
        raise ValueError(f"clip_length and num_clips must be >= 1, got {clip_length}, {num_clips}")
    n, L = int(num_frames), int(clip_length)
    s = adapted_stride(n, L, int(stride))
    span = (L - 1) * s
    last_start = n - span - 1
    padded = last_start < 0
    if padded:
        starts = np.zeros(num_clips, dtype=np.int64)
    elif num_clips == 1:
        starts = np.array([last_start // 2], dtype=np.int64)
    else:
        starts = np.round(np.linspace(0, last_start, num_clips)).astype(np.int64)
    return EvalClips([_clip_indices(int(st), L, s, n) for st in starts], s, bool(padded))
