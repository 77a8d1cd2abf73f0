"""The online kNN monitor: writes its TensorBoard scalar, runs only when due, leaves RNG and model mode alone."""
import random

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from goca_fast.eval.common import load_model
from goca_fast.eval.monitor import KnnMonitor
from test_eval_support import one_torch_thread, tiny_dataset, tiny_run  # noqa: F401 (autouse fixture)


def _monitor(every=2, **kw):
    return KnnMonitor(tiny_dataset(), "train", "test", subset_size=kw.pop("subset_size", 8), clip_length=8,
                      stride=1, crop_size=24, short_side=32, every=every, batch_size=4, **kw)


@pytest.mark.parametrize("preload", [True, False])
def test_monitor_writes_its_scalar(tmp_path, preload):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    model = load_model(tiny_run()).model.train()
    mon = _monitor(max_preload_mb=1e6 if preload else 0.0)
    writer = SummaryWriter(str(tmp_path))
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert mon.maybe_run(model, 0, writer) is None          # epoch 1 of every 2: not due
    r1 = mon.maybe_run(model, 1, writer, step=40)           # epoch 2: due
    writer.close()
    assert r1 is not None and 0.0 <= r1 <= 100.0
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


def test_monitor_single_stream_and_never():
    two_stream = load_model(tiny_run()).model
    assert set(_monitor(every=1, streams=("flow",)).run(two_stream)) == {"flow"}   # watch one stream only
    rgb_only = load_model(tiny_run(), streams=["rgb"]).model
    assert set(_monitor(every=1).run(rgb_only)) == {"rgb"}                        # the model lacks flow
    assert not _monitor(every=0).due(9)
