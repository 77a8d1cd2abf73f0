"""Online kNN monitor: every N epochs of pretraining, R@1 of a small labelled val subset against a train subset.

Cheap by construction: the subsets are class-balanced and small (default 256 videos each), each video is one
centre clip × one centre crop, and the decoded, cropped clips are kept in memory (fp16) after the first run, so
a later run is only forward passes of the backbone in eval mode. It never touches the training's RNG streams
(exact resume stays exact), nor BN statistics (eval mode), and restores the model's train/eval mode.

The engine owns one instance (made by `goca_fast.plan.build_monitor`) and calls `maybe_run(model, epoch, writer)`
after every epoch on rank 0.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from goca_fast.train.checkpoint import preserve_rng
from goca_fast.data.cpu_loader import EvalClipDataset, make_eval_loader
from goca_fast.data.index import VideoRecord, read_index, select_split
from goca_fast.data.views import ViewSpec, plural
from goca_fast.eval import EvalError
from goca_fast.eval.features import extract_features
from goca_fast.eval.splits import check_disjoint
from goca_fast.eval.retrieval import combine_streams, recall_at_k

log = logging.getLogger("goca_fast.eval")


def stratified_subset(labels: Sequence[int], size: int, seed: int = 0) -> list[int]:
    """Up to `size` positions with classes as balanced as possible (round-robin over classes, random within a
    class), deterministic in `seed`; returned in ascending order. size <= 0 keeps everything."""
    labels = [int(x) for x in labels]
    if size <= 0 or size >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    pools = {}
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        pools[c] = list(rng.permutation(members))
    chosen: list[int] = []
    while len(chosen) < size:
        for c in list(pools):
            if pools[c] and len(chosen) < size:
                chosen.append(int(pools[c].pop(0)))
    return sorted(chosen)


class _Batch:
    """A minimal EvalBatch stand-in for preloaded clips."""

    def __init__(self, rgb, flow, label, index):
        self.rgb, self.flow, self.label, self.index = rgb, flow, label, index
        self.padded = torch.zeros(len(label), dtype=torch.bool)
        self.skipped = 0


@dataclass(frozen=True)
class MonitorSettings:
    """Which subsets the monitor scores, how often, and how it loads them."""

    train_split: str = "train"         # gallery
    val_split: str = "test"            # queries
    subset_size: int = 256             # class-balanced videos per split (0 = all)
    every: int = 1                     # epochs between runs (0 = never)
    batch_size: int = 32
    workers: int = 0
    seed: int = 0                      # subset choice
    max_preload_mb: float = 2048.0     # decoded clips kept in memory up to this size
    tag: str = "monitor"               # TensorBoard prefix


class KnnMonitor:
    """R@1 of a val subset against a train subset, logged to TensorBoard every `every` epochs.

    views: the monitor's protocol, normally one centre clip × one centre crop (num_clips=1, crops=1). records: the
    dataset index when the caller has read it (`read_index(root)[0]`); None reads it at the first run."""

    def __init__(self, root: str | Path, records: Optional[Sequence[VideoRecord]], views: ViewSpec,
                 settings: MonitorSettings = MonitorSettings(), *, streams: Sequence[str] = ("rgb", "flow"),
                 device: torch.device | str = "cpu", amp: Optional[torch.dtype] = None):
        if settings.every < 0 or settings.subset_size < 0 or settings.batch_size < 1:
            raise EvalError("monitor: every and subset_size must be >= 0, batch_size >= 1")
        self.root, self.settings = Path(root), settings
        self.records = None if records is None else list(records)
        self.splits = (settings.train_split, settings.val_split)
        self.views, self.streams = views, list(streams)
        self.device, self.amp = torch.device(device), amp
        self._data: Optional[dict[str, list]] = None   # split → preloaded batches
        self._datasets: Optional[dict] = None
        self.counts: dict[str, int] = {}
        self.prepare_seconds = 0.0
        self.last_seconds = 0.0
        self.history: list[tuple[int, dict[str, float]]] = []

    # ------------------------------------------------------------------------------------------ set-up
    def _build_datasets(self) -> dict:
        records = self.records if self.records is not None else read_index(self.root)[0]
        gallery, query = self.splits
        check_disjoint(gallery, [r.id for r in select_split(records, gallery, required=False)],
                       query, [r.id for r in select_split(records, query, required=False)],
                       roles=("monitor gallery", "monitor query"))
        out = {}
        for split in self.splits:
            recs = select_split(records, split, required=False)
            if "flow" in self.streams:
                recs = [r for r in recs if r.flow is not None]
            if not recs:
                raise EvalError(f"monitor: split {split!r} of {self.root} is empty (or has no flow)")
            keep = stratified_subset([r.label for r in recs], self.settings.subset_size, self.settings.seed)
            recs = [recs[i] for i in keep]
            out[split] = EvalClipDataset(self.root, recs, self.views, with_flow="flow" in self.streams)
            self.counts[split] = len(recs)
        return out

    def preload_mb(self) -> float:
        """Memory the preloaded clips need (fp16)."""
        v = self.views
        per_video = v.views * v.clip_length * v.crop_size ** 2 * 2 * (3 * ("rgb" in self.streams)
                                                                      + 3 * ("flow" in self.streams))
        return sum(self.counts.values()) * per_video / 2 ** 20

    def prepare(self) -> None:
        """Pick the subsets and (memory permitting) decode them once. Called by the first run if not before."""
        t0 = time.perf_counter()
        with preserve_rng():
            self._datasets = self._build_datasets()
            if self.preload_mb() <= self.settings.max_preload_mb:
                self._data = {}
                for split, ds in self._datasets.items():
                    batches = []
                    for b in make_eval_loader(ds, self.settings.batch_size, self.settings.workers):
                        if b is None:
                            continue
                        batches.append(_Batch(b.rgb.half(), None if b.flow is None else b.flow.half(), b.label,
                                              b.index))
                    self._data[split] = batches
            else:
                log.info("monitor: subsets need %.0f MB > %.0f MB; decoding them at every run", self.preload_mb(),
                         self.settings.max_preload_mb)
        self.prepare_seconds = time.perf_counter() - t0

    def _batches(self, split: str):
        if self._data is not None:
            return self._data[split]
        return make_eval_loader(self._datasets[split], self.settings.batch_size, self.settings.workers)

    # ------------------------------------------------------------------------------------------ running
    def due(self, epoch: int) -> bool:
        """After 0-based epoch `epoch`: runs when (epoch + 1) is a multiple of `every` (0 = never)."""
        return self.settings.every > 0 and (epoch + 1) % self.settings.every == 0

    @torch.no_grad()
    def run(self, model) -> dict[str, float]:
        """R@1 (percent) per stream and, with two streams, "both"."""
        if self._datasets is None:
            self.prepare()
            log.info("kNN monitor: %d train / %s, %s in memory (%.0f MB), prepared in %.1fs",
                     self.counts[self.splits[0]], plural(self.counts[self.splits[1]], "val video"),
                     "clips kept" if self._data is not None else "not kept", self.preload_mb(), self.prepare_seconds)
        t0 = time.perf_counter()
        streams = [s for s in self.streams if s in model.streams]
        with preserve_rng():
            feats = [extract_features(model, self._batches(split), self.device, self.amp, streams=streams)
                     for split in self.splits]
        (g, q) = feats
        if len(q.labels) == 0 or len(g.labels) == 0:
            raise EvalError("monitor: no video of the subsets could be decoded")
        out = {s: recall_at_k(q.features[s], q.labels, g.features[s], g.labels, (1,))[1] for s in streams}
        if len(streams) == 2:
            out["both"] = recall_at_k(combine_streams(q.features), q.labels, combine_streams(g.features), g.labels,
                                      (1,))[1]
        self.last_seconds = time.perf_counter() - t0
        return out

    def maybe_run(self, model, epoch: int, writer=None, step: Optional[int] = None) -> Optional[float]:
        """Run if due after 0-based `epoch`; log `monitor/knn_r1_<stream>` (and seconds) at `step` (default:
        epochs completed). Returns the headline R@1 ("both" with two streams), or None when not due."""
        if not self.due(epoch):
            return None
        r = self.run(model)
        self.history.append((epoch + 1, r))
        x = epoch + 1 if step is None else step
        if writer is not None:
            for s, v in r.items():
                writer.add_scalar(f"{self.settings.tag}/knn_r1_{s}", v, x)
            writer.add_scalar(f"{self.settings.tag}/seconds", self.last_seconds, x)
        log.info("kNN monitor after epoch %d: %s (%d val vs %s, %.1fs)", epoch + 1,
                 ", ".join(f"R@1 {s} {v:.1f}" for s, v in r.items()), self.counts[self.splits[1]],
                 plural(self.counts[self.splits[0]], "train video"), self.last_seconds)
        return r["both"] if "both" in r else next(iter(r.values()))
