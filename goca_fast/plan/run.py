"""A pretraining run, planned once: `plan_run(cfg, info)` resolves the device's AMP dtype, the dataset and its
index (read once, checked before anything is trained or written) and every section's settings; the builders below
take the plan, never the config."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from goca_fast.config import Config, ConfigError
from goca_fast.data.augment import ClipAugment
from goca_fast.data.index import VideoRecord, read_index, select_split, training_records
from goca_fast.data.synthetic import make_synthetic_dataset
from goca_fast.data.views import ViewSpec
from goca_fast.eval.features import ExtractSettings
from goca_fast.eval.knn import evaluate_knn
from goca_fast.eval.monitor import KnnMonitor, MonitorSettings
from goca_fast.eval.splits import check_disjoint
from goca_fast.method.assign import resolve_backend
from goca_fast.models import GocaModel, ModelSpec, load_prototypes
from goca_fast.plan import settings
from goca_fast.runtime.device import resolve_amp
from goca_fast.runtime.distributed import DistInfo, barrier
from goca_fast.train.engine import LoopSettings, Trainer, TrainLoader
from goca_fast.train.optim import OptimSettings

log = logging.getLogger("goca_fast")


@dataclass(frozen=True)
class RunData:
    """The dataset of a run: its root and its index, read once."""

    root: Path
    records: list[VideoRecord]      # every video of the index
    classes: list[str]              # the index's class names
    train: list[VideoRecord]        # the training split


@dataclass(frozen=True)
class RunPlan:
    """Everything a pretraining run needs, decided once; one settings object per config section."""

    config: Config                  # kept whole only for config.yaml and the checkpoints
    info: DistInfo
    amp: Optional[torch.dtype]      # engine.amp on this device
    run_dir: Path
    model: ModelSpec
    prototypes: Optional[np.ndarray]   # fixed initial prototypes (model.prototypes_path), shape checked
    augment: ClipAugment
    loop: LoopSettings
    optim: OptimSettings
    views: ViewSpec                 # the evaluation protocol of the kNN table
    monitor: Optional[MonitorSettings]   # None: no online kNN monitor
    data: Optional[RunData] = None  # None: a plan without data (the caller feeds its own loader)


def _prototypes(cfg: Config) -> Optional[np.ndarray]:
    m = cfg.model
    if not m.prototypes_path:
        return None
    try:
        init = load_prototypes(m.prototypes_path)
    except ValueError as e:
        raise ConfigError(f"model.prototypes_path: {e}") from None
    if init.shape != (m.num_prototypes, m.embed_dim):
        raise ConfigError(f"model.prototypes_path={m.prototypes_path} holds {init.shape[0]}×{init.shape[1]} "
                          f"prototypes; this model needs model.num_prototypes × model.embed_dim = "
                          f"{m.num_prototypes}×{m.embed_dim}")
    return init


def plan_settings(cfg: Config, info: Optional[DistInfo] = None) -> RunPlan:
    """The plan of `cfg` without its data (no dataset is read or generated)."""
    info = info or DistInfo()
    return RunPlan(config=cfg, info=info, amp=resolve_amp(cfg.engine.amp, info.device, "engine.amp"),
                   run_dir=Path(cfg.output_dir).expanduser() / cfg.name, model=settings.model_spec(cfg),
                   prototypes=_prototypes(cfg), augment=settings.train_augment(cfg.data),
                   loop=settings.loop_settings(cfg), optim=settings.optim_settings(cfg),
                   views=settings.eval_views(cfg),
                   monitor=settings.monitor_settings(cfg) if cfg.eval.monitor_every > 0 else None)


def dataset_root(cfg: Config, info: Optional[DistInfo] = None) -> Path:
    """The prepared dataset, or the synthetic one (generated once, by rank 0) when `data.root` is empty."""
    info = info or DistInfo()
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser()
        if not (root / "index.jsonl").is_file():
            raise ConfigError(f"data.root={root} holds no index.jsonl; prepare it with goca-prepare and goca-flow")
        return root
    spec = settings.synthetic_spec(cfg)
    key = hashlib.sha1(json.dumps(vars(cfg.data.synthetic), sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg.data.cache_dir).expanduser() / f"synthetic-{key}"
    if info.is_main:
        t0 = time.time()
        make_synthetic_dataset(root, spec, with_flow=cfg.data.modalities != "rgb")
        log.info("synthetic dataset ready at %s (%.1fs)", root, time.time() - t0)
    barrier(info)
    return root


def plan_run(cfg: Config, info: Optional[DistInfo] = None) -> RunPlan:
    """The whole plan: settings, then the dataset (generated if synthetic) and its index, read once here.

    Checked before anything is trained or written: the training split fills one batch on every rank, and no
    evaluated split shares videos with the gallery (each query would retrieve itself)."""
    plan = plan_settings(cfg, info)
    d, info = cfg.data, plan.info
    root = dataset_root(cfg, info)
    records, classes = read_index(root)
    training_records(records, d.train_split, with_flow=d.modalities != "rgb", batch=d.batch_size * info.world_size)
    evaluated = ([d.test_split] if cfg.eval.knn_after_training else []) + (
        [plan.monitor.val_split] if plan.monitor else [])
    train = select_split(records, d.train_split)
    for split in evaluated:
        check_disjoint(d.train_split, [r.id for r in train], split,
                       [r.id for r in select_split(records, split, required=False)], roles=("data.train_split", "test"))
    return replace(plan, data=RunData(root=root, records=records, classes=classes, train=train))


# ------------------------------------------------------------------------------------------------ builders
def build_model(plan: RunPlan) -> GocaModel:
    """A freshly initialised network of the plan (the initialisation draws from the global RNG as it stands)."""
    return GocaModel(plan.model, prototypes_init=plan.prototypes)


def build_trainer(plan: RunPlan, loader: TrainLoader) -> Trainer:
    """The run's Trainer. Collective: the assignment backend is decided once for the whole process group (ranks
    on different backends would issue different collectives)."""
    cfg, info = plan.config, plan.info
    backend = resolve_backend(cfg.goca.backend, info.device, info.group, num_prototypes=plan.model.num_prototypes)
    return Trainer(model=build_model(plan), objective=settings.objective(cfg, backend=backend, group=info.group),
                   optim=plan.optim, loop=plan.loop, info=info, run_dir=plan.run_dir, loader=loader, amp=plan.amp,
                   config=cfg.to_dict())


def plan_data(plan: RunPlan) -> RunData:
    """The plan's dataset (a plan made by plan_settings has none)."""
    if plan.data is None:
        raise ValueError("this plan has no data: make it with plan_run")
    return plan.data


def build_monitor(plan: RunPlan, streams: Sequence[str]) -> KnnMonitor:
    """The online kNN monitor of `eval.monitor_*` (rank 0 runs it) on the plan's index."""
    if plan.monitor is None:
        raise ValueError("this plan has no monitor (eval.monitor_every = 0)")
    data, cfg = plan_data(plan), plan.config
    views = replace(plan.views, clip_length=cfg.eval.monitor_clip_length or min(cfg.data.frames_per_group),
                    num_clips=1, crops=1)
    return KnnMonitor(data.root, data.records, views, plan.monitor, streams=streams, device=plan.info.device,
                      amp=plan.amp)


def knn_recall(model: GocaModel, plan: RunPlan) -> dict[str, dict[int, float]]:
    """R@k of the test split's videos against the train split's with a live model, the config's protocol (the
    pretraining run's closing table), on the plan's index."""
    cfg, data = plan.config, plan_data(plan)
    extract = ExtractSettings(device=plan.info.device, batch_size=cfg.eval.batch_size, workers=cfg.data.workers,
                              loader=cfg.data.loader)
    return evaluate_knn(model, data.root, plan.views, extract, train_split=cfg.data.train_split,
                        test_split=cfg.data.test_split, index=(data.records, data.classes)).recall
