"""The training source of DALI's CPU backend: the sample's frames decoded by the project's seeking reader, each RGB
clip's crop resized and coloured in the source's worker processes, the rest of the clip left to the DALI graph.

DALI 1.53's CPU decoder decodes every file from its first frame (measured: 10-18x the cost of a clip at frame 0 for
one at the end of a 750-frame video), so the frames come from `goca_fast.video.io.read_yuv420` and
`goca_fast.video.flow_codec.read_flow_planes` (exact, and their cost does not grow with where a clip starts).

RGB arrives as the decoder's 4:2:0 planes. Each plane's crop window is resized straight to the crop size with the
triangle filter of DALI's antialiased linear resize (`resize_window`), then one affine map takes the clip from
BT.601 YCbCr to colour-jittered RGB (`ycbcr_colour_map`, applied by `apply_colour_map`). Done here instead of by
DALI's CPU operators because those cost far more on these small crops (measured per sample of 6 clips on one
core: resize 15 ms, the colour map 17 ms and the channel concatenation 4 ms in DALI; moving the work here made
the DALI graph 39 ms cheaper and the source 18 ms dearer). The GPU graph keeps its own resize and `color_twist`;
the tests hold both to each other.
"""
from __future__ import annotations

import logging
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from dali_pipelines.source import P_JITTER, P_ROI, TrainSource
from goca_fast.video.flow_codec import read_flow_planes
from goca_fast.video.io import YUV_TO_RGB, VideoReadError, read_yuv420, set_decoder_threads

log = logging.getLogger(__name__)

# DALI's `color_twist` works in YIQ: hue rotates and saturation scales the (I, Q) plane. NTSC RGB -> YIQ, and back.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def ycbcr_colour_map(jitter: np.ndarray) -> np.ndarray:
    """The clip's colour jitter (brightness, contrast, saturation, hue in degrees: `P_JITTER`) as one 3×4 float32
    map [M | t] from BT.601 limited-range YCbCr to RGB: DALI's `color_twist` (hue and saturation in YIQ, contrast
    around 128, then brightness) after `color_space_conversion`, composed, so one pass over the crop does both. It
    differs from the two ops only where they round or clip in between (a converted pixel outside [0, 255] keeps its
    value into the jitter); a saturation of 0 is greyscale."""
    b, c, s, h = (float(v) for v in jitter)
    t = np.deg2rad(h)
    rotate = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), np.sin(t)], [0.0, -np.sin(t), np.cos(t)]])
    twist = b * c * _YIQ_TO_RGB @ rotate @ np.diag([1.0, s, s]) @ _RGB_TO_YIQ
    offset = np.full(3, (1 - c) * 128.0 * b)
    m, t0 = YUV_TO_RGB[:, :3].astype(np.float64), YUV_TO_RGB[:, 3].astype(np.float64)
    return np.concatenate([twist @ m, (twist @ t0 + offset)[:, None]], axis=1).astype(np.float32)


def resize_window(plane: np.ndarray, window: Sequence[float], size: tuple[int, int]) -> np.ndarray:
    """The window (y0, x0, y1, x1, in pixels, fractional allowed) of a uint8 H×W plane resized to `size` (h, w):
    the separable triangle filter of DALI's `resize(antialias=True, INTERP_LINEAR)` with a roi, widened by the
    downscale factor where the window shrinks. Pillow's `resize(box=...)` computes that filter; where the window
    does not shrink on either axis it is plain bilinear interpolation, which OpenCV's warp computes 8x faster.
    Both agree with DALI to one grey level (tested)."""
    y0, x0, y1, x1 = (float(v) for v in window)
    h, w = size
    sy, sx = (y1 - y0) / h, (x1 - x0) / w
    if sy <= 1.0 and sx <= 1.0:
        # output pixel i's centre (i + 0.5) lands at x0 + (i + 0.5) * sx in the plane, whose pixel centres OpenCV
        # puts at integers
        to_plane = np.array([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]])
        return cv2.warpAffine(plane, to_plane, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)
    return np.asarray(Image.fromarray(plane).resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1),
                                                    reducing_gap=None))


def rgb_clip(planes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], order: np.ndarray, window: np.ndarray,
             colour: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """F×h×w×3 uint8 RGB training crop of the frames `order` of the decoded (Y, Cb, Cr) planes: each plane's crop
    `window` (in luma pixels; the chroma window is it halved, exact for centre-sited chroma) resized to `crop`,
    then the clip's 3×4 `colour` map (`ycbcr_colour_map`, `apply_colour_map`) in one rounding pass. Black when
    nothing was decoded, so the batch keeps its shape."""
    out = np.zeros((len(order), crop[0], crop[1], 3), np.uint8)
    luma_window = tuple(float(v) for v in window)
    chroma_window = tuple(v / 2 for v in luma_window)
    for k in range(len(order) if planes else 0):
        y, cb, cr = planes[order[k]]
        ycc = cv2.merge([resize_window(y, luma_window, crop), resize_window(cb, chroma_window, crop),
                         resize_window(cr, chroma_window, crop)])
        out[k] = apply_colour_map(ycc, colour)
    return out


def apply_colour_map(pixels: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 through a 3×4 affine colour map, computed in float32 and rounded once to the nearest level, as
    DALI's colour operators round. (OpenCV's transform straight on uint8 is 4x faster but off by one level in
    about 3% of values; in float it costs about 1 ms per sample of 6 clips.)"""
    x = cv2.transform(pixels.astype(np.float32), colour)
    np.rint(x, out=x)
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


def crop_box(roi: np.ndarray, height: int, width: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the part of a height×width frame that resizing the window `roi` (y0, x0, y1,
    x1) to `crop` reads: the window grown by 2·(ceil(downscale factor) + 2) pixels, a safe bound on the filter's
    reach (its radius is the downscale factor, at least one pixel), clipped to the frame, with an even top and left
    (needed once for half-resolution chroma boxes; kept, it costs at most a pixel)."""
    y0, x0, y1, x1 = (float(v) for v in roi)
    scale = max((y1 - y0) / crop[0], (x1 - x0) / crop[1], 1.0)
    reach = 2 * (int(np.ceil(scale)) + 2)
    top, left = max(0, int(np.floor(y0)) - reach) // 2 * 2, max(0, int(np.floor(x0)) - reach) // 2 * 2
    bottom, right = min(height, int(np.ceil(y1)) + reach), min(width, int(np.ceil(x1)) + reach)
    return top, left, bottom, right


def _boxed(params: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The clip's parameters with its window moved into `box`'s coordinates."""
    v = params.copy()
    v[P_ROI] -= np.array([box[0], box[1], box[0], box[1]], np.float32)
    return v


def flow_crops(planes: Sequence[np.ndarray], order: np.ndarray, box: tuple[int, int, int, int],
               height: int) -> np.ndarray:
    """F×h×w×2 (u, v) of the frames `order` of the decoded flow luma planes (u above v, each `height` rows), cut to
    `box` (zero when nothing was decoded)."""
    top, left, bottom, right = box
    uv = np.zeros((len(order), bottom - top, right - left, 2), np.uint8)
    for k in range(len(order) if planes else 0):
        luma = planes[order[k]]
        uv[k, ..., 0] = luma[top:bottom, left:right]
        uv[k, ..., 1] = luma[height + top:height + bottom, left:right]
    return uv


class SeekingTrainSource(TrainSource):
    """`TrainSource` for DALI's CPU backend (see the module docstring). Outputs: meta, then per clip: RGB
    F×h×w×3 uint8 (`rgb_clip`: resized and colour-jittered; the graph blurs, flips and normalises it), RGB params,
    [flow F×h×w×2 (u, v) uint8 cut to the part its crop reads (`crop_box`), flow params with the window in that
    box's coordinates]. A video that cannot be decoded is logged and dropped from its batch through the meta row's
    keep flag (as a too-short video is), the rest of the batch trains; raising would surface on an earlier batch,
    the source running ahead."""

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        set_decoder_threads(1)   # the pipeline's Python workers already run in parallel
        sp = self.plan(info.idx_in_epoch)
        meta, crop = sp.meta, self.augment.crop
        h, w = meta.height, meta.width
        try:
            rgb = read_yuv420(meta.rgb, sp.frames)
            flow = read_flow_planes(meta.flow, sp.frames) if self.with_flow else []
            if rgb[0][0].shape != (h, w) or (flow and flow[0].shape != (2 * h, w)):
                raise VideoReadError(f"{meta.id}: frames are not {w}x{h} as the index says (flow: {w}x{2 * h})")
        except VideoReadError as e:
            if meta.id not in self._warned:
                self._warned.add(meta.id)
                log.warning("skipping video %s: cannot decode it (%s)", meta.id, e)
            rgb, flow = [], []
            sp.row[2] = 0  # dropped from its batch like a too-short video; the rest of the batch trains
        out = [sp.row]
        for order, params, flow_clip in sp.clips:
            out += [rgb_clip(rgb, order, params[P_ROI], ycbcr_colour_map(params[P_JITTER]), crop), params]
            if flow_clip is not None:
                f_order, f_params = flow_clip
                f_box = crop_box(f_params[P_ROI], h, w, crop)
                out += [flow_crops(flow, f_order, f_box, h), _boxed(f_params, f_box)]
        return tuple(out)
