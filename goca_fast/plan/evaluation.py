"""Evaluation setups: a checkpoint's network, its pretraining config's protocol, and the command line's changes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from goca_fast.config import Config, config_from_dict, load_config
from goca_fast.eval import EvalError
from goca_fast.eval.finetune import FinetuneStart, find_resume
from goca_fast.eval.loading import (EvalSetup, LoadedModel, default_output_dir, fit_checkpoint, read_checkpoint,
                                    resolve_checkpoint)
from goca_fast.models import GocaModel
from goca_fast.plan.run import dataset_root
from goca_fast.plan.settings import eval_views, model_spec
from goca_fast.runtime.device import resolve_device
from goca_fast.runtime.distributed import init_distributed


@dataclass(frozen=True)
class CheckpointRequest:
    """Which checkpoint to evaluate and what of it: `source` is a checkpoint file, a run directory or its
    checkpoints/ folder; `expect_arch` fails unless the checkpoint is of that architecture; `config_path` is the
    pretraining config for a checkpoint that holds none."""

    source: Optional[str]
    streams: Optional[Sequence[str]] = None
    need_heads: bool = False
    expect_arch: Optional[str] = None
    config_path: Optional[str] = None


@dataclass(frozen=True)
class EvalOverrides:
    """The command line's changes to the pretraining config's evaluation defaults (None keeps the config's)."""

    data_root: Optional[str] = None
    train_split: Optional[str] = None
    test_split: Optional[str] = None
    batch_size: Optional[int] = None
    workers: Optional[int] = None


def _checkpoint_config(state: dict, run_dir: Path, path: Path, config_path: Optional[str]) -> Config:
    if config_path:
        return load_config(config_path)
    if isinstance(state.get("config"), dict):
        return config_from_dict(state["config"])
    yaml_path = run_dir / "config.yaml"
    if yaml_path.is_file():
        return load_config(yaml_path)
    raise EvalError(f"{path} holds no config and there is no {yaml_path}; pass --config with the pretraining config")


def _fresh_model(cfg: Config) -> Callable[[], GocaModel]:
    """Freshly initialised networks of `cfg`'s architecture; the prototypes come from the checkpoint (the
    pretraining run's prototypes .npy may not exist here)."""
    spec = model_spec(cfg)
    return lambda: GocaModel(spec)


def load_eval_model(source: str, *, device: torch.device | str = "cpu", streams: Optional[Sequence[str]] = None,
                    need_heads: bool = False, expect_arch: Optional[str] = None,
                    config_path: Optional[str] = None) -> tuple[LoadedModel, Config]:
    """A pretraining (or fine-tuning) checkpoint's network ready for evaluation, and its config (the checkpoint's
    own, else the run directory's config.yaml, else `config_path`)."""
    path, run_dir = resolve_checkpoint(source)
    state = read_checkpoint(path)
    cfg = _checkpoint_config(state, run_dir, path, config_path)
    if expect_arch and cfg.model.arch != expect_arch:
        raise EvalError(f"{path} is a {cfg.model.arch} checkpoint, but {expect_arch} was asked for")
    loaded = fit_checkpoint(_fresh_model(cfg)(), path, run_dir, state, arch=cfg.model.arch,
                            modalities=cfg.data.modalities, streams=streams, need_heads=need_heads, device=device)
    return loaded, cfg


def _eval_root(cfg: Config, data_root: Optional[str]) -> Path:
    """`data_root`, else the pretraining config's dataset (a synthetic one is generated as pretraining does)."""
    if data_root:
        root = Path(data_root).expanduser()
        if not (root / "index.jsonl").is_file():
            raise EvalError(f"{root} holds no index.jsonl; prepare it with goca-prepare (and goca-flow for flow)")
        return root
    return dataset_root(cfg)


def setup_from_config(cfg: Config, loaded: Optional[LoadedModel], device: torch.device,
                      overrides: EvalOverrides = EvalOverrides()) -> EvalSetup:
    """The evaluation setup of a pretraining config, with the command line's overrides."""
    d, o = cfg.data, overrides
    return EvalSetup(loaded=loaded, device=device, root=_eval_root(cfg, o.data_root), name=cfg.name,
                     arch=cfg.model.arch, train_split=o.train_split or d.train_split,
                     test_split=o.test_split or d.test_split, views=eval_views(cfg),
                     batch_size=o.batch_size or cfg.eval.batch_size,
                     workers=d.workers if o.workers is None else o.workers,
                     seed=cfg.seed, crop_size=d.crop_size, scale_range=(d.scale_range[0], d.scale_range[1]),
                     hflip_prob=d.hflip_p,
                     loader=d.loader, config=cfg.to_dict(), new_model=_fresh_model(cfg))


def eval_setup(request: CheckpointRequest, overrides: EvalOverrides = EvalOverrides(), *,
               device: str = "auto") -> EvalSetup:
    """Everything `goca-eval knn/linear/export/plots` need of a checkpoint."""
    dev = resolve_device(device, "--device")
    r = request
    loaded, cfg = load_eval_model(r.source, device=dev, streams=r.streams, need_heads=r.need_heads,
                                  expect_arch=r.expect_arch, config_path=r.config_path)
    return setup_from_config(cfg, loaded, dev, overrides)


def finetune_start(request: CheckpointRequest, overrides: EvalOverrides = EvalOverrides(), *,
                   out_dir: Optional[str] = None, fresh: bool = False, device: str = "auto") -> FinetuneStart:
    """Where `goca-eval finetune` starts: its run directory (--out, else <pretraining run>/eval/finetune) resumed
    from its own checkpoint unless `fresh`, else a new run from the pretrained checkpoint `request.source`."""
    source = request.source
    if out_dir:
        run_dir = Path(out_dir)
    elif source:
        run_dir = default_output_dir(resolve_checkpoint(source)[1]) / "finetune"
    else:
        raise EvalError("finetune needs a checkpoint (or --out of a fine-tuning run to resume)")
    info = init_distributed(device)
    resume = None if fresh else find_resume(run_dir)
    if resume is not None:
        cfg, loaded = config_from_dict(resume[1]["config"]), None
    elif not source:
        raise EvalError("finetune needs a pretrained checkpoint or run directory")
    else:
        loaded, cfg = load_eval_model(source, device="cpu", streams=request.streams,
                                      expect_arch=request.expect_arch, config_path=request.config_path)
    return FinetuneStart(info=info, setup=setup_from_config(cfg, loaded, info.device, overrides), run_dir=run_dir,
                         resume=resume)
