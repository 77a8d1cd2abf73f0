"""The run configuration's sections as typed dataclasses, and the cross-field checks types alone cannot express.

Every mistake a user can make in a config (unknown key, wrong type, value out of range) is reported as one
`ConfigError` line naming the key, with a close-match suggestion for typos (the typed conversion:
`goca_fast.config.typed_yaml`); `pretrain` turns it into exit code 2.
"""
from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from goca_fast.config.typed_yaml import ConfigError, build

log = logging.getLogger("goca_fast")


@dataclass
class SyntheticConfig:
    """Procedural motion dataset generated when `data.root` is empty (the CPU demo)."""
    num_classes: int = 8
    videos_per_class: int = 24
    frames: int = 40
    height: int = 64
    width: int = 80
    fps: int = 25
    test_fraction: float = 0.25
    seed: int = 0
    pan_speed: float = 1.0              # max nuisance camera-pan speed (px/frame); 0 = none


@dataclass
class DataConfig:
    loader: Literal["auto", "cpu", "dali"] = "auto"
    root: str = ""                      # prepared dataset (index.jsonl); "" = synthetic dataset in cache_dir
    cache_dir: str = "~/.cache/goca_fast"
    train_split: str = "train"
    test_split: str = "test"
    modalities: Literal["rgb_flow", "rgb", "flow"] = "rgb_flow"
    clips_per_group: list[int] = field(default_factory=lambda: [2, 4])
    frames_per_group: list[int] = field(default_factory=lambda: [16, 8])
    stride: int = 2
    min_distance: int = 16
    crop_size: int = 112
    scale_range: list[int] = field(default_factory=lambda: [128, 160])
    hflip_p: float = 0.5                # 0 where a mirror changes the class (left/right motion, Something-Something)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0                 # the official code builds a blur but never applies it
    time_reverse_p: float = 0.0
    flow_mode: Literal["shared", "official"] = "shared"
    batch_size: int = 8                 # per process
    workers: int = 4
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    arch: Literal["r2plus1d_18", "r3d_18", "s3d", "tiny"] = "r2plus1d_18"
    pool: Literal["1x2x2", "global"] = "1x2x2"
    hidden_dim: int = 2048
    embed_dim: int = 128
    num_prototypes: int = 1000
    shared_head: bool = False
    head: Literal["mlp", "linear"] = "mlp"  # mlp: the official 3-linear MLP; linear: one linear projection
    prototypes_path: str = ""           # .npy K×D; loaded and frozen when set
    prototype_reg_weight: float = 0.0   # mean max (1+cos) separation penalty; 0 = off
    channels_last: bool = False
    sync_bn: bool = True                # only under DDP


@dataclass
class GocaConfig:
    merge: Literal["prior", "mix", "avg"] = "prior"
    epsilon: float = 0.05
    prior_epsilon: float = 0.01
    iterations: int = 3
    cycles: Literal[1, 2] = 1
    prior_sign: Literal["kl", "official"] = "kl"
    prior_to: Literal["both", "rgb"] = "both"   # both: each stream guided by the other (official); rgb: flow alone
    prior_start_epoch: int = 0
    assign_clips: list[int] = field(default_factory=lambda: [0, 1])
    temperature: float = 0.1
    queue_length: int = 0               # global; 0 = no queue
    queue_start_epoch: int = 10
    official_loss_scale: bool = False   # the official code divides by |assign_clips| twice
    backend: Literal["auto", "torch", "cuda"] = "auto"


@dataclass
class OptimConfig:
    epochs: int = 200
    base_lr: float = 0.15               # × sqrt(global batch)
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    final_lr: float = 0.0048
    start_warmup: float = 0.3
    warmup_epochs: int = 10
    fix_lr: bool = False
    momentum: float = 0.9
    weight_decay: float = 1e-4
    larc: bool = True
    larc_trust: float = 0.001
    larc_clip: bool = False
    exclude_bn_bias: bool = False       # official: LARC and wd on every parameter
    use_apex: bool = False
    freeze_prototypes_epochs: int = 1
    freeze_prototypes_iters: int = 0


@dataclass
class EngineConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    max_bad_steps: int = 20             # consecutive non-finite losses before aborting
    checkpoint_minutes: float = 30.0    # also write `latest` mid-epoch this often (0 = only at epoch ends)
    checkpoint_every_iters: int = 0     # also write `latest` every N iterations (0 = off)
    snapshot_every_epochs: int = 10
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True               # tqdm bar on a terminal; without one (a log file) one line per epoch
    max_iters_per_epoch: int = 0        # 0 = full epoch (smoke tests cut epochs short)
    torch_threads: int = 0              # 0 = leave torch's default
    dist_timeout_s: float = 300.0       # multi-rank: a collective waiting longer (a dead or hung rank) ends the job


@dataclass
class EvalConfig:
    knn_after_training: bool = True
    clips: int = 5
    crops: int = 3
    clip_length: int = 0                # 0 = the longest pretraining clip
    batch_size: int = 8
    compare_random_init: bool = True
    monitor_every: int = 0              # online kNN monitor every N epochs during pretraining (0 = off)
    monitor_videos: int = 256           # class-balanced videos per split in the monitor's subsets (0 = all)
    monitor_clip_length: int = 0        # frames per monitor clip (0 = the shortest pretraining clip: cheapest)
    monitor_val_split: str = ""         # monitor queries ("" = data.test_split); the gallery is data.train_split


@dataclass
class Config:
    name: str = "goca"
    output_dir: str = "runs"
    seed: int = 31
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    goca: GocaConfig = field(default_factory=GocaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def clip_lengths(self) -> list[int]:
        """Flat per-clip frame counts in batch order, e.g. [16, 16, 8, 8, 8, 8]."""
        return [t for n, t in zip(self.data.clips_per_group, self.data.frames_per_group) for _ in range(n)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express."""
    d, m, g, o = cfg.data, cfg.model, cfg.goca, cfg.optim

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(len(d.clips_per_group) == len(d.frames_per_group) and len(d.clips_per_group) > 0,
         "data.clips_per_group and data.frames_per_group must be non-empty lists of the same length")
    need(all(n > 0 for n in d.clips_per_group), "data.clips_per_group: every group needs at least one clip")
    need(all(t > 0 for t in d.frames_per_group), "data.frames_per_group: every clip needs at least one frame")
    n_clips = sum(d.clips_per_group)
    need(n_clips >= 2, "data.clips_per_group: swapped prediction needs at least 2 clips per video")
    need(len(g.assign_clips) > 0 and all(0 <= i < n_clips for i in g.assign_clips),
         f"goca.assign_clips: indices must lie in [0, {n_clips}) (the number of clips per video)")
    need(len(set(g.assign_clips)) == len(g.assign_clips), "goca.assign_clips: indices must be distinct")
    need(d.stride >= 1, "data.stride must be >= 1")
    need(d.min_distance >= 0, "data.min_distance must be >= 0")
    need(len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1],
         "data.scale_range must be [min_short_side, max_short_side] with 0 < min <= max")
    need(d.crop_size > 0 and d.crop_size <= d.scale_range[0],
         f"data.crop_size ({d.crop_size}) must be positive and <= data.scale_range[0] ({d.scale_range[0]})")
    for name in ("hflip_p", "color_jitter_p", "grayscale_p", "blur_p", "time_reverse_p"):
        p = getattr(d, name)
        need(0.0 <= p <= 1.0, f"data.{name} must be a probability in [0, 1], got {p}")
    need(d.batch_size >= 1, "data.batch_size must be >= 1")
    need(d.workers >= 0, "data.workers must be >= 0")
    need(g.merge == "prior" or d.modalities == "rgb_flow" or g.merge == "avg",
         "goca.merge 'mix' needs data.modalities=rgb_flow")
    need(not (g.merge == "avg" and d.modalities != "rgb_flow"), "goca.merge 'avg' needs data.modalities=rgb_flow")
    need(g.epsilon > 0, f"goca.epsilon must be > 0, got {g.epsilon}")
    need(g.prior_epsilon >= 0, f"goca.prior_epsilon must be >= 0, got {g.prior_epsilon}")
    need(g.iterations >= 1, "goca.iterations must be >= 1")
    need(not (g.prior_to == "rgb" and g.cycles == 2),
         "goca.prior_to=rgb has one guided pass (flow is clustered alone): goca.cycles=2 would repeat it; use 1")
    need(g.temperature > 0, "goca.temperature must be > 0")
    need(g.queue_length >= 0, "goca.queue_length must be >= 0")
    need(m.num_prototypes >= 2, "model.num_prototypes must be >= 2")
    need(m.embed_dim >= 2 and m.hidden_dim >= 1, "model.embed_dim must be >= 2 and model.hidden_dim >= 1")
    need(o.epochs >= 1, "optim.epochs must be >= 1")
    need(0 <= o.warmup_epochs <= o.epochs, "optim.warmup_epochs must lie in [0, optim.epochs]")
    need(o.base_lr > 0 and o.final_lr >= 0 and o.start_warmup >= 0, "optim: learning rates must be positive")
    need(cfg.engine.max_bad_steps >= 1, "engine.max_bad_steps must be >= 1")
    need(cfg.engine.dist_timeout_s > 0, f"engine.dist_timeout_s must be > 0 seconds, got {cfg.engine.dist_timeout_s}")
    need(cfg.eval.clips >= 1 and cfg.eval.crops in (1, 3), "eval.clips must be >= 1 and eval.crops 1 or 3")
    need(cfg.eval.monitor_every >= 0 and cfg.eval.monitor_videos >= 0 and cfg.eval.monitor_clip_length >= 0,
         "eval.monitor_every, eval.monitor_videos and eval.monitor_clip_length must be >= 0")
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """A validated Config from the plain dict a checkpoint stores. Keys this version does not know are dropped with
    a warning (a checkpoint from a newer goca_fast stays usable); missing keys take their defaults."""
    def known(cls: type, vals: dict[str, Any], prefix: str) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        out = {}
        for k, v in vals.items():
            if k not in names:
                log.warning("checkpoint config key '%s%s' is unknown to this version; ignored", prefix, k)
                continue
            tp = hints[k]
            out[k] = known(tp, v, f"{prefix}{k}.") if dataclasses.is_dataclass(tp) and isinstance(v, dict) else v
        return out

    if not isinstance(values, dict):
        raise ConfigError(f"checkpoint config is a {type(values).__name__}, expected a mapping")
    return validate(build(Config, known(Config, values, "")))
