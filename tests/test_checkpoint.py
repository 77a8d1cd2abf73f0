"""Atomic save, checked load, resume-point discovery, RNG round trip, DDP prefix, save timer."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import goca_fast.train.checkpoint as ck
from goca_fast.runtime.atomic import remove_stale_temps
from goca_fast.train.checkpoint import (CheckpointError, CheckpointTimer, find_latest, latest_path, load_checkpoint,
                                  rng_state, save_checkpoint, set_rng_state, snapshot_path, strip_ddp_prefix)

REPO = Path(__file__).resolve().parents[1]


def _state(v: float) -> dict:
    return {"epoch": int(v), "model": {"w": torch.full((64, 64), v)}, "note": "x"}


def _tmp_files(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_save_load_round_trip(tmp_path):
    p = save_checkpoint(tmp_path / "sub" / "a.pth", _state(1.0))  # creates the directory
    d = load_checkpoint(p)
    assert d["epoch"] == 1 and d["note"] == "x" and torch.equal(d["model"]["w"], torch.full((64, 64), 1.0))
    assert _tmp_files(p.parent) == []
    assert (p.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600


def test_save_fsyncs_file_and_directory(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    save_checkpoint(tmp_path / "a.pth", _state(1.0))
    assert len(calls) == 2  # the data file, then the directory entry


def test_exception_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "latest.pth"
    save_checkpoint(path, _state(1.0))
    real_save = torch.save

    def half_then_fail(obj, f):
        import io
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, _state(2.0))
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert _tmp_files(path.parent) == []
    assert find_latest(tmp_path) == path


def test_hard_crash_mid_write_keeps_previous_file(tmp_path):
    """A process killed mid-save (os._exit: no finally, no cleanup) leaves the old file and a temp file."""
    run_dir = tmp_path / "run"
    path = latest_path(run_dir)
    save_checkpoint(path, _state(1.0))
    script = textwrap.dedent(f"""
        import io, os, torch
        import goca_fast.train.checkpoint as ck
        real = torch.save
        def crash(obj, f):
            buf = io.BytesIO(); real(obj, buf)
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2]); f.flush()
            os._exit(9)
        ck.torch.save = crash
        ck.save_checkpoint({str(path)!r}, {{"epoch": 2, "model": {{"w": torch.zeros(64, 64)}}}})
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 9, r.stderr
    leftovers = _tmp_files(path.parent)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    assert not ck.is_valid_checkpoint(leftovers[0])
    assert load_checkpoint(path)["epoch"] == 1
    assert find_latest(run_dir) == path
    # without any good latest/snapshot the temp file is still never picked
    path.unlink()
    assert find_latest(run_dir) is None
    assert remove_stale_temps(path.parent, older_than=0) == leftovers and _tmp_files(path.parent) == []


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(missing)
    good = save_checkpoint(tmp_path / "good.pth", _state(3.0))
    data = good.read_bytes()
    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flip.pth"
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF  # inside the tensor bytes: torch.load alone would not notice
    flipped.write_bytes(bytes(b))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for bad in (truncated, flipped, garbage):
        with pytest.raises(CheckpointError, match=bad.name) as e:
            load_checkpoint(bad)
        assert "\n" not in str(e.value)
    not_dict = tmp_path / "list.pth"
    torch.save([1, 2], not_dict)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(not_dict)


def test_find_latest_prefers_valid_latest_then_newest_valid_snapshot(tmp_path):
    run = tmp_path / "run"
    assert find_latest(run) is None
    for e in (1, 2, 10):
        save_checkpoint(snapshot_path(run, e), _state(float(e)))
    assert snapshot_path(run, 10).name == "ckpt_epoch0010.pth"
    assert find_latest(run) == snapshot_path(run, 10)           # numeric order, no latest yet
    # a corrupt newer snapshot and a corrupt latest are both skipped
    snapshot_path(run, 11).write_bytes(snapshot_path(run, 10).read_bytes()[:1000])
    latest_path(run).write_bytes(b"\x00" * 100)
    (latest_path(run).parent / "ckpt_epoch0012.pth.tmp").write_bytes(b"junk")  # not a snapshot name
    assert find_latest(run) == snapshot_path(run, 10)
    save_checkpoint(latest_path(run), _state(7.0))
    assert find_latest(run) == latest_path(run)
    assert load_checkpoint(find_latest(run))["epoch"] == 7


def _draw() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist())


def test_rng_round_trip_in_memory_and_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draw()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    first = _draw()
    _draw()
    set_rng_state(state)
    assert _draw() == first
    save_checkpoint(tmp_path / "rng.pth", {"rng": state})
    _draw()
    set_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])  # weights_only load must accept it
    assert _draw() == first
    assert isinstance(state["cuda"], list)
    if not torch.cuda.is_available():
        assert state["cuda"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_round_trip_cuda():
    torch.cuda.manual_seed_all(5)
    state = rng_state()
    a = torch.rand(4, device="cuda").tolist()
    set_rng_state(state)
    assert torch.rand(4, device="cuda").tolist() == a


def test_strip_ddp_prefix_keys_and_metadata():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    wrapped = torch.nn.Module()
    wrapped.module = net  # what DDP's state_dict looks like
    sd = wrapped.state_dict()
    assert all(k.startswith("module.") for k in sd)
    stripped = strip_ddp_prefix(sd)
    assert list(stripped) == list(net.state_dict())
    assert set(stripped._metadata) == set(net.state_dict()._metadata)
    net2 = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    net2.load_state_dict(stripped)  # strict
    mixed = strip_ddp_prefix(OrderedDict([("module.a", 1), ("b", 2)]))
    assert list(mixed.items()) == [("a", 1), ("b", 2)]


def test_checkpoint_timer():
    now = [100.0]
    t = CheckpointTimer(every_minutes=2, clock=lambda: now[0])
    assert t.enabled and not t.due()
    now[0] += 119
    assert not t.due()
    now[0] += 1
    assert t.due()
    t.reset()
    assert not t.due()
    off = CheckpointTimer(every_minutes=0, clock=lambda: now[0])
    now[0] += 1e6
    assert not off.enabled and not off.due()
    assert not CheckpointTimer(None).due()
