"""The online kNN monitor: writes its TensorBoard scalar, runs only when due, leaves RNG and model mode alone."""
import random

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from goca_fast.plan.evaluation import load_eval_model
from goca_fast.data.index import read_index
from goca_fast.eval.features import ExtractSettings, compute_split_features
from goca_fast.eval.knn import knn_scores
from goca_fast.eval.monitor import KnnMonitor, MonitorSettings, stratified_subset
from goca_fast.data.views import ViewSpec
from goca_fast.eval.splits import SplitRecords
from helpers import one_torch_thread, tiny_dataset, tiny_run  # noqa: F401 (autouse fixture)


# the monitor's views: 1 centre clip of 8 frames × 1 centre crop
VIEWS = ViewSpec(clip_length=8, stride=1, num_clips=1, crops=1, crop_size=24, short_side=32)


def _monitor(every=2, streams=("rgb", "flow"), **kw):
    settings = MonitorSettings(subset_size=kw.pop("subset_size", 8), every=every, batch_size=4, **kw)
    return KnnMonitor(tiny_dataset(), read_index(tiny_dataset())[0], VIEWS, settings, streams=streams)


def _offline_r1(model, train: int, test: int) -> float:
    """R@1 ("both") of the monitor's class-balanced subsets and views (1 centre clip of 8 frames, 1 crop), computed
    by the offline kNN evaluation."""
    records, classes = read_index(tiny_dataset())
    feats = []
    for split, size in (("train", train), ("test", test)):
        recs = [r for r in records if split in r.splits]
        recs = [recs[i] for i in stratified_subset([r.label for r in recs], size, 0)]
        feats.append(compute_split_features(model, tiny_dataset(), SplitRecords(split, recs, len(recs), [], classes),
                                            VIEWS, ExtractSettings(torch.device("cpu"), 4, 0, loader="cpu")))
    return knn_scores(feats[0], feats[1], model.streams, ks=(1,))["both"][1]


@pytest.mark.parametrize("preload", [True, False])
def test_monitor_writes_its_scalar(tmp_path, preload):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model = load_eval_model(tiny_run())[0].model.train()
    mon = _monitor(max_preload_mb=1e6 if preload else 0.0)
    writer = SummaryWriter(str(tmp_path))
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert mon.maybe_run(model, 0, writer) is None          # epoch 1 of every 2: not due
    r1 = mon.maybe_run(model, 1, writer, step=40)           # epoch 2: due
    writer.close()
    assert r1 is not None
    assert model.training                                    # mode restored
    assert torch.equal(states[0], torch.get_rng_state())     # training RNG streams untouched
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()
    assert mon.counts == {"train": 8, "test": 4} and (mon._data is not None) == preload
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"monitor/knn_r1_rgb", "monitor/knn_r1_flow", "monitor/knn_r1_both", "monitor/seconds"} <= set(tags)
    ev = acc.Scalars("monitor/knn_r1_both")
    assert [e.step for e in ev] == [40] and ev[0].value == pytest.approx(r1)
    # a second run reuses the preloaded clips and gives the same number
    assert mon.maybe_run(model, 3) == pytest.approx(r1)
    assert r1 == pytest.approx(_offline_r1(model, train=8, test=4))  # the R@1 of the same subsets offline


def test_monitor_single_stream_and_never():
    two_stream = load_eval_model(tiny_run())[0].model
    assert set(_monitor(every=1, streams=("flow",)).run(two_stream)) == {"flow"}   # watch one stream only
    rgb_only = load_eval_model(tiny_run(), streams=["rgb"])[0].model
    assert set(_monitor(every=1).run(rgb_only)) == {"rgb"}                        # the model lacks flow
    assert not _monitor(every=0).due(9)
