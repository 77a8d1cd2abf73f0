"""DALI graph pieces shared by the training and evaluation pipelines (no randomness: every draw arrives as a
per-sample argument from `dali_pipelines.source`).

A clip is: decode the sample's frames once (`decoders.video(frames=...)`: the distinct frames all its clips
need) -> `sequence_rearrange` picks the clip's frames by position (stride, repeats and time reversal included) -> the drawn crop window resized to the crop size (= resize to the drawn short side,
then crop) -> colour ops (RGB) ->
`crop_mirror_normalize` (flip, normalisation, F×H×W×C -> C×F×H×W, output dtype). Every per-clip op takes its
parameters per sample, so one draw covers all frames of a clip. The same graph runs on the DALI CPU backend
(`device_id=None`) and on the GPU (decoding with NVDEC through the "mixed" decoder), except for training on the
CPU backend: there the source decodes with the seeking PyAV reader (DALI's CPU decoder does not seek) and also
resizes and colours each RGB clip (`dali_pipelines.seeking`), and the graph only finishes it (`finish_rgb_clip`).
"""
from __future__ import annotations

from typing import Sequence

from nvidia.dali import fn, types

from dali_pipelines.source import P_BLUR, P_FLIP, P_JITTER, P_ROI, P_SIGN
from goca_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD
from goca_fast.video.flow_codec import U8_LEVELS

FLOW_STD = U8_LEVELS / 2  # u8 -> px / FLOW_BOUND in [-1, 1]: (x - 127.5) / 127.5, as augment.flow_to_unit
FLOW_MEAN = (FLOW_STD, FLOW_STD)  # the u8 of 0 px


def decode(encoded, frames, gpu: bool):
    """Encoded file + per-sample frame indices -> F×H×W×3 uint8, those frames in that order (FFmpeg on the CPU
    backend, NVDEC on "mixed"). A frame index past the end would come back as a black frame, not an error
    (measured with 1.53), which is why the index's frame counts must be the files' (goca-prepare and goca-flow write
    them from the files; `dali_pipelines.validate` checks them before an evaluation)."""
    frames = fn.experimental.decoders.video(encoded, frames=frames, device="mixed" if gpu else "cpu")
    return fn.reshape(frames, layout="FHWC")  # the decoder (1.53 too) leaves the layout empty; later ops need it


def decode_streams(outs: list, with_flow: bool, gpu: bool):
    """Takes the source's leading outputs (RGB file, flow file when `with_flow`, the frame list) off `outs` and
    decodes both streams at the same frames: (RGB frames, flow frames or None)."""
    rgb_file = outs.pop(0)
    flow_file = outs.pop(0) if with_flow else None
    frames = outs.pop(0)
    return decode(rgb_file, frames, gpu), (decode(flow_file, frames, gpu) if with_flow else None)


def take_frames(frames, order):
    """The clip's frames, in `order` (positions in the sample's decode)."""
    return fn.sequence_rearrange(frames, new_order=order)


def _channel(frames, c: int):
    """Channel c of F×H×W×C frames, keeping the layout (unlike subscripting)."""
    return fn.slice(frames, start=[c], shape=[1], axis_names="C")


def flow_planes(frames):
    """Flow video frames (u above v in luma, full range, so R = G = B = luma) -> F×H×W×2 uint8 (u, v)."""
    u = fn.slice(frames, rel_start=(0.0, 0.0, 0.0), rel_shape=(0.5, 1.0, 1 / 3), axis_names="HWC")
    v = fn.slice(frames, rel_start=(0.5, 0.0, 0.0), rel_shape=(0.5, 1.0, 1 / 3), axis_names="HWC")
    return fn.cat(u, v, axis_name="C")


def official_flow_image(uv):
    """F×H×W×2 (u, v) -> the 3-channel image the released code trains on: (128, v, u)."""
    u, v = _channel(uv, 0), _channel(uv, 1)
    grey = fn.cast(v * 0 + 128, dtype=types.UINT8)
    return fn.cat(grey, v, u, axis_name="C")


def _mirror(params):
    return fn.cast(params[P_FLIP], dtype=types.INT32)


def _crop(frames, anchor, crop: Sequence[int]):
    """crop[0]×crop[1] window at per-sample (top, left), given as positional inputs."""
    shape = fn.constant(fdata=[float(crop[0]), float(crop[1])])
    return fn.slice(frames, anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False,
                    out_of_bounds_policy="error")


def _resize_crop(frames, params, crop: Sequence[int]):
    """The drawn crop of the drawn short-side resize, computed directly: resize the crop's source window."""
    roi = params[P_ROI]
    return fn.resize(frames, size=list(crop), roi_start=roi[0:2], roi_end=roi[2:4], roi_relative=False,
                     antialias=True, interp_type=types.INTERP_LINEAR)


def train_rgb_clip(frames, params, crop: Sequence[int], blur_window: int, out_dtype):
    """Training view of an RGB (or official 3-channel flow) clip: resize, crop, jitter, grey, blur, flip, norm."""
    x = _resize_crop(frames, params, crop)
    jitter = params[P_JITTER]  # jitter and grey in one op
    x = fn.color_twist(x, brightness=jitter[0], contrast=jitter[1], saturation=jitter[2], hue=jitter[3])
    return finish_rgb_clip(x, params, blur_window, out_dtype)


def finish_rgb_clip(x, params, blur_window: int, out_dtype):
    """Blur, flip and ImageNet normalisation of a cropped, colour-jittered RGB clip (on the CPU backend the source
    delivers the clip that far: `dali_pipelines.seeking.rgb_clip`)."""
    if blur_window > 0:
        x = fn.gaussian_blur(x, sigma=params[P_BLUR], window_size=blur_window)
    return fn.crop_mirror_normalize(x, mirror=_mirror(params), mean=[255 * m for m in IMAGENET_MEAN],
                                    std=[255 * s for s in IMAGENET_STD], output_layout="CFHW", dtype=out_dtype)


def train_flow_clip(uv, params, crop: Sequence[int], out_dtype):
    """Training view of a flow clip with its RGB clip's geometry; a flip (and a time reversal) negates u (u, v)
    through the sign of the normalisation's std. Resized as uint8, as the CPU loader does (within half a
    quantisation level of a float resize, and 7 ms less per sample of 6 clips on one core)."""
    x = _resize_crop(uv, params, crop)
    return fn.crop_mirror_normalize(x, mirror=_mirror(params), mean=list(FLOW_MEAN), std=params[P_SIGN] * FLOW_STD,
                                    output_layout="CFHW", dtype=out_dtype)


def eval_resize(frames, size, dtype=None):
    kw = {} if dtype is None else {"dtype": dtype}
    return fn.resize(frames, size=size, antialias=True, interp_type=types.INTERP_LINEAR, **kw)


def eval_view(resized, anchor, crop: int, flow: bool, out_dtype):
    """One deterministic crop of a resized eval clip, normalised, C×F×H×W."""
    x = _crop(resized, anchor, (crop, crop))
    if flow:
        return fn.crop_mirror_normalize(x, mean=list(FLOW_MEAN), std=[FLOW_STD, FLOW_STD], output_layout="CFHW",
                                        dtype=out_dtype)
    return fn.crop_mirror_normalize(x, mean=[255 * m for m in IMAGENET_MEAN], std=[255 * s for s in IMAGENET_STD],
                                    output_layout="CFHW", dtype=out_dtype)
