"""What every evaluation shares: loading a model from a checkpoint or run directory (with one-line errors), resolving
the dataset and its splits (missing videos, empty splits and class mismatches reported, never silently dropped),
the eval view protocol, per-split feature extraction and its on-disk cache.

Feature cache layout (one folder per split × checkpoint × protocol, written atomically)::

    <cache_dir>/<split>-<source>-<hash>/index.json     ids, labels, padded flags, dropped ids, the key it was made for
    <cache_dir>/<split>-<source>-<hash>/<stream>.npy   N×F float32: mean over views of L2-normalised view features
    <cache_dir>/<split>-<source>-<hash>/<stream>_views.npy   N×V×F float16 raw view features (linear probe only)

The hash covers the checkpoint file (path, size, mtime), the dataset index, the split and every protocol setting,
so a rewritten checkpoint or a changed protocol never reuses stale features.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import importlib
import logging
import os
import random
import shutil
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from goca_fast import checkpoint as ckpt
from goca_fast.builders import build_model, dataset_root
from goca_fast.config import Config, ConfigError, load_config
from goca_fast.data.index import DatasetIndexError, VideoRecord, read_index, split_names
from goca_fast.models.goca_model import GocaModel

log = logging.getLogger("goca_fast.eval")


def plural(n: int, word: str, words: Optional[str] = None) -> str:
    """"1 epoch", "2 epochs": a count with its noun in the right number (`words` for irregular plurals)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"


STREAM_NAMES = ("rgb", "flow")


class EvalError(ConfigError):
    """A problem with the user's evaluation inputs, reported as one line (`goca-eval: error: ...`, exit 2)."""


# ---------------------------------------------------------------------------------------------- config / device
def config_from_dict(values: dict[str, Any]) -> Config:
    """A Config from a checkpoint's `config` dict. Keys this version does not know are dropped with a warning
    (a checkpoint from a newer goca_fast stays usable); missing keys take their defaults."""
    def filt(cls: type, vals: dict[str, Any], prefix: str) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        out = {}
        for k, v in vals.items():
            if k not in names:
                log.warning("checkpoint config key '%s%s' is unknown to this version; ignored", prefix, k)
                continue
            tp = hints[k]
            out[k] = filt(tp, v, f"{prefix}{k}.") if dataclasses.is_dataclass(tp) and isinstance(v, dict) else v
        return out

    if not isinstance(values, dict):
        raise EvalError(f"checkpoint config is a {type(values).__name__}, expected a mapping")
    from goca_fast.config import config_from_dict as strict_config_from_dict
    return strict_config_from_dict(filt(Config, values, ""))


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"device {name} requested but torch sees no CUDA device")
    if not (name == "cpu" or name.startswith("cuda")):
        raise EvalError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """'auto' = bf16 on GPU, fp32 on CPU (as pretraining); 'bf16' | 'fp16' | 'off'."""
    if mode not in ("auto", "bf16", "fp16", "off"):
        raise EvalError(f"amp must be auto, bf16, fp16 or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if mode == "fp16" else torch.bfloat16


@contextlib.contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block without disturbing any global RNG (python, numpy, torch CPU and CUDA).

    Evaluation inside training (monitor, per-epoch validation) must not shift the training's random stream, or a
    resumed run would differ from an uninterrupted one (DataLoader iterators draw a seed from torch's RNG)."""
    py, npy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# ---------------------------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(source: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoint file, run directory) from a checkpoint path, a run directory or its checkpoints/ folder."""
    p = Path(source).expanduser()
    if p.is_dir():
        run_dir = p.parent if p.name == ckpt.CHECKPOINT_SUBDIR else p
        found = ckpt.find_latest(run_dir)
        if found is None:
            raise EvalError(f"{p} holds no intact checkpoint (looked for {ckpt.latest_path(run_dir)} and "
                            f"ckpt_epochNNNN.pth snapshots)")
        return found, run_dir
    if not p.is_file():
        raise EvalError(f"checkpoint or run directory not found: {p}")
    run_dir = p.parent.parent if p.parent.name == ckpt.CHECKPOINT_SUBDIR else p.parent
    return p, run_dir


@dataclass
class LoadedModel:
    """A model ready for evaluation, and where it came from."""

    model: GocaModel
    config: Config
    checkpoint: Path
    run_dir: Path
    epoch: Optional[int]
    kind: str                 # "pretrain" | "finetune"
    has_heads: bool
    checkpoint_key: dict = field(default_factory=dict)  # identifies the weights for the feature cache

    @property
    def streams(self) -> list[str]:
        return list(self.model.streams)


def _checkpoint_config(state: dict, run_dir: Path, path: Path, config_path: Optional[str]) -> Config:
    if config_path:
        return load_config(config_path)
    if isinstance(state.get("config"), dict):
        return config_from_dict(state["config"])
    yaml_path = run_dir / "config.yaml"
    if yaml_path.is_file():
        return load_config(yaml_path)
    raise EvalError(f"{path} holds no config and there is no {yaml_path}; pass --config with the pretraining config")


def _match_state(model: GocaModel, state: dict[str, torch.Tensor], streams: Sequence[str], need_heads: bool,
                 path: Path, arch: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The part of `state` the evaluation needs, checked key by key and shape by shape (clear error otherwise)."""
    own = model.state_dict()
    needed = [k for k in own if any(k.startswith(f"backbones.{s}.") for s in streams)]
    head_keys = [k for k in own if k.startswith("heads.")]
    has_heads = all(k in state and state[k].shape == own[k].shape for k in head_keys)
    if need_heads:
        needed += head_keys
    missing = [k for k in needed if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in needed
             if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        if not any(k.startswith("backbones.") for k in state):
            hint = "it holds no goca_fast backbone weights (an official or foreign checkpoint?)"
        elif need_heads and not has_heads and not wrong and all(k.startswith("heads.") for k in missing):
            hint = "it holds no projection heads (a fine-tuned checkpoint?); use the backbone features"
        else:
            hint = f"is it from another architecture than model.arch={arch}?"
        detail = "; ".join(filter(None, [
            f"{len(missing)} missing keys (e.g. {missing[0]})" if missing else "",
            f"{len(wrong)} shape mismatches (e.g. {wrong[0]})" if wrong else ""]))
        raise EvalError(f"checkpoint {path} does not fit the model its config describes: {detail}; {hint}")
    return {k: state[k] for k in own if k in state and state[k].shape == own[k].shape}, has_heads


def load_model(source: str | os.PathLike, device: torch.device | str = "cpu", streams: Optional[Sequence[str]] = None,
               need_heads: bool = False, expect_arch: Optional[str] = None,
               config_path: Optional[str] = None) -> LoadedModel:
    """Load a pretraining (or goca-eval fine-tuning) checkpoint for evaluation.

    source: checkpoint file, run directory, or its checkpoints/ folder. streams: the streams to evaluate (default:
    all the checkpoint has); asking for one it lacks is an error. expect_arch: fail unless the checkpoint's
    architecture is this one. The architecture comes from the checkpoint's own config (else the run directory's
    config.yaml, else `config_path`).
    """
    path, run_dir = resolve_checkpoint(source)
    try:
        state = ckpt.load_checkpoint(path, map_location="cpu")
    except ckpt.CheckpointError as e:
        raise EvalError(str(e)) from None
    if "model" not in state or not isinstance(state["model"], dict):
        raise EvalError(f"{path} has no 'model' state dict (keys: {sorted(state)[:8]}); not a goca_fast checkpoint")
    cfg = _checkpoint_config(state, run_dir, path, config_path)
    if expect_arch and cfg.model.arch != expect_arch:
        raise EvalError(f"{path} is a {cfg.model.arch} checkpoint, but {expect_arch} was asked for")
    build_cfg = copy.deepcopy(cfg)
    build_cfg.model.prototypes_path = ""  # prototypes come from the checkpoint; the .npy may not exist here
    model = build_model(build_cfg)
    avail = list(model.streams)
    streams = list(streams) if streams else avail
    for s in streams:
        if s not in STREAM_NAMES:
            raise EvalError(f"unknown stream {s!r}; choose from rgb, flow")
        if s not in avail:
            raise EvalError(f"{path} was pretrained with data.modalities={cfg.data.modalities}: it has no {s} "
                            f"stream (available: {', '.join(avail)})")
    weights, has_heads = _match_state(model, ckpt.strip_ddp_prefix(state["model"]), streams, need_heads, path,
                                      cfg.model.arch)
    model.load_state_dict(weights, strict=False)
    model.streams = streams  # evaluate only the requested streams
    model.to(device).eval()
    st = path.stat()
    key = {"checkpoint": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return LoadedModel(model, cfg, path, run_dir, state.get("epoch"), str(state.get("kind", "pretrain")),
                       has_heads, key)


def default_output_dir(run_dir: Path) -> Path:
    """Where a run's evaluation results, plots and feature cache go: <run_dir>/eval."""
    return Path(run_dir) / "eval"


# ---------------------------------------------------------------------------------------------- data
def dataset_root_for(cfg: Config, override: Optional[str] = None) -> Path:
    """The dataset to evaluate on: `override`, else the pretraining config's data.root, else its synthetic set
    (generated on demand exactly as pretraining does)."""
    if override:
        root = Path(override).expanduser()
        if not (root / "index.jsonl").is_file():
            raise EvalError(f"{root} holds no index.jsonl; prepare it with goca-prepare (and goca-flow for flow)")
        return root
    return dataset_root(cfg)


@dataclass(frozen=True)
class ViewSpec:
    """The eval view protocol: num_clips uniformly spaced clips × crops spatial crops per video
    (docs/official_behaviour.md#evaluation-views)."""

    clip_length: int
    stride: int
    num_clips: int
    crops: int
    crop_size: int
    short_side: int
    flow_mode: str = "shared"

    @property
    def views(self) -> int:
        return self.num_clips * self.crops

    def describe(self) -> str:
        return (f"{plural(self.num_clips, 'clip')} × {plural(self.crops, 'crop')} of "
                f"{plural(self.clip_length, 'frame')} (stride {self.stride}), "
                f"short side {self.short_side} → {self.crop_size}² crops")


def view_spec_from_config(cfg: Config, clips: Optional[int] = None, crops: Optional[int] = None,
                          clip_length: Optional[int] = None, stride: Optional[int] = None) -> ViewSpec:
    """The protocol of a pretraining config (eval.clips × eval.crops of the longest pretraining clip), overridable."""
    spec = ViewSpec(clip_length=clip_length or cfg.eval.clip_length or max(cfg.data.frames_per_group),
                    stride=stride or cfg.data.stride, num_clips=clips or cfg.eval.clips,
                    crops=crops or cfg.eval.crops, crop_size=cfg.data.crop_size, short_side=cfg.data.scale_range[0],
                    flow_mode=cfg.data.flow_mode)
    if spec.crops not in (1, 3):
        raise EvalError(f"crops must be 1 (centre) or 3 (left/centre/right), got {spec.crops}")
    if spec.num_clips < 1 or spec.clip_length < 1 or spec.stride < 1:
        raise EvalError(f"clips, clip length and stride must be >= 1, got {spec.num_clips}, {spec.clip_length}, "
                        f"{spec.stride}")
    return spec


@dataclass
class SplitRecords:
    """The usable videos of one split, and the ones left out because their files are missing."""

    name: str
    records: list[VideoRecord]
    total: int
    missing: list[str]
    classes: list[str]


def split_records(root: Path, split: str, streams: Sequence[str], records: Optional[list[VideoRecord]] = None,
                  classes: Optional[list[str]] = None) -> SplitRecords:
    """Records of `split` whose RGB (and flow, when a flow stream is evaluated) files exist.

    Errors: unknown or empty split, or a split none of whose videos exist. Missing files are warned about (count and
    the first ids) and counted; they never silently shrink the evaluation.
    """
    if records is None or classes is None:
        try:
            records, classes = read_index(root)
        except DatasetIndexError as e:
            raise EvalError(str(e)) from None
    chosen = [r for r in records if split in r.splits]
    if not chosen:
        raise EvalError(f"split {split!r} of {root} is empty or unknown (splits there: "
                        f"{', '.join(split_names(records)) or 'none'})")
    need_flow = "flow" in streams
    ok, missing = [], []
    for r in chosen:
        files = [r.rgb] + ([r.flow] if need_flow and r.flow is not None else [])
        if (need_flow and r.flow is None) or not all(os.path.isfile(os.path.join(root, f)) for f in files):
            missing.append(r.id)
        else:
            ok.append(r)
    if missing:
        what = "RGB or flow" if need_flow else "RGB"
        msg = (f"split {split!r}: {len(missing)} of {plural(len(chosen), 'video')} "
               f"{'has' if len(missing) == 1 else 'have'} missing {what} files "
               f"(e.g. {', '.join(missing[:3])}); they are left out and counted")
        if not ok:
            hint = " (no flow extracted? run goca-flow, or evaluate --streams rgb)" if need_flow else ""
            raise EvalError(f"split {split!r} of {root}: none of its {plural(len(chosen), 'video')} has its "
                              f"files{hint}")
        log.warning(msg)
    return SplitRecords(split, ok, len(chosen), missing, list(classes))


def check_disjoint(first: str, first_ids: Sequence[str], second: str, second_ids: Sequence[str],
                   roles: tuple[str, str] = ("gallery", "query")) -> None:
    """Refuse to evaluate on training videos: a query that is also in the gallery retrieves itself (R@1 100 %),
    and a probe tested on what it was fitted on measures memory, not features."""
    shared = set(first_ids) & set(second_ids)
    if shared:
        same = ", the same split" if first == second else ""
        raise EvalError(f"{roles[0]} split {first!r} and {roles[1]} split {second!r} share {len(shared)} of "
                        f"{plural(len(set(second_ids)), 'video')}{same} (e.g. {', '.join(sorted(shared)[:3])}): "
                        f"every such video would be matched with itself; choose disjoint splits")


def check_disjoint_records(first: SplitRecords, second: SplitRecords,
                           roles: tuple[str, str] = ("gallery", "query")) -> None:
    check_disjoint(first.name, [r.id for r in first.records], second.name, [r.id for r in second.records], roles)


def class_check(gallery: Sequence[int], query: Sequence[int], classes: Sequence[str], gallery_split: str,
                query_split: str) -> list[str]:
    """Warnings about classes present in one split but not the other (an error when they share none)."""
    g, q = set(int(x) for x in gallery), set(int(x) for x in query)
    if not g & q:
        raise EvalError(f"splits {gallery_split!r} and {query_split!r} share no class: mismatched class lists "
                        f"(wrong split names or a different dataset?)")
    out = []
    only_q = sorted(q - g)
    if only_q:
        names = ", ".join(classes[i] if i < len(classes) else str(i) for i in only_q[:5])
        out.append(f"{len(only_q)} classes of {query_split!r} never occur in {gallery_split!r} ({names}"
                   f"{', ...' if len(only_q) > 5 else ''}); their videos can never be matched")
    only_g = sorted(g - q)
    if only_g:
        out.append(f"{len(only_g)} classes of {gallery_split!r} have no video in {query_split!r}")
    for w in out:
        log.warning(w)
    return out


# ---------------------------------------------------------------------------------------------- features
@dataclass
class SplitFeatures:
    """Video features of one split plus the bookkeeping every reported number needs.

    features: stream → N×F float32 (mean of L2-normalised views). views: stream → N×V×F raw view features (fp16)
    or None.
    ids/labels/padded: per evaluated video. missing: ids whose files do not exist; unreadable: ids the decoder
    rejected. total = evaluated + missing + unreadable.
    """

    split: str
    ids: list[str]
    labels: torch.Tensor
    padded: torch.Tensor
    features: dict[str, torch.Tensor]
    views: Optional[dict[str, torch.Tensor]]
    total: int
    missing: list[str]
    unreadable: list[str]
    classes: list[str]

    @property
    def evaluated(self) -> int:
        return len(self.ids)

    def counts(self) -> dict[str, int]:
        return {"videos": self.total, "evaluated": self.evaluated, "missing_files": len(self.missing),
                "unreadable": len(self.unreadable), "padded_short": int(self.padded.sum())}


def _dali_importable() -> bool:
    try:
        importlib.import_module("dali_pipelines.eval")
    except ImportError:
        return False
    return True


def eval_loader(root: Path, split: SplitRecords, spec: ViewSpec, with_flow: bool, batch_size: int, workers: int,
                device: torch.device, loader: str = "auto"):
    """Iterable of EvalBatch over a split, from the CPU loader or the DALI pipeline (same views, same batches)."""
    if loader not in ("auto", "cpu", "dali"):
        raise EvalError(f"loader must be auto, cpu or dali, got {loader!r}")
    use_dali = loader == "dali" or (loader == "auto" and device.type == "cuda" and _dali_importable())
    if use_dali:
        if not _dali_importable():
            raise EvalError("loader=dali but the DALI pipelines are not available (pip install -e '.[dali]')")
        from dali_pipelines.eval import DaliEvalLoader
        return DaliEvalLoader(root, split.records, spec.clip_length, spec.stride, spec.num_clips, spec.crop_size,
                              spec.short_side, with_flow, spec.crops, spec.flow_mode, batch_size, workers, device)
    from goca_fast.data.cpu_loader import EvalClipDataset, make_eval_loader
    ds = EvalClipDataset(root, split.records, spec.clip_length, spec.stride, spec.num_clips, spec.crop_size,
                         spec.short_side, with_flow, crops=spec.crops, flow_mode=spec.flow_mode)
    return make_eval_loader(ds, batch_size, workers)


def compute_split_features(model: GocaModel, root: Path, split: SplitRecords, spec: ViewSpec,
                           device: torch.device, batch_size: int = 8, workers: int = 0, source: str = "backbone",
                           keep_views: bool = False, amp: Optional[torch.dtype] = None,
                           loader: str = "auto") -> SplitFeatures:
    """Extract the features of one split under the view protocol `spec` (no cache).

    loader: "cpu" (PyAV), "dali", or "auto" (DALI on a CUDA device when the pipelines import)."""
    from goca_fast.eval.features import extract_features

    streams = list(model.streams)
    out = extract_features(model, eval_loader(root, split, spec, "flow" in streams, batch_size, workers, device, loader),
                           device, amp, source, keep_views)
    order = torch.argsort(out.index)  # loader order is already record order; sorting makes it a guarantee
    got = set(out.index.tolist())
    unreadable = [r.id for i, r in enumerate(split.records) if i not in got]
    if not got:
        raise EvalError(f"split {split.name!r}: none of its {plural(len(split.records), 'video')} could be decoded")
    if unreadable:
        log.warning("split %r: %s could not be decoded and %s left out (e.g. %s)", split.name,
                    plural(len(unreadable), "video"), "is" if len(unreadable) == 1 else "are",
                    ", ".join(unreadable[:3]))
    ids = [split.records[i].id for i in out.index[order].tolist()]
    # view features are kept (and cached) at fp16: half the memory, and a cache hit gives the very same numbers
    return SplitFeatures(split.name, ids, out.labels[order], out.padded[order],
                         {s: f[order] for s, f in out.features.items()},
                         {s: v[order].half() for s, v in out.views.items()} if out.views is not None else None,
                         split.total, list(split.missing), unreadable, split.classes)


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


def split_features(loaded: LoadedModel, root: Path, split: SplitRecords, spec: ViewSpec, device: torch.device,
                   batch_size: int, workers: int, source: str = "backbone", keep_views: bool = False,
                   amp: Optional[torch.dtype] = None, cache: Optional[FeatureCache] = None) -> SplitFeatures:
    """Features of a split for a loaded checkpoint, from the cache when it holds them, else extracted (and cached)."""
    key = FeatureCache.key(loaded.checkpoint_key, root, split.name, spec, source, loaded.streams) if cache else None
    if cache is not None:
        hit = cache.load(key, need_views=keep_views)
        if hit is not None:
            log.info("split %r: features from cache %s", split.name, cache.folder(key))
            return hit
    out = compute_split_features(loaded.model, root, split, spec, device, batch_size, workers, source, keep_views,
                                 amp)
    if cache is not None:
        cache.save(key, out)
    return out
