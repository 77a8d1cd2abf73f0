"""CPU loader: frame alignment proved with frame-index videos, skipping bad files, sampler, resume."""
import logging
import shutil

import numpy as np
import pytest
import torch

from goca_fast.data.augment import ClipAugment
from goca_fast.data.batch import ClipBatch
from goca_fast.data.cpu_loader import (
    EpochSampler,
    EvalClipDataset,
    ShardSampler,
    TrainClipDataset,
    collate_clips,
    make_eval_loader,
    make_train_loader,
)
from goca_fast.data.index import read_index
from goca_fast.data.sampling import uniform_eval_clips
from goca_fast.data.views import ViewSpec
from goca_fast.video.io import write_video
from helpers import decode_frame_index, make_frame_index_dataset

FRAMES = [40, 64, 25, 90, 33, 50, 70, 45]
LENGTHS = [8, 8, 4, 4]


@pytest.fixture(scope="module")
def idx_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx") / "ds"
    make_frame_index_dataset(root, FRAMES, height=64, width=80, gop=8)
    return root


def _aug():
    # Full-height crop (short side 64 = crop): bands stay in place; flip / jitter / grey keep them decodable.
    return ClipAugment(crop_size=64, scale_range=(64, 64))


def _decoded(clip):
    """C×T×H×W -> frame index per t, read from channel 0 (and every channel for flow)."""
    return [decode_frame_index(clip[0, t].numpy()) for t in range(clip.shape[1])]


def test_train_items_are_frame_aligned(idx_root):
    records, _ = read_index(idx_root)
    ds = TrainClipDataset(idx_root, records, LENGTHS, stride=2, min_distance=6, augment=_aug(),
                          with_flow=True, seed=3)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert item is not None and len(item.rgb) == len(item.flow) == 4
            assert all(np.all(np.diff(c) == 2) for c in item.frames)  # stride 2 fits every video
            starts = sorted(int(c[0]) for c in item.frames)
            assert records[i].frames < 40 or min(np.diff(starts)) >= 6  # room for 4 starts 6 apart
            for c, L in enumerate(LENGTHS):
                want = item.frames[c].tolist()
                assert item.rgb[c].shape == (3, L, 64, 64) and item.flow[c].shape == (2, L, 64, 64)
                assert _decoded(item.rgb[c]) == want
                assert _decoded(item.flow[c]) == want                      # u
                assert _decoded(item.flow[c][1:]) == want                  # v
                assert item.flow[c].abs().max() <= 1.0


def test_indices_independent_of_worker_assignment(idx_root):
    records, _ = read_index(idx_root)
    ds = TrainClipDataset(idx_root, records, LENGTHS, 2, 6, _aug(), True, seed=3)
    ds.set_epoch(4)
    a = [ds.clip_indices(i) for i in range(len(ds))]
    ds.set_epoch(5)
    b = [ds.clip_indices(i) for i in range(len(ds))]
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, b))  # epoch changes the draw
    ds.set_epoch(4)
    single = [(bt.index.tolist(), [c.clone() for c in bt.rgb]) for bt in
              make_train_loader(ds, 2, 0, 0, 1, seed=1, epoch=4)]
    multi = [(bt.index.tolist(), [c.clone() for c in bt.rgb]) for bt in
             make_train_loader(ds, 2, 2, 0, 1, seed=1, epoch=4)]
    assert [s[0] for s in single] == [m[0] for m in multi]
    for (_, x), (_, y) in zip(single, multi):
        assert all(torch.equal(p, q) for p, q in zip(x, y))


def test_collate_layout(idx_root):
    records, _ = read_index(idx_root)
    ds = TrainClipDataset(idx_root, records, LENGTHS, 2, 6, _aug(), True, seed=0)
    batch = collate_clips([ds[0], None, ds[3]])
    assert isinstance(batch, ClipBatch) and batch.batch_size == 2 and batch.skipped == 1
    assert [tuple(c.shape) for c in batch.rgb] == [(2, 3, 8, 64, 64)] * 2 + [(2, 3, 4, 64, 64)] * 2
    assert [tuple(c.shape) for c in batch.flow] == [(2, 2, 8, 64, 64)] * 2 + [(2, 2, 4, 64, 64)] * 2
    assert batch.index.tolist() == [0, 3] and batch.label.tolist() == [records[0].label, records[3].label]
    assert collate_clips([None, None]) is None
    rgb_only = TrainClipDataset(idx_root, records, LENGTHS, 2, 6, _aug(), False, seed=0)
    assert collate_clips([rgb_only[1]]).flow is None


def test_bad_files_skipped_and_counted(idx_root, tmp_path, caplog):
    work = tmp_path / "bad"
    shutil.copytree(idx_root, work)
    records, _ = read_index(work)
    open(work / records[1].rgb, "wb").close()                                   # zero-byte rgb
    data = open(work / records[2].flow, "rb").read()
    open(work / records[2].flow, "wb").write(data[: len(data) // 2])            # truncated flow
    write_video(work / records[3].rgb, np.zeros((10, 64, 80, 3), np.uint8), 25)  # shorter than indexed
    ds = TrainClipDataset(work, records, LENGTHS, 2, 6, _aug(), True, seed=0)
    with caplog.at_level(logging.WARNING, logger="goca_fast.data.cpu_loader"):
        batches = [b for b in make_train_loader(ds, 4, 0, 0, 1, seed=0, epoch=0) if b is not None]
        again = [ds[1], ds[1]]
    assert again == [None, None]
    assert sum(b.skipped for b in batches) == 3
    assert sum(b.batch_size for b in batches) == 5
    assert ds.num_skipped == 5
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3 and all("\n" not in m for m in msgs)  # once per video
    assert any(records[1].id in m and "empty" in m for m in msgs)
    # too short per the index: skipped without touching the file
    short = TrainClipDataset(work, records, [8, 100], 2, 6, _aug(), True, seed=0)
    assert short[0] is None and short.num_skipped == 1


def test_epoch_sampler_shards():
    for n, w in [(10, 3), (17, 4), (8, 2), (5, 1)]:
        for drop_last in (True, False):
            shards = []
            for r in range(w):
                s = EpochSampler(n, r, w, seed=7, drop_last=drop_last)
                s.set_epoch(2)
                shards.append(list(s))
                assert len(s) == len(shards[-1])
            sizes = {len(x) for x in shards}
            assert len(sizes) == 1  # equal per rank
            flat = [i for x in shards for i in x]
            if drop_last:
                assert len(flat) == len(set(flat)) == n // w * w  # disjoint
            else:
                assert set(flat) == set(range(n))  # covering; duplicates only from wrap-around padding
                assert len(flat) == -(-n // w) * w and len(flat) - len(set(flat)) == len(flat) - n
    # same permutation on every rank: interleaving rank lists rebuilds one order
    a, b = EpochSampler(12, 0, 2, seed=1), EpochSampler(12, 1, 2, seed=1)
    order = [x for pair in zip(a, b) for x in pair]
    assert sorted(order) == list(range(12))
    full = EpochSampler(12, 0, 1, seed=1)
    assert order == list(full)
    e1 = EpochSampler(50, 0, 1, seed=1)
    e1.set_epoch(1)
    assert list(e1) != list(full)  # a new epoch reshuffles
    assert list(EpochSampler(6, 0, 1, seed=1, shuffle=False)) == list(range(6))
    with pytest.raises(ValueError):
        EpochSampler(5, 3, 3)


def test_sampler_resume_same_remaining_order():
    s = EpochSampler(40, 1, 2, seed=9)
    s.set_epoch(3)
    full = list(s)
    s.set_start(3, 4)
    assert list(s) == full[12:] and len(s) == len(full) - 12
    s.set_epoch(4)
    assert len(list(s)) == 20  # a new epoch clears the resume offset


def test_loader_resume_exact(idx_root):
    records, _ = read_index(idx_root)
    ds = TrainClipDataset(idx_root, records, [4], 2, 4, _aug(), False, seed=0)
    full = [b.index.tolist() for b in make_train_loader(ds, 2, 0, 0, 1, seed=5, epoch=1)]
    assert len(full) == 4
    resumed = [b for b in make_train_loader(ds, 2, 0, 0, 1, seed=5, epoch=1, start_batch=2)]
    assert [b.index.tolist() for b in resumed] == full[2:]
    # the resumed clips are the same pixels as the original epoch's (per-item RNG)
    orig = list(make_train_loader(ds, 2, 0, 0, 1, seed=5, epoch=1))
    assert torch.equal(orig[3].rgb[0], resumed[1].rgb[0])


def test_loaders_leave_the_global_rng_alone(idx_root):
    """Iterating a training or evaluation loader (in-process and with a worker) draws nothing from torch's global
    RNG, so what runs after it (a network's initialisation, dropout) does not depend on how many loaders ran."""
    records, _ = read_index(idx_root)
    train = TrainClipDataset(idx_root, records, [4], 2, 4, _aug(), False, seed=0)
    evaluation = EvalClipDataset(idx_root, records[:2], ViewSpec(clip_length=4, stride=2, num_clips=1, crops=1,
                                                                 crop_size=64, short_side=64), with_flow=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for workers in (0, 1):
        assert len(list(make_train_loader(train, 2, workers, 0, 1, seed=5, epoch=1))) == 4
        assert len(list(make_eval_loader(evaluation, 2, workers))) == 1
    assert torch.equal(torch.get_rng_state(), before)


def test_eval_dataset_views_and_alignment(idx_root):
    records, _ = read_index(idx_root)
    ds = EvalClipDataset(idx_root, records, ViewSpec(clip_length=8, stride=4, num_clips=3, crops=3, crop_size=64,
                                                     short_side=64), with_flow=True)
    item = ds[3]
    assert item.rgb.shape == (9, 3, 8, 64, 64) and item.flow.shape == (9, 2, 8, 64, 64)
    ev = uniform_eval_clips(records[3].frames, 8, 4, 3)
    for v in range(9):
        want = ev.indices[v // 3].tolist()
        assert _decoded(item.rgb[v]) == want and _decoded(item.flow[v]) == want
    assert not item.padded
    batches = list(make_eval_loader(ds, 3, 0))
    assert sum(b.rgb.shape[0] for b in batches) == len(FRAMES)
    assert batches[0].rgb.shape == (3, 9, 3, 8, 64, 64) and batches[0].padded.dtype == torch.bool
    one = EvalClipDataset(idx_root, records, ViewSpec(clip_length=8, stride=4, num_clips=2, crops=1, crop_size=56,
                                                      short_side=64), with_flow=False)
    it = one[0]
    assert it.rgb.shape == (2, 3, 8, 56, 56) and it.flow is None
    assert list(ShardSampler(7, 1, 3)) == [1, 4]


def test_eval_padded_short_video(tmp_path):
    root = make_frame_index_dataset(tmp_path / "s", [5], height=64, width=80)
    records, _ = read_index(root)
    ds = EvalClipDataset(root, records, ViewSpec(clip_length=8, stride=2, num_clips=2, crops=1, crop_size=64,
                                                 short_side=64), with_flow=True)
    item = ds[0]
    assert item.padded and _decoded(item.rgb[0]) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert _decoded(item.flow[1]) == [0, 1, 2, 3, 4, 4, 4, 4]


def test_record_table_holds_the_records_it_was_given():
    """The packed table loader workers read gives back exactly the records (every field), by any index."""
    from goca_fast.data.index import RecordTable, VideoRecord
    recs = [VideoRecord(id=f"v{i}", rgb=f"rgb/c{i % 3}/v{i}.mp4", flow=None if i == 4 else f"flow/c{i % 3}/v{i}.mp4",
                        label=i % 3, cls=f"c{i % 3}", frames=40 + i, fps=25.0 + i / 8, width=340, height=256,
                        splits=["train"] if i % 2 else ["test", "trainval"]) for i in range(7)]
    table = RecordTable(recs)
    assert len(table) == 7 and list(table) == recs and table[-1] == recs[6] and table[2:5] == recs[2:5]
    assert table.nbytes > 0
    with pytest.raises(IndexError):
        table[7]
    assert len(RecordTable([])) == 0


def test_training_dataset_reads_its_records_from_a_table(idx_root):
    records, _ = read_index(idx_root)
    ds = TrainClipDataset(idx_root, records, clip_lengths=[8], stride=1, min_distance=0,
                          augment=ClipAugment(crop_size=64, scale_range=(64, 64)), with_flow=True, seed=0)
    assert type(ds.records).__name__ == "RecordTable" and list(ds.records) == records
