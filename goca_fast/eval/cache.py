"""The feature cache: split features on disk, reused while the checkpoint, dataset index and view protocol are
unchanged.

Layout (one folder per split × checkpoint × protocol, written atomically)::

    <cache_dir>/<split>-<source>-<hash>/index.json     ids, labels, padded flags, dropped ids, the key it was made for
    <cache_dir>/<split>-<source>-<hash>/<stream>.npy   N×F float32: mean over views of L2-normalised view features
    <cache_dir>/<split>-<source>-<hash>/<stream>_views.npy   N×V×F float16 raw view features (linear probe only)

The hash covers the checkpoint file (path, size, mtime), the dataset index, the split and every protocol setting,
so a rewritten checkpoint or a changed protocol never reuses stale features.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from goca_fast.eval import features
from goca_fast.eval.features import SplitFeatures
from goca_fast.eval.loading import LoadedModel
from goca_fast.data.views import ViewSpec
from goca_fast.eval.splits import SplitRecords

log = logging.getLogger("goca_fast.eval")


class FeatureCache:
    """Split features on disk, reused while the checkpoint, dataset index and protocol are unchanged."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    @staticmethod
    def key(checkpoint_key: dict, root: Path, split: str, spec: ViewSpec, source: str,
            streams: Sequence[str]) -> dict:
        idx = Path(root) / "index.jsonl"
        st = idx.stat()
        return {"weights": checkpoint_key, "index": [str(idx.resolve()), st.st_size, st.st_mtime_ns],
                "split": split, "spec": dataclasses.asdict(spec), "source": source, "streams": list(streams),
                "version": 1}

    def folder(self, key: dict) -> Path:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return self.dir / f"{key['split']}-{key['source']}-{digest}"

    def load(self, key: dict, need_views: bool = False) -> Optional[SplitFeatures]:
        d = self.folder(key)
        try:
            meta = json.loads((d / "index.json").read_text())
            if meta["key"] != json.loads(json.dumps(key)) or (need_views and not meta["has_views"]):
                return None
            feats = {s: torch.from_numpy(np.load(d / f"{s}.npy")) for s in meta["streams"]}
            views = ({s: torch.from_numpy(np.load(d / f"{s}_views.npy")) for s in meta["streams"]}
                     if meta["has_views"] else None)
        except (OSError, ValueError, KeyError):
            return None
        return SplitFeatures(meta["split"], meta["ids"], torch.tensor(meta["labels"], dtype=torch.int64),
                             torch.tensor(meta["padded"], dtype=torch.bool), feats, views, meta["total"],
                             meta["missing"], meta["unreadable"], meta["classes"])

    def save(self, key: dict, f: SplitFeatures) -> Path:
        d = self.folder(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=self.dir))
        try:
            for s, x in f.features.items():
                np.save(tmp / f"{s}.npy", x.numpy().astype(np.float32))
            if f.views is not None:
                for s, x in f.views.items():
                    np.save(tmp / f"{s}_views.npy", x.numpy().astype(np.float16))
            meta = {"key": key, "split": f.split, "ids": f.ids, "labels": f.labels.tolist(),
                    "padded": f.padded.tolist(), "total": f.total, "missing": f.missing, "unreadable": f.unreadable,
                    "classes": f.classes, "streams": list(f.features), "has_views": f.views is not None}
            (tmp / "index.json").write_text(json.dumps(meta))
            if d.exists():
                shutil.rmtree(d)
            os.replace(tmp, d)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return d


def split_features(loaded: LoadedModel, root: Path, split: SplitRecords, spec: ViewSpec,
                   extract: features.ExtractSettings, cache: Optional[FeatureCache] = None) -> SplitFeatures:
    """Features of a split for a loaded checkpoint, from the cache when it holds them, else extracted (and cached)."""
    source = extract.source
    key = FeatureCache.key(loaded.checkpoint_key, root, split.name, spec, source, loaded.streams) if cache else None
    if cache is not None:
        hit = cache.load(key, need_views=extract.keep_views)
        if hit is not None:
            log.info("split %r: features from cache %s", split.name, cache.folder(key))
            return hit
    out = features.compute_split_features(loaded.model, root, split, spec, extract)
    if cache is not None:
        cache.save(key, out)
    return out
