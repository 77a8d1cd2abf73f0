"""Camera-motion videos of real photographs in UCF101 layout: the data of the guidance benchmark.

Each video is a virtual camera looking at one of scikit-image's bundled sample photographs and moving in one of
eight ways (the class): pan left/right, tilt up/down, zoom in/out, roll clockwise/counter-clockwise. Appearance
carries no label: every photograph is used equally often by every class, the test split's photographs are not
used in the train split at all, and the start pose, start angle and speed are random per video. So a network that
only describes what it sees cannot retrieve a test video's class; it has to describe how the picture moves.

The output is raw data in UCF101 layout, for `goca-prepare --dataset ucf101` and `goca-flow` as user data:

    <out>/UCF-101/<Class>/v_<Class>_g<image>_c<clip>.mp4
    <out>/ucfTrainTestlist/classInd.txt, trainlist01.txt, testlist01.txt

(UCF101's "group" g = the photograph, so like UCF101's split 1 the test groups never occur in training.)

On screen (image y pointing down), a camera pan to the left moves the picture to the right, a tilt up moves it down,
a zoom in makes it grow about the frame centre and a clockwise roll turns it counter-clockwise: `SCREEN_MOTION`.

    python -m benchmarks.guidance_data --out /tmp/camera_motion [--train-per-class 16 --test-per-class 8]
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from goca_fast.video.io import write_video  # noqa: E402

CLASSES = ("PanLeft", "PanRight", "TiltUp", "TiltDown", "ZoomIn", "ZoomOut", "RollClockwise",
           "RollCounterClockwise")
# what each camera motion does to the picture on screen: ("translate", (dx, dy) direction) | ("zoom", +1 grows /
# -1 shrinks) | ("rotate", +1 clockwise / -1 counter-clockwise on screen, y down)
SCREEN_MOTION = {
    "PanLeft": ("translate", (1, 0)), "PanRight": ("translate", (-1, 0)),
    "TiltUp": ("translate", (0, 1)), "TiltDown": ("translate", (0, -1)),
    "ZoomIn": ("zoom", 1), "ZoomOut": ("zoom", -1),
    "RollClockwise": ("rotate", -1), "RollCounterClockwise": ("rotate", 1),
}
# scikit-image's bundled photographs (no download). Train and test use disjoint photographs.
TRAIN_IMAGES = ("astronaut", "brick", "camera", "cell", "chelsea", "coins", "gravel", "immunohistochemistry",
                "moon", "retina", "text", "motorcycle")
TEST_IMAGES = ("coffee", "rocket", "grass", "hubble_deep_field", "page")


def load_photo(name: str) -> np.ndarray:
    """H×W×3 uint8 RGB of a bundled scikit-image sample (grey ones repeated to 3 channels)."""
    from skimage import data
    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(np.round(255 * (img.astype(np.float64) - img.min()) / max(np.ptp(img), 1e-9)), 0, 255)
    return np.ascontiguousarray(img.astype(np.uint8))


@dataclass(frozen=True)
class CameraPath:
    """Pose per frame: the picture point seen at the frame centre, source pixels per frame pixel, roll angle."""

    centre: np.ndarray  # T×2 (x, y) in photo pixels
    scale: np.ndarray   # T
    angle: np.ndarray   # T, radians; positive = the camera rolls clockwise

    def matrix(self, t: int, height: int, width: int) -> np.ndarray:
        """2×3 affine map from frame pixel (x, y) to photo pixel (cv2.warpAffine with WARP_INVERSE_MAP)."""
        c, s = np.cos(self.angle[t]), np.sin(self.angle[t])
        a = self.scale[t] * np.array([[c, -s], [s, c]])
        o = np.array([(width - 1) / 2, (height - 1) / 2])
        return np.concatenate([a, (self.centre[t] - a @ o)[:, None]], axis=1)


def camera_path(cls: str, frames: int, photo_hw: tuple[int, int], frame_hw: tuple[int, int],
                speed: float, rng: np.random.Generator) -> CameraPath:
    """A camera motion of class `cls` at `speed` (frame pixels per frame at the frame's edge) that stays inside
    the photograph; start pose and roll angle random."""
    kind, sign = SCREEN_MOTION[cls]
    h, w = frame_hw
    t = np.arange(frames, dtype=np.float64) - (frames - 1) / 2
    scale = np.full(frames, rng.uniform(0.9, 1.1))
    angle = np.full(frames, rng.uniform(-np.pi, np.pi))
    offset = np.zeros((frames, 2))
    if kind == "translate":
        # the picture moves by `speed` frame px per frame in screen direction `sign`: the camera the other way
        c, s = np.cos(angle[0]), np.sin(angle[0])
        screen_dir = np.array(sign, dtype=np.float64)
        offset = -(scale[0] * speed * t)[:, None] * (np.array([[c, -s], [s, c]]) @ screen_dir)[None]
    elif kind == "zoom":
        rate = speed / (0.5 * np.hypot(h, w))  # relative scale change per frame: `speed` px at the corners
        scale = scale * np.exp(-sign * rate * t)
    else:
        omega = speed / (0.5 * np.hypot(h, w))  # radians per frame: `speed` px at the corners
        angle = angle - sign * omega * t  # the picture turns clockwise on screen when the camera rolls back
    reach = 0.5 * np.hypot(h, w) * scale.max() + np.abs(offset).max(axis=0)  # half extent of what is seen
    ph, pw = photo_hw
    lo, hi = reach, np.array([pw - 1, ph - 1]) - reach
    start = np.array([rng.uniform(lo[i], hi[i]) if hi[i] > lo[i] else (lo[i] + hi[i]) / 2 for i in range(2)])
    return CameraPath(start[None] + offset, scale, angle)


def render_video(photo: np.ndarray, path: CameraPath, height: int, width: int) -> np.ndarray:
    """T×H×W×3 uint8: the photograph through the camera path (bilinear, mirrored beyond the edges)."""
    out = np.empty((len(path.scale), height, width, 3), np.uint8)
    for t in range(len(path.scale)):
        out[t] = cv2.warpAffine(photo, path.matrix(t, height, width), (width, height),
                                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT_101)
    return out


def _photo_pool(names: Sequence[str], short_side: int) -> list[np.ndarray]:
    """The photographs resized (area filter) to `short_side`, so every video samples them at about 1:1."""
    pool = []
    for name in names:
        img = load_photo(name)
        h, w = img.shape[:2]
        f = short_side / min(h, w)
        pool.append(cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA))
    return pool


@dataclass(frozen=True)
class CameraMotionSpec:
    """What the camera-motion set holds. speed: range of the on-screen motion, written-frame pixels per frame (at
    the frame's corners for zoom/roll)."""

    train_per_class: int = 16
    test_per_class: int = 8
    frames: int = 48
    height: int = 96
    width: int = 128
    fps: float = 25
    speed: tuple[float, float] = (1.5, 3.0)
    classes: Sequence[str] = CLASSES
    seed: int = 0


def write_camera_motion_set(out: str | os.PathLike, spec: CameraMotionSpec = CameraMotionSpec()) -> Path:
    """Write the raw dataset (UCF101 layout, split 1) under `out`; returns `out`.

    Photograph k of a split is used by every class equally often (videos of a class cycle through the split's
    photographs from a random start), so the photograph says nothing about the class.
    """
    out = Path(out)
    train_per_class, test_per_class, frames, height, width = (spec.train_per_class, spec.test_per_class, spec.frames,
                                                              spec.height, spec.width)
    fps, speed, classes, seed = spec.fps, spec.speed, spec.classes, spec.seed
    unknown = [c for c in classes if c not in SCREEN_MOTION]
    if unknown:
        raise ValueError(f"unknown classes {unknown}; known: {', '.join(CLASSES)}")
    rng = np.random.default_rng(seed)
    photo_side = int(2.5 * max(height, width))
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for split, names, per_class in (("train", TRAIN_IMAGES, train_per_class), ("test", TEST_IMAGES, test_per_class)):
        pool = _photo_pool(names, photo_side)
        for label, cls in enumerate(classes):
            first = int(rng.integers(len(pool)))
            for n in range(per_class):
                g = (first + n) % len(pool)
                path = camera_path(cls, frames, pool[g].shape[:2], (height, width), rng.uniform(*speed), rng)
                rel = f"{cls}/v_{cls}_g{g + 1 + (0 if split == 'train' else len(TRAIN_IMAGES)):02d}_c{n + 1:02d}.mp4"
                (out / "UCF-101" / cls).mkdir(parents=True, exist_ok=True)
                write_video(out / "UCF-101" / rel, render_video(pool[g], path, height, width), fps)
                lists[split].append(f"{rel} {label + 1}" if split == "train" else rel)
    lists_dir = out / "ucfTrainTestlist"
    lists_dir.mkdir(parents=True, exist_ok=True)
    (lists_dir / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (lists_dir / "trainlist01.txt").write_text("".join(line + "\n" for line in lists["train"]))
    (lists_dir / "testlist01.txt").write_text("".join(line + "\n" for line in lists["test"]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="raw dataset folder to write (UCF-101/ and ucfTrainTestlist/)")
    p.add_argument("--train-per-class", type=int, default=16)
    p.add_argument("--test-per-class", type=int, default=8)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--speed", type=float, nargs=2, default=(1.5, 3.0), help="on-screen px/frame range")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_camera_motion_set(a.out, CameraMotionSpec(train_per_class=a.train_per_class, test_per_class=a.test_per_class,
                                                    frames=a.frames, height=a.height, width=a.width,
                                                    speed=tuple(a.speed), seed=a.seed))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
