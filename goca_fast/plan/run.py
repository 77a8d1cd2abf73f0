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
from goca_fast.data.cpu_loader import TrainClipDataset, batches_per_rank, make_train_loader
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
from goca_fast.runtime.device import choose_loader, resolve_amp
from goca_fast.runtime.distributed import DistInfo, barrier
from goca_fast.train.engine import LoopSettings, Trainer, TrainLoader
from goca_fast.train.optim import OptimSettings

log = logging.getLogger("goca_fast")


@dataclass(frozen=True)
class RunData:
    """The dataset of a run: its root and its index, read once."""

    root: Path
    records: list[VideoRecord]      # every video of the index
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
    records = read_index(root)[0]
    training_records(records, d.train_split, with_flow=d.modalities != "rgb", batch=d.batch_size * info.world_size)
    evaluated = ([d.test_split] if cfg.eval.knn_after_training else []) + (
        [plan.monitor.val_split] if plan.monitor else [])
    gallery = [r.id for r in select_split(records, d.train_split)]
    for split in evaluated:
        check_disjoint(d.train_split, gallery, split, [r.id for r in select_split(records, split, required=False)],
                       roles=("data.train_split", "test"))
    return replace(plan, data=RunData(root=root, records=records, train=select_split(records, d.train_split)))


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


def _data(plan: RunPlan) -> RunData:
    if plan.data is None:
        raise ValueError("this plan has no data: make it with plan_run")
    return plan.data


def _train_dataset(plan: RunPlan, records: Sequence[VideoRecord], augment: ClipAugment) -> TrainClipDataset:
    cfg = plan.config
    return TrainClipDataset(_data(plan).root, records, clip_lengths=cfg.clip_lengths, stride=cfg.data.stride,
                            min_distance=cfg.data.min_distance, augment=augment,
                            with_flow=cfg.data.modalities != "rgb", seed=cfg.seed)


def cpu_train_loader(plan: RunPlan) -> TrainLoader:
    """The CPU (PyAV) training loader."""
    d, info = plan.config.data, plan.info
    dataset = _train_dataset(plan, _data(plan).train, plan.augment)

    def make(epoch: int, start_batch: int):
        return make_train_loader(dataset, d.batch_size, d.workers, rank=info.rank, world_size=info.world_size,
                                 seed=plan.config.seed, epoch=epoch, start_batch=start_batch)

    return TrainLoader(make, batches_per_rank(len(dataset), info.world_size, d.batch_size))


def dali_train_loader(plan: RunPlan, augment: Optional[ClipAugment] = None) -> TrainLoader:
    """The DALI training loader (GPU, or DALI's CPU backend); videos DALI cannot read are left out first and
    reported. `augment`: default the plan's."""
    # DALI is optional: its pipelines are imported only when a run asks for them
    from dali_pipelines import source as dali_source, train as dali_train, validate as dali_validate
    d, info, cfg = plan.config.data, plan.info, plan.config
    with_flow = d.modalities != "rgb"
    train, _excluded = dali_validate.validate_for_dali(_data(plan).root, _data(plan).train, with_flow,
                                                       workers=max(1, d.workers), progress=info.is_main)
    batches = batches_per_rank(len(train), info.world_size, d.batch_size)
    if batches < 1:
        raise ConfigError(f"{len(train)} readable training videos cannot fill one batch of {d.batch_size} "
                          f"on each of {info.world_size} ranks")
    augment = augment if augment is not None else plan.augment
    half_output, torch_dtype = dali_train.output_dtype(info.device, plan.amp)
    sampling = dali_source.TrainSampling(
        metas=dali_source.video_metas(_data(plan).root, train), clip_lengths=list(cfg.clip_lengths),
        stride=d.stride, min_distance=d.min_distance, augment=augment, with_flow=with_flow, seed=cfg.seed,
        rank=info.rank, world_size=info.world_size, batch_size=d.batch_size, batches_per_epoch=batches)
    spec = dali_train.TrainPipelineSpec(
        sampling=sampling, official_flow=d.flow_mode == "official",
        blur_window=augment.blur_kernel if d.blur_p > 0 else 0, half_output=half_output, device=info.device,
        torch_dtype=torch_dtype, threads=d.workers)
    log.info("DALI %s loader: %d videos, %d batches per epoch per rank",
             "GPU" if info.device.type == "cuda" else "CPU", len(train), batches)
    return TrainLoader(dali_train.dali_train_loaders(spec, _train_dataset(plan, train, augment)), batches)


def train_loader(plan: RunPlan) -> TrainLoader:
    """The loader `data.loader` picks for this device (DALI on a GPU by default, else the CPU loader)."""
    if choose_loader(plan.config.data.loader, plan.info.device) == "dali":
        return dali_train_loader(plan)
    return cpu_train_loader(plan)


def build_monitor(plan: RunPlan, streams: Sequence[str]) -> KnnMonitor:
    """The online kNN monitor of `eval.monitor_*` (rank 0 runs it) on the plan's index."""
    if plan.monitor is None:
        raise ValueError("this plan has no monitor (eval.monitor_every = 0)")
    data, cfg = _data(plan), plan.config
    views = replace(plan.views, clip_length=cfg.eval.monitor_clip_length or min(cfg.data.frames_per_group),
                    num_clips=1, crops=1)
    return KnnMonitor(data.root, data.records, views, plan.monitor, streams=streams, device=plan.info.device,
                      amp=plan.amp)


def knn_recall(model: GocaModel, plan: RunPlan) -> dict[str, dict[int, float]]:
    """R@k of the test split's videos against the train split's with a live model, the config's protocol (the
    pretraining run's closing table), on the plan's index."""
    cfg, data = plan.config, _data(plan)
    extract = ExtractSettings(device=plan.info.device, batch_size=cfg.eval.batch_size, workers=cfg.data.workers,
                              loader=cfg.data.loader)
    return evaluate_knn(model, data.root, plan.views, extract, train_split=cfg.data.train_split,
                        test_split=cfg.data.test_split, records=data.records).recall
