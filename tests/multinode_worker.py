"""`python tests/multinode_worker.py [pretrain args]`: goca_fast.cli.pretrain with test instrumentation, for the multi-node
tests (tests/test_multinode.py). Run directly, by torchrun or as a fake SLURM task, exactly like
`python -m goca_fast.cli.pretrain`. Everything here is test-side: the package knows nothing of it.

Switched on by environment variables (all optional):
  GOCA_TEST_EVENTS=DIR         one JSON line per event to DIR/rank<R>.jsonl: start (pid, restart count), every
                               Trainer.save (epoch, iteration, step) and every checkpoint file written, exit code
  GOCA_TEST_FROZEN_BN=1        BatchNorm stays in eval mode (running statistics of the initialisation: a fixed
                               per-channel affine map), so a sample's forward pass does not depend on the rest of its
                               rank's batch and 2 ranks × b compute what 1 rank × 2b computes
  GOCA_TEST_PREFILL_QUEUE=1    the feature queue starts full of fixed unit embeddings, so the first step already uses
                               it; split across ranks as real steps fill it (a stack of global batches of which rank r
                               holds its b rows each), so that every rank drops the same past batches
  GOCA_TEST_RECORD=DIR         after each step, DIR/rank<R>_step<S>.pt: video indices, codes, local and returned loss,
                               gradients and weights
  GOCA_TEST_PAUSE_RANK, GOCA_TEST_PAUSE_AFTER_STEPS=N
                               that rank writes a `paused` event before step N+1 and waits (≤ 60 s) for a stop
                               signal, so a test can deliver one at a known batch
  GOCA_TEST_CRASH_RANK, GOCA_TEST_CRASH_AFTER_STEPS=N
                               that rank exits 17 before step N+1, on torchrun's first attempt only
                               (TORCHELASTIC_RESTART_COUNT=0): the injected fault of the elastic-restart test
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from goca_fast.train import checkpoint as ckpt
from goca_fast.train import engine
from goca_fast.method import objective
from goca_fast.cli import pretrain
from goca_fast.runtime.distributed import env_rank_info

RANK = env_rank_info()[0]
RESTART = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def event(kind: str, **fields) -> None:
    folder = os.environ.get("GOCA_TEST_EVENTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / f"rank{RANK}.jsonl", "a") as f:
            f.write(json.dumps({"event": kind, "rank": RANK, "restart": RESTART, **fields}) + "\n")


def _targets_me(prefix: str) -> int | None:
    """The step count a GOCA_TEST_<prefix>_* fault is set for on this rank, or None."""
    if os.environ.get(f"GOCA_TEST_{prefix}_RANK") != str(RANK):
        return None
    return int(os.environ[f"GOCA_TEST_{prefix}_AFTER_STEPS"])


def freeze_batchnorm() -> None:
    bn = torch.nn.modules.batchnorm._BatchNorm
    train = bn.train
    bn.train = lambda self, mode=True: train(self, False)


def prefill_queue() -> None:
    create = engine.Trainer._maybe_create_queue

    def create_full(self) -> None:
        fresh = self.queue is None
        create(self)
        if fresh and self.queue is not None:
            q = self.queue.embeddings
            streams, slots, rows, dim = q.shape
            world, bs = self.info.world_size, self.loop.batch_size
            g = torch.Generator().manual_seed(1234)
            full = torch.nn.functional.normalize(torch.randn(streams, slots, rows * world, dim, generator=g), dim=-1)
            # the global queue is a stack of past global batches, each the ranks' local batches in rank order
            blocks = full.reshape(streams, slots, rows // bs, world, bs, dim)
            q.copy_(blocks[:, :, :, self.info.rank].reshape(streams, slots, rows, dim))
            self.queue.filled = rows

    engine.Trainer._maybe_create_queue = create_full


def instrument_steps(record: str | None) -> None:
    call = objective.GocaObjective.__call__
    last = {}

    def recording_call(self, *args, **kwargs):
        last["result"] = call(self, *args, **kwargs)
        return last["result"]

    objective.GocaObjective.__call__ = recording_call
    step = engine.Trainer.train_step
    pause, crash = _targets_me("PAUSE"), _targets_me("CRASH")

    def instrumented_step(self, batch):
        if crash is not None and self.state.step == crash and RESTART == 0:
            event("crash", step=self.state.step)
            os._exit(17)
        if pause is not None and self.state.step == pause:
            event("paused", step=self.state.step, pid=os.getpid())
            deadline = time.time() + 60
            while self.signals.signum is None and time.time() < deadline:
                time.sleep(0.02)
        loss, stats = step(self, batch)
        if record:
            result = last["result"]
            torch.save({"index": batch.index.clone(), "returned_loss": loss, "local_loss": float(result.loss),
                        "codes": {s: {i: q.clone() for i, q in per.items()} for s, per in result.codes.items()},
                        "grads": {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None},
                        "weights": {k: v.clone() for k, v in self.model.state_dict().items()}},
                       Path(record) / f"rank{RANK}_step{self.state.step}.pt")
        return loss, stats

    engine.Trainer.train_step = instrumented_step


def instrument_checkpoints() -> None:
    save = engine.Trainer.save
    write = ckpt.save_checkpoint

    def logged_save(self, snapshot: bool = False) -> None:
        s = self.state
        event("save", epoch=s.epoch, iteration=s.iteration, step=s.step)
        save(self, snapshot)

    def logged_write(path, state):
        event("checkpoint_written", path=str(path), step=state.get("step"))
        return write(path, state)

    engine.Trainer.save = logged_save
    ckpt.save_checkpoint = logged_write


def main() -> int:
    event("start", pid=os.getpid())
    if os.environ.get("GOCA_TEST_FROZEN_BN") == "1":
        freeze_batchnorm()
    if os.environ.get("GOCA_TEST_PREFILL_QUEUE") == "1":
        prefill_queue()
    record = os.environ.get("GOCA_TEST_RECORD")
    if record:
        Path(record).mkdir(parents=True, exist_ok=True)
    instrument_steps(record)
    instrument_checkpoints()
    code = 1
    try:
        code = pretrain.main(sys.argv[1:])
    finally:
        event("exit", code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
