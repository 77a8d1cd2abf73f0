"""goca-flow: quantisation, flow-video round trip, extraction (opencv + torch), JPEG import, bad inputs, resume."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import av
import cv2
import numpy as np
import pytest

from goca_fast.prepare.datasets import scan_dataset
from goca_fast.data.index import read_index
from goca_fast.prepare.build import prepare_dataset
from goca_fast.video.transcode import PrepareOptions
from goca_fast.data.synthetic import class_motion, random_texture, render_motion_video
from goca_fast.video.io import probe_video, read_all_frames, write_video
from goca_fast.video.flow_codec import dequantise_flow, quantise_flow, read_flow_frames, write_flow_video
from goca_fast.prepare.flow_files import flow_rel_path
from goca_fast.cli.flow import main
from goca_fast.prepare.flow import FlowSettings, extract_flow, grey_frames
from goca_fast.video.tvl1 import TVL1Params, opencv_tvl1
from helpers import entropy_coding_mode_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = TVL1Params(nscales=3, warps=3, outer_iterations=3)  # small, fast cases; defaults are tested in test_flow_tvl1
SMALL_ARGS = ["--nscales", "3", "--warps", "3", "--outer-iterations", "3"]


def test_quantisation_is_exactly_memdpc():
    f = np.array([-25, -20, -0.0785, 0, 0.0784, 0.0785, 10, 19.99, 20, 31], dtype=np.float32)
    memdpc = np.round((np.clip(f, -20, 20) + 20) * (255 / 40.0)).astype(np.uint8)  # MemDPC extract_ff.py
    assert np.array_equal(quantise_flow(f), memdpc)
    assert quantise_flow(np.float32(0)) == 128 and quantise_flow(np.float32(-20)) == 0 and quantise_flow(np.float32(20)) == 255
    assert np.abs(dequantise_flow(quantise_flow(f)) - np.clip(f, -20, 20)).max() <= 20 / 255 + 1e-6


def _tvl1_clip(n=12, h=48, w=64, cls="rotate_cw", seed=0):
    rng = np.random.default_rng(seed)
    frames, _ = render_motion_video(random_texture(rng), class_motion(cls, n, rng), h, w)
    return np.round(frames * 255).astype(np.uint8)


def test_flow_video_round_trip_error_real_tvl1_flow(tmp_path):
    rgb = _tvl1_clip(n=10, h=64, w=80)
    g = grey_frames(rgb)
    tv = opencv_tvl1(SMALL)
    flow = np.stack([tv.calc(g[i], g[i + 1], None) for i in range(len(g) - 1)]) * 4  # bigger motion, more range
    q = quantise_flow(flow)
    path = tmp_path / "f.mp4"
    write_flow_video(path, np.concatenate([q, q[-1:]]), fps=25)
    back = read_flow_frames(path, list(range(10)))
    err = np.abs(back.astype(int) - np.concatenate([q, q[-1:]]).astype(int))
    assert err.mean() <= 1.0 and err.max() <= 8       # <= 1 quantisation level (0.157 px) on average
    # the stream says full range: a decoder converting to RGB with the signalled matrix gets grey = luma
    with av.open(str(path)) as c:
        fr = next(c.decode(video=0))
        assert fr.color_range == 2  # JPEG / full
        rgb_view = fr.to_ndarray(format="rgb24")
    luma = np.concatenate([back[0, ..., 0], back[0, ..., 1]], axis=0).astype(int)
    assert np.abs(rgb_view[..., 1].astype(int) - luma).mean() <= 1.0


@pytest.fixture()
def prepared(tmp_path):
    """A prepared 'folders' dataset: 4 good videos (64x48, 12 frames) and one whose RGB goes missing later."""
    src = tmp_path / "src"
    for k, cls in enumerate(["rotate_cw", "translate_right", "zoom_in", "rotate_ccw", "translate_up"]):
        write_video(src / ("a" if k % 2 else "b") / f"v{k}.mp4", _tvl1_clip(cls=cls, seed=k), fps=25)
    out = tmp_path / "ds"
    prepare_dataset(scan_dataset("folders", str(src)), str(out), PrepareOptions(short_side=48, min_frames=8))
    return out


def test_extract_opencv_and_torch_agree_and_index_is_updated(prepared, tmp_path):
    rep = extract_flow(str(prepared), FlowSettings(params=SMALL), workers=2)
    assert rep["computed"] == 5 and rep["with_flow"] == 5 and rep["failed"] == 0
    records, _ = read_index(prepared)
    for r in records:
        assert r.flow == flow_rel_path(r) and r.flow.startswith("flow/")
        assert entropy_coding_mode_flags(prepared / r.flow) == [0]  # CAVLC, as goca-flow writes by default
        info = probe_video(prepared / r.flow)
        assert (info.frames, info.width, info.height) == (r.frames, r.width, 2 * r.height)
    r = records[0]
    g = grey_frames(read_all_frames(prepared / r.rgb))
    tv = opencv_tvl1(SMALL)
    direct = quantise_flow(np.stack([tv.calc(g[i], g[i + 1], None) for i in range(len(g) - 1)]))
    stored = read_flow_frames(prepared / r.flow, list(range(r.frames)))
    assert np.abs(stored[:-1].astype(int) - direct).mean() <= 1.0
    assert np.abs(stored[-1].astype(int) - stored[-2]).mean() <= 1.0  # last flow repeated (up to the codec)
    # the torch backend on the same dataset (fresh copy of the flow dir) gives the same flow
    import shutil
    shutil.rmtree(prepared / "flow")
    rep = extract_flow(str(prepared), FlowSettings("torch", batch=4, params=SMALL, entropy="cabac"), workers=1,
                       limit=1)
    assert rep["computed"] == 1 and rep["with_flow"] == 1          # the others are listed as missing flow
    assert entropy_coding_mode_flags(prepared / r.flow) == [1]
    stored_t = read_flow_frames(prepared / r.flow, list(range(r.frames)))
    assert np.abs(stored_t.astype(int) - stored.astype(int)).mean() <= 1.0
    assert extract_flow(str(prepared), FlowSettings(params=SMALL), workers=1)["computed"] == 4
    rep = extract_flow(str(prepared), FlowSettings("torch", params=SMALL))
    assert rep["computed"] == 0 and rep["already_done"] == 5 and rep["with_flow"] == 5


def test_bad_rgb_and_mismatched_flow_are_reported_not_fatal(prepared):
    records, _ = read_index(prepared)
    os.unlink(prepared / records[1].rgb)                       # RGB vanished after prepare
    bogus = prepared / flow_rel_path(records[2])               # a stale flow video with the wrong frame count
    write_flow_video(bogus, np.full((3, records[2].height, records[2].width, 2), 128, np.uint8), fps=25)
    rep = extract_flow(str(prepared), FlowSettings(params=SMALL), workers=1)
    assert rep["failed"] == 1 and rep["with_flow"] == 4 and rep["computed"] == 4
    recs, _ = read_index(prepared)
    assert records[1].id not in {r.id for r in recs}
    assert probe_video(bogus).frames == records[2].frames      # recomputed, not trusted
    with open(prepared / "excluded.jsonl") as f:
        excl = {e["id"]: e["reason"] for e in map(json.loads, f)}
    assert excl[records[1].id].startswith("flow failed") and "no such file" in excl[records[1].id]
    assert not [p for p in prepared.rglob(".tmp_*")]


def _memdpc_jpegs(folder, flow_px):
    """Write flow the way MemDPC/GOCA do: H×W×3 image, ch0 = x, ch1 = y, ch2 = 128, JPEG quality 100, from 1."""
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(flow_px):
        img = np.full((*f.shape[:2], 3), 128, np.uint8)
        img[..., :2] = quantise_flow(f)
        cv2.imwrite(os.path.join(folder, f"flow_{i + 1:05d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 100])


def test_import_memdpc_jpegs(prepared, tmp_path):
    records, _ = read_index(prepared)
    jroot = tmp_path / "jpeg" / "train"
    rng = np.random.default_rng(0)
    truth = {}
    for k, r in enumerate(records):
        n = r.frames - 1 if k != 1 else r.frames - 9         # record 1: far too few JPEGs
        flow = cv2.GaussianBlur(rng.normal(0, 4, (n, r.height, r.width * 2)).astype(np.float32), (0, 0), 3)
        flow = flow.reshape(n, r.height, r.width, 2)
        if k == 3:                                            # record 3: JPEGs at twice the size
            big = np.stack([cv2.resize(f, (2 * r.width, 2 * r.height)) * 2 for f in flow])
            _memdpc_jpegs(jroot / r.cls / r.id, big)
        elif k != 4:                                          # record 4: no folder at all
            _memdpc_jpegs(jroot / r.cls / r.id, flow)
        truth[r.id] = flow
    rep = main(["--root", str(prepared), "--import-jpeg", str(tmp_path / "jpeg"), "--no-progress", "--workers", "2",
                "--entropy", "cabac"])
    assert rep == 0
    recs, _ = read_index(prepared)
    assert {r.id for r in recs} == {records[0].id, records[2].id, records[3].id}
    with open(prepared / "excluded.jsonl") as f:
        excl = {e["id"]: e["reason"] for e in map(json.loads, f)}
    assert excl[records[1].id].startswith("flow frame count mismatch")
    assert excl[records[4].id].startswith("flow missing")
    for k in (0, 3):
        r = records[k]
        got = dequantise_flow(read_flow_frames(prepared / flow_rel_path(r), list(range(r.frames - 1))))
        tol = 0.25 if k == 0 else 0.6                         # JPEG + H.264 (+ resize for k = 3), in px
        assert np.abs(got - truth[r.id]).mean() < tol
        assert entropy_coding_mode_flags(prepared / flow_rel_path(r)) == [1]  # --entropy reached the writer


def test_cli_errors(tmp_path, capsys):
    for args, msg in ((["--root", str(tmp_path / "nope")], "does not exist"),
                      (["--root", str(tmp_path)], "not a prepared dataset"),
                      (["--root", str(tmp_path), "--shard", "3/2"], "--shard"),
                      (["--root", str(tmp_path), "--scale-step", "2"], "scale_step")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and "goca-flow: error:" in capsys.readouterr().err and msg
        

def _digest(root):
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted((root / "flow").rglob("*.mp4")) if not p.name.startswith(".tmp_")}


@pytest.mark.slow
def test_kill_mid_run_and_rerun_matches_uninterrupted(tmp_path):
    src = tmp_path / "src"
    for k in range(8):
        write_video(src / f"c{k % 2}" / f"v{k}.mp4", _tvl1_clip(n=16, h=48, w=64, seed=k), fps=25)
    dss = []
    for name in ("ref", "killed"):
        out = tmp_path / name
        prepare_dataset(scan_dataset("folders", str(src)), str(out), PrepareOptions(short_side=48, min_frames=8))
        dss.append(out)
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "goca_fast.cli.flow", "--workers", "1", "--no-progress", *SMALL_ARGS]
    assert subprocess.run(cmd + ["--root", str(dss[0])], cwd=ROOT, env=env, capture_output=True).returncode == 0
    p = subprocess.Popen(cmd + ["--root", str(dss[1])], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_digest(dss[1]) if (dss[1] / "flow").is_dir() else {}) < 2:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    finished = _digest(dss[1])
    before = len(finished)
    assert 2 <= before < 8
    r = subprocess.run(cmd + ["--root", str(dss[1])], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and f"{8 - before} computed now, {before} already done" in r.stdout
    after, ref = _digest(dss[1]), _digest(dss[0])
    assert set(after) == set(ref) and all(after[k] == v for k, v in finished.items())  # done ones untouched
    for rel in ref:  # same flow as the uninterrupted run (libx264 is not always bit-exact run to run)
        a = read_flow_frames(dss[1] / rel, list(range(16))).astype(int)
        b = read_flow_frames(dss[0] / rel, list(range(16))).astype(int)
        assert np.abs(a - b).mean() <= 0.5
    assert (dss[1] / "index.jsonl").read_text() == (dss[0] / "index.jsonl").read_text()


def test_shards_journal_their_videos_and_one_merge_writes_the_index(prepared, monkeypatch):
    """Two shards leave the index alone; the merge writes it from their journals without opening a flow file;
    a restart opens none either, and a flow file changed after its journal line is probed again (and redone)."""
    import goca_fast.prepare.flow_files as flow_files
    before = (prepared / "index.jsonl").read_text()
    reps = [extract_flow(str(prepared), FlowSettings(params=SMALL), shard=(i, 2)) for i in (0, 1)]
    assert [r["computed"] for r in reps] == [3, 2] and not any(r["merged"] for r in reps)
    assert (prepared / "index.jsonl").read_text() == before          # no shard wrote the index
    journals = sorted(p.name for p in (prepared / "flow_journal").glob("*.jsonl"))
    assert journals == ["shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    probed = []
    real_probe = flow_files.probe_video
    monkeypatch.setattr(flow_files, "probe_video", lambda p, **kw: probed.append(p) or real_probe(p, **kw))
    rep = main(["--root", str(prepared), "--merge"])
    assert rep == 0 and probed == []
    records, _ = read_index(prepared)
    assert len(records) == 5 and all(r.flow == flow_rel_path(r) for r in records)
    rep = extract_flow(str(prepared), FlowSettings(params=SMALL))
    assert (rep["computed"], rep["already_done"], rep["with_flow"]) == (0, 5, 5) and probed == []
    stale = prepared / flow_rel_path(records[3])                     # replaced after its journal line
    write_flow_video(stale, np.full((3, records[3].height, records[3].width, 2), 128, np.uint8), fps=25)
    rep = extract_flow(str(prepared), FlowSettings(params=SMALL))
    assert (rep["computed"], rep["already_done"]) == (1, 4) and probed == [str(stale)]
    assert probe_video(stale).frames == records[3].frames


def test_a_torn_journal_line_is_skipped_and_the_file_probed(prepared):
    extract_flow(str(prepared), FlowSettings(params=SMALL))
    journal = next((prepared / "flow_journal").glob("*.jsonl"))
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:7])   # killed while writing the last line
    rep = extract_flow(str(prepared), FlowSettings(params=SMALL))
    assert (rep["computed"], rep["already_done"], rep["with_flow"]) == (0, 5, 5)


@pytest.mark.slow
def test_slurm_array_script_runs_the_shards_and_the_merge(prepared):
    """scripts/slurm_flow.sh as SLURM would start it: array tasks 0 and 1 of 2, then the merge job."""
    script = os.path.join(ROOT, "scripts", "slurm_flow.sh")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHON=sys.executable, SLURM_ARRAY_TASK_COUNT="2",
               SLURM_CPUS_PER_TASK="1")
    before = (prepared / "index.jsonl").read_text()
    for task in ("0", "1"):
        r = subprocess.run(["bash", script, str(prepared), *SMALL_ARGS], env=dict(env, SLURM_ARRAY_TASK_ID=task),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert f"shard {task}/2" in r.stdout and "--merge" in r.stdout
    assert (prepared / "index.jsonl").read_text() == before
    r = subprocess.run(["bash", script, str(prepared), "--merge"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "5 of 5 videos have flow" in r.stdout, r.stdout + r.stderr
    assert all(rec.flow == flow_rel_path(rec) for rec in read_index(prepared)[0])
    bad = subprocess.run(["bash", script, str(prepared)], env=dict(env, SLURM_ARRAY_TASK_ID="2"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not a shard of 2" in bad.stderr
