"""The training loaders of a run plan: the CPU (PyAV) loader, or DALI on a GPU or on DALI's CPU backend."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from goca_fast.config import ConfigError
from goca_fast.data.augment import ClipAugment
from goca_fast.data.cpu_loader import TrainClipDataset, batches_per_rank, make_train_loader
from goca_fast.data.index import VideoRecord
from goca_fast.plan.run import RunPlan, plan_data
from goca_fast.runtime.device import choose_loader
from goca_fast.train.engine import TrainLoader

log = logging.getLogger("goca_fast")


def _train_dataset(plan: RunPlan, records: Sequence[VideoRecord], augment: ClipAugment) -> TrainClipDataset:
    cfg = plan.config
    return TrainClipDataset(plan_data(plan).root, records, clip_lengths=cfg.clip_lengths, stride=cfg.data.stride,
                            min_distance=cfg.data.min_distance, augment=augment,
                            with_flow=cfg.data.modalities != "rgb", seed=cfg.seed)


def cpu_train_loader(plan: RunPlan) -> TrainLoader:
    """The CPU (PyAV) training loader."""
    d, info = plan.config.data, plan.info
    dataset = _train_dataset(plan, plan_data(plan).train, plan.augment)

    def make(epoch: int, start_batch: int):
        return make_train_loader(dataset, d.batch_size, d.workers, rank=info.rank, world_size=info.world_size,
                                 seed=plan.config.seed, epoch=epoch, start_batch=start_batch)

    return TrainLoader(make, batches_per_rank(len(dataset), info.world_size, d.batch_size))


def dali_train_loader(plan: RunPlan, augment: Optional[ClipAugment] = None) -> TrainLoader:
    """The DALI training loader (GPU, or DALI's CPU backend). `augment`: default the plan's.

    It opens no video before the first batch: the index's frame counts and sizes are the files' (goca-prepare and
    goca-flow write them from the files), so nothing is probed or stat'ed per video at start-up (at Kinetics scale
    that would be 1.3M files per rank). A file that cannot be decoded fails its batch, which is then decoded by
    the CPU loader without it (one sample lost, reported)."""
    # DALI is optional: its pipelines are imported only when a run asks for them
    from dali_pipelines import source as dali_source, train as dali_train
    d, info, cfg = plan.config.data, plan.info, plan.config
    with_flow = d.modalities != "rgb"
    train = plan_data(plan).train
    batches = batches_per_rank(len(train), info.world_size, d.batch_size)
    if batches < 1:
        raise ConfigError(f"{len(train)} readable training videos cannot fill one batch of {d.batch_size} "
                          f"on each of {info.world_size} ranks")
    augment = augment if augment is not None else plan.augment
    half_output, torch_dtype = dali_train.output_dtype(info.device, plan.amp)
    sampling = dali_source.TrainSampling(
        metas=dali_source.video_metas(plan_data(plan).root, train), clip_lengths=list(cfg.clip_lengths),
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
