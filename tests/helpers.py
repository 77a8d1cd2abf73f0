"""What several test files share (no tests here): a tiny dataset and a tiny 'pretrained' run for the evaluation
tests, the goca-eval runners called as the command line calls them, independent float64 re-derivations of the GOCA
assignment, and frame-index videos whose pixels encode their own index (loader alignment tests).

The tiny dataset and run are built once per test session (functools.cache) in a temporary folder removed at exit:
4 classes × 4 videos of 16 frames at 32×40 (3 train + 1 test video per class), and a run directory holding a
checkpoint of the tiny two-stream network with random weights plus config.yaml, exactly as pretraining lays them
out.
"""
import atexit
import contextlib
import functools
import json
import math
import os
import shutil
import socket
import tempfile
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from goca_fast.plan.evaluation import CheckpointRequest, EvalOverrides, eval_setup, finetune_start
from goca_fast.plan.run import build_model, build_trainer, plan_settings
from goca_fast.train.engine import TrainLoader
from goca_fast.train.checkpoint import latest_path, save_checkpoint
from goca_fast.config import Config, config_to_yaml, load_config
from goca_fast.data.index import VideoRecord, write_index
from goca_fast.data.synthetic import SyntheticSpec, make_synthetic_dataset
from goca_fast.video.io import PREPARED_ENTROPY, write_video
from goca_fast.data.views import ViewOverrides
from goca_fast.eval.codes import CodesOptions, run_codes
from goca_fast.eval.export import ExportOptions, run_export
from goca_fast.eval.finetune import run_finetune
from goca_fast.eval.knn import KnnOptions, run_knn
from goca_fast.eval.linear import LinearOptions, run_linear
from goca_fast.eval.plots import PlotOptions, run_plots
from goca_fast.video.flow_codec import write_flow_video

# ------------------------------------------------------------------------------------------------ evaluation runs
TINY = ["model.arch=tiny", "model.pool=global", "model.hidden_dim=32", "model.embed_dim=16",
        "model.num_prototypes=8", "data.crop_size=24", "data.scale_range=[32,32]", "data.frames_per_group=[8,4]",
        "data.clips_per_group=[2,2]", "data.stride=1", "data.min_distance=2", "eval.clips=2", "eval.crops=1",
        "eval.batch_size=4", "data.workers=0", "name=tiny"]


@functools.cache
def base_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="goca_eval_tests_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@functools.cache
def tiny_dataset() -> Path:
    root = base_dir() / "ds"
    make_synthetic_dataset(root, SyntheticSpec(num_classes=4, videos_per_class=4, frames=16, height=32, width=40),
                           workers=1)
    return root


def tiny_config(root: Path, *extra: str) -> Config:
    return load_config(None, [*TINY, f"data.root={root}", *extra])


def make_run(run_dir: Path, *extra: str, seed: int = 0, epoch: int = 3) -> Path:
    """A run directory with checkpoints/latest.pth of a randomly initialised tiny model (and config.yaml)."""
    cfg = tiny_config(tiny_dataset(), *extra)
    torch.manual_seed(seed)
    model = build_model(plan_settings(cfg))
    save_checkpoint(latest_path(run_dir), {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": epoch})
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    return run_dir


@functools.cache
def tiny_run() -> Path:
    return make_run(base_dir() / "run")


def copy_dataset(dst: Path) -> Path:
    """A private copy of the tiny dataset a test may damage."""
    shutil.copytree(tiny_dataset(), dst)
    return dst


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convolutions gain nothing from intra-op threads, and on a busy 2-core runner OpenMP spinning makes
    them ~50× slower; restored afterwards so other test modules are unaffected. Import it into a test module to
    apply it there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REQUEST_KEYS = ("streams", "expect_arch", "config_path")                 # a CheckpointRequest
OVERRIDE_KEYS = ("data_root", "train_split", "test_split", "batch_size", "workers")   # EvalOverrides


RUNNER_KEYS = ("out_dir", "use_cache")
VIEW_KEYS = ("clips", "crops", "clip_length", "stride")   # a ViewOverrides, for the runners whose options take one
RUNNER_OPTIONS = {run_knn: KnnOptions, run_codes: CodesOptions, run_linear: LinearOptions, run_export: ExportOptions, run_plots: PlotOptions}


def run_eval(runner, source, **kw):
    """`runner` (run_knn, run_codes, run_linear, run_export, run_plots) on a checkpoint as goca-eval runs it: the setup's
    keywords go to `goca_fast.plan.evaluation.eval_setup` (device cpu unless given), out_dir/use_cache to the
    runner, the others into its options object (clips/crops/clip_length/stride as its ViewOverrides where it has
    one)."""
    request = CheckpointRequest(str(source), need_heads=kw.get("feature") == "head" or runner is run_codes,
                                **{k: kw.pop(k) for k in REQUEST_KEYS if k in kw})
    overrides = EvalOverrides(**{k: kw.pop(k) for k in OVERRIDE_KEYS if k in kw})
    setup = eval_setup(request, overrides, device=kw.pop("device", "cpu"))
    run_kw = {k: kw.pop(k) for k in RUNNER_KEYS if k in kw}
    options = RUNNER_OPTIONS[runner]
    if "overrides" in {f.name for f in fields(options)}:
        kw["overrides"] = ViewOverrides(**{k: kw.pop(k) for k in VIEW_KEYS if k in kw})
    return runner(setup, options(**kw), quiet=True, **run_kw)


def finetune(source, out, settings, **kw):
    """`goca-eval finetune` of `source` into `out` on the CPU without loader workers (resumes `out` unless fresh)."""
    kw = {"workers": 0, **kw}
    request = CheckpointRequest(str(source), **{k: kw.pop(k) for k in REQUEST_KEYS if k in kw})
    overrides = EvalOverrides(**{k: kw.pop(k) for k in OVERRIDE_KEYS if k in kw})
    return run_finetune(finetune_start(request, overrides, out_dir=str(out), device=kw.pop("device", "cpu"), **kw),
                        settings, quiet=True)


def brute_force_recall(q, qy, g, gy, ks):
    """R@k by hand: python floats, full sort by (-cosine, gallery position)."""
    hits = {k: 0 for k in ks}
    for i in range(len(q)):
        qn = math.sqrt(sum(v * v for v in q[i]))
        sims = []
        for j in range(len(g)):
            gn = math.sqrt(sum(v * v for v in g[j]))
            sims.append((-sum(a * b for a, b in zip(q[i], g[j])) / (qn * gn), j))
        order = [j for _, j in sorted(sims)]
        for k in ks:
            if any(gy[j] == qy[i] for j in order[:k]):
                hits[k] += 1
    return {k: 100.0 * hits[k] / len(q) for k in ks}


def cached_features(cache_dir: Path, split: str) -> tuple[dict, dict, dict]:
    """(index.json, stream → N×F float32 video features, stream → N×V×F view features or {}) of the one cached
    feature folder of `split` under `cache_dir`."""
    (folder,) = [d for d in Path(cache_dir).iterdir() if d.name.startswith(f"{split}-")]
    meta = json.loads((folder / "index.json").read_text())
    views = {s: np.load(folder / f"{s}_views.npy") for s in meta["streams"]} if meta["has_views"] else {}
    return meta, {s: np.load(folder / f"{s}.npy") for s in meta["streams"]}, views


def encode_rgb(container, stream, frames) -> None:
    """Encode H×W×3 uint8 RGB frames into `stream` of an open PyAV output `container`, then flush the stream."""
    for i, f in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(f, format="rgb24")
        vf.pts = i
        for p in stream.encode(vf):
            container.mux(p)
    for p in stream.encode(None):
        container.mux(p)


# ------------------------------------------------------------------------------------------------ assignment
def plain_iterate64(S, eps, iters, P=None, eps2=0.0, sign=1.0):
    """The official iterate (docs/official_behaviour.md#assignment) in float64 numpy, written independently of
    goca_fast."""
    S = np.asarray(S, dtype=np.float64)
    X = S / eps if P is None else (S + sign * eps2 * np.log(np.asarray(P, np.float64) / S.shape[0])) / (eps + eps2)
    Q = np.exp(X).T
    Q /= Q.sum()
    K, B = Q.shape
    for _ in range(iters):
        Q /= Q.sum(axis=1, keepdims=True)
        Q /= K
        Q /= Q.sum(axis=0, keepdims=True)
        Q /= B
    return (Q * B).T


def goca64(Sr, Sf, eps, eps2, iters, cycles, sign):
    Pf, Pr = plain_iterate64(Sf, eps, iters), plain_iterate64(Sr, eps, iters)
    for _ in range(cycles):
        Qr = plain_iterate64(Sr, eps, iters, Pf, eps2, sign)
        Qf = plain_iterate64(Sf, eps, iters, Pr, eps2, sign)
        Pr, Pf = Qr, Qf
    return Pr, Pf


def cosine_scores(B, K, D=32, seed=0, noise_of=None, noise=0.5):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(K, D, generator=g), dim=1)
    emb = torch.randn(B, D, generator=g) if noise_of is None else noise_of + noise * torch.randn(B, D, generator=g)
    emb = F.normalize(emb, dim=1)
    return emb @ protos.t(), emb, protos


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def free_port() -> int:
    """A TCP port free on this host right now (a gloo rendezvous for spawned test processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/<pid>/stat file after the command name (which may hold spaces and parentheses):
    [0] state, [1] parent pid, ..., [11] utime, [12] stime."""
    return stat.read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """The processes below `pid` in the process tree (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            children.setdefault(int(proc_stat_fields(stat)[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


# ------------------------------------------------------------------------------------------------ frame-index videos
# Every frame writes its own index as a binary code in full-width horizontal bands (two reference bands + one band
# per bit), in RGB and in both flow channels. The code survives H.264, resizing, horizontal crops and flips,
# brightness/contrast, greyscale and normalisation, so a loader test can decode the index back and prove frame
# alignment.
INDEX_BITS = 10
_LEVELS = (40, 215)


def _bands(height: int, nbits: int) -> list[tuple[int, int]]:
    """Row range (middle half) of each band: 2 references then nbits bits, top to bottom."""
    nb = nbits + 2
    out = []
    for k in range(nb):
        a, b = k * height / nb, (k + 1) * height / nb
        q = (b - a) / 4
        out.append((int(np.floor(a + q)), max(int(np.floor(a + q)) + 1, int(np.ceil(b - q)))))
    return out


def _code_column(index: int, height: int, nbits: int, invert: bool = False) -> np.ndarray:
    """H values: band k gets dark/bright according to reference pattern and the bits of index."""
    lo, hi = (_LEVELS[1], _LEVELS[0]) if invert else _LEVELS
    bits = [0, 1] + [(index >> b) & 1 for b in range(nbits)]
    nb = len(bits)
    col = np.empty(height, np.uint8)
    for k, bit in enumerate(bits):
        col[int(round(k * height / nb)):int(round((k + 1) * height / nb))] = hi if bit else lo
    return col


def frame_index_video(num_frames: int, height: int, width: int,
                      nbits: int = INDEX_BITS) -> tuple[np.ndarray, np.ndarray]:
    """RGB T×H×W×3 and flow T×H×W×2 uint8 frames whose pixels encode their own index.

    RGB is grey; flow u carries the code, flow v the code with dark/bright swapped (both decode
    to the same index). Needs height >= 3*(nbits+2) so bands survive H.264.
    """
    if num_frames > 2 ** nbits:
        raise ValueError(f"{num_frames} frames need more than {nbits} bits")
    if height < 3 * (nbits + 2):
        raise ValueError(f"height {height} too small for {nbits + 2} bands")
    rgb = np.empty((num_frames, height, width, 3), np.uint8)
    flow = np.empty((num_frames, height, width, 2), np.uint8)
    for i in range(num_frames):
        rgb[i] = _code_column(i, height, nbits)[:, None, None]
        flow[i, ..., 0] = _code_column(i, height, nbits)[:, None]
        flow[i, ..., 1] = _code_column(i, height, nbits, invert=True)[:, None]
    return rgb, flow


def decode_frame_index(frame, nbits: int = INDEX_BITS) -> int:
    """Index written by frame_index_video, from an H×W or H×W×C frame of any affine scaling.

    Each bit band is read as closer to the bright or to the dark reference band, so any
    monotone or sign-flipping affine map of the values (normalisation, /20, negation) keeps it.
    """
    f = np.asarray(frame, dtype=np.float64)
    if f.ndim == 3:
        f = f.mean(axis=2)
    if f.ndim != 2:
        raise ValueError(f"expected H×W or H×W×C, got shape {f.shape}")
    means = [f[a:b].mean() for a, b in _bands(f.shape[0], nbits)]
    dark, bright = means[0], means[1]
    idx = 0
    for b, m in enumerate(means[2:]):
        if abs(m - bright) < abs(m - dark):
            idx |= 1 << b
    return idx


def make_frame_index_dataset(root: str | os.PathLike, frame_counts: Sequence[int], height: int = 64,
                             width: int = 80, fps: float = 25, gop: int = 16, with_flow: bool = True,
                             num_classes: int = 2) -> str:
    """Small dataset of frame-index videos in the on-disk format goca-prepare and goca-flow write (CAVLC; loader
    alignment tests, on the GPU too)."""
    root = os.fspath(root)
    classes = [f"class{c}" for c in range(num_classes)]
    records = []
    for i, n in enumerate(frame_counts):
        label = i % num_classes
        vid = f"idx_{i:04d}"
        rgb, flow = frame_index_video(n, height, width)
        rel_rgb = f"rgb/{classes[label]}/{vid}.mp4"
        write_video(os.path.join(root, rel_rgb), rgb, fps, gop=gop, entropy=PREPARED_ENTROPY)
        rel_flow = None
        if with_flow:
            rel_flow = f"flow/{classes[label]}/{vid}.mp4"
            write_flow_video(os.path.join(root, rel_flow), flow, fps, gop=gop, entropy=PREPARED_ENTROPY)
        records.append(VideoRecord(id=vid, rgb=rel_rgb, flow=rel_flow, label=label, cls=classes[label],
                                   frames=n, fps=float(fps), width=width, height=height,
                                   splits=["train", "test"]))
    write_index(root, records, classes)
    return root


def trainer_for(cfg, run_dir, make_batches, batches_per_epoch, info=None):
    """A Trainer of `cfg` writing to `run_dir`, fed by `make_batches(epoch, start_batch)` instead of a dataset."""
    plan = replace(plan_settings(cfg, info), run_dir=Path(run_dir))
    return build_trainer(plan, TrainLoader(make_batches, batches_per_epoch))


def _read_ue(bits: str, pos: int) -> tuple[int, int]:
    """One unsigned Exp-Golomb code of an H.264 bit string at `pos`: (value, next position)."""
    zeros = 0
    while bits[pos + zeros] == "0":
        zeros += 1
    end = pos + 2 * zeros + 1
    return int(bits[pos + zeros:end], 2) - 1, end


def entropy_coding_mode_flags(path) -> list[int]:
    """entropy_coding_mode_flag (1 = CABAC, 0 = CAVLC) of every picture parameter set in an mp4's avcC box, parsed
    by hand from the H.264 syntax (ISO 14496-15 avcC; PPS: ue pps_id, ue sps_id, then the flag)."""
    with av.open(str(path)) as c:
        avcc = bytes(c.streams.video[0].codec_context.extradata)
    pos, flags = 6, []
    for _ in range(avcc[5] & 0x1F):  # skip the sequence parameter sets
        pos += 2 + int.from_bytes(avcc[pos:pos + 2], "big")
    for _ in range(avcc[pos]):
        size = int.from_bytes(avcc[pos + 1:pos + 3], "big")
        nal = avcc[pos + 3:pos + 3 + size]
        assert nal[0] & 0x1F == 8  # a PPS
        bits = "".join(f"{byte:08b}" for byte in nal[1:])
        _, at = _read_ue(bits, 0)
        _, at = _read_ue(bits, at)
        flags.append(int(bits[at]))
        pos += 3 + size
    return flags
