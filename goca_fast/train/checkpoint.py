"""Checkpoint files: atomic save, checked load, finding the resume point, RNG capture.

Layout under a run directory::

    run_dir/checkpoints/latest.pth            rewritten every epoch (and every N minutes), the resume point
    run_dir/checkpoints/ckpt_epochNNNN.pth    kept snapshots

What goes *into* the state dict (model, optimizer, scaler, queue, epoch, iteration, RNG) is the engine's business;
this module only guarantees that a file at a final name is always complete, and that a damaged one is noticed.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from goca_fast.runtime.atomic import atomic_open

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "is_valid_checkpoint", "find_latest",
    "checkpoint_dir", "latest_path", "snapshot_path", "rng_state", "set_rng_state", "preserve_rng",
    "strip_ddp_prefix", "CheckpointTimer", "LATEST_NAME", "CHECKPOINT_SUBDIR",
]

PathLike = Union[str, os.PathLike]
CHECKPOINT_SUBDIR = "checkpoints"
LATEST_NAME = "latest.pth"
_SNAPSHOT_RE = re.compile(r"^ckpt_epoch(\d+)\.pth$")
_TEMP_SUFFIX = ".tmp"  # temp files are ".tmp_<name>.<random>.tmp": never match the names find_latest looks for


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used (truncated, corrupt, not a dict)."""


# --- names -----------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_SUBDIR


def latest_path(run_dir: PathLike) -> Path:
    return checkpoint_dir(run_dir) / LATEST_NAME


def snapshot_path(run_dir: PathLike, epoch: int) -> Path:
    return checkpoint_dir(run_dir) / f"ckpt_epoch{int(epoch):04d}.pth"


# --- save / load -----------------------------------------------------------------------------------------
def save_checkpoint(path: PathLike, state: dict) -> Path:
    """Write ``state`` so that ``path`` is either the old file or the complete new one, never a partial file.

    torch.save into a temp file beside ``path`` (`goca_fast.runtime.atomic`), fsynced, renamed onto ``path``, the
    directory fsynced. On an exception the temp file is removed; after a hard crash (SIGKILL, power loss) a
    ``.tmp_<name>.*.tmp`` file may remain, which :func:`find_latest` ignores and
    :func:`goca_fast.runtime.atomic.remove_stale_temps` cleans up.
    """
    path = Path(path)
    with atomic_open(path, "wb", durable=True, suffix=_TEMP_SUFFIX) as f:
        torch.save(state, f)
    return path


def _check_zip(path: Path) -> None:
    """CRC-check every member of torch's zip container. torch.load itself does not notice flipped bits in
    tensor data, and truncation shows up here as a missing central directory."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or not a torch zip checkpoint ({e})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (CRC mismatch in {bad})")
    if not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        raise CheckpointError(f"checkpoint {path} is a zip file but not a torch checkpoint (no data.pkl)")


def load_checkpoint(path: PathLike, map_location: Any = "cpu", weights_only: bool = True,
                    verify: bool = True) -> dict:
    """Load a checkpoint dict, with a one-line error naming the file when it is missing or damaged.

    ``weights_only=True`` (torch's safe unpickler) is enough for everything this package stores (tensors,
    numbers, strings, lists/tuples/dicts; :func:`rng_state` is built to fit). ``verify`` CRC-checks the file
    first (one extra sequential read) because torch.load silently accepts corrupted tensor bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if verify:
        _check_zip(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # unpickling errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = " (saved with non-tensor objects? try weights_only=False for a trusted file)" \
            if weights_only and "weights_only" in str(e) else ""
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: {first}{hint}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def is_valid_checkpoint(path: PathLike) -> bool:
    """Cheap integrity check (zip structure + CRCs), without unpickling or allocating tensors."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        _check_zip(path)
    except CheckpointError:
        return False
    return True


def find_latest(run_dir: PathLike) -> Optional[Path]:
    """The file to resume from: ``checkpoints/latest.pth`` if intact, else the highest-numbered intact
    ``checkpoints/ckpt_epochNNNN.pth``, else None. Temp files of interrupted saves never qualify."""
    ckpt_dir = checkpoint_dir(run_dir)
    if not ckpt_dir.is_dir():
        return None
    latest = ckpt_dir / LATEST_NAME
    if is_valid_checkpoint(latest):
        return latest
    snapshots = []
    for p in ckpt_dir.iterdir():
        m = _SNAPSHOT_RE.match(p.name)
        if m:
            snapshots.append((int(m.group(1)), p))
    for _, p in sorted(snapshots, reverse=True):
        if is_valid_checkpoint(p):
            return p
    return None


# --- RNG -------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every global RNG the training touches: python ``random``, numpy's global generator, torch CPU and
    each visible CUDA device. Only tensors, ints, floats and tuples, so ``weights_only`` loading works."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "python": (py_version, tuple(py_internal), py_gauss),
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": list(cuda),
    }


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` output. CUDA states are restored for the devices present both in the state and
    here (a GPU checkpoint resumed on CPU restores the CPU generators only)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(torch.as_tensor(n["keys"]).cpu().numpy(), dtype=np.uint32),
                         int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"])))
    torch.set_rng_state(torch.as_tensor(state["torch"]).cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(torch.as_tensor(cuda[i]).cpu(), device=i)


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block without disturbing any global RNG (python, numpy, torch CPU and CUDA).

    Evaluation inside training (monitor, per-epoch validation) must not shift the training's random stream, or a
    resumed run would differ from an uninterrupted one (DataLoader iterators draw a seed from torch's RNG)."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# --- state-dict keys -------------------------------------------------------------------------------------
def strip_ddp_prefix(state_dict: dict, prefix: str = "module.") -> "OrderedDict[str, Any]":
    """Drop the DDP ``module.`` prefix (official checkpoints carry it) from every key that has it, keeping the
    order and the ``_metadata`` that ``load_state_dict`` uses for versioned modules. Keys without it are kept."""
    out: "OrderedDict[str, Any]" = OrderedDict(
        (k[len(prefix):] if k.startswith(prefix) else k, v) for k, v in state_dict.items())
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        bare = prefix[:-1] if prefix.endswith(".") else prefix
        new_meta = OrderedDict()
        for k, v in meta.items():
            if k == bare:
                k = ""
            elif k.startswith(prefix):
                k = k[len(prefix):]
            new_meta.setdefault(k, v)
        out._metadata = new_meta  # type: ignore[attr-defined]
    return out


# --- time-based saves ------------------------------------------------------------------------------------
class CheckpointTimer:
    """Says when a time-based ``latest`` save is due (so a preempted job loses at most ``every_minutes``).

    ``every_minutes <= 0`` or None disables it. Under DDP, decide on one rank and broadcast the answer:
    each rank's clock differs, and a save that involves collectives must be entered by all ranks.
    """

    def __init__(self, every_minutes: Optional[float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = float(every_minutes) * 60.0 if every_minutes else 0.0
        self._clock = clock
        self._last = clock()

    @property
    def enabled(self) -> bool:
        return self.every_s > 0

    def due(self) -> bool:
        return self.enabled and self._clock() - self._last >= self.every_s

    def reset(self) -> None:
        """Call after any save of ``latest`` (time-based or end of epoch)."""
        self._last = self._clock()
