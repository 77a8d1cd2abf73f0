"""Clip augmentation for the CPU loader (torch, T×C×H×W in, C×T×H×W float32 out).

Train pipeline, as the official code (docs/official_behaviour.md#augmentation): random short-side resize (aspect kept,
bilinear), one random crop for all frames, hflip p=0.5, optional time reversal, colour jitter
p=0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; random op order, one draw per
clip), grayscale p=0.2, optional Gaussian blur (official: never applied, so default off),
ImageNet normalisation. Deviations: crop offsets include the last position (the official
randint excludes it) and resizing is antialiased.

Flow (`flow_mode`):
  "shared"   (default): the flow of a clip gets exactly its RGB clip's resize, crop, flip and
             time reversal, no colour ops; values px/20 in [-1, 1], 2 channels (u, v). A flip
             negates u; a time reversal negates u and v (approximating backward flow by the
             negated forward flow). `scale_flow=True` additionally multiplies u, v by the
             resize factors (physically consistent; off by default to keep the MemDPC/CoCLR/
             GOCA convention of flow in source-resolution pixels).
  "official": the released code's independent path: flow as a 3-channel image put through its
             own draw of the whole RGB pipeline (jitter, grayscale, ImageNet normalisation).
             Channel order is what the official loader sees after PyAV to_rgb of its flow
             videos (docs/official_behaviour.md#flow-format): R = 128, G = v, B = u.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torchvision.transforms.v2 import functional as TF

from goca_fast.video.flow_codec import FLOW_BOUND, U8_LEVELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_MODES = ("shared", "official")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand(1, generator=g).item())


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g).item())


def _coin(g: torch.Generator, p: float) -> bool:
    return p > 0 and torch.rand(1, generator=g).item() < p


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) after resizing the short side to `short_side`, aspect kept (torchvision rounding)."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


@dataclass(frozen=True)
class AugParams:
    """Every random decision for one clip (so RGB and flow can share them exactly)."""

    short_side: int
    top: int
    left: int
    flip: bool
    reverse: bool
    jitter: Optional[tuple[tuple[int, ...], float, float, float, float]]  # (order, b, c, s, h)
    gray: bool
    blur_sigma: Optional[float]


def _to_float01(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def flow_to_unit(flow: torch.Tensor) -> torch.Tensor:
    """T×2×H×W quantised uint8 -> float32 px/20 in [-1, 1] (float input is taken as already unit)."""
    if flow.dtype == torch.uint8:
        return flow.float() * (2 * FLOW_BOUND / U8_LEVELS / FLOW_BOUND) - 1.0
    return flow.float()


def official_flow_image(flow_u8: torch.Tensor) -> torch.Tensor:
    """T×2×H×W uint8 (u, v) -> T×3×H×W uint8 image as the official loader sees it: (128, v, u)."""
    if flow_u8.dtype != torch.uint8:
        raise ValueError("official flow mode needs the quantised uint8 flow")
    t, _, h, w = flow_u8.shape
    const = torch.full((t, 1, h, w), 128, dtype=torch.uint8)
    return torch.cat([const, flow_u8[:, 1:2], flow_u8[:, 0:1]], dim=1)


@dataclass(frozen=True, kw_only=True)
class ClipAugment:
    """Training augmentation of one clip; all randomness from the torch.Generator passed in."""

    crop_size: int | tuple[int, int] = 112
    scale_range: tuple[int, int] = (128, 160)   # the resized short side is drawn from this range
    hflip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)   # brightness, contrast, saturation, hue
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    time_reverse_prob: float = 0.0
    flow_mode: str = "shared"
    scale_flow: bool = False
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self) -> None:
        normalised = {"scale_range": (int(self.scale_range[0]), int(self.scale_range[1])),
                      "jitter": tuple(self.jitter), "mean": tuple(self.mean), "std": tuple(self.std),
                      "crop_size": self.crop_size if isinstance(self.crop_size, int) else tuple(self.crop_size)}
        for name, value in normalised.items():  # frozen: lists from YAML become tuples once, here
            object.__setattr__(self, name, value)
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError(f"scale_range must be (low, high), got {self.scale_range}")
        if self.scale_range[0] < min(self.crop):
            raise ValueError(f"scale_range {self.scale_range} has a short side below the crop {self.crop}")
        if self.flow_mode not in FLOW_MODES:
            raise ValueError(f"flow_mode must be one of {FLOW_MODES}, got {self.flow_mode!r}")

    @property
    def crop(self) -> tuple[int, int]:
        """(height, width) of the crop."""
        c = self.crop_size
        return (c, c) if isinstance(c, int) else (int(c[0]), int(c[1]))

    @property
    def blur_kernel(self) -> int:
        """Odd Gaussian-blur window, about a tenth of the crop (SimCLR's choice)."""
        return min(self.crop) // 20 * 2 + 1

    # ------------------------------------------------------------------ random draws

    def draw(self, height: int, width: int, g: torch.Generator) -> AugParams:
        """One draw of every random choice for a clip of height×width frames."""
        short = int(round(_uniform(g, self.scale_range[0], self.scale_range[1])))
        rh, rw = resized_size(height, width, short)
        ch, cw = self.crop
        if rh < ch or rw < cw:
            raise ValueError(f"resized clip {rh}x{rw} is smaller than the crop {ch}x{cw}")
        top, left = _randint(g, 0, rh - ch), _randint(g, 0, rw - cw)
        flip = _coin(g, self.hflip_prob)
        reverse = _coin(g, self.time_reverse_prob)
        jitter = None
        if _coin(g, self.jitter_prob):
            b, c, s, h = self.jitter
            order = tuple(torch.randperm(4, generator=g).tolist())
            jitter = (order, _uniform(g, max(0.0, 1 - b), 1 + b), _uniform(g, max(0.0, 1 - c), 1 + c),
                      _uniform(g, max(0.0, 1 - s), 1 + s), _uniform(g, -h, h))
        gray = _coin(g, self.grayscale_prob)
        sigma = _uniform(g, 0.1, 2.0) if _coin(g, self.blur_prob) else None
        return AugParams(short, top, left, flip, reverse, jitter, gray, sigma)

    # ------------------------------------------------------------------ application

    def _geometry(self, x: torch.Tensor, p: AugParams) -> torch.Tensor:
        """Resize (uint8 stays uint8: torchvision's uint8 antialiased resize is ~6x faster than float, within one
        grey level of it), crop, flip, reverse."""
        x = TF.resize(x, [p.short_side], antialias=True)
        x = x[..., p.top:p.top + self.crop[0], p.left:p.left + self.crop[1]]
        if p.flip:
            x = x.flip(-1)
        if p.reverse:
            x = x.flip(0)
        return x

    def apply_rgb(self, clip: torch.Tensor, p: AugParams) -> torch.Tensor:
        """T×3×H×W (uint8 or float in [0,1]) -> 3×T×h×w float32, normalised."""
        x = _to_float01(self._geometry(clip, p))
        if p.jitter is not None:
            order, b, c, s, h = p.jitter
            ops = (lambda y: TF.adjust_brightness(y, b), lambda y: TF.adjust_contrast(y, c),
                   lambda y: TF.adjust_saturation(y, s), lambda y: TF.adjust_hue(y, h))
            for i in order:
                x = ops[i](x)
        if p.gray:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if p.blur_sigma is not None:
            x = TF.gaussian_blur(x, [self.blur_kernel] * 2, [p.blur_sigma] * 2)
        return _normalise(x, self.mean, self.std).permute(1, 0, 2, 3).contiguous()

    def apply_flow_shared(self, flow: torch.Tensor, p: AugParams) -> torch.Tensor:
        """T×2×H×W flow -> 2×T×h×w float32 in [-1, 1] with the clip's own geometry."""
        t, _, h, w = flow.shape
        x = flow_to_unit(self._geometry(flow, p))  # resized as uint8 like RGB: within a quantisation level
        if self.scale_flow:
            rh, rw = resized_size(h, w, p.short_side)
            x = x * torch.tensor([rw / w, rh / h]).view(1, 2, 1, 1)
        sign = torch.tensor([-1.0 if p.flip else 1.0, 1.0]).view(1, 2, 1, 1)
        if p.reverse:
            sign = -sign
        x = x * sign
        return x.permute(1, 0, 2, 3).contiguous()

    def __call__(self, rgb: torch.Tensor, flow: Optional[torch.Tensor],
                 g: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Augment one clip (and its flow over the same frames) with one draw per stream."""
        _, _, h, w = rgb.shape
        p = self.draw(h, w, g)
        out_rgb = self.apply_rgb(rgb, p)
        if flow is None:
            return out_rgb, None
        if flow.shape[0] != rgb.shape[0] or flow.shape[-2:] != rgb.shape[-2:]:
            raise ValueError(f"flow {tuple(flow.shape)} does not match rgb {tuple(rgb.shape)}")
        if self.flow_mode == "shared":
            return out_rgb, self.apply_flow_shared(flow, p)
        pf = self.draw(h, w, g)  # official: independent draw of everything
        return out_rgb, self.apply_rgb(official_flow_image(flow), pf)


# ---------------------------------------------------------------------- eval


def _eval_offsets(h: int, w: int, crop: int, position: int) -> tuple[int, int]:
    """Left/centre/right crops along the long side (top/centre/bottom for portrait)."""
    if position not in (0, 1, 2):
        raise ValueError(f"crop position must be 0, 1 or 2, got {position}")
    if h <= w:
        along = (0, (w - crop) // 2, w - crop)[position]
        return (h - crop) // 2, along
    along = (0, (h - crop) // 2, h - crop)[position]
    return along, (w - crop) // 2


def eval_crops(clip: torch.Tensor, short_side: int, crop_size: int, positions: Sequence[int] = (0, 1, 2),
               kind: str = "rgb", flow_mode: str = "shared",
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Deterministic eval views of one clip: V×C×T×crop×crop float32 (V = len(positions)).

    kind="rgb": T×3×H×W -> normalised RGB. kind="flow": T×2×H×W uint8 -> 2 channels px/20
    ("shared") or the official 3-channel normalised flow image ("official").
    """
    if crop_size > short_side:
        raise ValueError(f"crop {crop_size} larger than the short side {short_side}")
    if kind == "rgb":  # resized as uint8, as in training
        x = _to_float01(TF.resize(clip, [short_side], antialias=True))
    elif kind == "flow" and flow_mode == "shared":
        x = flow_to_unit(TF.resize(clip, [short_side], antialias=True))
    elif kind == "flow" and flow_mode == "official":
        x = _to_float01(TF.resize(official_flow_image(clip), [short_side], antialias=True))
    else:
        raise ValueError(f"kind must be rgb/flow and flow_mode one of {FLOW_MODES}, got {kind!r}, {flow_mode!r}")
    h, w = x.shape[-2:]
    views = []
    for pos in positions:
        top, left = _eval_offsets(h, w, crop_size, pos)
        views.append(x[..., top:top + crop_size, left:left + crop_size])
    out = torch.stack(views)  # V×T×C×h×w
    if not (kind == "flow" and flow_mode == "shared"):
        out = _normalise(out.flatten(0, 1), mean, std).view(out.shape)
    return out.permute(0, 2, 1, 3, 4).contiguous()
