"""The training engine end to end: demo smoke run, exact resume after kill -9 and after SIGTERM, NaN handling."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from goca_fast.config import load_config
from goca_fast.data.batch import ClipBatch
from goca_fast.plan.evaluation import CheckpointRequest, eval_setup
from goca_fast.plan.run import build_model, plan_settings
from goca_fast.train.checkpoint import latest_path, save_checkpoint
from goca_fast.train.engine import TrainingDiverged
from goca_fast.eval.knn import run_knn
from goca_fast.cli.pretrain import seed_everything
from helpers import trainer_for

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic.videos_per_class=6", "data.synthetic.frames=24", "data.batch_size=8", "data.workers=0",
         "engine.progress=false"]


def pretrain(out: Path, cache: Path, *extra: str, wait: bool = True, name: str = "run"):
    cmd = [sys.executable, "-m", "goca_fast.cli.pretrain", f"output_dir={out}", f"name={name}",
           f"data.cache_dir={cache}", *SMALL, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)


def test_demo_smoke_run(tmp_path):
    r = pretrain(tmp_path / "out", tmp_path / "cache", "optim.epochs=2", "engine.max_iters_per_epoch=2",
                 "eval.clips=1")
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "out" / "run"
    result = json.loads((run / "knn.json").read_text())
    # the table is goca-eval's kNN of the trained checkpoint, and of the network the same seed initialises
    cfg = load_config(run / "config.yaml")
    seed_everything(cfg.seed)
    save_checkpoint(latest_path(tmp_path / "init"),
                    {"model": build_model(plan_settings(cfg)).state_dict(), "config": cfg.to_dict()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo ran (OMP_NUM_THREADS=1)
    try:
        for model, source in (("GOCA", run), ("random init", tmp_path / "init")):
            cli = run_knn(eval_setup(CheckpointRequest(str(source)), device="cpu"), use_cache=False,
                          out_dir=str(tmp_path / "eval"), quiet=True)
            assert result["knn"][model] == {s: {str(k): v for k, v in r.items()} for s, r in cli.recall.items()}
    finally:
        torch.set_num_threads(threads)
    history = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and all(h["iterations"] == 2 for h in history)
    assert (run / "checkpoints" / "latest.pth").is_file()
    assert "kNN retrieval" in r.stdout and "R@1" in r.stdout
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


RESUME = ["optim.epochs=4", "engine.max_iters_per_epoch=3", "engine.checkpoint_every_iters=1",
          "eval.knn_after_training=false", "engine.tensorboard=false", "goca.queue_length=16",
          "goca.queue_start_epoch=1", "goca.prior_start_epoch=1"]
TOTAL_STEPS = 12


def _final(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "latest.pth", map_location="cpu", weights_only=True)


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == TOTAL_STEPS and a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["queue"][0]["embeddings"], b["queue"][0]["embeddings"])
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


def _wait_for_step(run: Path, proc, step: int, timeout: float = 300) -> None:
    t0 = time.time()
    latest = run / "checkpoints" / "latest.pth"
    while time.time() - t0 < timeout:
        assert proc.poll() is None, f"training ended early: {proc.stderr.read()[-2000:]}"
        if latest.is_file():
            try:
                if torch.load(latest, map_location="cpu", weights_only=True)["step"] >= step:
                    return
            except Exception:  # being replaced right now; atomic rename means the next read is whole
                pass
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    r = pretrain(base / "out", base / "cache", *RESUME, name="straight")
    assert r.returncode == 0, r.stderr[-2000:]
    return base, _final(base / "out" / "straight")


@pytest.mark.slow
def test_kill9_then_resume_is_bitwise_identical(uninterrupted):
    base, want = uninterrupted
    run = base / "out" / "killed"
    proc = pretrain(base / "out", base / "cache", *RESUME, wait=False, name="killed")
    _wait_for_step(run, proc, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _final(run)["step"] < TOTAL_STEPS  # really interrupted mid-run
    r = pretrain(base / "out", base / "cache", *RESUME, name="killed")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    _assert_bitwise_equal(_final(run), want)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_cleanly_and_resumes_identically(uninterrupted):
    base, want = uninterrupted
    run = base / "out" / "term"
    proc = pretrain(base / "out", base / "cache", *RESUME, "engine.checkpoint_every_iters=0", wait=False,
                    name="term")
    # wait until training has started (the first epoch-end checkpoint), then pre-empt
    _wait_for_step(run, proc, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    assert _final(run)["step"] < TOTAL_STEPS
    r = pretrain(base / "out", base / "cache", *RESUME, "engine.checkpoint_every_iters=0", name="term")
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_bitwise_equal(_final(run), want)


def _tiny_trainer(tmp_path, *overrides):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["engine.tensorboard=false", "engine.progress=false",
                                                       "data.batch_size=4", *overrides])
    return trainer_for(cfg, tmp_path, lambda e, s: [], 100), cfg


def _batch(cfg, value=None):
    g = torch.Generator().manual_seed(0)
    rgb = [torch.randn(4, 3, t, 56, 56, generator=g) for t in cfg.clip_lengths]
    flow = [torch.randn(4, 2, t, 56, 56, generator=g) for t in cfg.clip_lengths]
    if value is not None:
        rgb[0][0] = value
    return ClipBatch(rgb, flow, torch.zeros(4, dtype=torch.long), torch.arange(4))


def test_nonfinite_loss_skips_the_step_then_aborts_clearly(tmp_path):
    trainer, cfg = _tiny_trainer(tmp_path, "engine.max_bad_steps=3")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "backbones" in k and "weight" in k}
    loss, _ = trainer.train_step(_batch(cfg, float("nan")))
    assert loss is None and trainer.state.bad_total == 1
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update from a NaN step
    loss, _ = trainer.train_step(_batch(cfg))
    assert loss is not None and trainer.state.bad_in_row == 0
    trainer.train_step(_batch(cfg, float("inf")))
    trainer.train_step(_batch(cfg, float("nan")))
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        trainer.train_step(_batch(cfg, float("nan")))


def test_prototypes_are_normalised_and_frozen_in_the_first_epoch(tmp_path):
    trainer, cfg = _tiny_trainer(tmp_path, "optim.freeze_prototypes_epochs=1")
    w0 = torch.nn.functional.normalize(trainer.model.prototypes.weight.detach().clone(), dim=1)
    trainer.train_step(_batch(cfg))
    assert torch.allclose(trainer.model.prototypes.weight, w0, atol=1e-6)  # only normalised, not stepped
    trainer.state.epoch = 1
    trainer.train_step(_batch(cfg))
    assert not torch.allclose(trainer.model.prototypes.weight, w0, atol=1e-6)


def _official_lr(cfg, t: int, iters_per_epoch: int, world_size: int = 1) -> float:
    """The official LR at absolute iteration t, from its formula: linear warmup from start_warmup to
    base_lr·sqrt(global batch) over warmup_epochs (endpoint included), then cosine to final_lr."""
    o = cfg.optim
    peak = o.base_lr * math.sqrt(cfg.data.batch_size * world_size)
    warmup, total = o.warmup_epochs * iters_per_epoch, o.epochs * iters_per_epoch
    if t < warmup:
        return o.start_warmup + (peak - o.start_warmup) * t / (warmup - 1)
    return o.final_lr + 0.5 * (peak - o.final_lr) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_lr_is_indexed_by_the_absolute_iteration_despite_skipped_steps(tmp_path):
    """A NaN step, an unreadable batch (None) and an epoch whose loader ends early do not shift the schedule."""
    iters = 5
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["engine.tensorboard=false", "engine.progress=false",
                                                       "data.batch_size=4", "optim.epochs=2", "optim.warmup_epochs=1",
                                                       "engine.max_bad_steps=5", "engine.checkpoint_minutes=0"])
    good, nan = _batch(cfg), _batch(cfg, float("nan"))
    per_epoch = {0: [good, None, nan, good],          # ends one batch early
                 1: [good, nan, good, None, good]}
    trainer = trainer_for(cfg, tmp_path, lambda epoch, start: per_epoch[epoch][start:], iters)
    seen = []
    step = trainer.train_step

    def recording_step(batch):
        out = step(batch)
        seen.append((trainer.state.epoch, trainer.state.iteration, trainer.optimizer.param_groups[0]["lr"]))
        return out

    trainer.train_step = recording_step
    trainer.fit()
    assert trainer.state.bad_total == 2 and trainer.state.step == 7
    assert [(e, i) for e, i, _ in seen] == [(0, 0), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 4)]
    for e, i, lr in seen:
        assert lr == pytest.approx(_official_lr(cfg, e * iters + i, iters), rel=1e-12), (e, i)


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    """DDP on CPU (gloo): two ranks train, rank 0 checkpoints and evaluates."""
    cmd = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "goca_fast.cli.pretrain",
           f"output_dir={tmp_path / 'out'}", "name=ddp", f"data.cache_dir={tmp_path / 'cache'}", *SMALL,
           "data.batch_size=4", "optim.epochs=1", "optim.warmup_epochs=0", "engine.max_iters_per_epoch=2",
           "eval.clips=1", "eval.compare_random_init=false", "goca.queue_length=16", "goca.queue_start_epoch=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    state = _final(tmp_path / "out" / "ddp")
    assert state["world_size"] == 2 and state["step"] == 2 and len(state["rng"]) == 2
    # each rank's queue is saved, 16 / 2 ranks = 8 rows per stream and slot
    assert [q["embeddings"].shape[2] for q in state["queue"]] == [8, 8]
    assert "R@1" in r.stdout
