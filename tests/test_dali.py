"""DALI pipelines on the DALI CPU backend (device_id=None), the same graph the GPU runs; GPU variants are marked."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

dali = pytest.importorskip("nvidia.dali", reason="DALI is part of the [dali] extra installed by CI")

from dali_pipelines.bitstream import BitstreamError, gop_runs, packet_table, read_segment, segment_positions  # noqa: E402
from dali_pipelines.eval import DaliEvalLoader  # noqa: E402
from dali_pipelines.source import P_FLIP, TrainSource, video_metas  # noqa: E402
from dali_pipelines.train import build_dali_train_loader  # noqa: E402
from dali_pipelines.validate import validate_for_dali  # noqa: E402
from goca_fast.config import load_config  # noqa: E402
from goca_fast.data.cpu_loader import EvalClipDataset, TrainClipDataset, make_eval_loader, make_train_loader  # noqa: E402
from goca_fast.data.index import read_index, write_index  # noqa: E402
from goca_fast.data.synthetic import decode_frame_index, make_frame_index_dataset, make_synthetic_dataset  # noqa: E402
from goca_fast.data.video_io import write_video  # noqa: E402
from goca_fast.distributed import DistInfo  # noqa: E402
from goca_fast.flow.codec import read_flow_frames, write_flow_video  # noqa: E402
from goca_fast.pretrain import train_augment  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAME_COUNTS = [40, 57, 64, 33, 80, 48, 45, 70, 36]


@pytest.fixture(scope="module")
def index_root(tmp_path_factory):
    """Frame-index videos (each frame's pixels encode its index) with a GOP of 8."""
    return make_frame_index_dataset(tmp_path_factory.mktemp("fidx"), FRAME_COUNTS, height=72, width=96, gop=8)


@pytest.fixture(scope="module")
def motion_root(tmp_path_factory):
    """Small textured motion dataset (real pictures, for comparing values with the CPU loader)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("motion"), num_classes=2, videos_per_class=4, frames=36,
                                  height=64, width=80, seed=3, workers=1)


def cfg_for(root, *overrides):
    return load_config(os.path.join(REPO, "configs", "demo.yaml"),
                       [f"data.root={root}", "data.loader=dali", "data.workers=0", "data.batch_size=4",
                        "data.min_distance=2", "data.dali_process_batches=-1", *overrides])


# frames survive crops only when the whole height is kept: short side = crop = full height
INDEX_AUG = ("data.scale_range=[64,64]", "data.crop_size=64")


def batches(cfg, root, epoch=0, start=0, info=None):
    factory, n = build_dali_train_loader(cfg, info or DistInfo(), root)
    return list(factory(epoch, start)), n


def frame_ids(clip_nctHW: torch.Tensor, n: int, channel=None) -> list[int]:
    x = clip_nctHW[n]
    return [decode_frame_index((x[:, t].permute(1, 2, 0) if channel is None else x[channel, t]).numpy())
            for t in range(x.shape[1])]


def dali_decode(segment: np.ndarray) -> np.ndarray:
    """One encoded segment through DALI's CPU video decoder -> F×H×W×3 uint8."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return fn.experimental.decoders.video(fn.external_source(source=lambda: [segment], batch=True,
                                                                 dtype=types.UINT8), device="cpu")
    p = pipe()
    p.build()
    return np.array(p.run()[0][0])


# ------------------------------------------------------------------ bitstream (pure parts + file checks)


def test_gop_runs_cover_needed_frames_once(index_root):
    recs, _ = read_index(index_root)
    table = packet_table(os.path.join(index_root, recs[4].rgb))  # 80 frames, keyframes every 8
    assert table.keyframes.tolist() == list(range(0, 80, 8))
    want = np.array([3, 5, 7, 30, 31, 50, 52, 54, 9])
    runs = gop_runs(table, want)
    assert runs == [(0, 10), (24, 32), (48, 55)]  # 0..9 merges GOPs 0 and 1; trailing frames are not decoded
    pos = segment_positions(runs, want)
    assert pos.tolist() == [3, 5, 7, 16, 17, 20, 22, 24, 9]
    with pytest.raises(BitstreamError, match="outside"):
        gop_runs(table, np.array([80]))


def test_segment_decodes_to_the_wanted_frames(index_root):
    recs, _ = read_index(index_root)
    table = packet_table(os.path.join(index_root, recs[2].rgb))
    want = np.array([1, 17, 18, 40, 63])
    runs = gop_runs(table, want)
    seg = read_segment(table, runs)
    frames = dali_decode(seg)
    assert frames.shape[0] == sum(b - a for a, b in runs)
    assert [decode_frame_index(frames[i]) for i in segment_positions(runs, want)] == want.tolist()


def test_flow_video_full_range_round_trip_through_dali(tmp_path):
    """Every u8 level 0..255 comes back from DALI's decoder within one level (full range honoured)."""
    ramp = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(16, 16), (4, 16, 16))
    flow = np.stack([np.kron(ramp, np.ones((1, 4, 4), np.uint8)), 255 - np.kron(ramp, np.ones((1, 4, 4), np.uint8))], -1)
    path = tmp_path / "f.mp4"
    write_flow_video(path, flow, 25, gop=4)
    table = packet_table(path)
    seg = read_segment(table, [(0, 4)])
    got = dali_decode(seg).astype(int)
    h = flow.shape[1]
    err_u = np.abs(got[:, :h, :, 0] - flow[..., 0]).mean()
    err_v = np.abs(got[:, h:, :, 0] - flow[..., 1]).mean()
    assert err_u <= 1.0 and err_v <= 1.0, (err_u, err_v)
    assert np.abs(got[:, :h, :, 0] - read_flow_frames(path, range(4))[..., 0]).max() <= 1


def test_packet_table_rejects_bad_files(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(os.urandom(4096))
    with pytest.raises(BitstreamError, match="empty file"):
        packet_table(tmp_path / "empty.mp4")
    with pytest.raises(BitstreamError, match="cannot open|no video"):
        packet_table(tmp_path / "junk.mp4")
    with pytest.raises(BitstreamError, match="no such file"):
        packet_table(tmp_path / "missing.mp4")


# ------------------------------------------------------------------ training pipeline


def test_rgb_and_flow_decoded_at_the_sampled_frames(index_root):
    """Every clip of every video: RGB, flow u and flow v show exactly the CPU sampler's frame indices."""
    cfg = cfg_for(index_root, *INDEX_AUG, "data.color_jitter_p=0", "data.grayscale_p=0")
    recs, _ = read_index(index_root)
    cpu = TrainClipDataset(index_root, recs, cfg.clip_lengths, cfg.data.stride, cfg.data.min_distance,
                           train_augment(cfg), True, cfg.seed)
    for epoch in (0, 1):
        got, n = batches(cfg, index_root, epoch)
        assert len(got) == n == len(recs) // 4
        cpu.set_epoch(epoch)
        for batch in got:
            assert batch.skipped == 0
            for row, idx in enumerate(batch.index.tolist()):
                want = cpu.clip_indices(idx)
                for c, clip in enumerate(batch.rgb):
                    assert clip.shape[2] == cfg.clip_lengths[c]
                    assert frame_ids(clip, row) == want[c].tolist()
                    assert frame_ids(batch.flow[c], row, 0) == want[c].tolist()
                    assert frame_ids(batch.flow[c], row, 1) == want[c].tolist()


@pytest.mark.parametrize("flow_mode", ["shared", "official"])
def test_same_batches_as_the_cpu_loader(motion_root, flow_mode):
    """Same videos, frames, crops, flips and draws as the CPU loader; values equal up to resampling (colour
    jitter off: DALI's contrast pivots on mid-grey, torchvision's on the image mean)."""
    cfg = cfg_for(motion_root, "data.color_jitter_p=0", "data.grayscale_p=0.5", f"data.flow_mode={flow_mode}")
    recs, _ = read_index(motion_root)
    train = [r for r in recs if "train" in r.splits]
    ds = TrainClipDataset(motion_root, train, cfg.clip_lengths, cfg.data.stride, cfg.data.min_distance,
                          train_augment(cfg), True, cfg.seed)
    cpu = list(make_train_loader(ds, 4, 0, 0, 1, cfg.seed, 0))
    got, _ = batches(cfg, motion_root)
    assert len(got) == len(cpu)
    for a, b in zip(got, cpu):
        assert a.index.tolist() == b.index.tolist()
        for x, y in zip(a.rgb + a.flow, b.rgb + b.flow):
            assert x.shape == y.shape and x.dtype == torch.float32
            assert (x - y).abs().mean() < 0.05, (x - y).abs().mean()  # measured 0.034 RGB (≈2 grey levels)
            assert torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1] > 0.99


def test_flip_negates_u(tmp_path):
    """Uniform flow (u=+5, v=-3 px): a flipped clip reads u=-5/20, an unflipped one +5/20; v is untouched."""
    from goca_fast.data.index import VideoRecord
    from goca_fast.flow.codec import dequantise_flow, quantise_flow
    root = tmp_path / "const"
    recs = []
    for i in range(8):
        rgb = np.random.default_rng(i).integers(0, 255, (24, 48, 64, 3), dtype=np.uint8)
        flow = quantise_flow(np.broadcast_to(np.array([5.0, -3.0], np.float32), (24, 48, 64, 2)))
        write_video(root / f"rgb/{i}.mp4", rgb, 25, gop=8)
        write_flow_video(root / f"flow/{i}.mp4", flow, 25, gop=8)
        recs.append(VideoRecord(str(i), f"rgb/{i}.mp4", f"flow/{i}.mp4", i % 2, f"c{i % 2}", 24, 25.0, 64, 48,
                                ["train"]))
    write_index(root, recs, ["c0", "c1"])
    u_px, v_px = dequantise_flow(flow[0, 0, 0])
    cfg = cfg_for(root, "data.scale_range=[48,56]", "data.crop_size=40")
    src = TrainSource(video_metas(root, recs), cfg.clip_lengths, cfg.data.stride, cfg.data.min_distance,
                      train_augment(cfg), True, cfg.seed, 0, 1, 4, 2, 0, 0)
    got, _ = batches(cfg, root)
    seen = set()
    for b, batch in enumerate(got):
        for row in range(4):
            sample = src(type("Info", (), {"idx_in_epoch": 4 * b + row})())
            for c in range(len(cfg.clip_lengths)):
                flipped = bool(sample[3 + 4 * c + 3][P_FLIP])
                seen.add(flipped)
                u, v = batch.flow[c][row, 0], batch.flow[c][row, 1]
                assert torch.allclose(u, torch.full_like(u, (-u_px if flipped else u_px) / 20), atol=1e-5)
                assert torch.allclose(v, torch.full_like(v, v_px / 20), atol=1e-5)
    assert seen == {True, False}


def test_one_draw_per_clip(index_root):
    """Colour jitter / greyscale are drawn once per clip: all frames of a clip get the same transform (the two
    reference bands of the frame-index pictures have the same values in every frame), clips differ."""
    cfg = cfg_for(index_root, *INDEX_AUG, "data.color_jitter_p=1", "data.grayscale_p=0")
    got, _ = batches(cfg, index_root)
    per_clip = []
    for c, clip in enumerate(got[0].rgb):
        x = clip[0]  # 3×T×H×W
        bands = x[:, :, 2:6].mean(dim=(2, 3))  # dark reference band, per channel and frame
        assert (bands - bands[:, :1]).abs().max() < 0.02  # ≤ 1 grey level of H.264 noise
        per_clip.append(bands[:, 0])
    assert max((per_clip[0] - p).abs().max() for p in per_clip[1:]) > 0.1


def test_seeded_determinism_and_exact_resume(index_root):
    cfg = cfg_for(index_root, *INDEX_AUG)
    a, _ = batches(cfg, index_root, epoch=1)
    b, _ = batches(cfg, index_root, epoch=1, start=1)  # resume at batch 1 of epoch 1
    for x, y in zip(a[1].rgb + a[1].flow, b[0].rgb + b[0].flow):
        assert torch.equal(x, y)
    c, _ = batches(cfg_for(index_root, *INDEX_AUG, "seed=5"), index_root, epoch=1)
    assert not all(torch.equal(x, y) for x, y in zip(a[0].rgb, c[0].rgb))


def test_factory_reuses_the_pipeline_across_epochs(index_root):
    cfg = cfg_for(index_root, *INDEX_AUG)
    factory, n = build_dali_train_loader(cfg, DistInfo(), index_root)
    first = [list(factory(e, 0)) for e in range(3)]
    assert factory.rebuilds == 1  # prefetching ran on across epoch boundaries
    again, _ = batches(cfg, index_root, epoch=2)
    assert all(torch.equal(x, y) for x, y in zip(first[2][0].rgb, again[0].rgb))
    assert sorted(i for b in first[0] for i in b.index.tolist()) != sorted(i for b in first[1] for i in b.index.tolist()) \
        or [b.index.tolist() for b in first[0]] != [b.index.tolist() for b in first[1]]  # reshuffled


def test_shards_are_disjoint_and_cover(index_root):
    cfg = cfg_for(index_root, *INDEX_AUG, "data.batch_size=2")
    seen = []
    for rank in (0, 1):
        got, n = batches(cfg, index_root, info=DistInfo(rank=rank, world_size=2))
        assert n == (len(FRAME_COUNTS) // 2) // 2
        seen.append([i for b in got for i in b.index.tolist()])
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 2 * n * 2


def test_parallel_workers_give_the_same_batches(index_root):
    cfg0 = cfg_for(index_root, *INDEX_AUG)
    cfg2 = cfg_for(index_root, *INDEX_AUG, "data.workers=2")
    a, _ = batches(cfg0, index_root)
    b, _ = batches(cfg2, index_root)
    for x, y in zip(a[-1].rgb + a[-1].flow, b[-1].rgb + b[-1].flow):
        assert torch.equal(x, y)


# ------------------------------------------------------------------ producer processes (decoder leak workaround)


def test_decoder_leak_is_what_the_recycling_assumes(index_root):
    """DALI 1.34's video decoder keeps ~72 KB per decoded sample (DALI issue 5775); producer processes are sized
    from that figure (dali_pipelines.train.DECODER_LEAK_KB)."""
    from nvidia.dali import fn, pipeline_def, types
    from dali_pipelines.train import DECODER_LEAK_KB
    recs, _ = read_index(index_root)
    seg = read_segment(packet_table(os.path.join(index_root, recs[0].rgb)), [(0, 8)])

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        return fn.experimental.decoders.video(fn.external_source(source=lambda: [seg] * 8, batch=True,
                                                                 dtype=types.UINT8), device="cpu")

    def rss_kb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    p = pipe()
    p.build()
    for _ in range(30):
        p.run()
    before = rss_kb()
    for _ in range(150):
        p.run()
    per_decode = (rss_kb() - before) / (150 * 8)
    assert 0.5 * DECODER_LEAK_KB < per_decode < 2 * DECODER_LEAK_KB, per_decode


def test_producer_processes_give_the_same_batches_and_survive_a_crash(index_root):
    cfg_local = cfg_for(index_root, *INDEX_AUG)
    cfg_proc = cfg_for(index_root, *INDEX_AUG, "data.dali_process_batches=3")
    local = [list(build_dali_train_loader(cfg_local, DistInfo(), index_root)[0](e, 0)) for e in range(2)]
    factory, n = build_dali_train_loader(cfg_proc, DistInfo(), index_root)
    try:
        got = [list(factory(e, 0)) for e in range(2)]
        assert len(factory.producers) >= 2  # replaced every 3 batches
        for a, b in zip(sum(local, []), sum(got, [])):
            assert a.index.tolist() == b.index.tolist()
            assert all(torch.equal(x, y) for x, y in zip(a.rgb + a.flow, b.rgb + b.flow))
        # a producer that dies (as on a decoder crash) costs only its batch, which the CPU loader decodes
        it = factory(2, 0)
        first = next(it)
        os.kill(factory.producers[-1], 9)
        rest = list(it)
        assert first is not None and len(rest) == n - 1 and all(b is not None for b in rest)
        want = list(build_dali_train_loader(cfg_local, DistInfo(), index_root)[0](2, 0))
        assert [b.index.tolist() for b in [first] + rest] == [b.index.tolist() for b in want]
    finally:
        factory.close()


# ------------------------------------------------------------------ bad input


@pytest.fixture()
def broken_root(tmp_path, index_root):
    """Copy of the frame-index set with a zero-byte video, a truncated one, junk, and a flow/RGB mismatch."""
    root = tmp_path / "broken"
    shutil.copytree(index_root, root)
    recs, classes = read_index(root)
    (root / recs[0].rgb).write_bytes(b"")
    data = (root / recs[1].rgb).read_bytes()
    (root / recs[1].rgb).write_bytes(data[:len(data) // 2])
    (root / recs[2].flow).write_bytes(os.urandom(3000))
    rgb, flow = np.zeros((10, 72, 96, 3), np.uint8), np.zeros((10, 72, 96, 2), np.uint8)
    write_video(root / recs[3].rgb, rgb[:recs[3].frames // 10 * 10].repeat(1, 0), 25, gop=8)  # wrong frame count
    write_flow_video(root / recs[4].flow, flow, 25, gop=8)  # 10 flow frames for an 80-frame video
    write_index(root, recs, classes)
    return root, recs


def test_bad_videos_are_excluded_with_a_report(broken_root):
    root, recs = broken_root
    good, excluded = validate_for_dali(root, recs, with_flow=True)
    bad_ids = {e["id"]: e["reason"] for e in excluded}
    assert set(bad_ids) == {r.id for r in recs[:5]}
    assert "empty file" in bad_ids[recs[0].id]
    assert "frames" in bad_ids[recs[3].id] and "flow has 10 frames" in bad_ids[recs[4].id]
    report = [json.loads(line) for line in (root / "dali_excluded.jsonl").read_text().splitlines()]
    assert {e["id"] for e in report} == set(bad_ids)
    assert [r.id for r in good] == [r.id for r in recs[5:]]
    # training runs on what is left; evaluation counts the excluded videos as unreadable
    cfg = cfg_for(root, *INDEX_AUG, "data.batch_size=2")
    got, n = batches(cfg, root)
    assert n == 2 and all(b.batch_size == 2 for b in got)
    ev = DaliEvalLoader(root, recs, 8, 2, 2, 64, 64, True, crops=1, batch_size=4)
    out = list(ev)
    assert out[0] is None  # videos 0-3: all excluded (the feature extractor counts them as unreadable)
    assert sorted(i for b in out[1:] for i in b.index.tolist()) == list(range(5, len(recs)))
    assert [b.skipped for b in out[1:]] == [1, 0]  # video 4 failed; the last batch's padding is not a failure


def test_a_video_that_fails_at_run_time_is_dropped_not_fatal(index_root, tmp_path):
    """A file that passed validation and then disappeared: placeholder sample, dropped from the batch, counted."""
    root = tmp_path / "vanish"
    shutil.copytree(index_root, root)
    cfg = cfg_for(root, *INDEX_AUG, "data.batch_size=8")
    factory, _ = build_dali_train_loader(cfg, DistInfo(), root)
    recs, _ = read_index(root)
    os.remove(root / recs[2].rgb)
    (batch,) = list(factory(0, 0))
    assert batch.skipped == 1 and batch.batch_size == 7 and 2 not in batch.index.tolist()


# ------------------------------------------------------------------ evaluation pipeline


def test_eval_pipeline_matches_the_cpu_eval_loader(motion_root):
    recs, _ = read_index(motion_root)
    test = [r for r in recs if "test" in r.splits] + [r for r in recs if "train" in r.splits][:3]
    ds = EvalClipDataset(motion_root, test, 4, 2, 3, 48, 56, True, crops=3)
    cpu = [b for b in make_eval_loader(ds, 2, 0)]
    dl = [b for b in DaliEvalLoader(motion_root, test, 4, 2, 3, 48, 56, True, crops=3, batch_size=2)]
    assert [b.index.tolist() for b in dl] == [b.index.tolist() for b in cpu]  # every video once, in order
    for a, b in zip(dl, cpu):
        assert a.rgb.shape == b.rgb.shape and a.flow.shape == b.flow.shape  # N×V×C×T×h×w, V = 3 clips × 3 crops
        assert (a.rgb - b.rgb).abs().mean() < 0.05 and (a.flow - b.flow).abs().mean() < 0.05  # measured 0.034
        assert torch.equal(a.padded, b.padded) and torch.equal(a.label, b.label)


def test_eval_shards_cover_every_video_exactly_once(index_root):
    recs, _ = read_index(index_root)
    seen = []
    for rank in (0, 1):
        ev = DaliEvalLoader(index_root, recs, 8, 2, 2, 64, 64, True, crops=1, batch_size=4, rank=rank,
                            world_size=2)
        seen += [i for b in ev for i in b.index.tolist()]
    assert sorted(seen) == list(range(len(recs)))


# ------------------------------------------------------------------ the trainer on the DALI loader


def test_pretrain_runs_on_the_dali_loader_and_exits(tmp_path):
    """The real command, in its own process (default producer-process mode): it trains, and the interpreter exits
    (a producer waiting for its release once held up the exit forever)."""
    cmd = [sys.executable, "-m", "goca_fast.pretrain", "--config", os.path.join(REPO, "configs", "demo.yaml"),
           f"output_dir={tmp_path}", "data.loader=dali", f"data.cache_dir={tmp_path / 'cache'}",
           "data.synthetic.videos_per_class=4", "optim.epochs=1", "optim.warmup_epochs=0", "data.workers=0",
           "eval.knn_after_training=false"]
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()
    assert lines and np.isfinite(json.loads(lines[-1])["loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_pipeline_frame_alignment(index_root):
    cfg = cfg_for(index_root, *INDEX_AUG, "data.color_jitter_p=0", "data.grayscale_p=0", "engine.amp=off")
    got, _ = batches(cfg, index_root, info=DistInfo(device=torch.device("cuda", 0)))
    recs, _ = read_index(index_root)
    cpu = TrainClipDataset(index_root, recs, cfg.clip_lengths, cfg.data.stride, cfg.data.min_distance,
                           train_augment(cfg), True, cfg.seed)
    for batch in got:
        assert batch.rgb[0].is_cuda
        for row, idx in enumerate(batch.index.tolist()):
            for c, clip in enumerate(batch.rgb):
                want = cpu.clip_indices(idx)[c].tolist()
                assert frame_ids(clip.cpu(), row) == want == frame_ids(batch.flow[c].cpu(), row, 0)
