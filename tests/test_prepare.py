"""goca-prepare: split files in the official formats, re-encoding of old AVI codecs, bad inputs, resumability."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from goca_fast.prepare.datasets import (
    k400_file_stem,
    parse_hmdb_split,
    parse_k400_csv,
    parse_ucf_class_ind,
    parse_ucf_list,
    scan_dataset,
)
from goca_fast.data.index import read_index, select_split
from goca_fast.prepare.sources import SplitFileError
from goca_fast.prepare.build import prepare_dataset
from goca_fast.video.transcode import ExcludedInput, PrepareOptions, cfr_indices, nominal_fps, target_size
from goca_fast.video.io import probe_video, read_all_frames
from helpers import entropy_coding_mode_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIX = {"mpeg4": "yuv420p", "mjpeg": "yuvj420p", "cinepak": "rgb24", "libx264": "yuv420p", "msmpeg4v2": "yuv420p"}


def moving_frames(n=36, h=60, w=80, seed=0):
    """A textured image sliding right 1 px per frame (compressible, so the AVI codecs stay fast)."""
    import cv2
    rng = np.random.default_rng(seed)
    base = rng.random((h // 8 + 1, (w + n) // 8 + 1, 3)).astype(np.float32)
    big = cv2.GaussianBlur(np.repeat(np.repeat(base, 8, 0), 8, 1), (0, 0), 3)
    big = (big - big.min()) / (big.max() - big.min())
    return np.stack([(big[:h, n - i:n - i + w] * 255).astype(np.uint8) for i in range(n)])


def write_source(path, frames, codec="mpeg4", fps=25, fmt=None, times=None, time_base=None):
    """Write a source video with a PyAV encoder (mpeg4 = XviD-style MPEG-4 part 2, mjpeg, cinepak)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = fmt or ("avi" if path.endswith(".avi") else "mp4")
    with av.open(path, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], PIX[codec]
        s.bit_rate = 4_000_000
        if time_base:
            s.codec_context.time_base = time_base
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i if times is None else times[i]
            if time_base:
                vf.time_base = time_base
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


# ----------------------------------------------------------------------------- split-file parsing


def test_parse_ucf_formats_with_crlf():
    assert parse_ucf_class_ind("1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n\r\n") == ["ApplyEyeMakeup", "ApplyLipstick"]
    train = parse_ucf_list("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nApplyLipstick/v_ApplyLipstick_g08_c01.avi 2\r\n")
    assert train == [("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 1), ("ApplyLipstick/v_ApplyLipstick_g08_c01.avi", 2)]
    assert parse_ucf_list("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\n") == [("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", None)]
    with pytest.raises(SplitFileError):
        parse_ucf_class_ind("1 A\n3 B\n")
    with pytest.raises(SplitFileError):
        parse_ucf_class_ind("ApplyEyeMakeup\n")


def test_parse_hmdb_and_k400():
    assert parse_hmdb_split("a_b.avi 1 \nc.avi 2\nd.avi 0\n") == [("a_b.avi", 1), ("c.avi", 2), ("d.avi", 0)]
    with pytest.raises(SplitFileError):
        parse_hmdb_split("a.avi 3\n")
    csv = ("label,youtube_id,time_start,time_end,split,is_cc\n"
           "\"passing American football (in game)\",abc-_12,5,15,train,0\nabseiling,xyz,0,10,validate,0\n")
    assert parse_k400_csv(csv) == [("abc-_12_000005_000015", "passing American football (in game)", "train"),
                                   ("xyz_000000_000010", "abseiling", "val")]
    assert parse_k400_csv("youtube_id,time_start,time_end,split\nq,1,11,test\n") == [("q_000001_000011", None, "test")]
    assert k400_file_stem("id", 12.0, 22) == "id_000012_000022"
    with pytest.raises(SplitFileError):
        parse_k400_csv("label,youtube_id\nx,y\n")


def _ucf_tree(tmp, videos, codec="mpeg4", frames=None):
    """Fake UCF101: <Class>/v_<Class>_gXX_cYY.avi + ucfTrainTestlist with the official formats."""
    src = tmp / "UCF-101"
    lists = tmp / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    classes = sorted({c for c, _ in videos})
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(classes)))
    train, test = [], []
    for k, (c, g) in enumerate(videos):
        name = f"{c}/v_{c}_g{g:02d}_c01.avi"
        if frames is not False:
            write_source(str(src / name), moving_frames(seed=k) if frames is None else frames, codec)
        (train if g >= 8 else test).append(name)
    (lists / "trainlist01.txt").write_text("".join(f"{n} {classes.index(n.split('/')[0]) + 1}\r\n" for n in train))
    (lists / "testlist01.txt").write_text("".join(f"{n}\r\n" for n in test))
    (lists / "trainlist02.txt").write_text("".join(f"{n} {classes.index(n.split('/')[0]) + 1}\r\n" for n in test))
    (lists / "testlist02.txt").write_text("".join(f"{n}\r\n" for n in train))
    return src, lists, classes


def test_scan_ucf101_splits_and_missing(tmp_path):
    src, lists, classes = _ucf_tree(tmp_path, [("ApplyEyeMakeup", 8), ("ApplyEyeMakeup", 1), ("Archery", 9)], frames=False)
    for c, g in [("ApplyEyeMakeup", 8), ("ApplyEyeMakeup", 1), ("Archery", 9)]:
        (src / c).mkdir(parents=True, exist_ok=True)
        (src / c / f"v_{c}_g{g:02d}_c01.avi").write_bytes(b"x")
    # a listed name that does not exist, and a label that contradicts classInd.txt
    with open(lists / "trainlist01.txt", "a") as f:
        f.write("Archery/v_Archery_g10_c01.avi 2\r\nArchery/v_Archery_g11_c01.avi 1\r\nNoSuchClass/v_x.avi 1\r\n")
    (src / "Archery" / "v_Archery_g11_c01.avi").write_bytes(b"x")
    ds = scan_dataset("ucf101", str(src), str(lists))
    assert ds.classes == ["ApplyEyeMakeup", "Archery"]
    splits = {v.id: sorted(v.splits) for v in ds.videos}
    assert splits == {"v_ApplyEyeMakeup_g08_c01": ["test2", "train1"], "v_ApplyEyeMakeup_g01_c01": ["test1", "train2"],
                      "v_Archery_g09_c01": ["test2", "train1"]}
    reasons = {p["id"]: p["reason"] for p in ds.problems}
    assert reasons["v_Archery_g10_c01"].startswith("not found: listed in trainlist01.txt")
    assert "label 1 but class 'Archery' is 2" in reasons["v_Archery_g11_c01"]
    assert "NoSuchClass" in reasons["v_x"]
    # case-insensitive fallback (UCF's HandstandPushups vs v_HandStandPushups_* naming)
    (src / "Archery" / "v_Archery_g09_c01.avi").rename(src / "Archery" / "v_ARCHERY_g09_c01.avi")
    ds = scan_dataset("ucf101", str(src), str(lists))
    assert "v_Archery_g09_c01" in {v.id for v in ds.videos}
    # the split directory is found under the source root when not given
    with pytest.raises(SplitFileError, match="classInd.txt"):
        scan_dataset("ucf101", str(src))


def test_scan_hmdb51(tmp_path):
    src, sp = tmp_path / "hmdb51", tmp_path / "splits"
    sp.mkdir()
    for cls, vids in {"brush_hair": ["a.avi", "b.avi", "c.avi"], "shoot_ball": ["d.avi"]}.items():
        (src / cls).mkdir(parents=True)
        for v in vids:
            (src / cls / v).write_bytes(b"x")
    (sp / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \nghost.avi 1 \n")
    (sp / "brush_hair_test_split2.txt").write_text("a.avi 2 \nb.avi 1 \nc.avi 0 \n")
    (sp / "shoot_ball_test_split1.txt").write_text("d.avi 1 \n")
    ds = scan_dataset("hmdb51", str(src), str(sp))
    assert ds.classes == ["brush_hair", "shoot_ball"]
    assert {v.id: sorted(v.splits) for v in ds.videos} == {"a": ["test2", "train1"], "b": ["test1", "train2"],
                                                           "d": ["train1"]}
    reasons = sorted(p["reason"] for p in ds.problems)
    assert any(r.startswith("not found: listed in brush_hair_test_split1.txt") for r in reasons)
    assert "unused: tagged 0 in every split" in reasons
    assert any("missing split file: class 'shoot_ball' split 2" in r for r in reasons)


def test_scan_kinetics_class_folders_and_flat(tmp_path):
    root = tmp_path / "k400"
    ann = root / "annotations"
    ann.mkdir(parents=True)
    (ann / "train.csv").write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                                   "playing cards,aaa,1,11,train,0\nabseiling,bbb,0,10,train,0\nabseiling,gone,0,10,train,0\n")
    (ann / "validate.csv").write_text("label,youtube_id,time_start,time_end,split,is_cc\nabseiling,ccc,30,40,validate,0\n")
    (root / "train" / "playing_cards").mkdir(parents=True)
    (root / "train" / "playing_cards" / "aaa_000001_000011.mp4").write_bytes(b"x")
    (root / "train" / "bbb_000000_000010.mp4").write_bytes(b"x")  # flat tarball layout
    (root / "val" / "abseiling").mkdir(parents=True)
    (root / "val" / "abseiling" / "ccc_000030_000040.mp4").write_bytes(b"x")
    ds = scan_dataset("kinetics400", str(root))
    assert ds.classes == ["abseiling", "playing cards"]
    assert {(v.id, v.cls, tuple(v.splits)) for v in ds.videos} == {
        ("aaa_000001_000011", "playing cards", ("train",)), ("bbb_000000_000010", "abseiling", ("train",)),
        ("ccc_000030_000040", "abseiling", ("val",))}
    assert [p["id"] for p in ds.problems] == ["gone_000000_000010"]


def test_scan_folders_plain_and_split_layout(tmp_path):
    for rel in ["a/x.mp4", "a/y.avi", "b/z.mkv", "b/notes.txt"]:
        (tmp_path / "plain" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "plain" / rel).write_bytes(b"x")
    ds = scan_dataset("folders", str(tmp_path / "plain"))
    assert ds.classes == ["a", "b"] and {(v.id, v.cls, tuple(v.splits)) for v in ds.videos} == {
        ("x", "a", ("all",)), ("y", "a", ("all",)), ("z", "b", ("all",))}
    # split folders: a name repeated in another split is another video (distinct ids); same bytes = duplicate
    for rel, data in [("train/a/x.mp4", b"x1"), ("val/a/x.mp4", b"x2"), ("validate/b/w.mp4", b"w"),
                      ("train/b/same.mp4", b"dup"), ("val/b/same_copy.mp4", b"dup")]:
        (tmp_path / "split" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "split" / rel).write_bytes(data)
    ds = scan_dataset("folders", str(tmp_path / "split"))
    assert {(v.id, v.cls, tuple(v.splits)) for v in ds.videos} == {
        ("train__x", "a", ("train",)), ("val__x", "a", ("val",)), ("w", "b", ("val",)), ("same", "b", ("train",))}
    assert [p["reason"] for p in ds.problems] == [
        f"duplicate: same content as {tmp_path / 'split' / 'train/b/same.mp4'}; kept that one"]


def test_split_folders_with_repeated_names_keep_every_video(tmp_path, capsys):
    """End to end: train/<c>/x.mp4 and test/<c>/x.mp4 are two videos, both prepared."""
    from goca_fast.cli.prepare import main
    src = tmp_path / "src"
    for k, rel in enumerate(["train/a/x.avi", "test/a/x.avi", "train/b/y.avi", "test/b/y.avi", "test/b/z.avi"]):
        write_source(str(src / rel), moving_frames(n=12, seed=k), "mpeg4")
    assert main(["--dataset", "folders", "--src", str(src), "--out", str(tmp_path / "out"), "--short-side", "32",
                 "--min-frames", "8", "--workers", "1", "--no-progress"]) == 0
    records, classes = read_index(tmp_path / "out")
    assert sorted((r.id, tuple(r.splits)) for r in records) == [
        ("test__x", ("test",)), ("test__y", ("test",)), ("train__x", ("train",)), ("train__y", ("train",)),
        ("z", ("test",))]
    assert len({r.rgb for r in records}) == 5
    assert all(entropy_coding_mode_flags(tmp_path / "out" / r.rgb) == [0] for r in records)  # CAVLC by default
    assert (tmp_path / "out" / "excluded.jsonl").read_text() == ""
    # flow JPEGs in the same layout (<split>/<class>/<name>/): each video gets its own split's folder
    import cv2
    from goca_fast.video.flow_codec import read_flow_frames
    from goca_fast.cli.flow import main as flow_main
    u = {"train__x": 147, "test__x": 108}  # MemDPC quantisation of +3 and -3 px
    for r in records:
        if r.id in u:
            folder = tmp_path / "jpeg" / r.splits[0] / r.cls / r.id.split("__")[-1]
            folder.mkdir(parents=True)
            img = np.full((r.height, r.width, 3), 128, np.uint8)
            img[..., 0] = u[r.id]
            for i in range(r.frames - 1):
                cv2.imwrite(str(folder / f"flow_{i + 1:05d}.jpg"), img)
    assert flow_main(["--root", str(tmp_path / "out"), "--import-jpeg", str(tmp_path / "jpeg"), "--no-progress",
                      "--workers", "1"]) == 0
    flows = {r.id: r for r in read_index(tmp_path / "out")[0]}
    assert set(flows) == set(u)
    for vid, want in u.items():
        got = read_flow_frames(tmp_path / "out" / flows[vid].flow, [0, 5])[..., 0].astype(int)
        assert np.abs(got - want).max() <= 2, vid
        assert entropy_coding_mode_flags(tmp_path / "out" / flows[vid].flow) == [0]


# ----------------------------------------------------------------------------- pure helpers


def test_target_size_even_and_aspect():
    assert target_size(320, 240, 256) == (342, 256)   # UCF101
    assert target_size(340, 256, 256) == (340, 256)
    assert target_size(240, 320, 256) == (256, 342)   # portrait
    assert target_size(400, 226, 256) == (454, 256)
    assert target_size(320, 240, 256, upscale=False) == (320, 240)
    assert target_size(352, 288, 256, sar=12 / 11) == (342, 256)  # non-square pixels (4:3 display)
    for w, h in [(177, 101), (1920, 1080), (101, 177)]:
        tw, th = target_size(w, h, 128)
        assert tw % 2 == 0 and th % 2 == 0 and min(tw, th) == 128


def test_cfr_indices():
    t = np.arange(10) / 25
    assert cfr_indices(t, 25.0, 1.0) is None
    jitter = t + np.array([0, 0.004, -0.003, 0, 0.002, 0, 0, 0, 0, 0])
    assert cfr_indices(jitter, 25.0, 1.0) is None
    vfr = np.array([0, 0.04, 0.12, 0.16, 0.24])      # two frames missing at 0.08 and 0.20
    assert cfr_indices(vfr, 25.0, 1.0).tolist() == [0, 1, 1, 2, 3, 3, 4]  # nearest, ties to the earlier
    assert cfr_indices(t, 12.5, 1.0).tolist() == [0, 2, 4, 6, 8]
    # packed B-frames in AVI: frames come out in display order stamped 1,3,2,5,4,... -> a permutation, kept as is
    packed = np.array([1, 3, 2, 5, 4, 7, 6, 9, 8, 10]) / 25
    assert cfr_indices(packed, 25.0, 1.0) is None
    # the same with a dropped frame: resampling works on the sorted times
    assert cfr_indices(np.array([0, 2, 1, 4, 5]) / 25, 25.0, 1.0).tolist() == [0, 1, 2, 2, 3, 4]
    # a timestamp reset (spliced clips) goes back further than any decoder reorders: excluded
    with pytest.raises(ExcludedInput, match="backwards"):
        cfr_indices(np.concatenate([np.arange(40), np.arange(40)]) / 25, 25.0, 1.0)
    with pytest.raises(ExcludedInput, match="without frames"):
        cfr_indices(np.array([0, 0.04, 2.0]), 25.0, 1.0)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ucf_prepared(tmp_path_factory):
    """A fake UCF101 with one video per old codec and every kind of bad input, prepared at short side 48."""
    tmp = tmp_path_factory.mktemp("ucf")
    vids = [("ApplyEyeMakeup", 8), ("ApplyEyeMakeup", 1), ("Archery", 9), ("Archery", 2), ("Archery", 10),
            ("Archery", 11), ("Archery", 3), ("Archery", 12), ("Archery", 13)]
    src, lists, classes = _ucf_tree(tmp, vids, frames=False)
    f = moving_frames()
    write_source(str(src / "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"), f, "mpeg4")      # XviD-style
    write_source(str(src / "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi"), f, "mjpeg")
    write_source(str(src / "Archery/v_Archery_g09_c01.avi"), f[:32, :32, :40], "cinepak")
    write_source(str(src / "Archery/v_Archery_g02_c01.avi"), f[:12], "mpeg4")               # too short
    (src / "Archery/v_Archery_g10_c01.avi").write_bytes(b"")                                # zero bytes
    full = src / "Archery/v_Archery_g11_c01.avi"
    write_source(str(full), f, "mjpeg")
    full.write_bytes(full.read_bytes()[: full.stat().st_size // 2])                          # truncated
    (src / "Archery/v_Archery_g03_c01.avi").write_bytes(os.urandom(3000))                  # garbage
    # VFR mp4: frames at irregular times (1/1000 s time base), 40 and 80 ms apart
    times = np.cumsum([0] + [40 if i % 3 else 80 for i in range(1, 36)])
    write_source(str(src / "Archery/v_Archery_g12_c01.avi"), f, "libx264", fmt="mp4", times=times.tolist(),
                 time_base=Fraction(1, 1000))
    # v_Archery_g13_c01 is listed but never written: missing
    out = tmp / "prepared"
    opts = PrepareOptions(short_side=48, min_frames=20)
    from goca_fast.prepare.datasets import scan_dataset as scan
    report = prepare_dataset(scan("ucf101", str(src), str(lists)), str(out), opts, workers=2)
    return src, lists, out, report, f


def test_prepare_round_trip_and_report(ucf_prepared):
    src, lists, out, report, f = ucf_prepared
    records, classes = read_index(out)
    assert classes == ["ApplyEyeMakeup", "Archery"]
    by_id = {r.id: r for r in records}
    assert set(by_id) == {"v_ApplyEyeMakeup_g08_c01", "v_ApplyEyeMakeup_g01_c01", "v_Archery_g09_c01",
                          "v_Archery_g12_c01"}
    for r in records:
        info = probe_video(out / r.rgb, decode=True)
        assert (info.frames, info.width, info.height, info.codec) == (r.frames, r.width, r.height, "h264")
        assert min(r.width, r.height) == 48 and r.width % 2 == 0 and r.height % 2 == 0
        assert r.fps == pytest.approx(info.fps)
        assert r.flow is None
    mp4 = by_id["v_ApplyEyeMakeup_g08_c01"]
    assert (mp4.frames, mp4.width, mp4.height, mp4.fps) == (36, 64, 48, 25.0)
    assert by_id["v_Archery_g09_c01"].frames == 32 and by_id["v_Archery_g09_c01"].width == 60  # cinepak 40x32
    # the re-encoded picture is the source picture (resized 60x80 -> 48x64)
    import cv2
    dec = read_all_frames(out / mp4.rgb)
    ref = cv2.resize(f[5], (64, 48), interpolation=cv2.INTER_AREA).astype(int)
    assert np.abs(dec[5].astype(int) - ref).mean() < 6
    # VFR input (dropped frames) -> CFR at the nominal 25 fps: every frame kept, gaps filled, duration kept
    vfr = by_id["v_Archery_g12_c01"]
    duration = 0.04 * 36 + 0.04 * len([i for i in range(1, 36) if i % 3 == 0])  # incl. the last frame's 40 ms
    assert vfr.frames == int(np.floor(duration * vfr.fps + 0.5)) and vfr.fps == 25.0 and vfr.frames == 47
    assert [r.id for r in select_split(records, "train1")] == ["v_ApplyEyeMakeup_g08_c01", "v_Archery_g09_c01",
                                                                  "v_Archery_g12_c01"]
    assert [r.id for r in select_split(records, "test1")] == ["v_ApplyEyeMakeup_g01_c01"]
    with open(out / "excluded.jsonl") as fh:
        excl = {e["id"]: e["reason"] for e in map(json.loads, fh)}
    assert excl["v_Archery_g02_c01"] == "too short: 12 frames < 20"
    assert excl["v_Archery_g10_c01"].startswith("undecodable: empty file")
    assert excl["v_Archery_g11_c01"].startswith("truncated")
    assert excl["v_Archery_g03_c01"].startswith("undecodable")
    assert excl["v_Archery_g13_c01"].startswith("not found: listed in")
    assert report["kept"] == 4 and report["resampled_to_cfr"] == 1
    assert report["excluded"] == 7 and report["excluded_by_reason"]["missing split file"] == 2  # no split 3
    left = [n for d, _, fs in os.walk(out) for n in fs if n.startswith(".tmp_")]
    assert left == []


def test_prepare_rerun_skips_and_refuses_other_params(ucf_prepared):
    src, lists, out, _, _ = ucf_prepared
    stamp = {p: os.stat(p).st_mtime_ns for p in (out / "rgb").rglob("*.mp4")}
    ds = scan_dataset("ucf101", str(src), str(lists))
    rep = prepare_dataset(ds, str(out), PrepareOptions(short_side=48, min_frames=20), workers=1)
    assert rep["encoded"] == 0 and rep["skipped_existing"] == 4
    assert stamp == {p: os.stat(p).st_mtime_ns for p in (out / "rgb").rglob("*.mp4")}
    with pytest.raises(ValueError, match="other parameters"):
        prepare_dataset(ds, str(out), PrepareOptions(short_side=64, min_frames=20))
    with pytest.raises(ValueError, match=r"other parameters \{'entropy': \('cavlc', 'cabac'\)\}"):
        prepare_dataset(ds, str(out), PrepareOptions(short_side=48, min_frames=20, entropy="cabac"))
    # a root prepared before the coder was recorded was CABAC: the default (CAVLC) refuses it, cabac carries on
    params = out / "prepare.json"
    before = params.read_text()
    old = json.loads(before)
    del old["entropy"]
    params.write_text(json.dumps(old))
    try:
        with pytest.raises(ValueError, match=r"\{'entropy': \('cabac', 'cavlc'\)\}"):
            prepare_dataset(ds, str(out), PrepareOptions(short_side=48, min_frames=20))
        rep = prepare_dataset(ds, str(out), PrepareOptions(short_side=48, min_frames=20, entropy="cabac"), workers=1)
        assert rep["encoded"] == 0 and rep["skipped_existing"] == 4
    finally:
        params.write_text(before)


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "goca_fast.cli.prepare", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300, **kw)


def test_cli_bad_arguments(tmp_path, capsys):
    from goca_fast.cli.prepare import main

    def err(*args):
        with pytest.raises(SystemExit) as e:
            main(list(args))
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "goca-prepare: error: source directory" in err("--dataset", "ucf101", "--src", str(tmp_path / "nope"),
                                                         "--out", str(tmp_path / "o"))
    assert "goca-prepare: error: short side must be an even number" in err(
        "--dataset", "ucf101", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--short-side", "255")
    assert "classInd.txt" in err("--dataset", "ucf101", "--src", str(tmp_path), "--out", str(tmp_path / "o"))
    assert "invalid choice" in err("--dataset", "ucf", "--src", str(tmp_path), "--out", str(tmp_path / "o"))


def _digest(root):
    out = {}
    for p in sorted((root / "rgb").rglob("*.mp4")):
        if p.name.startswith(".tmp_"):
            continue
        out[str(p.relative_to(root))] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
def test_kill_mid_run_and_rerun_matches_uninterrupted(tmp_path):
    vids = [("Alpha", 8 + k) for k in range(6)] + [("Beta", 8 + k) for k in range(6)]
    src, lists, _ = _ucf_tree(tmp_path, vids, frames=False)
    for k, (c, g) in enumerate(vids):
        write_source(str(src / f"{c}/v_{c}_g{g:02d}_c01.avi"), moving_frames(n=40, h=64, w=128, seed=k), "mjpeg")
    args = ["--dataset", "ucf101", "--src", str(src), "--splits-dir", str(lists), "--short-side", "64",
            "--workers", "1", "--no-progress"]
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "goca_fast.cli.prepare", *args, "--out", str(out)], cwd=ROOT,
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_digest(out) if (out / "rgb").is_dir() else {}) < 3:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finished = _digest(out)
    done_before = len(finished)
    assert 3 <= done_before < 12 and not (out / "index.jsonl").exists()
    r = _cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{12 - done_before} encoded, {done_before} already done" in r.stdout
    after, ref = _digest(out), _digest(tmp_path / "ref")
    assert set(after) == set(ref) and all(after[k] == v for k, v in finished.items())  # done ones untouched
    for rel in ref:  # same pictures as the uninterrupted run (libx264 is not always bit-exact run to run)
        diff = read_all_frames(out / rel).astype(int) - read_all_frames(tmp_path / "ref" / rel)
        assert np.abs(diff).mean() <= 0.5
    assert (out / "index.jsonl").read_text() == (tmp_path / "ref" / "index.jsonl").read_text()
    from goca_fast.runtime.atomic import remove_stale_temps
    remove_stale_temps(str(out), older_than=0)  # what a rerun does once the killed run's temp is stale
    assert not [q for q in out.rglob(".tmp_*")]


def test_arrange_kinetics_flat_tarball_layout(tmp_path):
    from goca_fast.prepare.datasets import arrange_kinetics
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "aaa_000001_000011.mp4").write_bytes(b"x")
    csv = tmp_path / "train.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split,is_cc\nplaying cards,aaa,1,11,train,0\n"
                   "abseiling,zzz,0,10,train,0\n")
    assert arrange_kinetics(str(flat), str(csv), str(tmp_path / "train")) == (1, 1)
    assert (tmp_path / "train" / "playing_cards" / "aaa_000001_000011.mp4").is_file()
    assert arrange_kinetics(str(flat), str(csv), str(tmp_path / "train")) == (0, 1)  # idempotent


# ----------------------------------------------------------------------------- reruns, exit codes, memory


def _folders_src(root, n_videos, frames=16):
    for k in range(n_videos):
        write_source(str(root / ("a" if k % 2 else "b") / f"v{k}.avi"), moving_frames(n=frames, seed=k), "mpeg4")


def test_rerun_keeps_flow_and_says_when_it_must_be_recomputed(tmp_path, capsys):
    """A prepare rerun on a dataset with flow keeps the valid flow paths."""
    from goca_fast.cli.prepare import main
    from goca_fast.prepare.flow import FlowSettings, extract_flow
    from goca_fast.video.tvl1 import TVL1Params
    src, out = tmp_path / "src", tmp_path / "out"
    _folders_src(src, 2)
    args = ["--dataset", "folders", "--src", str(src), "--out", str(out), "--short-side", "32", "--min-frames", "8",
            "--workers", "1", "--no-progress"]
    assert main(args) == 0
    extract_flow(str(out), FlowSettings(params=TVL1Params(nscales=2, warps=2, outer_iterations=2)))
    flows = {r.id: r.flow for r in read_index(out)[0]}
    assert set(flows) == {"v0", "v1"} and all(flows.values())
    capsys.readouterr()
    assert main(args) == 0  # plain rerun
    assert {r.id: r.flow for r in read_index(out)[0]} == flows
    assert "flow kept for 2 videos" in capsys.readouterr().out
    _folders_src(src, 3)    # a new video: the old ones keep their flow, the new one has none yet
    assert main(args) == 0
    assert {r.id: r.flow for r in read_index(out)[0]} == {**flows, "v2": None}
    assert "1 still without flow" in capsys.readouterr().out
    # other encoding parameters re-encode the RGB: its flow is stale, deleted and reported
    assert main(args + ["--crf", "23", "--force"]) == 0
    assert {r.id: r.flow for r in read_index(out)[0]} == {"v0": None, "v1": None, "v2": None}
    msg = capsys.readouterr().out
    assert "FLOW MUST BE RECOMPUTED for 2 ({'RGB re-encoded in this run': 2})" in msg and "goca-flow --root" in msg
    assert not list((out / "flow").rglob("*.mp4"))


def test_exit_codes(tmp_path, capsys):
    """Exit codes: 0 = something usable, 1 = nothing usable (one line), 2 = usage error; goca-flow too."""
    from goca_fast.cli.prepare import main
    from goca_fast.cli.flow import main as flow_main
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "x.avi").write_bytes(os.urandom(2000))
    (bad / "a" / "y.mp4").write_bytes(b"")
    base = ["--dataset", "folders", "--src", str(bad), "--short-side", "32", "--workers", "1", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["goca-prepare: nothing usable: all 2 inputs excluded {'undecodable': 2}"]
    assert main(base + ["--check"]) == 1
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert main(["--dataset", "folders", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o2")]) == 1
    assert "goca-prepare: nothing usable: no videos found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "folders", "--src", str(bad)])  # neither --out nor --check
    assert e.value.code == 2
    # goca-flow: a dataset whose every RGB video is broken has nothing usable
    good = tmp_path / "good"
    _folders_src(good, 1)
    out = tmp_path / "ds"
    assert main(["--dataset", "folders", "--src", str(good), "--out", str(out), "--short-side", "32",
                 "--min-frames", "8", "--workers", "1", "--no-progress"]) == 0
    capsys.readouterr()
    (tmp_path / "jpeg").mkdir()
    assert flow_main(["--root", str(out), "--import-jpeg", str(tmp_path / "jpeg"), "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith("goca-flow: nothing usable: no video has flow")
    rgb = next((out / "rgb").rglob("*.mp4"))
    rgb.write_bytes(rgb.read_bytes()[:200])
    assert flow_main(["--root", str(out), "--no-progress", "--workers", "1", "--nscales", "2"]) == 1
    assert "nothing usable" in capsys.readouterr().err


def test_nominal_fps():
    assert nominal_fps(np.arange(30) / 25, 25.0) == 25.0
    assert nominal_fps(np.array([0, 1, 2, 5, 9, 29]) / 15, 15.0) == 15.0          # dropped frames: the container's
    t = np.array([g for g in range(60) if g % 7]) / 30 + 0.003 * np.sin(np.arange(51))
    assert nominal_fps(t, 51 / 2.0) == 30.0                                        # phone VFR: average 25.5 -> 30
    with pytest.raises(ExcludedInput, match="no usable frame rate"):
        nominal_fps(np.array([0.0]), 0.0)


_RSS_CHILD = """
import json, sys
from goca_fast.prepare.build import Job, process_one
from goca_fast.video.transcode import PrepareOptions
def mb(key):
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith(key))
base = mb("VmRSS")
r = process_one(Job(sys.argv[1], sys.argv[2], "rgb/c/long.mp4", "long"), PrepareOptions(short_side=160))
print(json.dumps({"base": base, "peak": mb("VmHWM"), "status": r["status"], "frames": r.get("frames")}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the peak RSS")
def test_peak_memory_does_not_grow_with_video_length(tmp_path):
    """3,000 frames of 640x480 (2 min at 25 fps) prepare in bounded memory.

    Holding the decoded frames (214x160 RGB each) would take 308 MB, twice that with the final stack.
    """
    src = tmp_path / "long.avi"
    ramp = np.tile(np.linspace(16, 235, 640).astype(np.uint8), (480, 1))
    grey = np.full((240, 320), 128, np.uint8)
    with av.open(str(src), "w", format="avi") as c:  # a moving square on a ramp: cheap to encode and decode
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt, s.bit_rate = 640, 480, "yuv420p", 500_000
        for i in range(3000):
            y = ramp.copy()
            r = (3 * i) % 400
            y[r:r + 64, r:r + 64] = 235
            vf = av.VideoFrame(640, 480, "yuv420p")
            for plane, data in zip(vf.planes, (y, grey, grey)):
                plane.update(data)
            vf.pts = i
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(src), str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert (m["status"], m["frames"]) == ("encoded", 3000)
    assert m["peak"] - m["base"] <= 300, m


def test_goca_prepare_on_a_kinetics_style_tree(tmp_path, capsys):
    """End to end on a tiny Kinetics-700-style download: CSV annotations (youtube_id, time_start, time_end, split),
    clips named <id>_<start>_<end> in class folders (train) and flat (val); a listed clip that was never downloaded
    and an unlabelled test row are listed in excluded.jsonl, not fatal."""
    from goca_fast.cli.prepare import main
    src = tmp_path / "k700"
    (src / "annotations").mkdir(parents=True)
    (src / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,aaaaaaaaaaa,0,10,train\nabseiling,bbbbbbbbbbb,12,22,train\n"
        "\"playing cards\",ccccccccccc,3,13,train\nplaying cards,never_there,0,10,train\n")
    (src / "annotations" / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nabseiling,ddddddddddd,30,40,validate\n")
    (src / "annotations" / "test.csv").write_text("youtube_id,time_start,time_end,split\neeeeeeeeeee,0,10,test\n")
    clips = {"train/abseiling/aaaaaaaaaaa_000000_000010.mp4": 0, "train/abseiling/bbbbbbbbbbb_000012_000022.mp4": 1,
             "train/playing_cards/ccccccccccc_000003_000013.mp4": 2, "val/ddddddddddd_000030_000040.mp4": 3,
             "test/eeeeeeeeeee_000000_000010.mp4": 4}
    for rel, seed in clips.items():
        write_source(str(src / rel), moving_frames(n=12, seed=seed), "mpeg4")
    out = tmp_path / "out"
    assert main(["--dataset", "kinetics700", "--src", str(src), "--out", str(out), "--short-side", "32",
                 "--min-frames", "8", "--workers", "1", "--no-progress"]) == 0
    records, classes = read_index(out)
    assert classes == ["abseiling", "playing cards"]
    assert sorted((r.id, r.cls, tuple(r.splits)) for r in records) == [
        ("aaaaaaaaaaa_000000_000010", "abseiling", ("train",)), ("bbbbbbbbbbb_000012_000022", "abseiling", ("train",)),
        ("ccccccccccc_000003_000013", "playing cards", ("train",)),
        ("ddddddddddd_000030_000040", "abseiling", ("val",))]
    assert all(probe_video(out / r.rgb).frames == r.frames == 12 for r in records)
    excluded = {e["id"]: e["reason"] for e in map(json.loads, (out / "excluded.jsonl").read_text().splitlines())}
    assert excluded == {"never_there_000000_000010": "not found: listed in train.csv",
                        "eeeeeeeeeee_000000_000010": "no label: test.csv"}
