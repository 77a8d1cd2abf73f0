"""The on-disk dataset index shared by every loader (CPU PyAV and DALI).

A dataset root holds:
  index.jsonl     one JSON object per video:
                  {"id", "rgb", "flow", "label", "class", "frames", "fps", "width", "height", "splits"}
                  rgb/flow are paths relative to the root (flow may be null); splits lists the
                  split names the video belongs to (e.g. ["train"], ["test"], ["train", "trainval"]).
  classes.txt     one class name per line; line number (0-based) = label.
  excluded.jsonl  inputs left out, one {"id", "path", "reason"} per line (a report, never read back
                  by loaders).
Files are written atomically (temp file + os.replace) and index.jsonl last, so a present
index.jsonl means the dataset is complete.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Iterator, Optional, Sequence, overload

import numpy as np

from goca_fast.runtime.atomic import write_atomic
from goca_fast.video.io import VideoReadError, probe_video

INDEX_FILE = "index.jsonl"
CLASSES_FILE = "classes.txt"
EXCLUDED_FILE = "excluded.jsonl"
MASTER_INDEX = "prepare_index.jsonl"        # goca-prepare's RGB-only index, from which goca-flow writes index.jsonl
MASTER_EXCLUDED = "prepare_excluded.jsonl"


class DatasetIndexError(ValueError):
    """The dataset index is missing, corrupt, or inconsistent."""


@dataclass(frozen=True, slots=True)
class VideoRecord:
    """One indexed video. Slotted, with class and split names interned: a Kinetics-700 index (650k records) is
    held once per process at about half the memory of plain objects."""

    id: str
    rgb: str
    flow: Optional[str]
    label: int
    cls: str
    frames: int
    fps: float
    width: int
    height: int
    splits: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        return d

    @staticmethod
    def from_json(d: dict) -> "VideoRecord":
        return VideoRecord(id=str(d["id"]), rgb=str(d["rgb"]),
                           flow=None if d.get("flow") is None else str(d["flow"]),
                           label=int(d["label"]), cls=sys.intern(str(d["class"])), frames=int(d["frames"]),
                           fps=float(d["fps"]), width=int(d["width"]), height=int(d["height"]),
                           splits=[sys.intern(str(s)) for s in d.get("splits", [])])


class RecordTable(Sequence[VideoRecord]):
    """Records packed into two numpy arrays (pickled bytes + offsets), for datasets that loader workers read.

    A forked DataLoader worker that reads Python objects writes to them (reference counts, the garbage collector's
    bookkeeping), so over an epoch every page of a list of records is copied into every worker: at Kinetics scale
    (650k records, ~350 MiB) that is the index once more per worker. Numpy buffers are read without being written,
    so the workers share the parent's copy. Indexing unpickles one record (a few microseconds)."""

    def __init__(self, records: Iterable[VideoRecord]):
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> VideoRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[VideoRecord]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self._ends)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range ({n} records)")
        index %= n
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(self._data[start:int(self._ends[index])].tobytes())

    def __iter__(self) -> Iterator[VideoRecord]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes + self._ends.nbytes)


def write_index(root: str | os.PathLike, records: Sequence[VideoRecord], classes: Sequence[str],
                excluded: Iterable[dict] = ()) -> None:
    """Write index.jsonl, classes.txt and excluded.jsonl under `root` (each atomically)."""
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    _check_consistent(records, list(classes), where=root)
    write_atomic(os.path.join(root, CLASSES_FILE), "".join(f"{c}\n" for c in classes))
    write_atomic(os.path.join(root, EXCLUDED_FILE), "".join(json.dumps(e) + "\n" for e in excluded))
    write_atomic(os.path.join(root, INDEX_FILE), "".join(json.dumps(r.to_json()) + "\n" for r in records))


def _check_consistent(records: Sequence[VideoRecord], classes: list[str], where: str) -> None:
    for name in classes:
        if not name or "\n" in name:
            raise DatasetIndexError(f"{where}: invalid class name {name!r}")
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise DatasetIndexError(f"{where}: duplicate video id {r.id!r}")
        seen.add(r.id)
        if not 0 <= r.label < len(classes) or classes[r.label] != r.cls:
            raise DatasetIndexError(f"{where}: video {r.id!r} has label {r.label} / class {r.cls!r}, "
                                    f"inconsistent with classes.txt ({len(classes)} classes)")


def read_index(root: str | os.PathLike) -> tuple[list[VideoRecord], list[str]]:
    """Records and class names of a prepared dataset root (clear error if missing/corrupt)."""
    root = os.fspath(root)
    ipath, cpath = os.path.join(root, INDEX_FILE), os.path.join(root, CLASSES_FILE)
    for p in (ipath, cpath):
        if not os.path.isfile(p):
            raise DatasetIndexError(f"{p} not found: is {root!r} a prepared dataset root "
                                    f"(run goca-prepare and goca-flow, or make_synthetic_dataset)?")
    with open(cpath, encoding="utf-8") as f:
        classes = [line.rstrip("\n") for line in f if line.strip()]
    records = []
    with open(ipath, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(VideoRecord.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise DatasetIndexError(f"{ipath}:{lineno}: corrupt record ({type(e).__name__}: {e})") from None
    _check_consistent(records, classes, where=ipath)
    return records, classes


def split_names(records: Sequence[VideoRecord]) -> list[str]:
    return sorted({s for r in records for s in r.splits})


def select_split(records: Sequence[VideoRecord], split: str, required: bool = True) -> list[VideoRecord]:
    """Records belonging to `split` (order preserved); an unknown or empty split is an error naming the known ones,
    unless not `required`."""
    out = [r for r in records if split in r.splits]
    if required and not out:
        raise DatasetIndexError(f"unknown or empty split {split!r}; available: {split_names(records)}")
    return out


def training_records(records: Sequence[VideoRecord], split: str, *, with_flow: bool,
                     batch: int) -> list[VideoRecord]:
    """The videos of `split` a training run can use, checked before anything is trained or written.

    A run whose every batch is skipped would otherwise end as if it had trained: so a split that cannot fill one
    batch of `batch` usable videos (e.g. no flow extracted yet) is a DatasetIndexError naming the cause."""
    chosen = select_split(records, split)
    usable = [r for r in chosen if r.flow is not None] if with_flow else list(chosen)
    if len(usable) < batch:
        no_flow = len(chosen) - len(usable)
        cause = (f"{no_flow} of its {len(chosen)} videos have no flow video in the index: run goca-flow first"
                 if no_flow else f"it has {len(chosen)} videos")
        raise DatasetIndexError(f"split {split!r} yields no full batch of {batch} usable videos ({cause})")
    return usable


def _validate_one(root: str, r: VideoRecord, min_frames: int, decode: bool,
                  max_frame_diff: int) -> tuple[Optional[VideoRecord], Optional[dict]]:
    def bad(path: Optional[str], reason: str):
        return None, {"id": r.id, "path": path, "reason": reason}

    try:
        rgb = probe_video(os.path.join(root, r.rgb), decode=decode)
    except VideoReadError as e:
        return bad(r.rgb, f"rgb unreadable: {e}")
    n = rgb.frames
    if r.flow is not None:
        try:
            flow = probe_video(os.path.join(root, r.flow), decode=decode)
        except VideoReadError as e:
            return bad(r.flow, f"flow unreadable: {e}")
        if abs(flow.frames - rgb.frames) > max_frame_diff:
            return bad(r.flow, f"frame count mismatch: rgb {rgb.frames}, flow {flow.frames}")
        if (flow.width, flow.height) != (rgb.width, 2 * rgb.height):
            return bad(r.flow, f"flow size {flow.width}x{flow.height} is not rgb {rgb.width}x{rgb.height} "
                               f"with u stacked above v")
        n = min(n, flow.frames)
    if n < min_frames:
        return bad(r.rgb, f"too short: {n} frames < {min_frames}")
    return replace(r, frames=n, fps=rgb.fps or r.fps, width=rgb.width, height=rgb.height), None


def validate_records(root: str | os.PathLike, records: Sequence[VideoRecord], min_frames: int,
                     decode: bool = False, max_frame_diff: int = 0,
                     workers: int = 1) -> tuple[list[VideoRecord], list[dict]]:
    """Probe every file; keep usable records (frames/size refreshed from the files), exclude the rest.

    Exclusion reasons: missing/undecodable rgb or flow, too short, RGB/flow frame-count
    mismatch beyond `max_frame_diff` (our flow videos have exactly the RGB count), wrong
    flow frame size. decode=True decodes every frame (slow, catches mid-file corruption).
    """
    root = os.fspath(root)
    args = [(root, r, min_frames, decode, max_frame_diff) for r in records]
    if workers > 1:
        with ThreadPoolExecutor(workers) as ex:
            results = list(ex.map(lambda a: _validate_one(*a), args))
    else:
        results = [_validate_one(*a) for a in args]
    ok = [r for r, _ in results if r is not None]
    excluded = [e for _, e in results if e is not None]
    return ok, excluded
