"""kNN video retrieval, the standard protocol (CoCLR / ViCC / GOCA, docs/official_behaviour.md#evaluation-protocol).

Gallery = the train split, queries = the test split. Each video's feature is the mean over N uniformly spaced clips
× 3 crops of the L2-normalised view features (official default 5 × 3 of the pretraining clip length), from the
pooled backbone (2048-d for R(2+1)D-18) or the projection head; cosine similarity; R@k = % of queries with a video
of their class among the k nearest (k = 1, 5, 10, 20, 50). RGB+flow ("both") averages the per-stream features,
as the official code does; `fusion` adds a "fused" row: the weighted concatenation of the normalised stream
features, weights equal (concat) or chosen on the gallery alone (weighted), goca_fast.eval.fusion.

    goca-eval knn RUN_DIR_OR_CHECKPOINT [--data-root DIR] [--clips 5 --crops 3] [--feature backbone|head] ...
    python -m goca_fast.eval knn ...        (same arguments)

In-process users (the pretraining demo, through `goca_fast.plan.run.knn_recall`) call :func:`evaluate_knn` with a
live model.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from goca_fast.data.index import read_index
from goca_fast.data.views import ViewOverrides, ViewSpec, plural
from goca_fast.runtime.device import resolve_amp
from goca_fast.eval.cache import FeatureCache, split_features
from goca_fast.eval.features import ExtractSettings, SplitFeatures, compute_split_features
from goca_fast.eval.fusion import fusion_weights, weighted_concat
from goca_fast.eval.loading import EvalSetup, default_output_dir
from goca_fast.eval.plots import embedding_plot, retrieval_grid
from goca_fast.eval.retrieval import DEFAULT_KS, combine_streams, format_table, recall_at_k
from goca_fast.eval.splits import DatasetIndex, check_disjoint_records, class_check, split_records
from goca_fast.models.goca_model import GocaModel

log = logging.getLogger("goca_fast.eval")

BOTH = "both"
FUSED = "fused"


def knn_scores(gallery: SplitFeatures, query: SplitFeatures, streams: Sequence[str],
               ks: Sequence[int] = DEFAULT_KS, fusion: Optional[str] = None,
               weights_out: Optional[dict] = None) -> dict[str, dict[int, float]]:
    """R@k per stream and, with two streams, for the averaged features ("both") and, with `fusion` (concat |
    weighted), for the fused features ("fused"; its stream weights are put into `weights_out`)."""
    out = {s: recall_at_k(query.features[s], query.labels, gallery.features[s], gallery.labels, ks)
           for s in streams}
    if len(streams) == 2:
        g = {s: gallery.features[s] for s in streams}
        q = {s: query.features[s] for s in streams}
        out[BOTH] = recall_at_k(combine_streams(q), query.labels, combine_streams(g), gallery.labels, ks)
        if fusion:
            weights = fusion_weights(fusion, g, gallery.labels)
            out[FUSED] = recall_at_k(weighted_concat(q, weights), query.labels, weighted_concat(g, weights),
                                     gallery.labels, ks)
            if weights_out is not None:
                weights_out.update(weights)
    return out


@dataclass
class KnnResult:
    """R@k per stream plus everything needed to read the numbers honestly (what was evaluated, how)."""

    recall: dict[str, dict[int, float]]
    gallery: dict[str, int]
    query: dict[str, int]
    protocol: dict
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, name: str = "model") -> str:
        return (format_table({name: self.recall}, sorted(next(iter(self.recall.values()))))
                + f"\n{self.query['evaluated']} of {plural(self.query['videos'], 'query video')} "
                  f"({self.protocol['query_split']}) against {self.gallery['evaluated']} of "
                  f"{plural(self.gallery['videos'], 'gallery video')} ({self.protocol['gallery_split']})"
                + self._notes())

    def _notes(self) -> str:
        notes = []
        for name, c in (("gallery", self.gallery), ("query", self.query)):
            left = c["missing_files"] + c["unreadable"]
            if left:
                notes.append(f"{name}: {plural(left, 'video')} left out ({c['missing_files']} missing, "
                             f"{c['unreadable']} unreadable)")
            if c["padded_short"]:
                notes.append(f"{name}: {plural(c['padded_short'], 'video')} shorter than a clip, padded by "
                             f"repeating frames")
        return "".join(f"\n  note: {n}" for n in notes)

    def to_json(self) -> dict:
        return {"recall": {s: {str(k): v for k, v in r.items()} for s, r in self.recall.items()},
                "gallery": self.gallery, "query": self.query, "protocol": self.protocol,
                "warnings": self.warnings, "seconds": round(self.seconds, 2)}


def knn_from_features(gallery: SplitFeatures, query: SplitFeatures, streams: Sequence[str], spec: ViewSpec,
                      source: str = "backbone", ks: Sequence[int] = DEFAULT_KS,
                      fusion: Optional[str] = None) -> KnnResult:
    """Score extracted features and attach the bookkeeping."""
    warnings = class_check(gallery.labels.tolist(), query.labels.tolist(), query.classes, gallery.split, query.split)
    weights: dict = {}
    recall = knn_scores(gallery, query, streams, ks, fusion, weights)
    protocol = {"gallery_split": gallery.split, "query_split": query.split, "clips": spec.num_clips,
                "crops": spec.crops, "clip_length": spec.clip_length, "stride": spec.stride,
                "crop_size": spec.crop_size, "short_side": spec.short_side, "feature": source,
                "feature_dim": int(next(iter(query.features.values())).shape[1]), "similarity": "cosine",
                "ks": list(ks)}
    if weights:
        protocol["fusion"] = {"mode": fusion, "weights": weights}
    return KnnResult(recall, gallery.counts(), query.counts(), protocol, warnings)


def evaluate_knn(model: GocaModel, root: Path, views: ViewSpec, extract: ExtractSettings, *, train_split: str,
                 test_split: str, ks: Sequence[int] = DEFAULT_KS, fusion: Optional[str] = None,
                 index: Optional[DatasetIndex] = None) -> KnnResult:
    """kNN retrieval of a live model on the dataset at `root`: `test_split` queries against the `train_split`
    gallery under the protocol `views` (no cache); `fusion` adds the "fused" RGB+flow row. `index`: the dataset
    index when the caller has read it already (`read_index(root)`)."""
    t0 = time.time()
    streams = list(model.streams)
    index = index if index is not None else read_index(root)
    recs = [split_records(Path(root), split, streams, index) for split in (train_split, test_split)]
    check_disjoint_records(recs[0], recs[1])
    feats = [compute_split_features(model, Path(root), r, views, extract) for r in recs]
    res = knn_from_features(feats[0], feats[1], streams, views, extract.source, ks, fusion)
    res.seconds = time.time() - t0
    return res


@dataclass(frozen=True)
class KnnOptions:
    """`goca-eval knn`'s own knobs (the setup holds the checkpoint's, the runner's keywords the output's)."""

    overrides: ViewOverrides = ViewOverrides()   # --clips/--crops/--clip-length/--stride
    feature: str = "backbone"          # backbone | head
    ks: Sequence[int] = DEFAULT_KS
    amp: str = "off"                   # auto | bf16 | fp16 | off
    plots: bool = False                # also draw the retrieval grid and PCA map
    fusion: Optional[str] = None       # None | concat | weighted


def run_knn(setup: EvalSetup, options: Optional[KnnOptions] = None, *, out_dir: Optional[str] = None,
            use_cache: bool = True, quiet: bool = False) -> KnnResult:
    """`goca-eval knn`: extract (or reuse cached) features, score, print the table, write knn.json."""
    t0 = time.time()
    o = options or KnnOptions()
    loaded, dev, root = setup.loaded, setup.device, setup.root
    spec = setup.views.with_overrides(o.overrides)
    out = Path(out_dir) if out_dir else default_output_dir(loaded.run_dir)
    cache = FeatureCache(out / "features") if use_cache else None
    index = read_index(root)
    recs = {role: split_records(root, split, loaded.streams, index)  # both checked before any extraction
            for role, split in (("gallery", setup.train_split), ("query", setup.test_split))}
    check_disjoint_records(recs["gallery"], recs["query"])
    extract = ExtractSettings(dev, setup.batch_size, setup.workers, amp=resolve_amp(o.amp, dev, "--amp"),
                              source=o.feature)
    feats = {role: split_features(loaded, root, r, spec, extract, cache) for role, r in recs.items()}
    res = knn_from_features(feats["gallery"], feats["query"], loaded.streams, spec, o.feature, o.ks, o.fusion)
    res.seconds = time.time() - t0
    res.protocol.update({"checkpoint": str(loaded.checkpoint), "epoch": loaded.epoch, "arch": setup.arch,
                         "dataset": str(root)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "knn.json").write_text(json.dumps(res.to_json(), indent=2))
    if o.plots:
        s = BOTH if len(loaded.streams) == 2 else loaded.streams[0]
        retrieval_grid(feats["gallery"], feats["query"], root, out / "plots" / "retrieval_grid.png", stream=s)
        embedding_plot(feats["query"], out / "plots" / "embedding_pca.png", stream=s)
    if not quiet:
        print(f"kNN retrieval, {spec.describe()}, {o.feature} features "
              f"({res.protocol['feature_dim']}-d), cosine:\n{res.table(setup.name)}\nwritten: {out / 'knn.json'}")
    return res
