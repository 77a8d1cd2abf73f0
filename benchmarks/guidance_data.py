"""The guidance benchmark's data: three independently generated *families* of motion-only videos in UCF101 layout.

In every family the class is a motion and appearance carries no label: every picture of a split is used by every
class equally often (videos of a class cycle through the split's pictures from a random start), the test split's
pictures never occur in training, and position, orientation and speed are random per video. A network that only
describes what it sees cannot retrieve a test video's class; it has to describe how the picture moves. The families
differ in everything else, so a recipe tuned on one of them can be checked on the others untouched:

    family          pictures                                   motion (classes)                     raw size  frames codec
    photos-camera   scikit-image's sample photographs           8 camera motions: pan, tilt, zoom,   96x128    20    H.264 mp4
                                                               roll (1.5-3 px/frame)
    textures-object procedural textures (gratings, noise,      8 directions of a textured object     80x80     16    MJPEG avi
                    random palettes; drawn per video)          moving over a still background (1.2-2.5)
    rasters-camera  other real rasters: matplotlib's samples,   6 camera motions: 4 diagonal pans,  120x160    20    MPEG-4 avi
                    hill-shaded elevation maps, a face mosaic  zoom in/out (2.5-4.5 px/frame)

photos-camera is the family the recipe (configs/guidance.yaml) is tuned on; the other two are for reporting only.

The output is raw data in UCF101 layout, for `goca-prepare --dataset ucf101` and `goca-flow` as user data:

    <out>/UCF-101/<Class>/v_<Class>_g<picture>_c<clip>.<mp4|avi>
    <out>/ucfTrainTestlist/classInd.txt, trainlist01.txt, testlist01.txt

(UCF101's "group" g = the picture, so like UCF101's split 1 the test groups never occur in training.)

On screen (image y pointing down), a camera pan to the left moves the picture to the right, a tilt up moves it down,
a zoom in makes it grow about the frame centre and a clockwise roll turns it counter-clockwise: `SCREEN_MOTION`.

    python -m benchmarks.guidance_data --family textures-object --out /tmp/textures [--train-per-class 4 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import av
import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from goca_fast.video.io import write_video  # noqa: E402

CLASSES = ("PanLeft", "PanRight", "TiltUp", "TiltDown", "ZoomIn", "ZoomOut", "RollClockwise",
           "RollCounterClockwise")
DIAGONAL_CLASSES = ("PanUpLeft", "PanUpRight", "PanDownLeft", "PanDownRight", "ZoomIn", "ZoomOut")
# an object moving on screen at 0°, 45°, ... counter-clockwise from "right" (image y down: "up" is -y)
OBJECT_CLASSES = ("MoveRight", "MoveUpRight", "MoveUp", "MoveUpLeft", "MoveLeft", "MoveDownLeft", "MoveDown",
                  "MoveDownRight")
# what each camera motion does to the picture on screen: ("translate", (dx, dy) direction) | ("zoom", +1 grows /
# -1 shrinks) | ("rotate", +1 clockwise / -1 counter-clockwise on screen, y down)
SCREEN_MOTION = {
    "PanLeft": ("translate", (1, 0)), "PanRight": ("translate", (-1, 0)),
    "TiltUp": ("translate", (0, 1)), "TiltDown": ("translate", (0, -1)),
    "PanUpLeft": ("translate", (1, 1)), "PanUpRight": ("translate", (-1, 1)),
    "PanDownLeft": ("translate", (1, -1)), "PanDownRight": ("translate", (-1, -1)),
    "ZoomIn": ("zoom", 1), "ZoomOut": ("zoom", -1),
    "RollClockwise": ("rotate", -1), "RollCounterClockwise": ("rotate", 1),
}
OBJECT_DIRECTION = {c: (np.cos(k * np.pi / 4), -np.sin(k * np.pi / 4)) for k, c in enumerate(OBJECT_CLASSES)}
# scikit-image's bundled photographs (no download). Train and test use disjoint photographs.
TRAIN_IMAGES = ("astronaut", "brick", "camera", "cell", "chelsea", "coins", "gravel", "immunohistochemistry",
                "moon", "retina", "text", "motorcycle")
TEST_IMAGES = ("coffee", "rocket", "grass", "hubble_deep_field", "page")
# rasters none of photos-camera's pictures: matplotlib's sample data, scikit-image's other bundled images
TRAIN_RASTERS = ("grace_hopper", "minduka", "topobathy", "clock", "colorwheel", "shepp_logan", "logo2")
TEST_RASTERS = ("jacksboro", "faces", "microaneurysms")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """H×W×3 uint8 from a grey or colour image of any dtype (grey repeated, alpha dropped, range stretched)."""
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = np.clip(np.round(255 * (img.astype(np.float64) - img.min()) / max(np.ptp(img), 1e-9)), 0, 255)
    return np.ascontiguousarray(img.astype(np.uint8))


def load_photo(name: str) -> np.ndarray:
    """H×W×3 uint8 RGB of a bundled scikit-image sample (grey ones repeated to 3 channels)."""
    from skimage import data
    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    return _to_uint8(img)


def load_raster(name: str) -> np.ndarray:
    """H×W×3 uint8 RGB of one of TRAIN_RASTERS / TEST_RASTERS: elevation maps are hill-shaded (matplotlib's
    LightSource), the face mosaic tiles scikit-image's 200 small LFW faces."""
    import matplotlib
    import matplotlib.image
    from matplotlib import colormaps
    from matplotlib.colors import LightSource
    from skimage import data
    sample = Path(matplotlib.get_data_path()) / "sample_data"
    if name in ("topobathy", "jacksboro"):
        z = np.load(sample / ("topobathy.npz" if name == "topobathy" else "jacksboro_fault_dem.npz"))
        elevation = z["topo" if name == "topobathy" else "elevation"].astype(np.float64)
        cmap = colormaps["gist_earth" if name == "topobathy" else "terrain"]
        return _to_uint8(LightSource(azdeg=315, altdeg=45).shade(elevation, cmap=cmap, blend_mode="soft"))
    if name == "faces":
        faces = data.lfw_subset()  # 200 × 25 × 25 float
        return _to_uint8(faces.reshape(10, 20, 25, 25).transpose(0, 2, 1, 3).reshape(250, 500))
    if name == "shepp_logan":
        return _to_uint8(colormaps["viridis"](data.shepp_logan_phantom()))
    files = {"grace_hopper": "grace_hopper.jpg", "minduka": "Minduka_Present_Blue_Pack.png", "logo2": "logo2.png"}
    if name in files:
        return _to_uint8(matplotlib.image.imread(sample / files[name]))
    return _to_uint8(getattr(data, name)())


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
        screen_dir /= np.linalg.norm(screen_dir)
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


def procedural_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """H×W×3 uint8: a few oriented gratings plus blurred noise at a random scale, through a random 3-colour
    palette. Every call draws a new texture: no two videos share a picture."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    field = np.zeros((height, width))
    for _ in range(int(rng.integers(2, 5))):
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.04, 0.25)
        field += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta))
                                                + rng.uniform(0, 2 * np.pi))
    noise = cv2.GaussianBlur(rng.standard_normal((height, width)), (0, 0), rng.uniform(0.8, 3.0))
    field = field / max(np.abs(field).max(), 1e-9) + 2.0 * noise / max(np.abs(noise).max(), 1e-9)
    level = (field - field.min()) / max(np.ptp(field), 1e-9)  # 0..1
    palette = rng.uniform(0, 255, (3, 3))  # colours at levels 0, 0.5, 1
    img = np.stack([np.interp(level, [0.0, 0.5, 1.0], palette[:, ch]) for ch in range(3)], axis=-1)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_object_video(cls: str, frames: int, height: int, width: int, speed: float,
                        rng: np.random.Generator) -> np.ndarray:
    """T×H×W×3 uint8: a textured ellipse moving at `speed` px/frame in the class's screen direction over a still
    textured background (both textures new per video; start position, size and orientation random)."""
    background = procedural_texture(height, width, rng)
    a, b = rng.uniform(0.14, 0.24) * min(height, width), rng.uniform(0.1, 0.2) * min(height, width)
    side = int(2 * max(a, b) + 4)
    sprite = procedural_texture(side, side, rng)
    mask = np.zeros((side, side), np.float32)
    cv2.ellipse(mask, (side // 2, side // 2), (int(a), int(b)), float(rng.uniform(0, 180)), 0, 360, 1.0, -1,
                cv2.LINE_AA)
    direction = np.array(OBJECT_DIRECTION[cls])
    travel = speed * (frames - 1)
    margin = max(a, b) + 2
    lo = np.array([margin, margin]) + np.maximum(-direction * travel, 0)
    hi = np.array([width - margin, height - margin]) - np.maximum(direction * travel, 0)
    start = np.array([rng.uniform(lo[i], hi[i]) if hi[i] > lo[i] else (lo[i] + hi[i]) / 2 for i in range(2)])
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        cx, cy = start + direction * speed * t
        shift = np.array([[1.0, 0.0, cx - side / 2], [0.0, 1.0, cy - side / 2]])
        alpha = cv2.warpAffine(mask, shift, (width, height), flags=cv2.INTER_LINEAR)[..., None]
        layer = cv2.warpAffine(sprite, shift, (width, height), flags=cv2.INTER_LINEAR)
        out[t] = np.round(alpha * layer + (1 - alpha) * background).astype(np.uint8)
    return out


@dataclass(frozen=True)
class FamilySpec:
    """What one benchmark family holds. speed: range of the on-screen motion in written-frame pixels per frame (at
    the frame's corners for zoom/roll). pictures: photographs | textures | rasters. codec: h264 (mp4) | mpeg4 |
    mjpeg (avi)."""

    name: str
    pictures: str
    classes: tuple[str, ...]
    train_per_class: int
    test_per_class: int
    frames: int
    height: int
    width: int
    speed: tuple[float, float]
    codec: str
    fps: float = 25
    seed: int = 0

    def resized(self, **changes) -> "FamilySpec":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        """Every field as JSON values (tuples as lists): the data's identity in markers and result files."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FAMILIES = {
    "photos-camera": FamilySpec("photos-camera", "photographs", CLASSES, train_per_class=16, test_per_class=38,
                                frames=20, height=96, width=128, speed=(1.5, 3.0), codec="h264", seed=0),
    "textures-object": FamilySpec("textures-object", "textures", OBJECT_CLASSES, train_per_class=20,
                                  test_per_class=38, frames=16, height=80, width=80, speed=(1.2, 2.5),
                                  codec="mjpeg", seed=1),
    "rasters-camera": FamilySpec("rasters-camera", "rasters", DIAGONAL_CLASSES, train_per_class=24,
                                 test_per_class=51, frames=20, height=120, width=160, speed=(2.5, 4.5),
                                 codec="mpeg4", seed=2),
}
TUNING_FAMILY = "photos-camera"


def write_raw_video(path: Path, frames: np.ndarray, fps: float, codec: str) -> None:
    """Write T×H×W×3 uint8 frames as the family's source codec: H.264 mp4 (goca_fast's writer) or, through PyAV,
    MPEG-4 part 2 / Motion JPEG in AVI, the formats of older datasets such as UCF101 and HMDB51."""
    if codec == "h264":
        write_video(path, frames, fps)
        return
    if codec not in ("mpeg4", "mjpeg"):
        raise ValueError(f"unknown codec {codec!r}: h264, mpeg4 or mjpeg")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.bit_rate = 2_000_000
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _picture_pool(names: Sequence[str], load: Callable[[str], np.ndarray], short_side: int) -> list[np.ndarray]:
    """The pictures resized (area filter) to `short_side`, so every video samples them at about 1:1."""
    pool = []
    for name in names:
        img = load(name)
        h, w = img.shape[:2]
        f = short_side / min(h, w)
        pool.append(cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA))
    return pool


def write_family(out: str | os.PathLike, spec: FamilySpec) -> Path:
    """Write one family's raw dataset (UCF101 layout, split 1) under `out`; returns `out`.

    Camera families: picture k of a split is used by every class equally often (videos of a class cycle through the
    split's pictures from a random start), so the picture says nothing about the class. The texture family draws
    new textures for every video (the group number is then only a counter)."""
    out = Path(out)
    unknown = [c for c in spec.classes if c not in SCREEN_MOTION and c not in OBJECT_DIRECTION]
    if unknown:
        raise ValueError(f"unknown classes {unknown}")
    rng = np.random.default_rng(spec.seed)
    ext = "mp4" if spec.codec == "h264" else "avi"
    sources = {"photographs": (TRAIN_IMAGES, TEST_IMAGES, load_photo), "rasters": (TRAIN_RASTERS, TEST_RASTERS,
                                                                                   load_raster)}
    lists: dict[str, list[str]] = {"train": [], "test": []}
    for split, per_class in (("train", spec.train_per_class), ("test", spec.test_per_class)):
        if spec.pictures == "textures":
            names, pool = tuple(f"t{i}" for i in range(6)), None
            group_base = 0 if split == "train" else 6
        else:
            train_names, test_names, load = sources[spec.pictures]
            names = train_names if split == "train" else test_names
            pool = _picture_pool(names, load, int(2.5 * max(spec.height, spec.width)))
            group_base = 0 if split == "train" else len(train_names)
        for label, cls in enumerate(spec.classes):
            first = int(rng.integers(len(names)))
            for n in range(per_class):
                g = (first + n) % len(names)
                speed = rng.uniform(*spec.speed)
                if pool is None:
                    video = render_object_video(cls, spec.frames, spec.height, spec.width, speed, rng)
                else:
                    path = camera_path(cls, spec.frames, pool[g].shape[:2], (spec.height, spec.width), speed, rng)
                    video = render_video(pool[g], path, spec.height, spec.width)
                rel = f"{cls}/v_{cls}_g{g + 1 + group_base:02d}_c{n + 1:02d}.{ext}"
                (out / "UCF-101" / cls).mkdir(parents=True, exist_ok=True)
                write_raw_video(out / "UCF-101" / rel, video, spec.fps, spec.codec)
                lists[split].append(f"{rel} {label + 1}" if split == "train" else rel)
    lists_dir = out / "ucfTrainTestlist"
    lists_dir.mkdir(parents=True, exist_ok=True)
    (lists_dir / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(spec.classes)))
    (lists_dir / "trainlist01.txt").write_text("".join(line + "\n" for line in lists["train"]))
    (lists_dir / "testlist01.txt").write_text("".join(line + "\n" for line in lists["test"]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default=TUNING_FAMILY, choices=sorted(FAMILIES))
    p.add_argument("--out", required=True, help="raw dataset folder to write (UCF-101/ and ucfTrainTestlist/)")
    p.add_argument("--train-per-class", type=int, help="default: the family's")
    p.add_argument("--test-per-class", type=int, help="default: the family's")
    p.add_argument("--frames", type=int, help="default: the family's")
    p.add_argument("--seed", type=int, help="default: the family's")
    a = p.parse_args(argv)
    changes = {k: v for k, v in (("train_per_class", a.train_per_class), ("test_per_class", a.test_per_class),
                                 ("frames", a.frames), ("seed", a.seed)) if v is not None}
    write_family(a.out, FAMILIES[a.family].resized(**changes))
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
