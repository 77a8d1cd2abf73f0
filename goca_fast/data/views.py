"""How an evaluation views a video (clips × crops of a fixed geometry): shared by the loaders (data, DALI) and
the evaluation, so it lives below both."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from goca_fast.config import ConfigError


def plural(n: int, word: str, words: Optional[str] = None) -> str:
    """"1 epoch", "2 epochs": a count with its noun in the right number (`words` for irregular plurals)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


@dataclass(frozen=True)
class ViewOverrides:
    """A command line's changes to a view protocol; None keeps the protocol's value."""

    clips: Optional[int] = None
    crops: Optional[int] = None
    clip_length: Optional[int] = None
    stride: Optional[int] = None


@dataclass(frozen=True)
class ViewSpec:
    """The eval view protocol: num_clips uniformly spaced clips × crops spatial crops per video
    (docs/official_behaviour.md#evaluation-views)."""

    clip_length: int
    stride: int
    num_clips: int
    crops: int
    crop_size: int
    short_side: int
    flow_mode: str = "shared"

    @property
    def views(self) -> int:
        return self.num_clips * self.crops

    def describe(self) -> str:
        return (f"{plural(self.num_clips, 'clip')} × {plural(self.crops, 'crop')} of "
                f"{plural(self.clip_length, 'frame')} (stride {self.stride}), "
                f"short side {self.short_side} → {self.crop_size}² crops")

    def with_overrides(self, overrides: ViewOverrides) -> "ViewSpec":
        """This protocol with the command line's overrides, checked (a ConfigError: one line, exit 2)."""
        o = overrides
        spec = replace(self, clip_length=o.clip_length or self.clip_length, stride=o.stride or self.stride,
                       num_clips=o.clips or self.num_clips, crops=o.crops or self.crops)
        if spec.crops not in (1, 3):
            raise ConfigError(f"crops must be 1 (centre) or 3 (left/centre/right), got {spec.crops}")
        if spec.num_clips < 1 or spec.clip_length < 1 or spec.stride < 1:
            raise ConfigError(f"clips, clip length and stride must be >= 1, got {spec.num_clips}, "
                              f"{spec.clip_length}, {spec.stride}")
        return spec
