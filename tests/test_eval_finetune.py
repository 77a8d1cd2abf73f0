"""Fine-tuning a tiny two-stream model for a few steps: results, checkpoints, resume equal to an uninterrupted run."""
import json
import signal

import pytest
import torch

from goca_fast.plan.evaluation import CheckpointRequest, EvalOverrides, finetune_start, load_eval_model
from goca_fast.eval import EvalError
from goca_fast.eval.finetune import Finetuner
from goca_fast.eval.finetune_recipe import FinetuneSettings
from goca_fast.runtime.stop_signals import RunStopped
from helpers import finetune, one_torch_thread, tiny_run  # noqa: F401 (autouse fixture)


def settings(epochs: int) -> FinetuneSettings:
    return FinetuneSettings(epochs=epochs, batch_size=4, warmup_epochs=1, lr=0.05, max_iters_per_epoch=2,
                            test_clips=2, test_crops=1, eval_every=1)


def test_finetune_resume_continues_and_equals_uninterrupted(tmp_path, monkeypatch):
    full = finetune(tiny_run(), tmp_path / "full", settings(2))
    part = finetune(tiny_run(), tmp_path / "part", settings(1))
    assert [h["epoch"] for h in part.history] == [1]
    resumed = finetune(tiny_run(), tmp_path / "part", settings(2))
    assert [h["epoch"] for h in resumed.history] == [1, 2]            # continued from the saved epoch
    a = torch.load(tmp_path / "full" / "checkpoints" / "latest.pth", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "latest.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed.accuracy == full.accuracy
    out = json.loads((tmp_path / "part" / "finetune.json").read_text())
    assert set(out["accuracy"]) == {"rgb", "flow", "both"} and out["test"]["evaluated"] == 4
    assert "late-fused" in out["protocol"]["test"]
    assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 2
    # stopped by a signal in the middle of epoch 2, then resumed: still the same weights as the uninterrupted run
    orig, calls = Finetuner._train_step, []

    def step_then_signal(self, net, batch):
        calls.append(1)
        if len(calls) == 3:
            self.run.signals.signum = signal.SIGTERM
        return orig(self, net, batch)
    monkeypatch.setattr(Finetuner, "_train_step", step_then_signal)
    with pytest.raises(RunStopped) as stopped:
        finetune(tiny_run(), tmp_path / "sig", settings(2))
    assert stopped.value.exit_code == 0 and "Run the same command again to resume" in str(stopped.value)
    c = torch.load(tmp_path / "sig" / "checkpoints" / "latest.pth", weights_only=True)
    assert (c["epoch"], c["iteration"]) == (1, 1)
    monkeypatch.undo()
    finetune(tiny_run(), tmp_path / "sig", settings(2))
    c = torch.load(tmp_path / "sig" / "checkpoints" / "latest.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    # the fine-tuned checkpoint keeps GocaModel's backbone names: kNN / export work on it
    loaded, _ = load_eval_model(tmp_path / "part")
    assert loaded.kind == "finetune" and not loaded.has_heads


def test_finetune_backbone_lr_is_a_tenth(tmp_path):
    start = finetune_start(CheckpointRequest(str(tiny_run()), streams=["rgb"]), EvalOverrides(workers=0),
                           out_dir=str(tmp_path / "ft"), device="cpu")
    ft = Finetuner.fresh(start, settings(1))
    lrs = [g["base_lr"] for g in ft.optimizer.param_groups]
    assert lrs == [pytest.approx(0.005), pytest.approx(0.05)] and ft.streams == ["rgb"]


def test_finetune_refuses_a_pretraining_run_as_output(tmp_path):
    with pytest.raises(EvalError, match="not a fine-tuning one"):
        finetune(tiny_run(), tiny_run(), settings(1))


def test_finetune_command_line(tmp_path, capsys):
    from goca_fast.cli.eval import main
    argv = ["finetune", str(tiny_run()), "--out", str(tmp_path), "--epochs", "1", "--warmup-epochs", "0",
            "--batch-size", "4", "--max-iters-per-epoch", "1", "--test-clips", "1", "--test-crops", "1",
            "--streams", "flow", "--device", "cpu", "--workers", "0", "--schedule", "cosine"]
    assert main(argv) == 0
    assert "flow" in capsys.readouterr().out
    out = json.loads((tmp_path / "finetune.json").read_text())
    assert set(out["accuracy"]) == {"flow"} and out["protocol"]["settings"]["schedule"] == "cosine"
    with pytest.raises(SystemExit) as e:                    # the pretrained checkpoint / run dir is required
        main(argv[:1] + ["--epochs", "1"])
    assert e.value.code == 2 and "required: source" in capsys.readouterr().err


def test_finetune_command_line_resumes_when_run_again(tmp_path, capsys, caplog):
    from goca_fast.cli.eval import main
    argv = ["finetune", str(tiny_run()), "--out", str(tmp_path), "--warmup-epochs", "0", "--batch-size", "4",
            "--max-iters-per-epoch", "1", "--test-clips", "1", "--test-crops", "1", "--streams", "flow",
            "--device", "cpu", "--workers", "0"]
    assert main(argv + ["--epochs", "1"]) == 0
    assert "Fine-tuning (1 epoch, flow)" in capsys.readouterr().out
    with caplog.at_level("INFO", logger="goca_fast.eval"):
        assert main(argv + ["--epochs", "2"]) == 0         # the same source and --out again: resumed, not restarted
    assert any("resumed fine-tuning from" in r.getMessage() and "at epoch 1" in r.getMessage()
               for r in caplog.records)
    assert "Fine-tuning (2 epochs, flow)" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "finetune.json").read_text())["history"]) == 2
