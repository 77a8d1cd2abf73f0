"""Plots are valid PNGs of the expected size (and reach TensorBoard); feature export round-trips."""
import json

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from goca_fast.eval.cli import main as cli_main
from goca_fast.eval.plots import (draw_curves, draw_embedding, draw_retrieval_grid, grid_size_px, png_size,
                                  read_scalars, run_plots)
from test_eval_support import make_run, one_torch_thread, tiny_run  # noqa: F401 (autouse fixture)

pytest.importorskip("matplotlib")


def _valid_png(path, size):
    from PIL import Image
    with Image.open(path) as im:
        im.verify()                 # full structural check (CRCs, chunks)
    assert png_size(path) == size


def test_drawn_plots_have_exact_sizes(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (32, 40, 3), dtype=np.uint8) for _ in range(3)]
    p = draw_retrieval_grid(frames[:2], ["a", "b"], [frames[:3], frames[:3]], [["a 0.9", "b 0.8", "a 0.7"]] * 2,
                            [[True, False, True], [False, False, True]], tmp_path / "grid.png", "t")
    _valid_png(p, grid_size_px(2, 4))
    p = draw_embedding(rng.normal(size=(30, 2)), [i % 4 for i in range(30)], list("abcd"), tmp_path / "emb.png",
                       size_px=(640, 480))
    _valid_png(p, (640, 480))
    p = draw_curves({"train/loss": [(1, 2.0), (2, 1.5)], "train/lr": [(1, 0.1), (2, 0.2)]}, tmp_path / "c.png",
                    size_px=(700, 300))
    _valid_png(p, (700, 300))
    with pytest.raises(ValueError):
        png_size(__file__)


def test_plots_command_on_a_run(tmp_path):
    run = make_run(tmp_path / "run")
    w = SummaryWriter(str(run / "tensorboard"))
    for step in range(1, 6):
        w.add_scalar("train/loss", 5.0 / step, step)
        w.add_scalar("monitor/knn_r1_both", 10.0 * step, step)
    w.close()
    assert [v for _, v in read_scalars(run)["monitor/knn_r1_both"]] == [10, 20, 30, 40, 50]
    out = run_plots(str(run), num_queries=3, device="cpu", workers=0, quiet=True)
    assert set(out) == {"retrieval_grid", "embedding_pca", "training_curves"}
    _valid_png(out["retrieval_grid"], grid_size_px(3, 6))   # 3 queries × (query + top-5)
    _valid_png(out["embedding_pca"], (900, 700))
    _valid_png(out["training_curves"], (760, 300))
    assert all(p.parent == run / "eval" / "plots" for p in out.values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard" / "eval"))
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"eval/retrieval_grid", "eval/embedding_pca", "eval/training_curves"}


def test_export_npy_and_pt(tmp_path):
    assert cli_main(["export", str(tiny_run()), "--out", str(tmp_path / "npy"), "--views", "--split", "test"]) == 0
    meta = json.loads((tmp_path / "npy" / "test_meta.json").read_text())
    x = np.load(tmp_path / "npy" / "test_rgb.npy")
    v = np.load(tmp_path / "npy" / "test_flow_views.npy")
    assert x.shape == (4, 128) and x.dtype == np.float32 and v.shape == (4, 2, 128)
    assert len(meta["ids"]) == 4 and meta["labels"] == sorted(meta["labels"]) and meta["counts"]["evaluated"] == 4
    assert cli_main(["export", str(tiny_run()), "--out", str(tmp_path / "pt"), "--format", "pt"]) == 0
    obj = torch.load(tmp_path / "pt" / "train.pt", weights_only=True)
    assert obj["features"]["flow"].shape == (12, 128) and len(obj["ids"]) == 12 and obj["views"] is None
    test = torch.load(tmp_path / "pt" / "test.pt", weights_only=True)
    assert np.allclose(test["features"]["rgb"].numpy(), x)   # same features whatever the format
