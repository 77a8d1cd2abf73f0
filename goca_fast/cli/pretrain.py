"""`python -m goca_fast.cli.pretrain [--config FILE] [key.sub=value ...]` — GOCA pretraining.

With no arguments it runs the CPU demo (configs/demo.yaml): it generates a small procedural motion dataset, pretrains
both streams, then compares kNN retrieval of held-out videos against the same network at random initialisation.
Under torchrun or SLURM (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS) it trains data-parallel; a run directory with
a checkpoint is resumed automatically; SIGTERM/SIGUSR1 write a checkpoint and exit cleanly (exit code 0), so a
requeued job continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from goca_fast.config import Config, ConfigError, config_to_yaml, load_config, resolve_config
from goca_fast.data.index import DatasetIndexError
from goca_fast.eval.retrieval import DEFAULT_KS, format_table
from goca_fast.plan.loaders import train_loader
from goca_fast.plan.run import build_model, build_monitor, build_trainer, knn_recall, plan_run
from goca_fast.runtime.distributed import (DistInfo, barrier, cleanup, env_rank_info, init_distributed,
                                           is_collective_failure, is_elastic_restart)
from goca_fast.runtime.stop_signals import RunStopped
from goca_fast.train.engine import NothingTrained
from goca_fast.train.run_dir import StopRequested

log = logging.getLogger("goca_fast")


def parse_args(argv: Optional[Sequence[str]]) -> tuple[Config, bool, bool]:
    """(config, fresh, print_config)."""
    p = argparse.ArgumentParser(prog="goca-pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo",
                   help="YAML file, or the name of a shipped config: demo (the CPU demo, the default), "
                        "ucf101_r2plus1d, k400_r2plus1d, ucf101_s3d_official")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in the run directory")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, overrides applied) as YAML and exit")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. data.batch_size=16")
    a = p.parse_args(argv)
    return load_config(resolve_config(a.config), a.overrides), a.fresh, a.print_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: Config, info: DistInfo, run_dir: Path) -> None:
    """Writes the run directory with its config.yaml; called only once every start-up check has passed, so a failed
    start leaves nothing behind."""
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
        except OSError as e:
            raise ConfigError(f"output_dir={cfg.output_dir}: cannot write the run directory {run_dir} "
                              f"({e.strerror or e})") from None
    barrier(info)


def run(cfg: Config, fresh: bool = False) -> dict:
    """Pretrain (resuming the run directory unless `fresh`), then evaluate. Raises RunStopped after a stop signal or
    Ctrl-C (checkpoint written), NothingTrained when an epoch made no optimiser step."""
    info = init_distributed(cfg.engine.device, cfg.engine.dist_timeout_s)
    if cfg.engine.torch_threads > 0:
        torch.set_num_threads(cfg.engine.torch_threads)
    seed_everything(cfg.seed + info.rank)
    plan = plan_run(cfg, info)
    loader = train_loader(plan)

    # the random-init reference is built from the same seed as the trained network's initial weights
    seed_everything(cfg.seed)
    run_dir = plan.run_dir
    trainer = build_trainer(plan, loader)
    init_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    seed_everything(cfg.seed + info.rank)
    prepare_run_dir(cfg, info, run_dir)
    if not fresh or is_elastic_restart():  # --fresh is for the job's first attempt, not for torchrun's restarts
        trainer.resume()
    trainer.install_signal_handlers()
    if plan.monitor is not None and info.is_main:
        trainer.monitor = build_monitor(plan, trainer.model.streams)
    t0 = time.time()
    try:
        summary = trainer.fit()
    except StopRequested:
        cleanup(info)
        raise RunStopped(trainer.signals, str(run_dir / "checkpoints")) from None
    finally:
        trainer.signals.restore()
    train_seconds = time.time() - t0
    # every rank is done: leave the process group before rank 0 evaluates alone, or the others would wait on a
    # collective for the whole evaluation and give up after engine.dist_timeout_s
    barrier(info)
    cleanup(info)
    result = {"run_dir": str(run_dir), "train_seconds": round(train_seconds, 1), "last_epoch": summary}
    if cfg.eval.knn_after_training and info.is_main:
        rows = {"GOCA": knn_recall(trainer.model, plan)}
        if cfg.eval.compare_random_init:
            ref = build_model(plan).to(info.device)
            ref.load_state_dict(init_state)
            rows["random init"] = knn_recall(ref, plan)
        ks = DEFAULT_KS
        table = format_table(rows, ks)
        result["knn"] = {m: {s: {str(k): v for k, v in r.items()} for s, r in per.items()} for m, per in rows.items()}
        (run_dir / "knn.json").write_text(json.dumps(result, indent=2))
        print(f"\nkNN retrieval, {cfg.data.test_split} → {cfg.data.train_split} (R@k, %):\n{table}\n")
    if info.is_main:
        print(f"run directory: {run_dir}\n  checkpoints: {run_dir / 'checkpoints'}\n"
              f"  TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}\n"
              f"  per-epoch metrics: {run_dir / 'metrics.jsonl'}", flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 trained (or stopped by SIGTERM/SIGUSR1 with a checkpoint, to be resumed), 130 stopped by Ctrl-C
    with a checkpoint, 2 a config or data problem found before training (one line), 1 nothing trained or another
    rank lost (it died, or a collective waited longer than engine.dist_timeout_s)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg, fresh, print_only = parse_args(argv)
        if print_only:
            print(config_to_yaml(cfg), end="")
            return 0
        run(cfg, fresh)
    except RunStopped as e:
        print(e, flush=True)
        return e.exit_code
    except ConfigError as e:  # EvalError too: e.g. a gallery that shares videos with the queries
        print(f"goca-pretrain: config error: {e}", file=sys.stderr)
        return 2
    except DatasetIndexError as e:
        print(f"goca-pretrain: data error: {e}", file=sys.stderr)
        return 2
    except NothingTrained as e:
        print(f"goca-pretrain: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"goca-pretrain: error: rank {env_rank_info()[0]} lost another rank (it died, or did not answer within "
              f"engine.dist_timeout_s={cfg.engine.dist_timeout_s:g}); the last checkpoint is kept, run the same "
              f"command again to resume ({detail})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
