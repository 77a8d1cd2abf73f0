"""The procedural motion-classification dataset of the CPU demo.

Motion dataset, scene "object" (the default, what the demo trains on): a textured disc (the actor) carries the
class motion — it crosses the frame (translate ×4), spins about its centre (rotate ×2) or grows/shrinks where it
stands (zoom ×2) — in front of a full-frame background moved by a hand-held camera shake whose velocity is redrawn
every few frames (`camera_shake`). Both textures, the object's size, place and speed are random per video, so
appearance carries no class information and RGB has to learn motion cues.

Why the nuisance makes the demo a real test: the object covers typically 6-12 % of the frame, so a randomly initialised
network, whose globally pooled features mostly average the flow of the large background, mainly sees the
camera shake (measured: random-init flow R@1 ≈ 25-30 %, chance 12.5 %). The shake is unrelated between two clips of
one video more than a shake period apart, while the object's motion is the same in every clip: exactly the
signal that clip-consistent self-supervision (GOCA's swapped prediction of the other clips' codes) rewards and
that a random network does not isolate. Without such a nuisance (scene "full" with pan_speed 0) a random 3D CNN
on the exact flow of these global motions is already ~100 % and pretraining has nothing to show.

Scene "full" (the former dataset, kept for the flow tests and benchmarks): a random smooth colour texture fills the
frame and is moved by the class motion plus an optional turning camera pan (`camera_pan`).

The textures are analytic random-Fourier fields, so every frame is rendered exactly (no borders, no resampling of
a finite image), and the forward flow t -> t+1 is exact per layer: x' = A_{t+1} A_t^{-1} x.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from goca_fast.runtime.atomic import write_atomic
from goca_fast.runtime.parallel import process_pool
from goca_fast.data.index import VideoRecord, write_index
from goca_fast.video.io import write_video
from goca_fast.video.flow_codec import pad_flow_to_frames, quantise_flow, write_flow_video

log = logging.getLogger(__name__)

MOTION_CLASSES = ("translate_right", "translate_left", "translate_up", "translate_down",
                  "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out")
_MARKER = "synthetic.json"
_VERSION = 4


# ----------------------------------------------------------------------- motion videos


@dataclass(frozen=True)
class Texture:
    """Random Fourier colour field: value(p)[c] = 0.5 + sum_k amp[c,k] cos(freq[k]·p + phase[k])."""

    freq: np.ndarray   # K×2, radians per texture pixel
    phase: np.ndarray  # K
    amp: np.ndarray    # 3×K


def random_texture(rng: np.random.Generator, components: int = 16,
                   wavelength: tuple[float, float] = (12.0, 40.0)) -> Texture:
    """Smooth isotropic texture; wavelengths >= 12 px keep it well sampled under zoom-out."""
    lam = rng.uniform(*wavelength, size=components)
    ang = rng.uniform(0, 2 * np.pi, size=components)
    freq = (2 * np.pi / lam)[:, None] * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    amp = rng.normal(0, 0.13 * np.sqrt(2.0 / components), size=(3, components))
    return Texture(freq.astype(np.float32), rng.uniform(0, 2 * np.pi, components).astype(np.float32),
                   amp.astype(np.float32))


def render_texture(tex: Texture, p: np.ndarray) -> np.ndarray:
    """Texture at texture coordinates p (2×N) -> N×3 float32 in [0, 1]."""
    arg = tex.freq @ p + tex.phase[:, None]  # K×N
    return np.clip(0.5 + (tex.amp @ np.cos(arg)).T, 0.0, 1.0)


@dataclass(frozen=True)
class Motion:
    """x = c + s_t R(theta_t) p + d_t maps texture point p to image point x at frame t."""

    scale: np.ndarray   # T
    theta: np.ndarray   # T, radians (positive = clockwise on screen, y points down)
    shift: np.ndarray   # T×2 (dx, dy)

    def matrices(self, centre: np.ndarray) -> np.ndarray:
        """T×3×3 homogeneous A_t."""
        t = len(self.scale)
        c, s = np.cos(self.theta), np.sin(self.theta)
        a = np.zeros((t, 3, 3))
        a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = c * self.scale, -s * self.scale, s * self.scale, c * self.scale
        a[:, :2, 2] = centre[None] + self.shift
        a[:, 2, 2] = 1
        return a


def camera_pan(num_frames: int, rng: np.random.Generator, max_speed: float = 1.0,
               turn: float = 0.15) -> np.ndarray:
    """A nuisance camera pan (T×2 displacement) whose direction turns during the video (scene "full").

    Measured, it does not make the full-frame scene a useful test: the pan turns slowly and averages out over a
    video's evaluation clips, so a random 3D CNN still separates the classes from the flow (R@1 ≈ 94 % at 1 px/frame),
    and faster pans made pretraining collapse. The demo uses the object scene with `camera_shake` instead.
    """
    t = np.arange(num_frames, dtype=np.float64)
    direction = rng.uniform(0, 2 * np.pi) + rng.uniform(-turn, turn) * t
    velocity = rng.uniform(0.4 * max_speed, max_speed) * np.stack([np.cos(direction), np.sin(direction)], axis=1)
    return np.concatenate([np.zeros((1, 2)), np.cumsum(velocity[:-1], axis=0)])


def class_motion(cls: str, num_frames: int, rng: np.random.Generator, pan_speed: float = 0.0) -> Motion:
    """Class-specific motion with random speed and random start phase, plus a random camera pan."""
    t = np.arange(num_frames, dtype=np.float64)
    theta0 = rng.uniform(0, 2 * np.pi)
    scale = np.full(num_frames, rng.uniform(0.9, 1.2))
    theta = np.full(num_frames, theta0)
    shift = np.zeros((num_frames, 2)) + rng.uniform(-100, 100, size=2)
    if cls.startswith("translate"):
        v = rng.uniform(1.0, 2.5)
        d = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[cls.split("_")[1]]
        shift = shift + v * t[:, None] * np.array(d, dtype=np.float64)[None]
    elif cls.startswith("rotate"):
        w = np.deg2rad(rng.uniform(1.5, 3.0)) * (1 if cls == "rotate_cw" else -1)
        theta = theta0 + w * t
        shift = np.zeros((num_frames, 2))  # rotate about the image centre
    elif cls.startswith("zoom"):
        k = min(rng.uniform(0.015, 0.03), np.log(3.0) / max(1, num_frames))  # at most 3x overall
        k *= 1 if cls == "zoom_in" else -1
        scale = scale * np.exp(k * (t - (num_frames - 1) / 2))
        shift = np.zeros((num_frames, 2))  # zoom about the image centre
    else:
        raise ValueError(f"unknown motion class {cls!r}; known: {MOTION_CLASSES}")
    if pan_speed > 0:
        shift = shift + camera_pan(num_frames, rng, pan_speed)
    return Motion(scale, theta, shift)


def render_motion_video(tex: Texture, motion: Motion, height: int,
                        width: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames T×H×W×3 float32 in [0,1] and exact forward flow (T-1)×H×W×2 float32 px."""
    n = len(motion.scale)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    a = motion.matrices(centre)
    yy, xx = np.mgrid[0:height, 0:width]
    x = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)]).astype(np.float64)  # 3×N
    frames = np.empty((n, height, width, 3), np.float32)
    flow = np.empty((max(n - 1, 0), height, width, 2), np.float32)
    for i in range(n):
        p = np.linalg.solve(a[i], x)  # texture coordinates of every pixel
        frames[i] = render_texture(tex, p[:2].astype(np.float32)).reshape(height, width, 3)
        if i + 1 < n:
            x_next = a[i + 1] @ p
            flow[i] = (x_next[:2] - x[:2]).T.reshape(height, width, 2)
    return frames, flow


# ----------------------------------------------------------------------- object scenes (the demo's default)

SCENES = ("object", "full")
OBJECT_RADIUS = (0.15, 0.22)  # object radius range, as a fraction of the frame's short side
SHAKE_PERIOD = 8.0            # frames between the camera shake's key velocities
# texture contrast of (background, object): a flat grey background in RGB (its shake stays in the exact flow) and a
# high-contrast object, so RGB can only learn the object's motion (with 1.0/1.5 the RGB stream did not learn, docs)
CONTRAST = (0.0, 3.0)


def camera_shake(num_frames: int, rng: np.random.Generator, max_speed: float = 1.0,
                 period: float = 8.0) -> np.ndarray:
    """A nuisance hand-held camera motion (T×2 displacement) whose velocity is redrawn every `period` frames.

    The velocity passes smoothly (cosine blend) between key velocities drawn uniformly in the disc of radius
    `max_speed`, so it is nearly steady within a short clip but unrelated between two clips of one video
    that lie more than a period apart, and it has no direction shared by the video.
    """
    keys = int(np.ceil(num_frames / period)) + 2
    r = max_speed * np.sqrt(rng.uniform(0, 1, keys))
    a = rng.uniform(0, 2 * np.pi, keys)
    key_v = np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    t = np.arange(num_frames, dtype=np.float64) / period + rng.uniform(0, 1)
    i = np.floor(t).astype(int)
    w = (0.5 - 0.5 * np.cos(np.pi * (t - i)))[:, None]
    velocity = (1 - w) * key_v[i] + w * key_v[i + 1]
    return np.concatenate([np.zeros((1, 2)), np.cumsum(velocity[:-1], axis=0)])


def object_motion(cls: str, num_frames: int, rng: np.random.Generator, height: int, width: int) -> Motion:
    """Class motion of a foreground object, in object coordinates centred on the object (origin = its centre).

    Maps object point p to image point x = image centre + s_t R(theta_t) p + d_t: translate classes move the
    object across the frame (its path centred on the frame, so it stays mostly in view), rotate classes spin it
    about its own centre and zoom classes grow or shrink it (at most 3x over the video) where it stands.
    Speeds and the start angle are random per video.
    """
    t = np.arange(num_frames, dtype=np.float64)
    scale = np.full(num_frames, rng.uniform(0.9, 1.1))
    theta = np.full(num_frames, rng.uniform(0, 2 * np.pi))
    pos = rng.uniform(-0.2, 0.2, size=2) * np.array([width, height])  # where a static object stands
    if cls.startswith("translate"):
        d = np.array({"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[cls.split("_")[1]], float)
        v = rng.uniform(0.8, 1.6)
        along = v * (t - (num_frames - 1) / 2)  # centred path: the object crosses the frame centre mid-video
        shift = pos[None] * (1 - np.abs(d))[None] + along[:, None] * d[None]
    elif cls.startswith("rotate"):
        w = np.deg2rad(rng.uniform(3.0, 6.0)) * (1 if cls == "rotate_cw" else -1)
        theta = theta + w * t
        shift = np.repeat(pos[None], num_frames, axis=0)
    elif cls.startswith("zoom"):
        k = min(rng.uniform(0.015, 0.03), np.log(3.0) / max(1, num_frames))
        k *= 1 if cls == "zoom_in" else -1
        scale = scale * np.exp(k * (t - (num_frames - 1) / 2))
        shift = np.repeat(pos[None], num_frames, axis=0)
    else:
        raise ValueError(f"unknown motion class {cls!r}; known: {MOTION_CLASSES}")
    return Motion(scale, theta, shift)


@dataclass(frozen=True)
class ObjectScene:
    """A textured disc (the actor) with the class motion in front of a background moved by the camera."""

    background: Texture
    camera: Motion          # background motion (camera shake)
    texture: Texture        # the object's texture
    motion: Motion          # the object's motion (object_motion), on screen
    radius: float           # object radius in object coordinates (px at scale 1)


def random_object_scene(cls: str, num_frames: int, height: int, width: int, rng: np.random.Generator,
                        shake_speed: float = 1.0) -> ObjectScene:
    """Everything random about one object-scene video: both textures, the object's size and motion, the camera."""
    background, texture = random_texture(rng), random_texture(rng)
    background = Texture(background.freq, background.phase, background.amp * CONTRAST[0])
    texture = Texture(texture.freq, texture.phase, texture.amp * CONTRAST[1])
    motion = object_motion(cls, num_frames, rng, height, width)
    radius = rng.uniform(*OBJECT_RADIUS) * min(height, width)
    shake = camera_shake(num_frames, rng, shake_speed, SHAKE_PERIOD) if shake_speed > 0 else np.zeros((num_frames, 2))
    camera = Motion(np.ones(num_frames), np.zeros(num_frames), shake + rng.uniform(-100, 100, size=2))
    return ObjectScene(background, camera, texture, motion, float(radius))


def render_object_video(scene: ObjectScene, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames T×H×W×3 float32 in [0,1] and exact forward flow (T-1)×H×W×2 float32 px of an object scene.

    The object's edge is antialiased (1 px ramp) in RGB; the flow at a pixel is that of the surface covering
    most of it (object where its coverage >= 1/2), each layer's flow exact as in render_motion_video.
    """
    n = len(scene.motion.scale)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    a_bg = scene.camera.matrices(centre)
    a_fg = scene.motion.matrices(centre)
    yy, xx = np.mgrid[0:height, 0:width]
    x = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)]).astype(np.float64)
    frames = np.empty((n, height, width, 3), np.float32)
    flow = np.empty((max(n - 1, 0), height, width, 2), np.float32)
    for i in range(n):
        p_bg = np.linalg.solve(a_bg[i], x)
        p_fg = np.linalg.solve(a_fg[i], x)
        dist = (scene.radius - np.hypot(p_fg[0], p_fg[1])) * scene.motion.scale[i]  # px inside the edge
        alpha = np.clip(dist + 0.5, 0.0, 1.0)[:, None]
        bg = render_texture(scene.background, p_bg[:2].astype(np.float32))
        fg = render_texture(scene.texture, p_fg[:2].astype(np.float32))
        frames[i] = (alpha * fg + (1 - alpha) * bg).reshape(height, width, 3)
        if i + 1 < n:
            f_bg = (a_bg[i + 1] @ p_bg)[:2] - x[:2]
            f_fg = (a_fg[i + 1] @ p_fg)[:2] - x[:2]
            flow[i] = np.where(alpha[:, 0] >= 0.5, f_fg, f_bg).T.reshape(height, width, 2)
    return frames, flow


def render_dataset_video(cls: str, num_frames: int, height: int, width: int, rng: np.random.Generator,
                         scene: str = "object", pan_speed: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One video of the motion dataset (frames, exact flow) exactly as make_synthetic_dataset renders it."""
    if scene == "object":
        return render_object_video(random_object_scene(cls, num_frames, height, width, rng, pan_speed),
                                   height, width)
    if scene == "full":
        tex = random_texture(rng)
        return render_motion_video(tex, class_motion(cls, num_frames, rng, pan_speed), height, width)
    raise ValueError(f"scene must be one of {SCENES}, got {scene!r}")


def _make_one(job: dict) -> dict:
    rng = np.random.default_rng([job["seed"], job["label"], job["num"]])
    frames, flow = render_dataset_video(job["cls"], job["frames"], job["height"], job["width"], rng,
                                        job["scene"], job["pan_speed"])
    rgb_u8 = np.round(frames * 255).astype(np.uint8)
    write_video(os.path.join(job["root"], job["rgb"]), rgb_u8, job["fps"], gop=job["gop"])
    if job["flow"] is not None:
        fq = pad_flow_to_frames(quantise_flow(flow), job["frames"])
        write_flow_video(os.path.join(job["root"], job["flow"]), fq, job["fps"], gop=job["gop"])
    return job


@dataclass(frozen=True)
class SyntheticSpec:
    """What the motion dataset holds. scene: "object" (a moving actor over a camera-shaken background; `pan_speed`
    is the shake's top speed in px/frame) or "full" (whole-frame class motion; `pan_speed` is the turning camera
    pan's top speed)."""

    num_classes: int = 8
    videos_per_class: int = 24
    frames: int = 48
    height: int = 64
    width: int = 80
    fps: float = 25
    seed: int = 0
    test_fraction: float = 0.25
    gop: int = 16
    pan_speed: float = 0.0
    scene: str = "object"


def make_synthetic_dataset(root: str | os.PathLike, spec: SyntheticSpec = SyntheticSpec(), *, with_flow: bool = True,
                           workers: Optional[int] = None) -> str:
    """Write the motion dataset in the on-disk format; returns root.

    Deterministic from the spec. Idempotent: a complete dataset with the same spec is reused; one we made with
    another spec (or left incomplete) is regenerated; a non-empty directory that is not ours is an error.
    """
    num_classes, videos_per_class, frames, height, width = (spec.num_classes, spec.videos_per_class, spec.frames,
                                                            spec.height, spec.width)
    fps, seed, test_fraction, gop, pan_speed, scene = (spec.fps, spec.seed, spec.test_fraction, spec.gop,
                                                       spec.pan_speed, spec.scene)
    root = os.fspath(root)
    if not 1 <= num_classes <= len(MOTION_CLASSES):
        raise ValueError(f"num_classes must be in 1..{len(MOTION_CLASSES)}, got {num_classes}")
    if frames < 2 or videos_per_class < 1 or not 0 <= test_fraction < 1:
        raise ValueError("need frames >= 2, videos_per_class >= 1 and 0 <= test_fraction < 1")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {SCENES}, got {scene!r}")
    params = dict(version=_VERSION, num_classes=num_classes, videos_per_class=videos_per_class,
                  frames=frames, height=height, width=width, fps=fps, seed=seed,
                  test_fraction=test_fraction, with_flow=with_flow, gop=gop, pan_speed=pan_speed, scene=scene)
    marker = os.path.join(root, _MARKER)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("params") == params and old.get("complete"):
            return root
        for sub in ("rgb", "flow", "index.jsonl", "classes.txt", "excluded.jsonl"):
            p = os.path.join(root, sub)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    elif os.path.isdir(root) and os.listdir(root):
        raise FileExistsError(f"{root} is not empty and holds no {_MARKER}; refusing to write a synthetic dataset there")
    os.makedirs(root, exist_ok=True)
    write_atomic(marker, json.dumps({"params": params, "complete": False}))

    classes = list(MOTION_CLASSES[:num_classes])
    n_test = int(round(videos_per_class * test_fraction))
    jobs = []
    for label, cls in enumerate(classes):
        test_ids = set(np.random.default_rng([seed, label, 10**6]).permutation(videos_per_class)[:n_test].tolist())
        for num in range(videos_per_class):
            vid = f"{cls}_{num:04d}"
            jobs.append(dict(root=root, seed=seed, label=label, cls=cls, num=num, id=vid,
                             rgb=f"rgb/{cls}/{vid}.mp4", flow=f"flow/{cls}/{vid}.mp4" if with_flow else None,
                             frames=frames, height=height, width=width, fps=fps, gop=gop, pan_speed=pan_speed,
                             scene=scene,
                             split="test" if num in test_ids else "train"))
    t0 = time.time()
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if workers > 1:
        with process_pool(workers) as ex:
            done = list(ex.map(_make_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        done = [_make_one(j) for j in jobs]
    records = [VideoRecord(id=j["id"], rgb=j["rgb"], flow=j["flow"], label=j["label"], cls=j["cls"],
                           frames=frames, fps=float(fps), width=width, height=height, splits=[j["split"]])
               for j in done]
    write_index(root, records, classes)
    write_atomic(marker, json.dumps({"params": params, "complete": True, "seconds": round(time.time() - t0, 2)}))
    log.info("synthetic dataset: %d videos in %.1fs at %s", len(records), time.time() - t0, root)
    return root
