"""Multi-node training on CPU (gloo, loopback): 2 ranks compute what 1 rank computes, pre-emption of one node, elastic
restarts, a hung rank, srun-style launch, SLURM node lists and the SLURM script.

The launches run tests/multinode_worker.py, which is `python -m goca_fast.cli.pretrain` plus test-side instrumentation
(event log, fault injection, per-step records; see its docstring). Every 2-rank run with the RUN settings is compared
bit for bit with one uninterrupted torchrun launch (the `reference` fixture).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from goca_fast.train import checkpoint as ckpt
from goca_fast.config import ConfigError, load_config
from goca_fast.runtime.distributed import env_rank_info, expand_slurm_nodelist, rendezvous_host, slurm_hostnames
from helpers import descendants, trainer_for

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "multinode_worker.py")
# the demo config on small clips of a small synthetic dataset (48 videos, 36 for training): a step costs little
SMALL = ["data.synthetic.videos_per_class=6", "data.synthetic.frames=16", "data.synthetic.height=40",
         "data.synthetic.width=48", "data.crop_size=32", "data.scale_range=[32,36]", "data.frames_per_group=[4,4]",
         "data.min_distance=2", "data.workers=0", "engine.progress=false", "eval.knn_after_training=false",
         "engine.tensorboard=false", "engine.checkpoint_minutes=0"]
# 2 ranks × 4 videos, 2 epochs × 3 batches; checkpoints only at epoch ends (and on a stop); the feature queue
# (16 = two global batches) and the prior from the second epoch, so a resume in epoch 2 must restore every rank's queue
RUN = [*SMALL, "data.batch_size=4", "optim.epochs=2", "engine.max_iters_per_epoch=3", "engine.checkpoint_every_iters=0",
       "goca.queue_length=16", "goca.queue_start_epoch=1", "goca.prior_start_epoch=1"]
TOTAL_STEPS = 6
LAUNCH_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict:
    """This process's environment without any launcher's variables (a test run under torchrun or SLURM must not leak
    them), one thread per process, the checkout importable from tests/multinode_worker.py."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "GOCA_TEST_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def run_args(out: Path, name: str, cache: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"name={name}", f"data.cache_dir={cache}", *RUN, *extra]


def torchrun_standalone(*args: str, restarts: int = 0) -> list[str]:
    return ["torchrun", "--standalone", "--nproc-per-node", "2", "--max-restarts", str(restarts), WORKER, *args]


# torchrun's agent shares its rendezvous store with the workers by default, and a restarted worker can then read the
# previous attempt's gloo/NCCL addresses from it and fail to connect (pytorch/pytorch#135712; here 3 of 4
# restarts failed so): with restarts the agent must keep its store to itself
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun_node(port: int, run_id: str, *args: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """One of two "nodes": a torchrun launcher with one process, meeting the other at a c10d rendezvous."""
    return ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, *launcher, WORKER, *args]


# what scripts/slurm_pretrain.sh gives torchrun for pre-emption: SIGUSR1 forwarded, time for the workers to checkpoint
SLURM_SIGNAL_FLAGS = ("--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "100")


def srun_env(rank: int, port: int, **extra: str) -> dict:
    """The variables `srun` gives task `rank` of two on one host (and no torchrun variables, no MASTER_ADDR)."""
    return launch_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NNODES="1",
                      SLURM_NODELIST="127.0.0.[1-2]", SLURM_JOB_ID="4242", MASTER_PORT=str(port), **extra)


class Launches:
    """The processes one test starts. Each runs in its own session (a "node": a torchrun launcher with its workers,
    or one plain task) and writes its output to a log file, so a full pipe never blocks it; whatever still runs
    when the test ends is killed with its whole session."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.logs: dict[subprocess.Popen, Path] = {}

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = self.folder / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.logs[proc] = log
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        return self.logs[proc].read_text()

    def finish(self, proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT) -> tuple[int, str]:
        """(exit code, output) once `proc` ends; the test fails if it outlives `timeout`."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launch did not end within {timeout} s: {self.output(proc)[-3000:]}")
        return proc.returncode, self.output(proc)

    def run(self, name: str, cmd: list[str], env: dict) -> tuple[int, str]:
        return self.finish(self.start(name, cmd, env))

    def kill_all(self) -> None:
        """SIGKILL (which ends a stopped process too) for every launch still running and everything it started:
        torchrun starts its workers in sessions of their own, so they are found by parent, not by session."""
        for proc in self.logs:
            if proc.poll() is None:
                for pid in [proc.pid, *descendants(proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()

    def wait_for_event(self, folder: Path, rank: int, kind: str, timeout: float = 240) -> dict:
        """The last `kind` event of `rank` (tests/multinode_worker.py GOCA_TEST_EVENTS) once there is one."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [e for e in events(folder, rank) if e["event"] == kind]
            if found:
                return found[-1]
            for proc in self.logs:
                if proc.poll() is not None:
                    pytest.fail(f"a launch ended (exit {proc.returncode}) before rank {rank} reported {kind!r}: "
                                f"{self.output(proc)[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"rank {rank} did not report {kind!r} within {timeout} s")


@pytest.fixture
def launches(tmp_path):
    started = Launches(tmp_path)
    yield started
    started.kill_all()


def events(folder: Path, rank: int) -> list[dict]:
    path = folder / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def final_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "latest.pth", map_location="cpu", weights_only=True)


def assert_bitwise_equal(got: dict, want: dict) -> None:
    assert got["step"] == want["step"] == TOTAL_STEPS and got["epoch"] == want["epoch"] == 2
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k
    for a, b in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert len(got["queue"]) == len(want["queue"]) == 2  # one queue per rank
    for a, b in zip(got["queue"], want["queue"]):
        assert torch.equal(a["embeddings"], b["embeddings"]) and a["filled"] == b["filled"]
    # (the global torch RNG state is not compared: a resumed epoch's DataLoader iterator draws one more base seed
    # from it; no training step draws from it, which the equal weights, momentum and queues confirm)
    assert len(got["rng"]) == 2


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The synthetic dataset, generated once for every launch of this module."""
    return tmp_path_factory.mktemp("dataset-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> dict:
    """The final checkpoint of an uninterrupted 2-rank torchrun launch with the RUN settings."""
    out = tmp_path_factory.mktemp("reference")
    started = Launches(out)
    try:
        code, output = started.run("torchrun", torchrun_standalone(*run_args(out, "straight", cache)), launch_env())
    finally:
        started.kill_all()
    assert code == 0, output[-3000:]
    return final_checkpoint(out / "straight")


# ------------------------------------------------------------------------------------------------ 1. equivalence

# Why these tolerances: both runs add up the same fp32 terms in a different order (a batch of 8 in one process vs
# two batches of 4 whose sums are all-reduced: the Sinkhorn row sums, the loss means, the gradient reductions of every
# layer), so each reduction may differ by a few ulps (fp32 ulp ~1.2e-7 relative). Measured over 4 steps: codes 5e-8,
# loss 4e-7, gradients 8e-7 of each tensor's largest entry, weights and momentum 6e-8; the limits allow ~10x that,
# except the gradients' (below).
# GRAD_RTOL is relative to each gradient's largest entry (see the floor below): the first conv layer's gradient (a
# sum over every position of the batch, with cancellation) measured 3e-6 to ~4e-5 on torch 2.14.1 from run to run
# (the summation order of the two ranks' halves varies), and a deep conv layer 1.4e-4 at step 2 once the decoded
# pixels changed (the project's RGB conversion); a wrong reduction (sum instead of mean, a missing rank) is off by ~1.
CODES_ATOL, LOSS_RTOL, GRAD_RTOL, WEIGHT_ATOL = 1e-6, 1e-6, 5e-4, 1e-6
EQUIVALENCE = [*SMALL, "optim.epochs=1", "optim.warmup_epochs=0", "optim.freeze_prototypes_epochs=0",
               "goca.queue_length=16", "goca.queue_start_epoch=0", "goca.prior_start_epoch=0"]


def _records(folder: Path, ranks: int) -> list[list[dict]]:
    """Per step, the ranks' records (tests/multinode_worker.py GOCA_TEST_RECORD)."""
    steps = sorted({int(p.stem.split("step")[1]) for p in folder.glob("rank0_step*.pt")})
    return [[torch.load(folder / f"rank{r}_step{s}.pt", weights_only=False) for r in range(ranks)] for s in steps]


def _by_video(records: list[dict], stream: str, clip: int) -> torch.Tensor:
    """One clip's codes of the whole global batch, rows in video-index order."""
    index = torch.cat([r["index"] for r in records])
    codes = torch.cat([r["codes"][stream][clip] for r in records])
    return codes[torch.argsort(index)]


@pytest.mark.slow
def test_two_ranks_of_b_compute_what_one_rank_of_2b_computes(tmp_path, cache, launches):
    """A full epoch (4 steps) with BatchNorm in eval mode, a feature queue full from the first step and the prior on:
    per step the codes of every video, the loss, the all-reduced gradients and the updated weights of 2 ranks × 4
    videos agree with 1 rank × 8 videos; so do the final checkpoint's weights and momentum.

    BatchNorm in train mode normalises with each rank's own batch statistics, so 2 × b is then a different network
    function from 1 × 2b (SyncBatchNorm, model.sync_bn, makes them one on GPUs; it does not run on CPU). In eval mode
    it is a fixed per-channel affine map of each sample (the initial running statistics), and the only coupling
    across the batch is what the engine all-reduces: the Sinkhorn sums, the loss mean and the gradients."""
    common = [f"data.cache_dir={cache}", f"output_dir={tmp_path}", *EQUIVALENCE]
    env = {"GOCA_TEST_FROZEN_BN": "1", "GOCA_TEST_PREFILL_QUEUE": "1"}
    code, output = launches.run("one", [sys.executable, WORKER, *common, "name=one", "data.batch_size=8"],
                                launch_env(**env, GOCA_TEST_RECORD=str(tmp_path / "rec1")))
    assert code == 0, output[-3000:]
    code, output = launches.run("two", torchrun_standalone(*common, "name=two", "data.batch_size=4"),
                                launch_env(**env, GOCA_TEST_RECORD=str(tmp_path / "rec2")))
    assert code == 0, output[-3000:]

    steps_one, steps_two = _records(tmp_path / "rec1", 1), _records(tmp_path / "rec2", 2)
    assert len(steps_one) == len(steps_two) == 4
    for step, ([ref], ranks) in enumerate(zip(steps_one, steps_two), start=1):
        # the same 8 videos in each step, the sampler's global order split across the ranks
        assert sorted(torch.cat([r["index"] for r in ranks]).tolist()) == sorted(ref["index"].tolist()), step
        assert set(ref["codes"]) == {"rgb", "flow"}
        for stream, per_clip in ref["codes"].items():
            for clip in per_clip:
                torch.testing.assert_close(_by_video(ranks, stream, clip), _by_video([ref], stream, clip),
                                           rtol=0, atol=CODES_ATOL, msg=f"step {step} {stream} clip {clip}")
        # each rank's loss is its batch mean; the global batch's loss is their mean, and every rank reports it
        global_loss = sum(r["local_loss"] for r in ranks) / 2
        assert global_loss == pytest.approx(ref["local_loss"], rel=LOSS_RTOL), step
        for r in ranks:
            assert r["returned_loss"] == pytest.approx(ref["returned_loss"], rel=LOSS_RTOL), step
        assert ranks[0]["local_loss"] != ranks[1]["local_loss"]  # the two halves really differ
        assert set(ranks[0]["grads"]) == set(ref["grads"]) and "prototypes.weight" in ref["grads"]
        largest = max(float(g.abs().max()) for g in ref["grads"].values())
        for name, want in ref["grads"].items():
            assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name  # all-reduced
            # a tensor whose gradient nearly cancels (BN biases under eval-mode BN) is held to 1e-3 of the model's
            # largest entry instead of its own ~0 maximum
            scale = max(float(want.abs().max()), 1e-3 * largest)
            assert (ranks[0]["grads"][name] - want).abs().max() <= GRAD_RTOL * scale, (step, name)
        for name, want in ref["weights"].items():
            torch.testing.assert_close(ranks[0]["weights"][name], want, rtol=0, atol=WEIGHT_ATOL,
                                       msg=f"step {step} {name}")
    got, want = final_checkpoint(tmp_path / "two"), final_checkpoint(tmp_path / "one")
    assert got["step"] == want["step"] == 4
    for name in want["model"]:
        torch.testing.assert_close(got["model"][name], want["model"][name], rtol=0, atol=WEIGHT_ATOL)
    for a, b in zip(got["optimizer"]["state"].values(), want["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(a["momentum_buffer"], b["momentum_buffer"], rtol=0, atol=WEIGHT_ATOL)


# ------------------------------------------------------------------------------------------------ 2. pre-emption

def preempt(launches: Launches, run: Path, cache: Path, slurm_step: bool) -> list[int]:
    """Two torchrun "nodes" (c10d rendezvous on loopback); while node B's trainer (rank 1) waits before step 5, it
    alone gets SIGTERM, or (`slurm_step`) every process of both nodes gets SIGUSR1, torchruns included, as SLURM
    signals a job step before its time limit. Checks that both ranks stop after step 5 and exit 0, and that rank 0
    writes exactly one checkpoint for the stop; returns the launchers' exit codes."""
    ev = run.parent / "events"
    port = free_port()
    env = launch_env(GOCA_TEST_EVENTS=str(ev), GOCA_TEST_PAUSE_RANK="1", GOCA_TEST_PAUSE_AFTER_STEPS="4")
    args = run_args(run.parent, run.name, cache)
    launcher = SLURM_SIGNAL_FLAGS if slurm_step else ()
    nodes = [launches.start(f"node{n}", torchrun_node(port, "preempt", *args, launcher=launcher), env) for n in "AB"]
    trainer = launches.wait_for_event(ev, 1, "paused")["pid"]
    if slurm_step:
        for pid in [p for n in nodes for p in (n.pid, *descendants(n.pid))]:
            os.kill(pid, signal.SIGUSR1)
    else:
        os.kill(trainer, signal.SIGTERM)
    results = [launches.finish(n) for n in nodes]
    for rank in (0, 1):
        log = events(ev, rank)
        assert [e["code"] for e in log if e["event"] == "exit"] == [0], (rank, results)
        # the stop's save (the last one) at the same boundary on every rank: epoch 2, batch 2 done, 5 steps
        last = [e for e in log if e["event"] == "save"][-1]
        assert (last["epoch"], last["iteration"], last["step"]) == (1, 2, 5), rank
    written = [e for r in (0, 1) for e in events(ev, r) if e["event"] == "checkpoint_written"]
    assert [(e["rank"], Path(e["path"]).name, e["step"]) for e in written] == [(0, "latest.pth", 3),
                                                                              (0, "latest.pth", 5)]
    assert final_checkpoint(run)["step"] == 5
    said = "".join(out for _, out in results)
    if slurm_step:
        assert said.count(f"stopped by signal {int(signal.SIGUSR1)}; checkpoint written") == 2
    else:
        assert said.count("stopped by signal 15; checkpoint written") == 1  # the signalled rank
        assert said.count("stopped because another rank was asked to stop; checkpoint written") == 1
    return [code for code, _ in results]


@pytest.mark.slow
def test_sigterm_to_one_nodes_trainer_stops_every_rank_at_one_boundary_and_resumes_bitwise(tmp_path, cache,
                                                                                         reference, launches):
    """SIGTERM to one node's training process: every rank stops at the same batch boundary, one checkpoint, every
    process (both trainers, both torchruns) exits 0; the same two commands again finish the run with the
    uninterrupted run's weights, bit for bit."""
    run = tmp_path / "preempted"
    assert preempt(launches, run, cache, slurm_step=False) == [0, 0]
    port = free_port()
    nodes = [launches.start(f"resumed-node{n}", torchrun_node(port, "resume", *run_args(tmp_path, run.name, cache)),
                            launch_env()) for n in "AB"]
    results = [launches.finish(p) for p in nodes]
    assert [code for code, _ in results] == [0, 0], results
    assert "resumed from" in results[0][1] + results[1][1]
    assert_bitwise_equal(final_checkpoint(run), reference)


@pytest.mark.slow
def test_sigusr1_to_every_process_of_the_step_stops_cleanly_and_torchrun_exits_1(tmp_path, cache, launches):
    """SIGUSR1 to both nodes' torchruns and trainers, with the SLURM script's torchrun flags: the same clean stop,
    trainers exit 0; each torchrun forwards the signal, waits for its trainer and then exits 1, torchrun's own answer
    to a signal it handles (so after a pre-emption the SLURM step reports a failure: the checkpoint, not the exit
    code, is what the requeued job goes by). A torchrun on another node that gets no signal would instead wait in
    torchrun's exit barrier (300 s) for the signalled one, which is why this case signals both nodes."""
    assert preempt(launches, tmp_path / "preempted", cache, slurm_step=True) == [1, 1]


def test_checkpoints_keep_every_ranks_queue_and_read_older_ones(tmp_path, caplog):
    """A checkpoint holds one feature queue per rank; one from before (rank 0's queue only, a dict) still resumes a
    single process, and queues saved by another number of ranks leave the queue empty (refilled in a few steps)
    instead of handing every rank rank 0's rows."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["engine.tensorboard=false", "data.batch_size=4",
                                                       "goca.queue_length=8", "goca.queue_start_epoch=0"])
    trainer = trainer_for(cfg, tmp_path / "a", lambda e, s: [], 10)
    trainer._maybe_create_queue()
    trainer.queue.push(torch.randn(*trainer.queue.embeddings.shape[:2], 4, trainer.queue.embeddings.shape[3]))
    trainer.save()
    state = final_checkpoint(tmp_path / "a")
    assert len(state["queue"]) == 1 and state["queue"][0]["filled"] == 4

    def resumed(queue):
        ckpt.save_checkpoint(ckpt.latest_path(tmp_path / "b"), {**state, "queue": queue})
        other = trainer_for(cfg, tmp_path / "b", lambda e, s: [], 10)
        assert other.resume()
        return other

    older = resumed(state["queue"][0])
    assert torch.equal(older.queue.embeddings, trainer.queue.embeddings) and older.queue.filled == 4
    with caplog.at_level("WARNING", logger="goca_fast"):
        regrouped = resumed(state["queue"] * 2)
    assert regrouped.queue.filled == 0 and "feature queues of 2 rank(s), this run has 1" in caplog.text


# ------------------------------------------------------------------------------------------------ 3. elastic restart

@pytest.mark.slow
def test_elastic_restart_continues_from_the_last_checkpoint(tmp_path, cache, reference, launches):
    """torchrun --max-restarts 1: rank 1 crashes (exit 17) before step 5 on the first attempt; torchrun restarts
    both ranks, which resume from the epoch-1 checkpoint (step 3) although the command says --fresh (that applies to
    the job's first attempt, not to a restart of it) and end with the uninterrupted run's weights, bit for bit."""
    ev = tmp_path / "events"
    code, output = launches.run(
        "torchrun", torchrun_standalone("--fresh", *run_args(tmp_path, "elastic", cache), restarts=1),
        launch_env(**ELASTIC_ENV, GOCA_TEST_EVENTS=str(ev), GOCA_TEST_CRASH_RANK="1", GOCA_TEST_CRASH_AFTER_STEPS="4"))
    assert code == 0, output[-3000:]
    log0, log1 = events(ev, 0), events(ev, 1)
    assert [(e["event"], e["restart"]) for e in log1 if e["event"] in ("start", "crash")] == [
        ("start", 0), ("crash", 0), ("start", 1)]
    # the restarted ranks continue from step 3: the next save is the run's end (step 6), not epoch 1's again
    assert [e["step"] for e in log0 if e["event"] == "save"] == [3, 6]
    assert "resumed from" in output and "at epoch 1, iteration 0" in output
    assert [e["code"] for e in log0 + log1 if e["event"] == "exit" and e["restart"] == 1] == [0, 0]
    assert_bitwise_equal(final_checkpoint(tmp_path / "elastic"), reference)


# ------------------------------------------------------------------------------------------------ 4. hung rank

HUNG_TIMEOUT_S = 10


@pytest.mark.slow
def test_a_rank_that_stops_responding_ends_the_others_within_the_timeout(tmp_path, cache, launches):
    """SIGSTOP freezes rank 1 before its second step; rank 0, waiting in that step's collectives, gives up after
    engine.dist_timeout_s and exits 1 with one line that names the setting (the run directory keeps its last
    checkpoint). Without the setting gloo and NCCL waited 30 minutes."""
    ev = tmp_path / "events"
    port = free_port()
    args = run_args(tmp_path, "hung", cache, f"engine.dist_timeout_s={HUNG_TIMEOUT_S}")
    extra = {"GOCA_TEST_EVENTS": str(ev), "GOCA_TEST_PAUSE_RANK": "1", "GOCA_TEST_PAUSE_AFTER_STEPS": "1"}
    rank0, _ = [launches.start(f"rank{r}", [sys.executable, WORKER, *args], srun_env(r, port, **extra))
                for r in (0, 1)]
    paused = launches.wait_for_event(ev, 1, "paused")
    os.kill(paused["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    code, output = launches.finish(rank0, timeout=HUNG_TIMEOUT_S + 120)
    waited = time.monotonic() - stopped_at
    assert code == 1, output[-3000:]
    assert HUNG_TIMEOUT_S - 1 <= waited <= HUNG_TIMEOUT_S + 60, waited
    last = output.strip().splitlines()[-1]
    assert last.startswith("goca-pretrain: error: ") and "engine.dist_timeout_s=10" in last, last
    assert "Traceback" not in output


# ------------------------------------------------------------------------------------------------ 5. SLURM

@pytest.mark.slow
def test_srun_style_launch_trains_like_torchrun(tmp_path, cache, reference, launches):
    """Two plain `python` processes with only SLURM's variables (rank, task count, local id, node list; no torchrun
    variables, no MASTER_ADDR: the rendezvous host comes from SLURM_NODELIST) train the run of the torchrun launch
    and end with its weights, bit for bit."""
    port = free_port()
    args = run_args(tmp_path, "srun", cache)
    tasks = [launches.start(f"rank{r}", [sys.executable, WORKER, *args], srun_env(r, port)) for r in (0, 1)]
    results = [launches.finish(t) for t in tasks]
    assert [code for code, _ in results] == [0, 0], results
    state = final_checkpoint(tmp_path / "srun")
    assert state["world_size"] == 2
    assert_bitwise_equal(state, reference)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-04]", ["node01", "node02", "node03", "node04"]),
    ("a,b", ["a", "b"]),
    ("gpu-[1,3-5]", ["gpu-1", "gpu-3", "gpu-4", "gpu-5"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
    ("rack[1-2]n[07,9]", ["rack1n07", "rack1n9", "rack2n07", "rack2n9"]),
    ("cn042", ["cn042"]),
])
def test_slurm_nodelist_forms(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["", "node[1-", "a,,b", "node[3-1]", "node[a-b]", "a]b", "n[]"])
def test_a_bad_slurm_nodelist_is_one_clear_error(nodelist):
    with pytest.raises(ConfigError, match="cannot parse SLURM node list"):
        expand_slurm_nodelist(nodelist)


def test_scontrol_is_asked_when_present(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "x1\\nx2\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm_hostnames("whatever[1-2]") == ["x1", "x2"]


def test_rank_and_rendezvous_from_slurm_variables():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu-[3,5-7]"}
    assert env_rank_info(slurm) == (5, 8, 1)
    assert rendezvous_host(slurm) == "gpu-3"
    assert rendezvous_host({**slurm, "SLURM_STEP_NODELIST": "gpu-[5-6]"}) == "gpu-5"  # the step's own nodes
    assert rendezvous_host({**slurm, "MASTER_ADDR": "10.0.0.1"}) == "10.0.0.1"
    # torchrun's variables win over SLURM's (torchrun started by srun: one SLURM task per node)
    assert env_rank_info({**slurm, "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}) == (3, 16, 3)
    assert env_rank_info({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == (0, 1, 0)
    assert rendezvous_host({}) == "127.0.0.1"


def test_dist_timeout_is_a_checked_setting():
    assert load_config(ROOT / "configs" / "demo.yaml").engine.dist_timeout_s == 300
    with pytest.raises(ConfigError, match="engine.dist_timeout_s"):
        load_config(ROOT / "configs" / "demo.yaml", ["engine.dist_timeout_s=0"])


def test_slurm_script_passes_rendezvous_restart_and_signal_settings(tmp_path):
    """scripts/slurm_pretrain.sh under fake sbatch variables, with stand-ins for srun (records its command line),
    scontrol and nvidia-smi: one torchrun per node, rendezvous at the first host, SIGUSR1 handled and forwarded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": f'printf "%s\\n" "$@" > {tmp_path}/srun_args\n'
                               f'echo "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" > {tmp_path}/srun_env\n',
                       "scontrol": '[ "$1 $2" = "show hostnames" ] && printf "node07\\nnode08\\n"\n',
                       "nvidia-smi": 'printf "GPU 0\\nGPU 1\\nGPU 2\\nGPU 3\\n"\n'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}")
        (bin_dir / name).chmod(0o755)
    env = {**launch_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[07-08]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "777", "SLURM_CPUS_PER_TASK": "16"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "slurm_pretrain.sh"), "configs/k400_r2plus1d.yaml",
                        "data.batch_size=16"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[0] == "--kill-on-bad-exit=1" and args[1] == "torchrun"
    script = args.index("-m")
    assert args[script:] == ["-m", "goca_fast.cli.pretrain", "--config", "configs/k400_r2plus1d.yaml", "data.batch_size=16"]
    options = dict(a.split("=", 1) for a in args[2:script])
    assert options == {"--nnodes": "2", "--nproc-per-node": "4", "--rdzv-id": "777", "--rdzv-backend": "c10d",
                       "--rdzv-endpoint": "node07:20777", "--max-restarts": "3",
                       "--signals-to-handle": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout": "100"}
    assert (tmp_path / "srun_env").read_text().strip() == ELASTIC_ENV["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]
    header = (ROOT / "scripts" / "slurm_pretrain.sh").read_text()
    assert "#SBATCH --signal=USR1@" in header
