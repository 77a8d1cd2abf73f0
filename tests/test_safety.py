"""Safe by default: no run presents an untrained model or a trivial evaluation as a result, a failed start leaves
nothing behind, Ctrl-C keeps progress, and typical mistakes end in one line with exit code 2."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from goca_fast.config import load_config
from goca_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset
from goca_fast.train.engine import NothingTrained
from goca_fast.cli.eval import main as eval_main
from goca_fast.eval import EvalError
from goca_fast.eval.splits import check_disjoint
from helpers import descendants, one_torch_thread, proc_stat_fields, tiny_run, trainer_for  # noqa: F401 (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic.videos_per_class=6", "data.synthetic.frames=24", "data.batch_size=8", "data.workers=0",
         "engine.progress=false", "engine.tensorboard=false"]


def pretrain_cmd(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "goca_fast.cli.pretrain", f"output_dir={out}", "name=run", f"data.cache_dir={cache}",
            *SMALL, *extra]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    """The process failed with `code` and said why on exactly one line of stderr (no traceback)."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    lines = [l for l in r.stderr.splitlines() if l.strip() and " INFO " not in l and " WARNING " not in l]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------- results that lie

@pytest.mark.slow
def test_split_without_flow_is_refused_before_anything_is_written_then_trains_once_flow_exists(tmp_path):
    data = tmp_path / "data"
    make_synthetic_dataset(data, SyntheticSpec(num_classes=2, videos_per_class=6, frames=24, height=64, width=80),
                           workers=1, with_flow=False)
    out = tmp_path / "out"
    cmd = pretrain_cmd(out, tmp_path / "cache", f"data.root={data}", "optim.epochs=1", "optim.warmup_epochs=0",
                       "data.batch_size=4", "eval.knn_after_training=false")
    line = one_line_error(run(cmd))
    assert "data error" in line and "no flow video" in line and "goca-flow" in line
    assert not (out / "run").exists()  # no checkpoint, no metrics line, no config.yaml
    make_synthetic_dataset(data, SyntheticSpec(num_classes=2, videos_per_class=6, frames=24, height=64, width=80),
                           workers=1, with_flow=True)  # "after goca-flow": the same command now trains for real
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" not in r.stderr
    history = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["optimizer_steps"] == history[0]["iterations"] >= 1
    assert np.isfinite(history[0]["loss"]) and history[0]["loss"] > 0


def test_an_epoch_without_an_optimiser_step_is_an_error_and_saves_nothing(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["engine.tensorboard=false", "engine.progress=false",
                                                       "data.batch_size=4", "engine.checkpoint_minutes=0"])
    trainer = trainer_for(cfg, tmp_path, lambda epoch, start: [None, None, None], 3)
    with pytest.raises(NothingTrained, match="epoch 1 made no optimiser step"):
        trainer.fit()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not list(tmp_path.rglob("*.pth"))


def test_gallery_equal_to_query_is_refused(capsys):
    assert eval_main(["knn", str(tiny_run()), "--train-split", "train", "--test-split", "train",
                      "--no-cache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "share 12 of 12 videos, the same split" in err[0]
    assert eval_main(["linear", str(tiny_run()), "--train-split", "test", "--test-split", "test",
                      "--no-cache", "--epochs", "1"]) == 2
    assert "train split 'test' and test split 'test'" in capsys.readouterr().err


def test_overlapping_splits_are_named_with_their_shared_videos():
    check_disjoint("train", ["a", "b"], "test", ["c"])  # disjoint: fine
    with pytest.raises(EvalError, match=r"share 1 of 2 videos \(e.g. b\)"):
        check_disjoint("train", ["a", "b"], "val", ["b", "c"])


@pytest.mark.slow
def test_pretraining_refuses_an_evaluation_on_its_own_training_videos(tmp_path):
    r = run(pretrain_cmd(tmp_path / "out", tmp_path / "cache", "data.test_split=train", "optim.epochs=1",
                         "optim.warmup_epochs=0"))
    assert "share" in one_line_error(r) and not (tmp_path / "out" / "run").exists()


# ------------------------------------------------------------------------------------------ interruptions

@pytest.mark.slow
def test_ctrl_c_checkpoints_exits_130_and_resumes(tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) while DataLoader workers run."""
    cmd = pretrain_cmd(tmp_path / "out", tmp_path / "cache", "data.workers=2", "optim.epochs=3",
                       "engine.max_iters_per_epoch=3", "engine.checkpoint_every_iters=1",
                       "eval.knn_after_training=false", "optim.warmup_epochs=0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    latest = tmp_path / "out" / "run" / "checkpoints" / "latest.pth"
    t0 = time.time()
    while not latest.is_file():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 300, "no checkpoint appeared"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "interrupted (Ctrl-C); checkpoint written" in stdout and "Run the same command again" in stdout
    stopped = torch.load(latest, map_location="cpu", weights_only=True)
    assert stopped["step"] < 9
    r = run(cmd)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-3000:]
    resumed = torch.load(latest, map_location="cpu", weights_only=True)
    straight = run([c.replace(str(tmp_path / "out"), str(tmp_path / "straight")) for c in cmd])
    assert straight.returncode == 0, straight.stderr[-3000:]
    want = torch.load(tmp_path / "straight" / "run" / "checkpoints" / "latest.pth", map_location="cpu",
                      weights_only=True)
    assert resumed["step"] == want["step"] == 9
    for k in want["model"]:  # the interrupted and resumed run ends bit for bit where the uninterrupted one does
        assert torch.equal(resumed["model"][k], want["model"][k]), k


def _cpu_ticks(pid: int) -> int:
    fields = proc_stat_fields(Path(f"/proc/{pid}/stat"))
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path):
    """The second Ctrl-C ends a run whose graceful stop cannot finish: the loader worker is frozen (SIGSTOP), so
    the main process waits for a batch that never comes and never reaches the batch boundary by itself."""
    cmd = pretrain_cmd(tmp_path / "out", tmp_path / "cache", "data.workers=1", "optim.epochs=50",
                       "eval.knn_after_training=false", "optim.warmup_epochs=0")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()

    def wait_for(condition, what: str, limit: float) -> None:
        t0 = time.time()
        while not condition():
            assert proc.poll() is None, "".join(stderr)[-3000:]
            assert time.time() - t0 < limit, f"{what} did not happen within {limit} s"
            time.sleep(0.05)

    try:
        wait_for((tmp_path / "out" / "run" / "metrics.jsonl").is_file, "training start", 300)
        last, flat_since = _cpu_ticks(proc.pid), time.time()

        def main_is_blocked() -> bool:  # every descendant frozen (new loaders start new ones) and no CPU for 1 s
            nonlocal last, flat_since
            for child in descendants(proc.pid):
                os.kill(child, signal.SIGSTOP)
            now = _cpu_ticks(proc.pid)
            if now != last:
                last, flat_since = now, time.time()
            return time.time() - flat_since > 1.0

        wait_for(main_is_blocked, "the main process waiting for a batch", 120)
        os.kill(proc.pid, signal.SIGINT)
        wait_for(lambda: any("stopping at the next batch boundary" in line for line in stderr), "first Ctrl-C", 60)
        assert proc.poll() is None  # the graceful stop is stuck: only the second Ctrl-C can end it
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        assert proc.returncode == 130 and "interrupted again: exiting now" in "".join(stderr), "".join(stderr)[-3000:]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the frozen workers
        except ProcessLookupError:
            pass
        proc.wait()


# -------------------------------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("override,expect", [
    ("data.root=/nonexistent/goca", "holds no index.jsonl"),
    ("data.train_split=train1", "unknown or empty split 'train1'"),
    ("engine.device=cuda", "torch sees no CUDA device"),
    ("output_dir=/proc/goca_fast_cannot_write", "cannot write the run directory"),
    ("data.batchsize=4", "did you mean 'data.batch_size'?"),
])
@pytest.mark.slow
def test_typical_mistakes_end_in_one_line(tmp_path, override, expect):
    if override == "engine.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = run(pretrain_cmd(tmp_path / "out", tmp_path / "cache", override, "optim.epochs=1",
                         "optim.warmup_epochs=0"))
    assert expect in one_line_error(r)
    assert not (tmp_path / "out" / "run").exists()  # a failed start leaves nothing behind


@pytest.mark.slow
def test_prototypes_file_missing_or_of_the_wrong_shape_is_one_line(tmp_path):
    bad = tmp_path / "p.npy"
    np.save(bad, np.ones((5, 3), dtype=np.float32))
    for value, expect in ((tmp_path / "missing.npy", "cannot read prototypes file"), (bad, "holds 5×3 prototypes")):
        r = run(pretrain_cmd(tmp_path / "out", tmp_path / "cache", f"model.prototypes_path={value}",
                             "optim.epochs=1", "optim.warmup_epochs=0"))
        assert expect in one_line_error(r)


def test_prototypes_tool_refuses_zero_steps_and_unwritable_output(tmp_path):
    from goca_fast.cli.prototypes import main as prototypes_main
    with pytest.raises(SystemExit) as e:
        prototypes_main(["--num", "8", "--dim", "4", "--steps", "0", "--out", str(tmp_path / "p.npy")])
    assert e.value.code == 2 and not (tmp_path / "p.npy").exists()
    assert prototypes_main(["--num", "8", "--dim", "4", "--steps", "5", "--no-plot",
                            "--out", "/proc/goca_fast_cannot_write.npy"]) == 2


# ------------------------------------------------------------------------------------- conveniences

@pytest.mark.slow
def test_shipped_config_by_name_from_another_directory_and_print_config_round_trips(tmp_path):
    cmd = [sys.executable, "-m", "goca_fast.cli.pretrain", "--config", "ucf101_r2plus1d", "--print-config",
           "data.batch_size=3"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "batch_size: 3" in first.stdout and "name: ucf101_r2plus1d" in first.stdout
    (tmp_path / "printed.yaml").write_text(first.stdout)
    again = subprocess.run([sys.executable, "-m", "goca_fast.cli.pretrain", "--config", "printed.yaml",
                            "--print-config"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and again.stdout == first.stdout
    bad = subprocess.run([sys.executable, "-m", "goca_fast.cli.pretrain", "--config", "ucf102"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert "shipped: demo, guidance, k400_r2plus1d, ucf101_r2plus1d, ucf101_s3d_official" in one_line_error(bad)


@pytest.mark.slow
def test_without_a_terminal_progress_is_one_line_per_epoch(tmp_path):
    r = run(pretrain_cmd(tmp_path / "out", tmp_path / "cache", "optim.epochs=2", "optim.warmup_epochs=0",
                         "engine.max_iters_per_epoch=2", "eval.knn_after_training=false", "engine.progress=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "\r" not in r.stderr and "it/s" not in r.stderr  # no tqdm redraws in a log file
    epochs = [l for l in r.stderr.splitlines() if " epoch " in l and "clips/s" in l]
    assert len(epochs) == 2 and "epoch 1/2: loss" in epochs[0] and "over 2 steps" in epochs[0]


def _torchvision_model(arch: str, in_channels: int):
    from torchvision.models import video as tv
    from goca_fast.models.backbones import _replace_first_conv
    m = getattr(tv, arch)(weights=None)
    if in_channels != 3:  # what the README tells users to do for the flow stream
        if arch == "s3d":
            m.features[0][0][0] = _replace_first_conv(m.features[0][0][0], in_channels)
        else:
            m.stem[0] = _replace_first_conv(m.stem[0], in_channels)
    return m


@pytest.mark.parametrize("arch,channels,head", [("r2plus1d_18", 3, "fc"), ("r3d_18", 2, "fc"),
                                                ("s3d", 3, "classifier"), ("s3d", 2, "classifier")])
def test_exported_backbone_loads_into_torchvision_with_only_the_classifier_missing(arch, channels, head):
    from goca_fast.eval.export import torchvision_state_dict
    from goca_fast.models.backbones import build_backbone
    torch.manual_seed(0)
    ours = build_backbone(arch, channels)
    weights = torchvision_state_dict(ours.state_dict(), arch)
    tv_model = _torchvision_model(arch, channels)
    missing, unexpected = tv_model.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing and all(k.startswith(head + ".") for k in missing)
    # the same network: identical features before the classifier
    x = torch.randn(1, channels, 8, 32, 32)
    ours.eval(), tv_model.eval()
    trunk = tv_model.features if arch == "s3d" else torch.nn.Sequential(tv_model.stem, tv_model.layer1,
                                                                        tv_model.layer2, tv_model.layer3,
                                                                        tv_model.layer4)
    with torch.no_grad():
        assert torch.equal(ours.trunk(x), trunk(x))


def test_export_weights_command_end_to_end(tmp_path, capsys):
    from helpers import make_run
    run_dir = make_run(tmp_path / "r3d", "model.arch=r3d_18", "data.modalities=rgb", "model.pool=global")
    out = tmp_path / "rgb.pth"
    assert eval_main(["export", str(run_dir), "--weights", str(out), "--device", "cpu"]) == 0
    m = _torchvision_model("r3d_18", 3)
    missing, unexpected = m.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert eval_main(["export", str(tiny_run()), "--weights", str(tmp_path / "t.pth")]) == 2
    assert "no torchvision counterpart" in capsys.readouterr().err


def _cli_parsers():
    from goca_fast.cli.prepare import build_parser as prepare_parser
    from goca_fast.cli.eval import build_parser as eval_parser
    from goca_fast.cli.flow import build_parser as flow_parser
    from goca_fast.cli.prototypes import build_parser as prototypes_parser
    subs = [a for a in eval_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction)]
    return [prepare_parser(), flow_parser(), prototypes_parser(), *subs[0].choices.values()]


def test_every_option_of_every_tool_has_help_with_its_default_shown_at_most_once():
    for parser in _cli_parsers():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or action.option_strings == ["-h", "--help"]:
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help text"
            shown = parser._get_formatter()._expand_help(action) if action.help else ""
            assert shown.lower().count("default") <= 1, f"{parser.prog} {action.option_strings[0]}: {shown!r}"
        assert "(default: None)" not in text and "(default: False)" not in text, parser.prog


def test_prepare_to_an_unwritable_place_is_one_line(tmp_path):
    from helpers import tiny_dataset
    src = tmp_path / "src" / "walk"
    src.mkdir(parents=True)
    first = sorted((tiny_dataset() / "rgb").rglob("*.mp4"))[0]
    (src / "v.mp4").write_bytes(first.read_bytes())
    r = run([sys.executable, "-m", "goca_fast.cli.prepare", "--dataset", "folders", "--src", str(tmp_path / "src"),
             "--out", "/proc/goca_fast_cannot_write", "--no-progress", "--workers", "1"])
    assert "cannot write /proc/goca_fast_cannot_write" in one_line_error(r)
