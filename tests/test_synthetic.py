"""Synthetic motion dataset, frame-index videos, and the on-disk index."""
import json
import os

import cv2
import numpy as np
import pytest

from goca_fast.data.index import (
    DatasetIndexError,
    VideoRecord,
    read_index,
    select_split,
    validate_records,
    write_index,
)
from goca_fast.data.synthetic import (
    MOTION_CLASSES,
    SyntheticSpec,
    camera_shake,
    class_motion,
    make_synthetic_dataset,
    random_object_scene,
    random_texture,
    render_dataset_video,
    render_motion_video,
    render_object_video,
)
from goca_fast.video.io import read_all_frames, write_video
from helpers import decode_frame_index, frame_index_video
from goca_fast.video.flow_codec import dequantise_flow, read_flow_frames

H, W = 48, 64


def _backward_warp(img, flow):
    """Sample img at x + flow(x) (cv2.remap), i.e. predict frame t from frame t+1."""
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
    return cv2.remap(img, xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=-1)


def _warp_errors(f0, f1, flow, margin=6, min_motion=0.25, min_change=0.0):
    """Mean |warp(f1, flow) - f0| and |f1 - f0| over interior pixels that move (and visibly change: a flat
    background moves in the flow without changing the picture)."""
    pred = _backward_warp(f1, flow)
    sel = np.all(pred >= 0, axis=-1) & (np.linalg.norm(flow, axis=-1) > min_motion)
    sel &= np.abs(f1 - f0).max(axis=-1) > min_change
    sel[:margin] = sel[-margin:] = False
    sel[:, :margin] = sel[:, -margin:] = False
    if min_change > 0 and sel.sum() <= 30:
        return None  # too few changing pixels to judge (the caller requires some frames to be judged)
    assert sel.sum() > 30
    return np.abs(pred - f0)[sel].mean(), np.abs(f1 - f0)[sel].mean()


@pytest.mark.parametrize("cls", MOTION_CLASSES)
def test_exact_flow_warps_frames(cls):
    rng = np.random.default_rng(3)
    tex = random_texture(rng)
    frames, flow = render_motion_video(tex, class_motion(cls, 6, rng), H, W)
    assert frames.shape == (6, H, W, 3) and flow.shape == (5, H, W, 2)
    for t in range(5):
        e_flow, e_zero = _warp_errors(frames[t], frames[t + 1], flow[t])
        assert e_flow < 0.004, (cls, t, e_flow)
        assert e_flow < 0.1 * e_zero, (cls, t, e_flow, e_zero)


def test_flow_direction_matches_class():
    rng = np.random.default_rng(0)
    tex = random_texture(rng)
    yy, xx = np.mgrid[0:H, 0:W]
    cx, cy = (W - 1) / 2, (H - 1) / 2
    def fl(c):
        return render_motion_video(tex, class_motion(c, 3, rng), H, W)[1][0]
    assert fl("translate_right")[..., 0].min() > 0.9 and fl("translate_left")[..., 0].max() < -0.9
    assert fl("translate_down")[..., 1].min() > 0.9 and fl("translate_up")[..., 1].max() < -0.9
    div = lambda f: ((xx - cx) * f[..., 0] + (yy - cy) * f[..., 1]).mean()
    curl = lambda f: ((xx - cx) * f[..., 1] - (yy - cy) * f[..., 0]).mean()
    assert div(fl("zoom_in")) > 0 > div(fl("zoom_out"))
    assert curl(fl("rotate_cw")) > 0 > curl(fl("rotate_ccw"))  # y down: cw has positive curl


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "ds"
    make_synthetic_dataset(root, SyntheticSpec(num_classes=8, videos_per_class=4, frames=10, height=H, width=W,
                           seed=5, pan_speed=2.0), workers=2)
    return root


def test_dataset_layout_and_index(dataset):
    records, classes = read_index(dataset)
    assert classes == list(MOTION_CLASSES)
    assert len(records) == 32
    train, test = select_split(records, "train"), select_split(records, "test")
    assert len(test) == 8 and len(train) == 24  # 25% per class held out
    assert {r.label for r in test} == set(range(8))
    assert not {r.id for r in train} & {r.id for r in test}
    with pytest.raises(DatasetIndexError, match="available: \\['test', 'train'\\]"):
        select_split(records, "val")
    r = records[0]
    assert r.rgb == f"rgb/{r.cls}/{r.id}.mp4" and r.flow == f"flow/{r.cls}/{r.id}.mp4"
    assert (r.frames, r.width, r.height, r.fps) == (10, W, H, 25.0)
    line = json.loads(open(os.path.join(dataset, "index.jsonl")).readline())
    assert set(line) == {"id", "rgb", "flow", "label", "class", "frames", "fps", "width", "height", "splits"}
    ok, excluded = validate_records(dataset, records, min_frames=8)
    assert len(ok) == 32 and excluded == []


def test_dataset_files_carry_exact_flow(dataset):
    records, _ = read_index(dataset)
    judged = 0
    for r in [x for x in records if x.cls in ("rotate_cw", "zoom_out", "translate_up")][::2]:
        rgb = read_all_frames(os.path.join(dataset, r.rgb)).astype(np.float32) / 255
        flow = dequantise_flow(read_flow_frames(os.path.join(dataset, r.flow), range(r.frames)))
        assert len(rgb) == len(flow) == 10
        # re-render with the generator's per-video recipe: the file holds the exact flow, quantised
        rng = np.random.default_rng([5, r.label, int(r.id.rsplit("_", 1)[1])])
        frames, exact = render_dataset_video(r.cls, r.frames, H, W, rng, "object", 2.0)
        assert np.abs(flow[:-1] - exact).mean() < 0.1  # px; one level is 0.157
        assert np.abs(flow[-1] - exact[-1]).mean() < 0.1  # last flow repeated
        assert np.abs(rgb - frames).mean() < 4 / 255  # H.264 crf 18
        for t in range(0, 9, 4):
            if not r.cls.startswith("translate"):  # small rotating/zooming disc on a flat background: its
                continue                               # coded edges dominate; exactness is checked vs the re-render
            errors = _warp_errors(rgb[t], rgb[t + 1], flow[t], min_motion=0.5, min_change=0.03)
            if errors is None:
                continue
            judged += 1
            e_flow, e_zero = errors
            # with the flat background only the object changes the picture, and its H.264-coded edges dominate;
            # the per-layer exactness of the flow is checked on the renderer itself above
            assert e_flow < e_zero, (r.cls, t, e_flow, e_zero)
    assert judged >= 1


def test_idempotent_and_regenerates(dataset, tmp_path):
    stamp = os.path.getmtime(os.path.join(dataset, "index.jsonl"))
    make_synthetic_dataset(dataset, SyntheticSpec(num_classes=8, videos_per_class=4, frames=10, height=H, width=W,
                           seed=5, pan_speed=2.0))
    assert os.path.getmtime(os.path.join(dataset, "index.jsonl")) == stamp
    other = tmp_path / "o"
    make_synthetic_dataset(other, SyntheticSpec(num_classes=2, videos_per_class=2, frames=4, height=16, width=16),
                           workers=1)
    make_synthetic_dataset(other, SyntheticSpec(num_classes=3, videos_per_class=2, frames=4, height=16, width=16),
                           workers=1)
    recs, classes = read_index(other)
    assert len(classes) == 3 and len(recs) == 6
    assert sorted(os.listdir(other / "rgb")) == sorted(MOTION_CLASSES[:3])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(foreign, SyntheticSpec(num_classes=1, videos_per_class=1, frames=4, height=16, width=16))


def _object_mask(scene, t, h=H, w=W):
    """Pixels the object covers at frame t (coverage >= 1/2, as the renderer decides the flow)."""
    a = scene.motion.matrices(np.array([(w - 1) / 2, (h - 1) / 2]))[t]
    yy, xx = np.mgrid[0:h, 0:w]
    p = np.linalg.solve(a, np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)]))
    return ((scene.radius - np.hypot(p[0], p[1])) * scene.motion.scale[t] >= 0).reshape(h, w), a


@pytest.mark.parametrize("cls", MOTION_CLASSES)
def test_object_scene_exact_flow_and_class_motion(cls):
    rng = np.random.default_rng(11)
    scene = random_object_scene(cls, 8, H, W, rng, shake_speed=1.5)
    frames, flow = render_object_video(scene, H, W)
    assert frames.shape == (8, H, W, 3) and flow.shape == (7, H, W, 2)
    yy, xx = np.mgrid[0:H, 0:W]
    for t in range(7):
        inside, a = _object_mask(scene, t)
        assert 40 < inside.sum() < 0.5 * H * W
        # background: the camera shake, the same displacement everywhere
        shake = scene.camera.shift[t + 1] - scene.camera.shift[t]
        assert np.allclose(flow[t][~inside], shake, atol=1e-4)
        # away from the object's edge, warping frame t+1 by the flow gives frame t back (both layers)
        edge = inside ^ cv2.erode(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        edge |= cv2.dilate(inside.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~inside
        pred = _backward_warp(frames[t + 1], flow[t])
        ok = np.all(pred >= 0, axis=-1) & ~edge
        ok[:3] = ok[-3:] = False
        ok[:, :3] = ok[:, -3:] = False
        assert np.abs(pred - frames[t])[ok].mean() < 0.004
        # the object's flow is the class motion (screen coordinates: the camera does not move the object)
        f, cx, cy = flow[t][inside], a[0, 2], a[1, 2]
        rx, ry = xx[inside] - cx, yy[inside] - cy
        if cls.startswith("translate"):
            d = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[cls.split("_")[1]]
            assert np.all(f @ np.array(d, float) > 0.7), (cls, t)
            assert np.allclose(f, f[0], atol=1e-4)
        elif cls.startswith("rotate"):
            curl = (rx * f[:, 1] - ry * f[:, 0]).mean()
            div = (rx * f[:, 0] + ry * f[:, 1]).mean()  # a finite rotation moves points slightly inward
            assert (curl > 0) == (cls == "rotate_cw") and abs(div) < 0.1 * abs(curl)
        else:
            div = (rx * f[:, 0] + ry * f[:, 1]).mean()
            assert (div > 0) == (cls == "zoom_in")


def test_camera_shake_changes_between_clips():
    """Nearly steady within a few frames, unrelated a couple of periods apart, bounded by max_speed."""
    v = np.stack([np.diff(camera_shake(40, np.random.default_rng(s), 1.0, 8.0), axis=0) for s in range(400)])
    assert np.linalg.norm(v, axis=-1).max() <= 1.0 + 1e-9
    def corr(lag):
        a, b = v[:, :-lag].reshape(-1), v[:, lag:].reshape(-1)
        return np.corrcoef(a, b)[0, 1]
    assert corr(1) > 0.9 and corr(2) > 0.8
    assert abs(corr(20)) < 0.1
    assert abs(v.mean()) < 0.05  # no preferred direction


def test_scene_choice():
    """Scene "full" is the former recipe (texture, then class motion from the same generator)."""
    a = render_dataset_video("rotate_cw", 3, 16, 16, np.random.default_rng(1), "full", 0.0)
    rng = np.random.default_rng(1)
    b = render_motion_video(random_texture(rng), class_motion("rotate_cw", 3, rng), 16, 16)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="scene"):
        render_dataset_video("rotate_cw", 3, 16, 16, rng, "bogus")
    with pytest.raises(ValueError, match="scene"):
        make_synthetic_dataset("/nonexistent-never-written", SyntheticSpec(num_classes=1, videos_per_class=1,
                               frames=4, height=16, width=16, scene="bogus"))


def test_deterministic_render():
    a = render_motion_video(random_texture(np.random.default_rng(9)),
                            class_motion("zoom_in", 4, np.random.default_rng(9)), 16, 16)
    b = render_motion_video(random_texture(np.random.default_rng(9)),
                            class_motion("zoom_in", 4, np.random.default_rng(9)), 16, 16)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_frame_index_survives_h264_and_transforms(tmp_path):
    n = 70
    rgb, flow = frame_index_video(n, H, W)
    write_video(tmp_path / "i.mp4", rgb, 25)
    dec = read_all_frames(tmp_path / "i.mp4")
    assert [decode_frame_index(f) for f in dec] == list(range(n))
    assert [decode_frame_index(f[..., 0]) for f in flow] == list(range(n))
    assert [decode_frame_index(f[..., 1]) for f in flow] == list(range(n))
    f = dec[53].astype(np.float32)
    assert decode_frame_index(cv2.resize(f, (W * 2, H * 2))) == 53           # resized
    assert decode_frame_index((f / 255 - 0.45) / 0.22) == 53                   # normalised
    assert decode_frame_index(-f) == 53                                         # negated (flipped u)
    assert decode_frame_index(f[:, ::-1][:, 5:40]) == 53                        # flipped + cropped in x
    with pytest.raises(ValueError):
        frame_index_video(2000, H, W)


def test_index_errors_and_validation(dataset, tmp_path):
    records, classes = read_index(dataset)
    with pytest.raises(DatasetIndexError, match="not found"):
        read_index(tmp_path)
    root = tmp_path / "broken"
    root.mkdir()
    (root / "classes.txt").write_text("a\n")
    (root / "index.jsonl").write_text('{"id": "x"\n')
    with pytest.raises(DatasetIndexError, match="index.jsonl:1: corrupt"):
        read_index(root)
    with pytest.raises(DatasetIndexError, match="inconsistent"):
        write_index(root, [VideoRecord("x", "a.mp4", None, 3, "a", 1, 25.0, 8, 8, ["train"])], ["a"])
    with pytest.raises(DatasetIndexError, match="duplicate"):
        write_index(root, [records[0], records[0]], classes)

    # build a copy of 5 records with defects and check each exclusion reason
    import shutil
    work = tmp_path / "w"
    shutil.copytree(dataset, work)
    recs = records[:6]
    os.remove(work / recs[0].rgb)                                            # missing rgb
    open(work / recs[1].rgb, "wb").close()                                  # zero-byte rgb
    data = open(work / recs[2].flow, "rb").read()
    open(work / recs[2].flow, "wb").write(data[: len(data) // 3])           # truncated flow
    write_video(work / recs[3].rgb, np.zeros((7, H, W, 3), np.uint8), 25)   # 7 vs 10 frames
    ok, excluded = validate_records(work, recs, min_frames=8, workers=2)
    reasons = {e["id"]: e["reason"] for e in excluded}
    assert [r.id for r in ok] == [recs[4].id, recs[5].id]
    assert "rgb unreadable" in reasons[recs[0].id] and "no such file" in reasons[recs[0].id]
    assert "empty" in reasons[recs[1].id]
    assert "flow unreadable" in reasons[recs[2].id]
    assert "mismatch" in reasons[recs[3].id]
    ok, excluded = validate_records(work, recs[4:], min_frames=11)
    assert not ok and all("too short" in e["reason"] for e in excluded)
    write_index(work, ok, classes, excluded)
    lines = open(work / "excluded.jsonl").read().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["reason"].startswith("too short")
