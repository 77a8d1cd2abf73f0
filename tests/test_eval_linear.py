"""Linear probe: the official RegLog, ~100% on separable synthetic features, both feeding paths end to end."""
import json

import pytest
import torch

from goca_fast.eval.linear import (ProbeSettings, RegLog, fuse_probabilities, predict_views, run_linear, topk_accuracy,
                                   train_probe)
from goca_fast.eval.finetune import finetune_augment
from goca_fast.eval.finetune_recipe import FinetuneSettings
from goca_fast.eval.linear import probe_augment
from goca_fast.plan.evaluation import CheckpointRequest, eval_setup
from helpers import cached_features, make_run, one_torch_thread, run_eval, tiny_run  # noqa: F401 (autouse fixture)


def test_reglog_matches_the_official_layout():
    torch.manual_seed(0)
    p = RegLog(2048, 101, l2norm=True, dropout=0.5)
    assert p.bn.momentum == 0.1 and torch.all(p.bn.weight == 1) and torch.all(p.bn.bias == 0)
    assert torch.all(p.linear.bias == 0) and abs(float(p.linear.weight.detach().std()) - 0.01) < 1e-3
    x = torch.randn(4, 2048) * 50
    p.eval()
    assert torch.allclose(p(x), p(x * 3), atol=1e-5)  # L2 norm first: the scale of the features does not matter


def test_probe_reaches_100_percent_on_separable_features():
    g = torch.Generator().manual_seed(0)
    classes, dim, per_class, views = 10, 64, 30, 3
    centres = torch.randn(classes, dim, generator=g) * 3
    def sample(n):
        y = torch.arange(classes).repeat_interleave(n)
        x = centres[y][:, None, :] + torch.randn(len(y), views, dim, generator=g)  # N×V×F, small noise
        return x * 0.01 + 0.05, y  # small, offset features like pooled ReLU outputs: BN must handle the scale
    xtr, ytr = sample(per_class)
    xte, yte = sample(10)
    s = ProbeSettings(epochs=12, milestones=(8, 10), batch_size=64)
    probe = train_probe(xtr.flatten(0, 1), ytr.repeat_interleave(views), classes, s)
    acc = topk_accuracy(predict_views(probe, xte), yte)
    assert acc[1] >= 99.0 and acc[5] == 100.0
    # deterministic given the seed
    probe2 = train_probe(xtr.flatten(0, 1), ytr.repeat_interleave(views), classes, s)
    assert torch.equal(probe.linear.weight, probe2.linear.weight)


@pytest.mark.parametrize("augment", [False, True])
def test_linear_cli_paths(tmp_path, augment):
    res = run_eval(run_linear, tiny_run(), settings=ProbeSettings(epochs=3, milestones=(2,)), augment=augment,
                   train_clips=2, train_crops=1, test_clips=2, test_crops=3, out_dir=str(tmp_path), workers=0)
    out = json.loads((tmp_path / "linear.json").read_text())
    assert set(out["accuracy"]) == {"rgb", "flow", "both"}
    # the reported accuracy is what the saved probes give on the cached test views, recomputed here
    meta, _, views = cached_features(tmp_path / "features", "test")
    labels, probes, probs = torch.tensor(meta["labels"]), torch.load(tmp_path / "linear_probe.pth"), {}
    for s in ("rgb", "flow"):
        probe = RegLog(views[s].shape[-1], 4)
        probe.load_state_dict(probes[s])
        probs[s] = predict_views(probe, torch.from_numpy(views[s]))
    want = {s: topk_accuracy(p, labels) for s, p in probs.items()}
    want["both"] = topk_accuracy(fuse_probabilities(probs), labels)
    assert out["accuracy"] == {s: {f"top{k}": v for k, v in a.items()} for s, a in want.items()}
    assert out["test"]["evaluated"] == 4 and out["train"]["evaluated"] == 12
    assert "2 clips × 3 crops" in out["protocol"]["test"] and out["protocol"]["augment"] is augment
    assert (tmp_path / "linear_probe.pth").is_file()
    assert "top-1" in res.table()


def test_linear_command_line(tmp_path, capsys):
    from goca_fast.cli.eval import main
    assert main(["linear", str(tiny_run()), "--epochs", "2", "--train-clips", "1", "--train-crops", "1",
                 "--test-clips", "1", "--test-crops", "1", "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert "top-1" in capsys.readouterr().out
    out = json.loads((tmp_path / "linear.json").read_text())
    assert out["protocol"]["settings"]["epochs"] == 2 and out["protocol"]["settings"]["lr"] == 0.1


def test_short_run_warns_once_about_unreached_milestones_and_counts_are_singular(tmp_path, capsys, caplog):
    from goca_fast.cli.eval import main
    argv = ["linear", str(tiny_run()), "--epochs", "1", "--train-clips", "1", "--train-crops", "1",
            "--test-clips", "1", "--test-crops", "1", "--out", str(tmp_path), "--device", "cpu", "--workers", "0"]
    with caplog.at_level("WARNING", logger="goca_fast.eval"):
        assert main(argv) == 0
    warned = [r.getMessage() for r in caplog.records if "milestones" in r.getMessage()]
    assert warned == ["linear probe: --milestones 60,80 not below --epochs 1: the LR never drops there "
                      "(pass smaller --milestones for a short run)"]
    out = capsys.readouterr().out
    assert "cached features, 1 epoch, lr" in out and "1 epochs" not in out
    protocol = json.loads((tmp_path / "linear.json").read_text())["protocol"]
    assert protocol["test"].startswith("1 clip × 1 crop of ") and "1 crops" not in protocol["train"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="goca_fast.eval"):   # milestones inside the run: no warning
        assert main(argv[:3] + ["2", "--milestones", "1"] + argv[4:]) == 0
    assert not [r for r in caplog.records if "milestones" in r.getMessage()]


def test_plural():
    from goca_fast.data.views import plural
    assert [plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert plural(1, "query video") == "1 query video" and plural(3, "query video") == "3 query videos"


@pytest.mark.parametrize("hflip_p", [0.0, 0.5])
def test_augmented_probe_and_fine_tuning_flip_as_pretraining_did(tmp_path, hflip_p):
    """A run pretrained without flips (mirror classes: a mirrored pan-left is a pan-right) is probed and fine-tuned
    without flips; one pretrained with flips keeps its rate. Counted over 400 draws of the real augmentation."""
    setup = eval_setup(CheckpointRequest(str(make_run(tmp_path / "run", f"data.hflip_p={hflip_p}"))), device="cpu")
    g = torch.Generator().manual_seed(0)
    for aug in (probe_augment(setup, setup.views), finetune_augment(setup, FinetuneSettings())):
        flips = sum(aug.draw(32, 40, g).flip for _ in range(400))
        assert (flips == 0) if hflip_p == 0 else (160 <= flips <= 240), flips
