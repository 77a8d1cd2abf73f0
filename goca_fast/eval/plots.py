"""Plots people would rather look at than read, saved as PNG in the run directory and shown in TensorBoard:

* retrieval grid: query videos (middle frame) with their top-5 neighbours, framed green when the neighbour has the
  query's class, red otherwise;
* a 2-D map of the test features coloured by class: PCA (torch.pca_lowrank; always available) or t-SNE when
  scikit-learn is installed;
* training curves read back from the run's TensorBoard event files (metrics.jsonl as fallback).

Matplotlib is used through its object API with the Agg canvas (no pyplot global state, no display needed); every
figure is created at an exact pixel size so the PNGs have predictable dimensions.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from goca_fast.data.index import read_index
from goca_fast.data.views import plural
from goca_fast.eval import EvalError
from goca_fast.eval.cache import FeatureCache, split_features
from goca_fast.eval.features import ExtractSettings, SplitFeatures
from goca_fast.eval.loading import EvalSetup, default_output_dir
from goca_fast.eval.monitor import stratified_subset
from goca_fast.eval.retrieval import combine_streams, nearest_neighbours
from goca_fast.eval.splits import check_disjoint_records, split_records
from goca_fast.video.io import VideoReadError, read_frames

log = logging.getLogger("goca_fast.eval")

DPI = 100
DEFAULT_CURVES = ("train/loss", "train/lr", "train/proto_usage_entropy", "train/rgb_flow_agreement",
                  "train/clips_per_s", "monitor/knn_r1_both", "monitor/knn_r1_rgb", "monitor/knn_r1_flow")


def _figure(width_px: int, height_px: int):
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")  # no bbox_inches="tight": keeps the exact pixel size
    return path


def stream_features(f: SplitFeatures, stream: str) -> torch.Tensor:
    """One stream's video features, or "both" = the averaged streams used for RGB+flow retrieval."""
    if stream == "both":
        return combine_streams(f.features)
    if stream not in f.features:
        raise EvalError(f"no {stream} features (have: {', '.join(f.features)})")
    return f.features[stream]


def grid_size_px(rows: int, cols: int) -> tuple[int, int]:
    """Pixel size of a retrieval grid with `rows` queries and `cols` = 1 + k columns."""
    return 150 * cols, 140 * rows + 40


def middle_frame(root: Path, rgb_path: str, frames: int) -> np.ndarray:
    """The middle RGB frame of a video (H×W×3 uint8), or a grey placeholder when it cannot be read."""
    try:
        return read_frames(os.path.join(root, rgb_path), [max(0, frames // 2)])[0]
    except (VideoReadError, OSError) as e:
        log.warning("retrieval grid: cannot read %s (%s)", rgb_path, e)
        return np.full((64, 64, 3), 128, dtype=np.uint8)


def draw_retrieval_grid(query_frames: Sequence[np.ndarray], query_names: Sequence[str],
                        neighbour_frames: Sequence[Sequence[np.ndarray]], neighbour_names: Sequence[Sequence[str]],
                        matches: Sequence[Sequence[bool]], out_path: Path, title: str = "") -> Path:
    """Rows = queries; column 0 the query, then its neighbours framed green (same class) or red."""
    rows, cols = len(query_frames), 1 + max((len(n) for n in neighbour_frames), default=0)
    if rows == 0:
        raise EvalError("retrieval grid: no query to show")
    w, h = grid_size_px(rows, cols)
    fig = _figure(w, h)
    top = 1 - 40 / h
    gs = fig.add_gridspec(rows, cols, left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.08, hspace=0.25)
    for r in range(rows):
        cells = [(query_frames[r], query_names[r], "black", 2)] + [
            (neighbour_frames[r][j], neighbour_names[r][j], "#1a9641" if matches[r][j] else "#d7191c", 5)
            for j in range(len(neighbour_frames[r]))]
        for c, (img, name, colour, lw) in enumerate(cells):
            ax = fig.add_subplot(gs[r, c])
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_edgecolor(colour)
                sp.set_linewidth(lw)
            label = ("query: " if c == 0 else f"{c}. ") + name
            ax.set_title(label[:24], fontsize=7, color="black" if c == 0 else colour)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 12 / h)
    return _save(fig, out_path)


def retrieval_grid(gallery: SplitFeatures, query: SplitFeatures, root: Path, out_path: Path, stream: str = "both",
                   num_queries: int = 8, k: int = 5, seed: int = 0) -> Path:
    """Pick `num_queries` class-balanced test videos, find their k nearest train videos (the same ranking as R@k),
    and draw them with their middle frames."""
    records = {r.id: r for r in read_index(root)[0]}
    qi = stratified_subset(query.labels.tolist(), num_queries, seed)
    nn_idx, sims = nearest_neighbours(stream_features(query, stream)[qi], stream_features(gallery, stream), k)
    classes = query.classes
    qf, qn, nf, nn_names, match = [], [], [], [], []
    for row, i in enumerate(qi):
        rec = records[query.ids[i]]
        qf.append(middle_frame(root, rec.rgb, rec.frames))
        qn.append(classes[int(query.labels[i])])
        frames, names, m = [], [], []
        for j, s in zip(nn_idx[row].tolist(), sims[row].tolist()):
            g = records[gallery.ids[j]]
            frames.append(middle_frame(root, g.rgb, g.frames))
            names.append(f"{classes[int(gallery.labels[j])]} {s:.2f}")
            m.append(int(gallery.labels[j]) == int(query.labels[i]))
        nf.append(frames)
        nn_names.append(names)
        match.append(m)
    return draw_retrieval_grid(qf, qn, nf, nn_names, match, out_path,
                               f"{query.split} → {gallery.split}, top-{k} by cosine ({stream} features)")


def project_2d(x: torch.Tensor, method: str = "pca", seed: int = 0) -> np.ndarray:
    """N×F → N×2: PCA (torch.pca_lowrank on L2-normalised, centred features) or t-SNE (needs scikit-learn)."""
    x = torch.nn.functional.normalize(x.float(), dim=1)
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            raise EvalError("t-SNE needs scikit-learn (pip install scikit-learn); or use --method pca") from None
        return TSNE(2, random_state=seed, init="pca", perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))
                    ).fit_transform(x.numpy())
    if method != "pca":
        raise EvalError(f"projection method must be pca or tsne, got {method!r}")
    if x.shape[0] < 2:
        raise EvalError("a 2-D map needs at least 2 videos")
    q = min(2, x.shape[0], x.shape[1])
    with torch.random.fork_rng(devices=[]):  # pca_lowrank sketches randomly: seed it without touching the caller's RNG
        torch.manual_seed(seed)
        u, s, _ = torch.pca_lowrank(x, q=q, center=True)
    y = (u * s).numpy()
    return y if q == 2 else np.pad(y, ((0, 0), (0, 2 - q)))


def draw_embedding(points: np.ndarray, labels: Sequence[int], classes: Sequence[str], out_path: Path,
                   title: str = "", size_px: tuple[int, int] = (900, 700)) -> Path:
    """Scatter of 2-D points coloured by class (legend up to 20 classes)."""
    fig = _figure(*size_px)
    ax = fig.add_axes((0.07, 0.08, 0.62 if len(set(labels)) <= 20 else 0.9, 0.84))
    labels = np.asarray(labels)
    present = sorted(set(labels.tolist()))
    cmap = colormaps["tab10" if len(present) <= 10 else "tab20"]
    for n, c in enumerate(present):
        sel = labels == c
        ax.scatter(points[sel, 0], points[sel, 1], s=14, color=cmap(n % cmap.N),
                   label=classes[c] if c < len(classes) else str(c), alpha=0.85)
    ax.set_title(title, fontsize=10)
    if len(present) <= 20:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    return _save(fig, out_path)


def embedding_plot(features: SplitFeatures, out_path: Path, stream: str = "both", method: str = "pca",
                   seed: int = 0) -> Path:
    """2-D map of a split's video features coloured by class."""
    pts = project_2d(stream_features(features, stream), method, seed)
    title = f"{method.upper()} of {features.split} features ({stream}, {plural(features.evaluated, 'video')})"
    return draw_embedding(pts, features.labels.tolist(), features.classes, out_path, title)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run: from its TensorBoard event files, else from metrics.jsonl (per epoch)."""
    tb = Path(run_dir) / "tensorboard"
    series: dict[str, list[tuple[int, float]]] = {}
    if tb.is_dir():
        tb_log = logging.getLogger("tensorboard")  # its INFO lines ("No path found after ...") are not ours to print
        quiet_level = tb_log.level
        tb_log.setLevel(max(quiet_level, logging.WARNING))
        try:
            dirs = sorted({p.parent for p in tb.rglob("events.out.tfevents.*")}) 
            for d in dirs:
                acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
                acc.Reload()
                for tag in acc.Tags().get("scalars", []):
                    pts = {e.step: e.value for e in acc.Scalars(tag)}  # later writes win (resumed runs)
                    series.setdefault(tag, [])
                    series[tag] = sorted({**dict(series[tag]), **pts}.items())
        finally:
            tb_log.setLevel(quiet_level)
    if not series and (Path(run_dir) / "metrics.jsonl").is_file():
        for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    series.setdefault(f"epoch/{k}", []).append((int(row["epoch"]), float(v)))
    return series


def draw_curves(series: dict[str, list[tuple[int, float]]], out_path: Path, tags: Optional[Sequence[str]] = None,
                size_px: Optional[tuple[int, int]] = None, title: str = "") -> Path:
    """One small panel per scalar series, 3 per row."""
    tags = [t for t in (tags or DEFAULT_CURVES) if t in series] or sorted(series)[:9]
    if not tags:
        raise EvalError("no scalar series to plot (no TensorBoard events or metrics.jsonl in the run directory)")
    cols = min(3, len(tags))
    rows = (len(tags) + cols - 1) // cols
    size_px = size_px or (380 * cols, 260 * rows + 40)
    fig = _figure(*size_px)
    gs = fig.add_gridspec(rows, cols, left=0.08, right=0.97, bottom=0.1 / rows, top=1 - 60 / size_px[1],
                          wspace=0.3, hspace=0.5)
    for n, tag in enumerate(tags):
        ax = fig.add_subplot(gs[n // cols, n % cols])
        steps, vals = zip(*series[tag])
        # a single point (e.g. a one-epoch run) is a line of length 0: draw markers so it shows
        ax.plot(steps, vals, lw=1.2, marker="o" if len(steps) <= 3 else None, ms=4)
        ax.set_title(tag, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out_path)


def training_curves(run_dir: Path, out_path: Path, tags: Optional[Sequence[str]] = None) -> Path:
    """Training curves of a pretraining (or fine-tuning) run directory as one PNG."""
    return draw_curves(read_scalars(run_dir), out_path, tags, title=f"training curves: {Path(run_dir).name}")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; raises ValueError if the file is not a PNG."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def log_images(log_dir: Path, images: dict[str, Path], step: int = 0) -> None:
    """Show PNGs in TensorBoard (an `eval` run next to the training run, so resumed training never purges them)."""
    w = SummaryWriter(str(log_dir))
    try:
        for tag, p in images.items():
            img = imread(str(p))[..., :3]
            w.add_image(tag, np.ascontiguousarray(img.transpose(2, 0, 1)), step)
    finally:
        w.close()


@dataclass(frozen=True)
class PlotOptions:
    """`goca-eval plots`' own knobs."""

    what: Sequence[str] = ("retrieval", "embedding", "curves")
    stream: Optional[str] = None       # rgb | flow | both; default both with two streams
    method: str = "pca"                # pca | tsne
    num_queries: int = 8               # rows of the retrieval grid
    feature: str = "backbone"
    tensorboard: bool = True           # also add the images to TensorBoard


def run_plots(setup: EvalSetup, options: Optional[PlotOptions] = None, *, out_dir: Optional[str] = None,
              use_cache: bool = True, quiet: bool = False) -> dict[str, Path]:
    """`goca-eval plots`: the retrieval grid and embedding use the kNN protocol's (cached) features."""
    o = options or PlotOptions()
    what, method = o.what, o.method
    unknown = set(what) - {"retrieval", "embedding", "curves"}
    if unknown:
        raise EvalError(f"unknown plot(s) {', '.join(sorted(unknown))}; choose from retrieval, embedding, curves")
    loaded = setup.loaded
    out = Path(out_dir) if out_dir else default_output_dir(loaded.run_dir) / "plots"
    written: dict[str, Path] = {}
    if {"retrieval", "embedding"} & set(what):
        root = setup.root
        cache = FeatureCache(default_output_dir(loaded.run_dir) / "features") if use_cache else None
        index = read_index(root)
        recs = [split_records(root, split, loaded.streams, index) for split in (setup.train_split, setup.test_split)]
        check_disjoint_records(recs[0], recs[1])
        extract = ExtractSettings(setup.device, setup.batch_size, setup.workers, source=o.feature)
        feats = [split_features(loaded, root, r, setup.views, extract, cache) for r in recs]
        s = o.stream or ("both" if len(loaded.streams) == 2 else loaded.streams[0])
        if "retrieval" in what:
            written["retrieval_grid"] = retrieval_grid(feats[0], feats[1], root, out / "retrieval_grid.png", s,
                                                       o.num_queries)
        if "embedding" in what:
            written[f"embedding_{method}"] = embedding_plot(feats[1], out / f"embedding_{method}.png", s, method)
    if "curves" in what:
        try:
            written["training_curves"] = training_curves(loaded.run_dir, out / "training_curves.png")
        except EvalError as e:
            if list(what) == ["curves"]:
                raise
            print(f"no training curves: {e}")
    if o.tensorboard:
        log_images(loaded.run_dir / "tensorboard" / "eval", {f"eval/{k}": p for k, p in written.items()},
                   int(loaded.epoch or 0))
    if not quiet:
        print("plots written:\n" + "\n".join(f"  {p}" for p in written.values()))
    return written
