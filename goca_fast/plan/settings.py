"""One config section -> the plain settings object of the stage that uses it. Pure: no I/O, no process group."""
from __future__ import annotations

from goca_fast.config import Config, DataConfig
from goca_fast.data.augment import ClipAugment
from goca_fast.data.synthetic import SyntheticSpec
from goca_fast.data.views import ViewSpec
from goca_fast.eval.monitor import MonitorSettings
from goca_fast.method.objective import GocaObjective
from goca_fast.models import ModelSpec
from goca_fast.train.engine import LoopSettings
from goca_fast.train.optim import OptimSettings


def model_spec(cfg: Config) -> ModelSpec:
    """`model.*`, with the input the data section feeds it (streams, flow channels) and the merge mode."""
    m = cfg.model
    return ModelSpec(m.arch, modalities=cfg.data.modalities, pool=m.pool, hidden_dim=m.hidden_dim,
                     embed_dim=m.embed_dim, num_prototypes=m.num_prototypes, shared_head=m.shared_head,
                     flow_channels=3 if cfg.data.flow_mode == "official" else 2, merge=cfg.goca.merge, head=m.head)


def objective(cfg: Config, *, backend: str, group=None) -> GocaObjective:
    """`goca.*` on an assignment backend already decided for the whole process group."""
    g = cfg.goca
    return GocaObjective(merge=g.merge, num_clips=sum(cfg.data.clips_per_group), assign_clips=g.assign_clips,
                         epsilon=g.epsilon, prior_epsilon=g.prior_epsilon, iterations=g.iterations, cycles=g.cycles,
                         prior_sign=g.prior_sign, prior_to=g.prior_to, prior_start_epoch=g.prior_start_epoch,
                         temperature=g.temperature, official_loss_scale=g.official_loss_scale, backend=backend,
                         group=group)


def train_augment(data: DataConfig) -> ClipAugment:
    """The training augmentation of `data.*` (one builder for both loaders)."""
    return ClipAugment(crop_size=data.crop_size, scale_range=tuple(data.scale_range), hflip_prob=data.hflip_p,
                       jitter_prob=data.color_jitter_p, grayscale_prob=data.grayscale_p, blur_prob=data.blur_p,
                       time_reverse_prob=data.time_reverse_p, flow_mode=data.flow_mode)


def synthetic_spec(cfg: Config) -> SyntheticSpec:
    """`data.synthetic.*`: the demo's procedural dataset."""
    return SyntheticSpec(**vars(cfg.data.synthetic))


def loop_settings(cfg: Config) -> LoopSettings:
    """The training loop: `engine.*`, epochs and prototype freezing from `optim.*`, `model.*` and the queue."""
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


def eval_views(cfg: Config) -> ViewSpec:
    """The evaluation protocol: eval.clips × eval.crops of the longest pretraining clip."""
    return ViewSpec(clip_length=cfg.eval.clip_length or max(cfg.data.frames_per_group), stride=cfg.data.stride,
                    num_clips=cfg.eval.clips, crops=cfg.eval.crops, crop_size=cfg.data.crop_size,
                    short_side=cfg.data.scale_range[0], flow_mode=cfg.data.flow_mode)


def monitor_settings(cfg: Config) -> MonitorSettings:
    """The online kNN monitor of `eval.monitor_*`: a class-balanced subset of the val split (default the test
    split) against one of the train split."""
    e, d = cfg.eval, cfg.data
    return MonitorSettings(train_split=d.train_split, val_split=e.monitor_val_split or d.test_split,
                           subset_size=e.monitor_videos, every=e.monitor_every, workers=d.workers, seed=cfg.seed)
