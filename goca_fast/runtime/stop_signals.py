"""How a long run (pretraining, fine-tuning) is asked to stop: one handler for pre-emption and for Ctrl-C.

SIGTERM and SIGUSR1 (SLURM pre-emption) and the first SIGINT (Ctrl-C) only set a flag: the loop stops at the next
batch boundary, writes a checkpoint and exits (0 after SIGTERM/SIGUSR1 so that a requeued job simply continues;
130 after Ctrl-C, the shell's code for an interrupt). A second SIGINT ends the process at once, keeping the last
checkpoint. No KeyboardInterrupt is ever raised inside the loop, so neither a traceback nor a half-shut DataLoader
is left behind.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """The stop flag of one run; `install` while the loop runs, `restore` after it."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            print("\ninterrupted again: exiting now; the last checkpoint is kept", file=sys.stderr, flush=True)
            os._exit(130)
        if signum == signal.SIGINT:
            print("\ninterrupted: stopping at the next batch boundary to write a checkpoint "
                  "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)
        self.signum = signum

    def seen_on_any_rank(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop: with a process group every rank must stop at the same batch
        boundary (pre-emption usually signals one node), so the flag is all-reduced."""
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, 0 after a pre-emption signal (the job is meant to be requeued and resumed)."""
        return 130 if self.signum == signal.SIGINT else 0

    def describe(self) -> str:
        if self.signum is None:  # seen_on_any_rank: another rank was signalled
            return "stopped because another rank was asked to stop"
        return "interrupted (Ctrl-C)" if self.signum == signal.SIGINT else f"stopped by signal {self.signum}"


class RunStopped(Exception):
    """A run stopped on request after writing its checkpoint; entry points exit with `exit_code`."""

    def __init__(self, signals: StopSignals, checkpoints: str):
        self.exit_code = signals.exit_code
        super().__init__(f"{signals.describe()}; checkpoint written to {checkpoints}. "
                         f"Run the same command again to resume.")


def ignore_interrupts_in_worker() -> None:
    """For loader worker processes: Ctrl-C goes to the whole process group, and a worker that dies of it would
    turn a clean stop into a crash; the main process decides and shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
