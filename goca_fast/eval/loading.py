"""Checkpoints for evaluation: finding one from a run directory, fitting its weights into the network its config
describes (one-line errors for foreign or mismatched checkpoints), and `EvalSetup`, everything an evaluation
needs of a checkpoint and its pretraining config as plain values. `goca_fast.plan` does the config part."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from goca_fast.train import checkpoint as ckpt
from goca_fast.eval import EvalError
from goca_fast.data.views import ViewSpec
from goca_fast.models.goca_model import STREAMS, GocaModel


def resolve_checkpoint(source: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoint file, run directory) from a checkpoint path, a run directory or its checkpoints/ folder."""
    p = Path(source).expanduser()
    if p.is_dir():
        run_dir = p.parent if p.name == ckpt.CHECKPOINT_SUBDIR else p
        found = ckpt.find_latest(run_dir)
        if found is None:
            raise EvalError(f"{p} holds no intact checkpoint (looked for {ckpt.latest_path(run_dir)} and "
                            f"ckpt_epochNNNN.pth snapshots)")
        return found, run_dir
    if not p.is_file():
        raise EvalError(f"checkpoint or run directory not found: {p}")
    run_dir = p.parent.parent if p.parent.name == ckpt.CHECKPOINT_SUBDIR else p.parent
    return p, run_dir


def read_checkpoint(path: Path) -> dict:
    """A goca_fast checkpoint's state (on the CPU), with one-line errors for damaged or foreign files."""
    try:
        state = ckpt.load_checkpoint(path, map_location="cpu")
    except ckpt.CheckpointError as e:
        raise EvalError(str(e)) from None
    if "model" not in state or not isinstance(state["model"], dict):
        raise EvalError(f"{path} has no 'model' state dict (keys: {sorted(state)[:8]}); not a goca_fast checkpoint")
    return state


def default_output_dir(run_dir: Path) -> Path:
    """Where a run's evaluation results, plots and feature cache go: <run_dir>/eval."""
    return Path(run_dir) / "eval"


@dataclass
class LoadedModel:
    """A model ready for evaluation, and where it came from."""

    model: GocaModel
    checkpoint: Path
    run_dir: Path
    epoch: Optional[int]
    kind: str                 # "pretrain" | "finetune"
    has_heads: bool
    checkpoint_key: dict = field(default_factory=dict)  # identifies the weights for the feature cache

    @property
    def streams(self) -> list[str]:
        return list(self.model.streams)


def _match_state(model: GocaModel, state: dict[str, torch.Tensor], streams: Sequence[str], need_heads: bool,
                 path: Path, arch: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The part of `state` the evaluation needs, checked key by key and shape by shape (clear error otherwise)."""
    own = model.state_dict()
    needed = [k for k in own if any(k.startswith(f"backbones.{s}.") for s in streams)]
    head_keys = [k for k in own if k.startswith("heads.")]
    has_heads = all(k in state and state[k].shape == own[k].shape for k in head_keys)
    if need_heads:
        needed += head_keys
    missing = [k for k in needed if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in needed
             if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        if not any(k.startswith("backbones.") for k in state):
            hint = "it holds no goca_fast backbone weights (an official or foreign checkpoint?)"
        elif need_heads and not has_heads and not wrong and all(k.startswith("heads.") for k in missing):
            hint = "it holds no projection heads (a fine-tuned checkpoint?); use the backbone features"
        else:
            hint = f"is it from another architecture than model.arch={arch}?"
        detail = "; ".join(filter(None, [
            f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
            f"{len(wrong)} shape mismatches (e.g. {wrong[0]})" if wrong else ""]))
        raise EvalError(f"checkpoint {path} does not fit the model its config describes: {detail}; {hint}")
    return {k: state[k] for k in own if k in state and state[k].shape == own[k].shape}, has_heads


def fit_checkpoint(model: GocaModel, path: Path, run_dir: Path, state: dict, *, arch: str, modalities: str,
                   streams: Optional[Sequence[str]] = None, need_heads: bool = False,
                   device: torch.device | str = "cpu") -> LoadedModel:
    """Load the checkpoint's weights into `model` (the network its config describes) for evaluation.

    streams: the streams to evaluate (default: all the model has); asking for one it lacks is an error."""
    avail = list(model.streams)
    streams = list(streams) if streams else avail
    for s in streams:
        if s not in STREAMS:
            raise EvalError(f"unknown stream {s!r}; choose from rgb, flow")
        if s not in avail:
            raise EvalError(f"{path} was pretrained with data.modalities={modalities}: it has no {s} "
                            f"stream (available: {', '.join(avail)})")
    weights, has_heads = _match_state(model, ckpt.strip_ddp_prefix(state["model"]), streams, need_heads, path, arch)
    model.load_state_dict(weights, strict=False)
    model.streams = streams  # evaluate only the requested streams
    model.to(device).eval()
    st = path.stat()
    key = {"checkpoint": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return LoadedModel(model, path, run_dir, state.get("epoch"), str(state.get("kind", "pretrain")), has_heads, key)


@dataclass
class EvalSetup:
    """What an evaluation needs of a checkpoint and its pretraining config, as plain values (made by
    `goca_fast.plan.evaluation.eval_setup` from the checkpoint and the command line's overrides)."""

    loaded: Optional[LoadedModel]         # the checkpoint's network (None only for a fine-tuning run to resume)
    device: torch.device
    root: Path                            # the dataset evaluated on
    name: str                             # the pretraining run's name (tables)
    arch: str
    train_split: str                      # gallery / training split
    test_split: str                       # query / test split
    views: ViewSpec                       # the config's evaluation protocol
    batch_size: int                       # videos per batch
    workers: int                          # loader processes
    seed: int
    crop_size: int                        # training-time augmentation geometry (augmented probe, fine-tuning)
    scale_range: tuple[int, int]
    hflip_prob: float = 0.5               # the pretraining flip rate: 0 where a mirror changes the class
    loader: str = "auto"                  # auto | cpu | dali
    config: dict = field(default_factory=dict)   # the pretraining config, kept in fine-tuning checkpoints
    new_model: Optional[Callable[[], GocaModel]] = None  # a freshly initialised network of this architecture
