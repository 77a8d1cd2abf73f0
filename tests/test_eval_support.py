"""Shared fixtures of the evaluation tests (no tests here): a tiny motion dataset and a tiny 'pretrained' run.

Built once per test session (functools.cache) in a temporary folder removed at exit: 4 classes × 4 videos of
16 frames at 32×40 (3 train + 1 test video per class), and a run directory holding a checkpoint of the tiny
two-stream network with random weights plus config.yaml, exactly as pretraining lays them out.
"""
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from goca_fast.checkpoint import latest_path, save_checkpoint
from goca_fast.config import Config, config_to_yaml, load_config
from goca_fast.data.synthetic import make_synthetic_dataset
from goca_fast.builders import build_model

TINY = ["model.arch=tiny", "model.pool=global", "model.hidden_dim=32", "model.embed_dim=16",
        "model.num_prototypes=8", "data.crop_size=24", "data.scale_range=[32,32]", "data.frames_per_group=[8,4]",
        "data.clips_per_group=[2,2]", "data.stride=1", "data.min_distance=2", "eval.clips=2", "eval.crops=1",
        "eval.batch_size=4", "data.workers=0", "name=tiny"]


@functools.cache
def base_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="goca_eval_tests_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.cache
def tiny_dataset() -> Path:
    root = base_dir() / "ds"
    make_synthetic_dataset(root, num_classes=4, videos_per_class=4, frames=16, height=32, width=40, workers=1)
    return root


def tiny_config(root: Path, *extra: str) -> Config:
    return load_config(None, [*TINY, f"data.root={root}", *extra])


def make_run(run_dir: Path, *extra: str, seed: int = 0, epoch: int = 3) -> Path:
    """A run directory with checkpoints/latest.pth of a randomly initialised tiny model (and config.yaml)."""
    cfg = tiny_config(tiny_dataset(), *extra)
    torch.manual_seed(seed)
    model = build_model(cfg)
    save_checkpoint(latest_path(run_dir), {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": epoch})
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return run_dir


@functools.cache
def tiny_run() -> Path:
    return make_run(base_dir() / "run")


def copy_dataset(dst: Path) -> Path:
    """A private copy of the tiny dataset a test may damage."""
    shutil.copytree(tiny_dataset(), dst)
    return dst


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a busy 2-core runner OpenMP spinning makes
    them ~50× slower; restored afterwards so other test modules are unaffected. Import it into a test module to
    apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
