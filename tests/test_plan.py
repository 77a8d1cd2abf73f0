"""The run plan: every section's settings taken from the config, the dataset index read once per run, and the
start-up checks made before anything is trained or written."""
from __future__ import annotations

import json
import sys

import pytest

from goca_fast.cli import pretrain
from goca_fast.data import index as index_module
from goca_fast.data.index import DatasetIndexError
from goca_fast.eval import EvalError
from goca_fast.plan.run import plan_run, plan_settings
from helpers import copy_dataset, one_torch_thread, tiny_config, tiny_dataset  # noqa: F401 (autouse fixture)


def test_plan_settings_come_from_their_config_sections():
    cfg = tiny_config(tiny_dataset(), "model.num_prototypes=7", "goca.merge=avg", "optim.epochs=3",
                      "optim.warmup_epochs=0", "engine.log_every=9", "eval.clips=4", "eval.monitor_every=2",
                      "eval.monitor_videos=6", "data.flow_mode=official", "engine.amp=off")
    plan = plan_settings(cfg)
    assert (plan.model.num_prototypes, plan.model.merge, plan.model.flow_channels) == (7, "avg", 3)
    assert (plan.optim.epochs, plan.loop.epochs, plan.loop.log_every) == (3, 3, 9)
    assert (plan.views.num_clips, plan.views.clip_length) == (4, 8)   # the longest pretraining clip
    assert (plan.monitor.every, plan.monitor.subset_size, plan.monitor.val_split) == (2, 6, "test")
    assert plan.amp is None and plan.data is None
    assert plan.run_dir.name == "tiny"
    assert plan_settings(tiny_config(tiny_dataset())).monitor is None   # eval.monitor_every = 0: no monitor


def test_a_run_reads_the_index_once(tmp_path, monkeypatch):
    """A whole pretraining run (train, online monitor, closing kNN table with its random-init row) opens
    index.jsonl once: every module's reference to read_index is wrapped and counted."""
    calls = []
    original = index_module.read_index

    def counting(root):
        calls.append(str(root))
        return original(root)

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith(("goca_fast", "dali_pipelines")) and \
                getattr(module, "read_index", None) is original:
            monkeypatch.setattr(module, "read_index", counting)
    cfg = tiny_config(tiny_dataset(), f"output_dir={tmp_path}", "data.batch_size=4", "optim.epochs=1",
                      "optim.warmup_epochs=0", "engine.max_iters_per_epoch=1", "engine.tensorboard=false",
                      "engine.progress=false", "eval.monitor_every=1", "eval.monitor_videos=4",
                      "eval.compare_random_init=true", "data.loader=cpu", "engine.device=cpu")
    result = pretrain.run(cfg, fresh=True)
    assert set(result["knn"]) == {"GOCA", "random init"}
    assert calls == [str(tiny_dataset())]


def test_plan_run_checks_the_data_before_anything_is_written(tmp_path):
    root = tiny_dataset()
    with pytest.raises(DatasetIndexError, match="no full batch of 64"):
        plan_run(tiny_config(root, f"output_dir={tmp_path}", "data.batch_size=64"))
    with pytest.raises(EvalError, match="share"):   # the queries would retrieve themselves
        plan_run(tiny_config(root, f"output_dir={tmp_path}", "data.test_split=train"))
    ok = plan_run(tiny_config(root, f"output_dir={tmp_path}", "data.batch_size=4"))
    assert len(ok.data.train) == 12 and len(ok.data.records) == 16   # 4 classes × 4 videos, 1 per class in test
    assert not list(tmp_path.iterdir())   # planning writes nothing


def test_plan_run_on_a_dataset_without_flow_names_the_cause(tmp_path):
    root = copy_dataset(tmp_path / "ds")
    rows = [json.loads(line) for line in (root / "index.jsonl").read_text().splitlines()]
    (root / "index.jsonl").write_text("".join(json.dumps({**r, "flow": None}) + "\n" for r in rows))
    with pytest.raises(DatasetIndexError, match="no flow video"):
        plan_run(tiny_config(root, "data.batch_size=4"))
