"""The wiring layer: the one place besides the entry points (`pretrain`, `eval.cli`) that reads the whole `Config`.

It turns a config, once, into the plain objects and specs the rest of the package takes: the model, the objective,
the augmentation, the dataset root, the training loaders, the loop and optimiser settings, the kNN monitor and the
evaluation setup of a checkpoint. Data, model, engine and eval code never see a config and never import an entry
point, so data flows one way: config -> wiring -> data -> model -> assign -> loss -> engine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from goca_fast.config import Config, ConfigError, DataConfig, config_from_dict, load_config
from goca_fast.data.augment import ClipAugment
from goca_fast.runtime.device import choose_loader, resolve_amp, resolve_device
from goca_fast.runtime.distributed import DistInfo, barrier, init_distributed
from goca_fast.train.engine import LoaderFactory, LoopSettings, Trainer
from goca_fast.eval import EvalError
from goca_fast.eval.loading import EvalSetup, LoadedModel, fit_checkpoint, read_checkpoint, resolve_checkpoint
from goca_fast.eval.splits import ViewSpec
from goca_fast.models import GocaModel, load_prototypes
from goca_fast.method.objective import GocaObjective
from goca_fast.train.optim import OptimSettings

if TYPE_CHECKING:  # imported where used: DALI is optional, and the monitor / fine-tuning only some runs need
    from dali_pipelines.train import DaliTrainLoaders
    from goca_fast.eval.finetune import FinetuneStart
    from goca_fast.eval.monitor import KnnMonitor

log = logging.getLogger("goca_fast")


# ------------------------------------------------------------------------------------------------ model, objective
def build_model(cfg: Config) -> GocaModel:
    """The two-stream network `cfg.model` describes (prototypes from `model.prototypes_path` when set)."""
    m = cfg.model
    init = None
    if m.prototypes_path:
        try:
            init = load_prototypes(m.prototypes_path)
        except ValueError as e:
            raise ConfigError(f"model.prototypes_path: {e}") from None
        if init.shape != (m.num_prototypes, m.embed_dim):
            raise ConfigError(f"model.prototypes_path={m.prototypes_path} holds {init.shape[0]}×{init.shape[1]} "
                              f"prototypes; this model needs model.num_prototypes × model.embed_dim = "
                              f"{m.num_prototypes}×{m.embed_dim}")
    return GocaModel(m.arch, modalities=cfg.data.modalities, pool=m.pool, hidden_dim=m.hidden_dim,
                     embed_dim=m.embed_dim, num_prototypes=m.num_prototypes, shared_head=m.shared_head,
                     flow_channels=3 if cfg.data.flow_mode == "official" else 2, merge=cfg.goca.merge,
                     prototypes_init=init, head=m.head)


def build_objective(cfg: Config, info: DistInfo) -> GocaObjective:
    """The GOCA objective of `cfg.goca`; collective: the assignment backend is decided once for the whole group
    (ranks on different backends would issue different collectives)."""
    from goca_fast.method.assign import resolve_backend
    g = cfg.goca
    backend = resolve_backend(g.backend, info.device, info.group, num_prototypes=cfg.model.num_prototypes)
    return GocaObjective(merge=g.merge, num_clips=sum(cfg.data.clips_per_group), assign_clips=g.assign_clips,
                         epsilon=g.epsilon, prior_epsilon=g.prior_epsilon, iterations=g.iterations, cycles=g.cycles,
                         prior_sign=g.prior_sign, prior_to=g.prior_to, prior_start_epoch=g.prior_start_epoch,
                         temperature=g.temperature, official_loss_scale=g.official_loss_scale, backend=backend,
                         group=info.group)


# ------------------------------------------------------------------------------------------------ data
def train_augment(data: DataConfig) -> ClipAugment:
    """The training augmentation `data` asks for (one builder for both loaders)."""
    return ClipAugment(crop_size=data.crop_size, scale_range=tuple(data.scale_range), hflip_prob=data.hflip_p,
                       jitter_prob=data.color_jitter_p, grayscale_prob=data.grayscale_p, blur_prob=data.blur_p,
                       time_reverse_prob=data.time_reverse_p, flow_mode=data.flow_mode)


def dataset_root(cfg: Config, info: Optional[DistInfo] = None) -> Path:
    """The prepared dataset, or the synthetic one (generated once, by rank 0) when `data.root` is empty."""
    info = info or DistInfo()
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser()
        if not (root / "index.jsonl").is_file():
            raise ConfigError(f"data.root={root} holds no index.jsonl; prepare it with goca-prepare and goca-flow")
        return root
    from goca_fast.data.synthetic import make_synthetic_dataset
    syn = cfg.data.synthetic
    key = hashlib.sha1(json.dumps(vars(syn), sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg.data.cache_dir).expanduser() / f"synthetic-{key}"
    if info.is_main:
        t0 = time.time()
        make_synthetic_dataset(root, num_classes=syn.num_classes, videos_per_class=syn.videos_per_class,
                               frames=syn.frames, height=syn.height, width=syn.width, fps=syn.fps, seed=syn.seed,
                               test_fraction=syn.test_fraction, with_flow=cfg.data.modalities != "rgb",
                               pan_speed=syn.pan_speed)
        log.info("synthetic dataset ready at %s (%.1fs)", root, time.time() - t0)
    barrier(info)
    return root


def _train_dataset(cfg: Config, root: Path, records, augment: ClipAugment):
    from goca_fast.data.cpu_loader import TrainClipDataset
    return TrainClipDataset(root, records, clip_lengths=cfg.clip_lengths, stride=cfg.data.stride,
                            min_distance=cfg.data.min_distance, augment=augment,
                            with_flow=cfg.data.modalities != "rgb", seed=cfg.seed)


def build_train_loader(cfg: Config, info: DistInfo, root: Path) -> tuple[LoaderFactory, int]:
    """The CPU loader: (factory(epoch, start_batch) → iterable of ClipBatch, batches per epoch and rank)."""
    from goca_fast.data.cpu_loader import batches_per_rank, make_train_loader
    from goca_fast.data.index import read_index, select_split
    train = select_split(read_index(root)[0], cfg.data.train_split)
    dataset = _train_dataset(cfg, root, train, train_augment(cfg.data))

    def factory(epoch: int, start_batch: int):
        return make_train_loader(dataset, cfg.data.batch_size, cfg.data.workers, rank=info.rank,
                                 world_size=info.world_size, seed=cfg.seed, epoch=epoch, start_batch=start_batch)

    return factory, batches_per_rank(len(dataset), info.world_size, cfg.data.batch_size)


def build_dali_train_loader(cfg: Config, info: DistInfo, root: Path,
                            augment: Optional[ClipAugment] = None) -> tuple[DaliTrainLoaders, int]:
    """The DALI loader (GPU, or the DALI CPU backend): (DaliTrainLoaders, batches per epoch and rank). Videos DALI
    cannot read are left out first (`dali_pipelines.validate`). `augment`: default `train_augment(cfg.data)`."""
    from dali_pipelines.source import video_metas
    from dali_pipelines.train import TrainPipelineSpec, dali_train_loaders, output_dtype
    from dali_pipelines.validate import validate_for_dali
    from goca_fast.data.cpu_loader import batches_per_rank
    from goca_fast.data.index import read_index, select_split
    d = cfg.data
    with_flow = d.modalities != "rgb"
    train = select_split(read_index(root)[0], d.train_split)
    train, _excluded = validate_for_dali(root, train, with_flow, workers=max(1, d.workers), progress=info.is_main)
    batches = batches_per_rank(len(train), info.world_size, d.batch_size)
    if batches < 1:
        raise ConfigError(f"{len(train)} readable training videos cannot fill one batch of {d.batch_size} "
                          f"on each of {info.world_size} ranks")
    augment = augment if augment is not None else train_augment(d)
    half_output, torch_dtype = output_dtype(info.device, resolve_amp(cfg.engine.amp, info.device, "engine.amp"))
    spec = TrainPipelineSpec(
        metas=video_metas(root, train), clip_lengths=list(cfg.clip_lengths), stride=d.stride,
        min_distance=d.min_distance, augment=augment, with_flow=with_flow, seed=cfg.seed, rank=info.rank,
        world_size=info.world_size, batch_size=d.batch_size, batches_per_epoch=batches,
        official_flow=d.flow_mode == "official", blur_window=augment.blur_kernel if d.blur_p > 0 else 0,
        half_output=half_output, device=info.device,
        torch_dtype=torch_dtype, threads=d.workers)
    log.info("DALI %s loader: %d videos, %d batches per epoch per rank",
             "GPU" if info.device.type == "cuda" else "CPU", len(train), batches)
    return dali_train_loaders(spec, _train_dataset(cfg, root, train, augment)), batches


def train_loader(cfg: Config, info: DistInfo, root: Path) -> tuple[LoaderFactory, int]:
    """The loader `data.loader` picks for this device (DALI on a GPU by default, else the CPU loader)."""
    if choose_loader(cfg.data.loader, info.device) == "dali":
        return build_dali_train_loader(cfg, info, root)
    return build_train_loader(cfg, info, root)


# ------------------------------------------------------------------------------------------------ training
def loop_settings(cfg: Config) -> LoopSettings:
    """The training loop's settings from `engine.*`, `optim.*` (epochs, prototype freezing), `model.*`, `goca.*`."""
    e, o, m, g = cfg.engine, cfg.optim, cfg.model, cfg.goca
    return LoopSettings(epochs=o.epochs, batch_size=cfg.data.batch_size, max_iters_per_epoch=e.max_iters_per_epoch,
                        max_bad_steps=e.max_bad_steps, checkpoint_minutes=e.checkpoint_minutes,
                        checkpoint_every_iters=e.checkpoint_every_iters, snapshot_every_epochs=e.snapshot_every_epochs,
                        log_every=e.log_every, tensorboard=e.tensorboard, progress=e.progress,
                        channels_last=m.channels_last, sync_bn=m.sync_bn, prototype_reg_weight=m.prototype_reg_weight,
                        freeze_prototypes_epochs=o.freeze_prototypes_epochs,
                        freeze_prototypes_iters=o.freeze_prototypes_iters, queue_length=g.queue_length,
                        queue_start_epoch=g.queue_start_epoch)


def optim_settings(cfg: Config) -> OptimSettings:
    """The optimiser and LR schedule of `optim.*`."""
    o = cfg.optim
    return OptimSettings(epochs=o.epochs, base_lr=o.base_lr, lr_scaling=o.lr_scaling, final_lr=o.final_lr,
                         start_warmup=o.start_warmup, warmup_epochs=o.warmup_epochs, fix_lr=o.fix_lr,
                         momentum=o.momentum, weight_decay=o.weight_decay, larc=o.larc, larc_trust=o.larc_trust,
                         larc_clip=o.larc_clip, exclude_bn_bias=o.exclude_bn_bias, use_apex=o.use_apex)


def build_trainer(cfg: Config, info: DistInfo, run_dir: Path, make_loader: LoaderFactory,
                  batches_per_epoch: int) -> Trainer:
    """A pretraining run's Trainer; the model's random initialisation draws from the global RNG as it stands."""
    model = build_model(cfg)
    return Trainer(model=model, objective=build_objective(cfg, info), optim=optim_settings(cfg),
                   loop=loop_settings(cfg), info=info, run_dir=run_dir, make_loader=make_loader,
                   batches_per_epoch=batches_per_epoch, amp=resolve_amp(cfg.engine.amp, info.device, "engine.amp"),
                   config=cfg.to_dict())


# ------------------------------------------------------------------------------------------------ evaluation
def eval_views(cfg: Config) -> ViewSpec:
    """The config's evaluation protocol: eval.clips × eval.crops of the longest pretraining clip."""
    return ViewSpec(clip_length=cfg.eval.clip_length or max(cfg.data.frames_per_group), stride=cfg.data.stride,
                    num_clips=cfg.eval.clips, crops=cfg.eval.crops, crop_size=cfg.data.crop_size,
                    short_side=cfg.data.scale_range[0], flow_mode=cfg.data.flow_mode)


def build_monitor(cfg: Config, info: DistInfo, root: Path, streams: Sequence[str],
                  amp: Optional[torch.dtype]) -> KnnMonitor:
    """The online kNN monitor of `eval.monitor_*` (rank 0 runs it)."""
    from goca_fast.eval.monitor import KnnMonitor
    e, d = cfg.eval, cfg.data
    return KnnMonitor(root, d.train_split, e.monitor_val_split or d.test_split, subset_size=e.monitor_videos,
                      clip_length=e.monitor_clip_length or min(d.frames_per_group), stride=d.stride,
                      crop_size=d.crop_size, short_side=d.scale_range[0], every=e.monitor_every, streams=streams,
                      flow_mode=d.flow_mode, workers=d.workers, device=info.device, amp=amp, seed=cfg.seed)


def knn_recall(model: GocaModel, cfg: Config, root: Path, device: torch.device) -> dict[str, dict[int, float]]:
    """R@k of the test split's videos against the train split's with a live model, the config's protocol (the
    pretraining demo's table)."""
    from goca_fast.eval.knn import evaluate_knn
    return evaluate_knn(model, root, eval_views(cfg), device, train_split=cfg.data.train_split,
                        test_split=cfg.data.test_split, batch_size=cfg.eval.batch_size, workers=cfg.data.workers,
                        loader=cfg.data.loader).recall


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
    """A factory of freshly initialised networks of `cfg`'s architecture; prototypes come from the checkpoint (the
    prototypes .npy of the pretraining run may not exist here)."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, prototypes_path=""))
    return lambda: build_model(cfg)


def load_eval_model(source: str, *, device: torch.device | str = "cpu", streams: Optional[Sequence[str]] = None,
                    need_heads: bool = False, expect_arch: Optional[str] = None,
                    config_path: Optional[str] = None) -> tuple[LoadedModel, Config]:
    """A pretraining (or fine-tuning) checkpoint's network ready for evaluation, and its config.

    source: checkpoint file, run directory, or its checkpoints/ folder. The architecture comes from the
    checkpoint's own config (else the run directory's config.yaml, else `config_path`); expect_arch: fail unless it
    is this one."""
    path, run_dir = resolve_checkpoint(source)
    state = read_checkpoint(path)
    cfg = _checkpoint_config(state, run_dir, path, config_path)
    if expect_arch and cfg.model.arch != expect_arch:
        raise EvalError(f"{path} is a {cfg.model.arch} checkpoint, but {expect_arch} was asked for")
    loaded = fit_checkpoint(_fresh_model(cfg)(), path, run_dir, state, arch=cfg.model.arch,
                            modalities=cfg.data.modalities, streams=streams, need_heads=need_heads, device=device)
    return loaded, cfg


def _eval_root(cfg: Config, data_root: Optional[str]) -> Path:
    """The dataset to evaluate on: `data_root`, else the pretraining config's (its synthetic set is generated on
    demand exactly as pretraining does)."""
    if data_root:
        root = Path(data_root).expanduser()
        if not (root / "index.jsonl").is_file():
            raise EvalError(f"{root} holds no index.jsonl; prepare it with goca-prepare (and goca-flow for flow)")
        return root
    return dataset_root(cfg)


def setup_from_config(cfg: Config, loaded: Optional[LoadedModel], device: torch.device, *,
                      data_root: Optional[str] = None, train_split: Optional[str] = None,
                      test_split: Optional[str] = None, batch_size: Optional[int] = None,
                      workers: Optional[int] = None) -> EvalSetup:
    """The evaluation setup of a pretraining config, with the command line's overrides (None keeps the config's)."""
    d = cfg.data
    return EvalSetup(loaded=loaded, device=device, root=_eval_root(cfg, data_root), name=cfg.name,
                     arch=cfg.model.arch, train_split=train_split or d.train_split,
                     test_split=test_split or d.test_split, views=eval_views(cfg),
                     batch_size=batch_size or cfg.eval.batch_size, workers=d.workers if workers is None else workers,
                     seed=cfg.seed, crop_size=d.crop_size, scale_range=(d.scale_range[0], d.scale_range[1]),
                     loader=d.loader, config=cfg.to_dict(), new_model=_fresh_model(cfg))


def eval_setup(source: str, *, device: str = "auto", streams: Optional[Sequence[str]] = None,
               need_heads: bool = False, expect_arch: Optional[str] = None, config_path: Optional[str] = None,
               data_root: Optional[str] = None, train_split: Optional[str] = None, test_split: Optional[str] = None,
               batch_size: Optional[int] = None, workers: Optional[int] = None) -> EvalSetup:
    """Everything `goca-eval knn/linear/export/plots` need of a checkpoint (see `load_eval_model`)."""
    dev = resolve_device(device, "--device")
    loaded, cfg = load_eval_model(source, device=dev, streams=streams, need_heads=need_heads,
                                  expect_arch=expect_arch, config_path=config_path)
    return setup_from_config(cfg, loaded, dev, data_root=data_root, train_split=train_split, test_split=test_split,
                             batch_size=batch_size, workers=workers)


def finetune_start(source: Optional[str], *, out_dir: Optional[str] = None, fresh: bool = False,
                   device: str = "auto", streams: Optional[Sequence[str]] = None, expect_arch: Optional[str] = None,
                   config_path: Optional[str] = None, data_root: Optional[str] = None,
                   train_split: Optional[str] = None, test_split: Optional[str] = None,
                   workers: Optional[int] = None) -> FinetuneStart:
    """Where `goca-eval finetune` starts: its run directory (--out, else <pretraining run>/eval/finetune) resumed
    from its own checkpoint unless `fresh`, else a new run from the pretrained checkpoint `source`."""
    from goca_fast.eval.finetune import FinetuneStart, find_resume
    from goca_fast.eval.loading import default_output_dir
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
        loaded, cfg = load_eval_model(source, device="cpu", streams=streams, expect_arch=expect_arch,
                                      config_path=config_path)
    setup = setup_from_config(cfg, loaded, info.device, data_root=data_root, train_split=train_split,
                              test_split=test_split, workers=workers)
    return FinetuneStart(info=info, setup=setup, run_dir=run_dir, resume=resume)
