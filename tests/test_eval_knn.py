"""kNN retrieval end to end on a tiny dataset: CLI, JSON, feature cache, bad inputs reported clearly."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from goca_fast.eval import common, knn
from goca_fast.eval.cli import main as cli_main
from goca_fast.eval.common import EvalError, load_model
from test_eval_support import one_torch_thread  # noqa: F401 (autouse fixture)
from test_eval_support import copy_dataset, make_run, tiny_dataset, tiny_run

ROOT = Path(__file__).resolve().parents[1]


def test_knn_module_cli_writes_table_and_json(tmp_path):
    run = tiny_run()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "goca_fast.eval", "knn", str(run), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "R@1" in r.stdout and "4 of 4 query videos (test) against 12 of 12 gallery videos (train)" in r.stdout
    res = json.loads((tmp_path / "knn.json").read_text())
    assert set(res["recall"]) == {"rgb", "flow", "both"}
    for rec in res["recall"].values():
        vals = [rec[k] for k in ("1", "5", "10", "20", "50")]
        assert vals == sorted(vals) and 0 <= vals[0] <= 100
    assert res["query"]["evaluated"] == 4 and res["gallery"]["evaluated"] == 12
    assert res["protocol"]["clips"] == 2 and res["protocol"]["crops"] == 1 and res["protocol"]["feature_dim"] == 128


def test_cache_is_reused_and_gives_identical_numbers(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    first = knn.run_knn(str(run), quiet=True, device="cpu")
    assert len(list((run / "eval" / "features").iterdir())) == 2

    def boom(*a, **k):
        raise AssertionError("features recomputed despite the cache")
    monkeypatch.setattr(common, "compute_split_features", boom)
    second = knn.run_knn(str(run / "checkpoints" / "latest.pth"), quiet=True, device="cpu")
    assert second.recall == first.recall
    # a different protocol is a different cache entry (and so recomputes)
    with pytest.raises(AssertionError, match="recomputed"):
        knn.run_knn(str(run), clips=1, quiet=True, device="cpu")


def test_in_memory_evaluation_equals_cli_numbers(tmp_path):
    run = make_run(tmp_path / "run", seed=1)
    cli = knn.run_knn(str(run), quiet=True, device="cpu", use_cache=False)
    loaded = load_model(run)
    mem = knn.knn_retrieval(loaded.model, loaded.config, tiny_dataset(), torch.device("cpu"))
    assert mem == cli.recall


def test_head_features_and_stream_selection(tmp_path):
    res = knn.run_knn(str(tiny_run()), feature="head", streams=["flow"], out_dir=str(tmp_path), quiet=True,
                      device="cpu")
    assert set(res.recall) == {"flow"} and res.protocol["feature_dim"] == 16


def test_clear_errors(tmp_path, capsys):
    rgb_only = make_run(tmp_path / "rgb", "data.modalities=rgb", "goca.merge=prior")
    cases = [
        ([str(tmp_path / "nope")], "not found"),
        ([str(tiny_run()), "--arch", "r2plus1d_18"], "is a tiny checkpoint, but r2plus1d_18"),
        ([str(rgb_only), "--streams", "flow"], "has no flow stream"),
        ([str(tiny_run()), "--test-split", "val"], "split 'val'"),
    ]
    for argv, msg in cases:
        assert cli_main(["knn", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("goca-eval: error: ") and msg in err and err.count("\n") == 1, err


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    run = make_run(tmp_path / "run")
    state = torch.load(run / "checkpoints" / "latest.pth", weights_only=True)
    cfg = state["config"]
    cfg["model"]["arch"] = "r3d_18"    # the config now describes a different network than the weights
    torch.save({**state, "config": cfg}, run / "checkpoints" / "latest.pth")
    with pytest.raises(EvalError, match="missing keys .*another architecture than model.arch=r3d_18"):
        load_model(run)
    cfg["model"]["arch"], cfg["data"]["flow_mode"] = "tiny", "official"   # 3-channel flow stem: shapes differ
    torch.save({**state, "config": cfg}, run / "checkpoints" / "latest.pth")
    with pytest.raises(EvalError, match="1 shape mismatches \\(e.g. backbones.flow"):
        load_model(run)
    load_model(run, streams=["rgb"])   # the RGB stream alone still fits


def test_missing_unreadable_short_and_mismatched_videos_are_counted(tmp_path):
    root = copy_dataset(tmp_path / "ds")
    index = [json.loads(l) for l in (root / "index.jsonl").read_text().splitlines()]
    train = [r for r in index if r["splits"] == ["train"]]
    os.remove(root / train[0]["rgb"])                        # missing file
    (root / train[1]["flow"]).write_bytes(b"not a video")    # unreadable
    res = knn.run_knn(str(tiny_run()), data_root=str(root), clip_length=20, out_dir=str(tmp_path / "o"),
                      quiet=True, device="cpu")
    g = res.gallery
    assert g == {"videos": 12, "evaluated": 10, "missing_files": 1, "unreadable": 1, "padded_short": 10}
    assert res.query["padded_short"] == 4          # 16-frame videos, 20-frame clips: padded and counted
    table = res.table()
    assert "10 of 12 gallery videos" in table and "1 missing, 1 unreadable" in table and "padded" in table

    # a class of the test split that never occurs in the train split: warned and recorded
    for r in index:
        if r["label"] == 0 and r["splits"] == ["train"]:
            r["splits"] = ["other"]
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    res = knn.run_knn(str(tiny_run()), data_root=str(root), out_dir=str(tmp_path / "o2"), quiet=True, device="cpu")
    assert any("never occur in 'train'" in w for w in res.warnings)


def test_demo_retrieval_comes_from_this_module():
    import goca_fast.pretrain as pretrain
    fn = getattr(pretrain, "knn_retrieval", None)
    assert fn is None or fn is knn.knn_retrieval, "pretrain.py must use goca_fast.eval.knn, not a copy"
    assert "extract_video_features" not in inspect.getsource(pretrain)


def test_every_option_has_a_help_text_and_shows_its_default_once():
    import argparse
    import re
    from goca_fast.eval.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"knn", "linear", "finetune", "export", "plots"}
    for name, parser in sub.choices.items():
        text = parser.format_help()
        flat = " ".join(text.split())
        assert not re.search(r"\(default[^)]*\) \(default", flat) and "(default: None)" not in flat, name
        fmt = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            shown = fmt._expand_help(action) if action.help else ""
            assert shown.strip(), f"{name} {action.option_strings or action.dest}: no help text"
            n = shown.lower().count("default")
            assert n <= 1, f"{name} {action.option_strings}: {shown!r}"
            if action.option_strings and action.default is not None and action.default is not False:
                assert n == 1, f"{name} {action.option_strings}: default {action.default!r} not shown: {shown!r}"
        with pytest.raises(SystemExit) as e:           # the checkpoint/run directory is required everywhere
            parser.parse_args([])
        assert e.value.code == 2
    lin = sub.choices["linear"].format_help()
    assert "training epochs (official 100) (default: 100)" in " ".join(lin.split())
    assert "SGD momentum (default: 0.9)" in " ".join(lin.split())
