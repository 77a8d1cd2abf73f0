"""Plots are valid PNGs of the expected size (and reach TensorBoard); feature export round-trips."""
import json

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from goca_fast.cli.eval import main as cli_main
from goca_fast.eval.plots import (draw_curves, draw_embedding, draw_retrieval_grid, grid_size_px, png_size,
                                  read_scalars, run_plots)
from helpers import make_run, one_torch_thread, run_eval, tiny_run  # noqa: F401 (autouse fixture)

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
    out = run_eval(run_plots, run, num_queries=3, workers=0)
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


def test_export_lists_each_written_file_once(tmp_path, capsys):
    argv = ["export", str(tiny_run()), "--out", str(tmp_path), "--split", "test", "--split", "test", "--views",
            "--device", "cpu", "--workers", "0"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("test: 4 of 4 videos exported") == 1          # a split named twice is exported once
    names = out.strip().splitlines()[-1].split(": ", 1)[1].split(", ")
    assert sorted(names) == sorted(["test_rgb.npy", "test_rgb_views.npy", "test_flow.npy", "test_flow_views.npy",
                                    "test_meta.json"])


def _blue_pixels(path):
    from PIL import Image
    with Image.open(path) as im:
        px = np.asarray(im.convert("RGB")).astype(int)
    c0 = np.array([31, 119, 180])                                    # matplotlib's first line colour
    return int((np.abs(px - c0).sum(-1) < 60).sum())


def test_a_one_epoch_curve_is_drawn_as_a_point(tmp_path):
    one = draw_curves({"train/loss": [(1, 2.0)]}, tmp_path / "one.png", size_px=(380, 300))
    assert _blue_pixels(one) > 10                                    # a marker, not empty axes
    many = draw_curves({"train/loss": [(s, 1.0 / s) for s in range(1, 50)]}, tmp_path / "many.png",
                       size_px=(380, 300))
    assert _blue_pixels(many) > 10


def test_plots_output_has_no_tensorboard_info_lines(tmp_path, capsys, caplog):
    run = make_run(tmp_path / "run")
    w = SummaryWriter(str(run / "tensorboard"))
    w.add_scalar("train/loss", 1.0, 1)
    w.close()
    with caplog.at_level("INFO"):
        assert cli_main(["plots", str(run), "--what", "curves", "--device", "cpu", "--no-tensorboard"]) == 0
    assert not [r for r in caplog.records if r.name.startswith("tensorboard")], caplog.text
    assert capsys.readouterr().out.startswith("plots written:")
    import logging
    assert logging.getLogger("tensorboard").level == logging.NOTSET   # the level is restored afterwards


def test_export_and_plots_refuse_the_options_they_do_not_use(capsys):
    for argv in (["export", "--arch", "tiny"], ["export", "--train-split", "train"], ["export", "--test-split", "test"],
                 ["plots", "--arch", "tiny"], ["plots", "--streams", "rgb"], ["plots", "--train-split", "train"]):
        with pytest.raises(SystemExit) as e:
            cli_main([argv[0], str(tiny_run()), *argv[1:]])
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err, argv
