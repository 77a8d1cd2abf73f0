"""kNN retrieval end to end on a tiny dataset: CLI, JSON, feature cache, bad inputs reported clearly."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from goca_fast.data.index import read_index, select_split
from goca_fast.plan.evaluation import load_eval_model
from goca_fast.plan.run import RunData, knn_recall, plan_settings
from goca_fast.eval import EvalError, features, knn
from goca_fast.cli.eval import main as cli_main
from helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from helpers import brute_force_recall, cached_features, copy_dataset, make_run, run_eval, tiny_dataset, tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_knn_module_cli_writes_table_and_json(tmp_path):
    run = tiny_run()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "goca_fast.cli.eval", "knn", str(run), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "R@1" in r.stdout and "4 of 4 query videos (test) against 12 of 12 gallery videos (train)" in r.stdout
    res = json.loads((tmp_path / "knn.json").read_text())
    assert set(res["recall"]) == {"rgb", "flow", "both"}
    # the table is R@k of the features the command extracted (and cached), recomputed here by hand
    gm, gallery, _ = cached_features(tmp_path / "features", "train")
    qm, query, _ = cached_features(tmp_path / "features", "test")
    ks = (1, 5, 10, 20, 50)
    for s in ("rgb", "flow"):
        want = brute_force_recall(query[s].tolist(), qm["labels"], gallery[s].tolist(), gm["labels"], ks)
        assert res["recall"][s] == {str(k): v for k, v in want.items()}, s
    both = {k: torch.stack([F.normalize(torch.from_numpy(f[s]), dim=1) for s in ("rgb", "flow")]).mean(0).tolist()
            for k, f in (("q", query), ("g", gallery))}
    want = brute_force_recall(both["q"], qm["labels"], both["g"], gm["labels"], ks)
    assert res["recall"]["both"] == {str(k): v for k, v in want.items()}
    assert res["query"]["evaluated"] == 4 and res["gallery"]["evaluated"] == 12
    assert res["protocol"]["clips"] == 2 and res["protocol"]["crops"] == 1 and res["protocol"]["feature_dim"] == 128


def test_cache_is_reused_and_gives_identical_numbers(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    first = run_eval(knn.run_knn, run)
    assert len(list((run / "eval" / "features").iterdir())) == 2

    def boom(*a, **k):
        raise AssertionError("features recomputed despite the cache")
    monkeypatch.setattr(features, "compute_split_features", boom)
    second = run_eval(knn.run_knn, run / "checkpoints" / "latest.pth")
    assert second.recall == first.recall
    # a different protocol is a different cache entry (and so recomputes)
    with pytest.raises(AssertionError, match="recomputed"):
        run_eval(knn.run_knn, run, clips=1)


def test_in_memory_evaluation_equals_cli_numbers(tmp_path):
    run = make_run(tmp_path / "run", seed=1)
    cli = run_eval(knn.run_knn, run, use_cache=False)
    loaded, cfg = load_eval_model(run)
    records, classes = read_index(tiny_dataset())
    plan = replace(plan_settings(cfg), data=RunData(tiny_dataset(), records, classes, select_split(records, "train")))
    mem = knn_recall(loaded.model, plan)
    assert mem == cli.recall


def test_head_features_and_stream_selection(tmp_path):
    res = run_eval(knn.run_knn, tiny_run(), feature="head", streams=["flow"], out_dir=str(tmp_path))
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
        load_eval_model(run)
    cfg["model"]["arch"], cfg["data"]["flow_mode"] = "tiny", "official"   # 3-channel flow stem: shapes differ
    torch.save({**state, "config": cfg}, run / "checkpoints" / "latest.pth")
    with pytest.raises(EvalError, match="1 shape mismatches \\(e.g. backbones.flow"):
        load_eval_model(run)
    load_eval_model(run, streams=["rgb"])   # the RGB stream alone still fits


def test_missing_unreadable_short_and_mismatched_videos_are_counted(tmp_path):
    root = copy_dataset(tmp_path / "ds")
    index = [json.loads(l) for l in (root / "index.jsonl").read_text().splitlines()]
    train = [r for r in index if r["splits"] == ["train"]]
    os.remove(root / train[0]["rgb"])                        # missing file
    (root / train[1]["flow"]).write_bytes(b"not a video")    # unreadable
    res = run_eval(knn.run_knn, tiny_run(), data_root=str(root), clip_length=20, out_dir=str(tmp_path / "o"))
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
    res = run_eval(knn.run_knn, tiny_run(), data_root=str(root), out_dir=str(tmp_path / "o2"))
    assert any("never occur in 'train'" in w for w in res.warnings)


def test_every_option_has_a_help_text_and_shows_its_default_once():
    import argparse
    import re
    from goca_fast.cli.eval import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"knn", "codes", "linear", "finetune", "export", "plots"}
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
