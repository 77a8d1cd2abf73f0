"""`goca-eval export`: video features of any split, for the user's own tools.

Per split, `npy` format writes
    <out>/<split>_<stream>.npy           N×F float32 (mean over views of L2-normalised view features)
    <out>/<split>_<stream>_views.npy     N×V×F float16 raw per-view features (with --views)
    <out>/<split>_meta.json              video ids, labels, class names, padded flags, counts, protocol
and `pt` format one `<out>/<split>.pt` holding the same as a dict of tensors and lists (torch.load it).
Rows are in the dataset index's order of the split; videos that could not be read are listed, not exported.

`--weights OUT.pth` instead writes one stream's backbone as a plain torchvision state_dict: for r2plus1d_18, r3d_18
and s3d, `torchvision.models.video.<arch>().load_state_dict(torch.load(OUT), strict=False)` loads every weight and
misses only the classifier (`fc` / `classifier`). The flow stream's stem takes 2 channels (u, v): replace the
torchvision model's first conv with a 2-channel one of the same geometry before loading.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from goca_fast.data.index import read_index
from goca_fast.data.views import ViewOverrides, plural
from goca_fast.runtime.device import resolve_amp
from goca_fast.eval import EvalError
from goca_fast.eval.cache import FeatureCache, split_features
from goca_fast.eval.features import ExtractSettings, SplitFeatures
from goca_fast.eval.loading import EvalSetup, LoadedModel, default_output_dir
from goca_fast.eval.splits import split_records

FORMATS = ("npy", "pt")
# where our backbone trunk's children sit in the torchvision model (goca_fast.models.backbones builds them so)
TORCHVISION_TRUNK = {"r2plus1d_18": ("stem", "layer1", "layer2", "layer3", "layer4"),
                     "r3d_18": ("stem", "layer1", "layer2", "layer3", "layer4"),
                     "s3d": None}  # the trunk is torchvision's `features` itself


def torchvision_state_dict(backbone: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """A backbone's weights (`PooledBackbone.state_dict()`) under the torchvision model's own key names."""
    if arch not in TORCHVISION_TRUNK:
        raise EvalError(f"arch {arch!r} has no torchvision counterpart to export weights for "
                        f"(one of {', '.join(TORCHVISION_TRUNK)})")
    names = TORCHVISION_TRUNK[arch]
    out = {}
    for key, value in backbone.items():
        head, _, rest = key.partition(".")
        if head != "trunk":
            raise EvalError(f"unexpected backbone weight {key!r}")
        if names is None:
            out[f"features.{rest}"] = value.clone()
        else:
            index, _, tail = rest.partition(".")
            out[f"{names[int(index)]}.{tail}"] = value.clone()
    return out


def run_export_weights(loaded: LoadedModel, arch: str, *, out_path: str, stream: str = "rgb",
                       quiet: bool = False) -> Path:
    """`goca-eval export RUN --weights OUT.pth [--stream rgb|flow]`: one backbone as a torchvision state_dict."""
    if stream not in loaded.streams:
        raise EvalError(f"the checkpoint has no {stream} stream (it has {', '.join(loaded.streams)})")
    weights = torchvision_state_dict(loaded.model.backbones[stream].state_dict(), arch)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in weights.items()}, out)
    if not quiet:
        print(f"{stream} backbone ({arch}, {len(weights)} tensors) written to {out}: "
              f"torchvision.models.video.{arch}().load_state_dict(torch.load({str(out)!r}), strict=False) "
              f"misses only the classifier" + ("; replace the first conv by a 2-channel one first (u, v flow)"
                                               if stream == "flow" else ""))
    return out


def write_features(f: SplitFeatures, out: Path, fmt: str, protocol: dict) -> list[Path]:
    """Write one split's features in `fmt` under `out`; returns the files written."""
    if fmt not in FORMATS:
        raise EvalError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"split": f.split, "ids": f.ids, "labels": f.labels.tolist(), "classes": f.classes,
            "padded": f.padded.tolist(), "counts": f.counts(), "missing": f.missing, "unreadable": f.unreadable,
            "streams": list(f.features), "protocol": protocol}
    written = []
    if fmt == "npy":
        for s, x in f.features.items():
            np.save(out / f"{f.split}_{s}.npy", x.numpy().astype(np.float32))
            written.append(out / f"{f.split}_{s}.npy")
            if f.views is not None:
                np.save(out / f"{f.split}_{s}_views.npy", f.views[s].numpy().astype(np.float16))
                written.append(out / f"{f.split}_{s}_views.npy")
        (out / f"{f.split}_meta.json").write_text(json.dumps(meta, indent=1))
        written.append(out / f"{f.split}_meta.json")
    else:
        obj = {**meta, "labels": f.labels.clone(), "padded": f.padded.clone(),
               "features": {s: x.clone() for s, x in f.features.items()},
               "views": None if f.views is None else {s: x.clone() for s, x in f.views.items()}}
        torch.save(obj, out / f"{f.split}.pt")
        written.append(out / f"{f.split}.pt")
    return written


@dataclass(frozen=True)
class ExportOptions:
    """`goca-eval export`'s own knobs (features; `run_export_weights` writes backbone weights instead)."""

    splits: Sequence[str] = ()         # default: the setup's train and test splits
    fmt: str = "npy"                   # npy | pt
    keep_views: bool = False           # also write the per-view features (--views)
    feature: str = "backbone"          # backbone | head
    overrides: ViewOverrides = ViewOverrides()
    amp: str = "off"


def run_export(setup: EvalSetup, options: Optional[ExportOptions] = None, *, out_dir: Optional[str] = None,
               use_cache: bool = True, quiet: bool = False) -> list[Path]:
    """Export the features of `options.splits` (default: the config's train and test splits)."""
    t0 = time.time()
    o = options or ExportOptions()
    feature = o.feature
    loaded, dev, root = setup.loaded, setup.device, setup.root
    spec = setup.views.with_overrides(o.overrides)
    base = default_output_dir(loaded.run_dir)
    out = Path(out_dir) if out_dir else base / "export"
    cache = FeatureCache(base / "features") if use_cache else None
    extract = ExtractSettings(dev, setup.batch_size, setup.workers, amp=resolve_amp(o.amp, dev, "--amp"),
                              source=feature, keep_views=o.keep_views)
    written = []
    names = list(dict.fromkeys(o.splits or [setup.train_split, setup.test_split]))  # a split named twice: once
    index = read_index(root)
    all_recs = [split_records(root, split, loaded.streams, index) for split in names]  # all checked before extracting
    for recs in all_recs:
        split = recs.name
        f = split_features(loaded, root, recs, spec, extract, cache)
        protocol = {**asdict(spec), "feature": feature, "checkpoint": str(loaded.checkpoint),
                    "epoch": loaded.epoch, "arch": setup.arch, "dataset": str(root),
                    "averaging": "mean over views of L2-normalised view features"}
        written += write_features(f, out, o.fmt, protocol)
        if not quiet:
            c = f.counts()
            print(f"{split}: {c['evaluated']} of {plural(c['videos'], 'video')} exported "
                  f"({c['missing_files']} missing, {c['unreadable']} unreadable, {c['padded_short']} padded)")
    if not quiet:
        print(f"written to {out} in {time.time() - t0:.1f}s: " + ", ".join(dict.fromkeys(p.name for p in written)))
    return written
