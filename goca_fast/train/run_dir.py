"""What a long run (pretraining, fine-tuning) shares, whatever it trains: checkpoints written by rank 0 with every
rank's RNG state, exact resume from the latest intact one, a stop request all ranks agree on, and rank 0's logs
(TensorBoard, metrics.jsonl).

Resume is exact because the files hold everything that changes: the trainer's state dict, the RNG states of every
rank (each restored on its own rank), and whatever else differs per rank (e.g. a feature queue).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from goca_fast.train import checkpoint as ckpt
from goca_fast.runtime.distributed import DistInfo, barrier
from goca_fast.runtime.stop_signals import StopSignals



class StopRequested(Exception):
    """The loop stopped at a batch boundary on a stop signal, its checkpoint written; the entry point exits."""


class RunDirectory:
    """One process's handle on its run directory and on the group it runs with."""

    def __init__(self, path: Path, info: DistInfo):
        self.path, self.info = Path(path), info
        self.signals = StopSignals()

    # ------------------------------------------------------------------ checkpoints
    def save(self, state: dict, *, per_rank: Optional[dict[str, Any]] = None, snapshot_epoch: Optional[int] = None,
             ) -> None:
        """Write `state` as checkpoints/latest.pth (and ckpt_epochNNNN.pth when `snapshot_epoch` is given).

        Collective: every rank calls it; each rank's RNG state goes into the file as `rng[rank]`, and each entry of
        `per_rank` as `state[key][rank]`."""
        mine = {"rng": ckpt.rng_state(), **(per_rank or {})}
        gathered = [mine]
        if self.info.enabled:
            gathered = [None] * self.info.world_size
            dist.all_gather_object(gathered, mine)
        if not self.info.is_main:
            return
        state = {**state, **{k: [g[k] for g in gathered] for k in mine}}
        ckpt.save_checkpoint(ckpt.latest_path(self.path), state)
        if snapshot_epoch is not None:
            ckpt.save_checkpoint(ckpt.snapshot_path(self.path, snapshot_epoch), state)

    def latest(self) -> Optional[Path]:
        """The checkpoint to resume from (latest.pth, else the newest intact snapshot), or None."""
        return ckpt.find_latest(self.path)

    def mine(self, state: dict, key: str) -> Any:
        """This rank's entry of a per-rank list saved by `save` (rank 0's for a run saved with another rank count:
        the RNG streams then restart from rank 0's, the best a resize can do)."""
        values = state[key]
        return values[self.info.rank] if len(values) == self.info.world_size else values[0]

    def restore_rng(self, state: dict) -> None:
        ckpt.set_rng_state(self.mine(state, "rng"))

    # ------------------------------------------------------------------ stopping
    def stop_requested(self) -> bool:
        """SIGTERM/SIGUSR1/Ctrl-C seen on any rank: every rank stops at this batch boundary."""
        return self.signals.seen_on_any_rank(self.info.device)

    def stop_if_requested(self, save: Callable[[], None]) -> None:
        """At a batch boundary, collective: when any rank was asked to stop, write the checkpoint (`save`), wait until
        every rank is past it (no rank exits, so no launcher tears the job down, before the file is complete) and
        raise StopRequested."""
        if self.stop_requested():
            save()
            barrier(self.info)
            raise StopRequested()

    # ------------------------------------------------------------------ rank 0's logs
    def tensorboard(self, purge_step: int):
        """A SummaryWriter into <run>/tensorboard on rank 0 (None elsewhere); `purge_step` drops events a resumed
        run rewrites."""
        if not self.info.is_main:
            return None
        return SummaryWriter(str(self.path / "tensorboard"), purge_step=purge_step)

    def append_metrics(self, entry: dict) -> None:
        """One line of metrics.jsonl (rank 0)."""
        if self.info.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
