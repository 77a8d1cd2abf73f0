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
    class_motion,
    decode_frame_index,
    frame_index_video,
    make_synthetic_dataset,
    random_texture,
    render_motion_video,
)
from goca_fast.data.video_io import read_all_frames, write_video
from goca_fast.flow.codec import dequantise_flow, read_flow_frames

H, W = 48, 64


def _backward_warp(img, flow):
    """Sample img at x + flow(x) (cv2.remap), i.e. predict frame t from frame t+1."""
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]].astype(np.float32)
    return cv2.remap(img, xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=-1)


def _warp_errors(f0, f1, flow, margin=6, min_motion=0.25):
    """Mean |warp(f1, flow) - f0| and |f1 - f0| over interior pixels that move."""
    pred = _backward_warp(f1, flow)
    sel = np.all(pred >= 0, axis=-1) & (np.linalg.norm(flow, axis=-1) > min_motion)
    sel[:margin] = sel[-margin:] = False
    sel[:, :margin] = sel[:, -margin:] = False
    assert sel.sum() > 100
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
    make_synthetic_dataset(root, num_classes=8, videos_per_class=4, frames=10, height=H, width=W,
                           seed=5, workers=2)
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
    for r in [x for x in records if x.cls in ("rotate_cw", "zoom_out", "translate_up")][::2]:
        rgb = read_all_frames(os.path.join(dataset, r.rgb)).astype(np.float32) / 255
        flow = dequantise_flow(read_flow_frames(os.path.join(dataset, r.flow), range(r.frames)))
        assert len(rgb) == len(flow) == 10
        # re-render with the generator's per-video recipe: the file holds the exact flow, quantised
        rng = np.random.default_rng([5, r.label, int(r.id.rsplit("_", 1)[1])])
        tex = random_texture(rng)
        frames, exact = render_motion_video(tex, class_motion(r.cls, r.frames, rng), H, W)
        assert np.abs(flow[:-1] - exact).mean() < 0.1  # px; one level is 0.157
        assert np.abs(flow[-1] - exact[-1]).mean() < 0.1  # last flow repeated
        assert np.abs(rgb - frames).mean() < 4 / 255  # H.264 crf 18
        for t in range(0, 9, 4):
            if r.cls.startswith("zoom"):  # sub-pixel motion: codec noise dominates the warp error
                continue
            e_flow, e_zero = _warp_errors(rgb[t], rgb[t + 1], flow[t], min_motion=0.5)
            assert e_flow < 0.8 * e_zero, (r.cls, t, e_flow, e_zero)


def test_idempotent_and_regenerates(dataset, tmp_path):
    stamp = os.path.getmtime(os.path.join(dataset, "index.jsonl"))
    make_synthetic_dataset(dataset, num_classes=8, videos_per_class=4, frames=10, height=H, width=W, seed=5)
    assert os.path.getmtime(os.path.join(dataset, "index.jsonl")) == stamp
    other = tmp_path / "o"
    make_synthetic_dataset(other, num_classes=2, videos_per_class=2, frames=4, height=16, width=16, workers=1)
    make_synthetic_dataset(other, num_classes=3, videos_per_class=2, frames=4, height=16, width=16, workers=1)
    recs, classes = read_index(other)
    assert len(classes) == 3 and len(recs) == 6
    assert sorted(os.listdir(other / "rgb")) == sorted(MOTION_CLASSES[:3])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(foreign, num_classes=1, videos_per_class=1, frames=4, height=16, width=16)


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
