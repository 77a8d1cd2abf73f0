"""The wiring layer: the one place besides the entry points that reads the whole `Config`.

It turns a config into the plain objects and specs the rest of the package takes (the model, the dataset root, ...),
so that data, model, engine and eval code never see the config and never reach back up to an entry point.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

from goca_fast.config import Config, ConfigError
from goca_fast.distributed import DistInfo, barrier
from goca_fast.models import GocaModel, load_prototypes

log = logging.getLogger("goca_fast")


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
    return GocaModel(m.arch, cfg.data.modalities, m.pool, m.hidden_dim, m.embed_dim, m.num_prototypes,
                     m.shared_head, flow_channels=3 if cfg.data.flow_mode == "official" else 2, merge=cfg.goca.merge,
                     prototypes_init=init)


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
        make_synthetic_dataset(root, syn.num_classes, syn.videos_per_class, syn.frames, syn.height, syn.width,
                               syn.fps, syn.seed, syn.test_fraction, with_flow=cfg.data.modalities != "rgb",
                               pan_speed=syn.pan_speed)
        log.info("synthetic dataset ready at %s (%.1fs)", root, time.time() - t0)
    barrier(info)
    return root
