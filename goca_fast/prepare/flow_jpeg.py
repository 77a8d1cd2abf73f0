"""Import flow stored as MemDPC / CoCLR / GOCA JPEG folders into our flow videos.

Those tools write, per video, a folder `<...>/<video id>/flow_00001.jpg ...` (N−1 images for N
frames, numbered from 1), each an H×W×3 image made with OpenCV: channel 0 = x-flow, channel 1 =
y-flow, channel 2 = 128, every flow value quantised as round((clip(f, ±20) + 20)·255/40). Also read:
separate greyscale `flow_x_%05d.jpg` / `flow_y_%05d.jpg` (or `x_`/`y_`) pairs, and `u/` + `v/`
subfolders. Files written in RGB order (constant channel first) are detected and swapped.

The folder of a video is found by its id (the source file name without extension), anywhere
under the JPEG root (`<split>/<class>/<id>/` or `<class>/<id>/`). The flow is resized (and its
vectors rescaled) when the JPEGs are not at the RGB size, padded to the RGB frame count, and
written with `codec.write_flow_video`. Videos whose JPEG count is off by more than `tolerance`
from the RGB frame count − 1 are excluded (the official loader tolerates 5).
"""
from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from typing import Iterator

import numpy as np
import cv2

from goca_fast.runtime.atomic import remove_stale_temps
from goca_fast.prepare.sources import SPLIT_DIR_NAMES
from goca_fast.data.index import VideoRecord
from goca_fast.video.io import PREPARED_ENTROPY, check_entropy
from goca_fast.video.flow_codec import FLOW_CRF, dequantise_flow, pad_flow_to_frames, quantise_flow, write_flow_video
from goca_fast.prepare.flow_files import (FlowJournal, finish_shard, flow_rel_path, load_master, pending_jobs,
                                          read_journals)
from goca_fast.runtime.parallel import run_parallel

_NUM = re.compile(r"(\d+)\D*$")


def _frame_no(name: str) -> int:
    m = _NUM.search(os.path.splitext(name)[0])
    return int(m.group(1)) if m else -1


def list_flow_jpegs(folder: str) -> tuple[str, list]:
    """(layout, files) for one video folder: 'rgb3' -> [path], 'xy' -> [(x_path, y_path)]."""
    names = sorted((f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png"))), key=_frame_no)
    xs = [f for f in names if re.match(r"^(flow_)?x_", f)]
    ys = [f for f in names if re.match(r"^(flow_)?y_", f)]
    if xs or ys:
        if len(xs) != len(ys):
            return "xy-mismatch", [len(xs), len(ys)]
        return "xy", [(os.path.join(folder, x), os.path.join(folder, y)) for x, y in zip(xs, ys)]
    if not names and os.path.isdir(os.path.join(folder, "u")) and os.path.isdir(os.path.join(folder, "v")):
        us = sorted(os.listdir(os.path.join(folder, "u")), key=_frame_no)
        vs = sorted(os.listdir(os.path.join(folder, "v")), key=_frame_no)
        if len(us) != len(vs):
            return "xy-mismatch", [len(us), len(vs)]
        return "xy", [(os.path.join(folder, "u", a), os.path.join(folder, "v", b)) for a, b in zip(us, vs)]
    return "rgb3", [os.path.join(folder, f) for f in names]


def read_flow_jpegs(layout: str, files: list) -> np.ndarray:
    """The JPEG folder -> T×H×W×2 uint8 (u, v) in the MemDPC quantisation."""
    if layout == "xy":
        out = []
        for xp, yp in files:
            x, y = cv2.imread(xp, cv2.IMREAD_GRAYSCALE), cv2.imread(yp, cv2.IMREAD_GRAYSCALE)
            if x is None or y is None or x.shape != y.shape:
                raise ValueError(f"unreadable flow JPEG pair {xp}, {yp}")
            out.append(np.stack([x, y], axis=-1))
        return np.stack(out)
    imgs = []
    for p in files:
        im = cv2.imread(p, cv2.IMREAD_COLOR)
        if im is None:
            raise ValueError(f"unreadable flow JPEG {p}")
        imgs.append(im)
    arr = np.stack(imgs)
    # the filler channel is the one pinned at 128; OpenCV-written files have it last (B=x, G=y, R=128)
    spread = [np.abs(arr[..., c].astype(np.int16) - 128).mean() for c in (0, 2)]
    return arr[..., [0, 1]] if spread[1] <= spread[0] else arr[..., [2, 1]]


def resize_flow_u8(flow_u8: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize quantised flow to width×height, scaling the vectors with the image (u by W ratio, v by H ratio)."""
    t, h, w, _ = flow_u8.shape
    if (w, h) == (width, height):
        return flow_u8
    f = dequantise_flow(flow_u8)
    out = np.stack([cv2.resize(x, (width, height), interpolation=cv2.INTER_LINEAR) for x in f])
    out[..., 0] *= width / w
    out[..., 1] *= height / h
    return quantise_flow(out)


def index_jpeg_folders(jpeg_root: str) -> dict[str, list[str]]:
    """Video id (folder name) -> folders holding flow images under jpeg_root."""
    found: dict[str, list[str]] = defaultdict(list)
    for d, dirs, files in os.walk(jpeg_root):
        dirs.sort()
        base = os.path.basename(d)
        if base in ("u", "v") and any(f.lower().endswith(".jpg") for f in files):
            continue
        if any(f.lower().endswith((".jpg", ".jpeg", ".png")) for f in files) or {"u", "v"} <= set(dirs):
            found[base].append(d)
    return found


def import_one(root: str, rec: VideoRecord, folder: str, out_rel: str, tolerance: int, gop: int,
               crf: float, entropy: str) -> dict:
    """Convert one JPEG folder; never raises."""
    t0 = time.perf_counter()
    try:
        layout, files = list_flow_jpegs(folder)
        if layout == "xy-mismatch":
            raise ValueError(f"flow JPEG x/y counts differ: {files[0]} vs {files[1]}")
        n = len(files)
        if n == 0:
            raise ValueError("no flow JPEGs in the folder")
        if abs(n - (rec.frames - 1)) > tolerance:
            return {"id": rec.id, "status": "failed",
                    "reason": f"flow frame count mismatch: {n} JPEGs for {rec.frames} RGB frames (tolerance {tolerance})"}
        flow = resize_flow_u8(read_flow_jpegs(layout, files), rec.width, rec.height)
        write_flow_video(os.path.join(root, out_rel), pad_flow_to_frames(flow, rec.frames), rec.fps, gop=gop, crf=crf,
                         entropy=entropy)
        return {"id": rec.id, "status": "done", "pairs": n, "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001
        return {"id": rec.id, "status": "failed", "reason": f"flow import failed: {type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0}


def import_jpeg_flow(root: str, jpeg_root: str, workers: int = 1, tolerance: int = 5, gop: int = 16,
                     crf: float = FLOW_CRF, shard: tuple[int, int] = (0, 1), progress: bool = False,
                     entropy: str = PREPARED_ENTROPY) -> dict:
    """Import every missing flow video of this shard of the prepared dataset `root` from JPEG folders; one shard
    (0/1) rewrites the index, shards of n > 1 leave it to `goca-flow --merge` (as `extract_flow`)."""
    check_entropy(entropy)
    root = os.path.abspath(root)
    records, classes, excluded = load_master(root)
    remove_stale_temps(os.path.join(root, "flow"))
    journals = read_journals(root)
    with FlowJournal(root, shard, journals) as journal:
        jobs, done_before = pending_jobs(root, records, shard, gop, crf, journal, journals.verified, entropy)
        report = _import(root, jpeg_root, jobs, workers, tolerance, progress, journal)
    report.update({"videos": len(records), "already_done": done_before, "shard": list(shard)})
    return finish_shard(root, (records, classes, excluded), shard, report, journals)


def _import(root: str, jpeg_root: str, jobs: list, workers: int, tolerance: int,
            progress: bool, journal: FlowJournal) -> dict:
    folders = index_jpeg_folders(jpeg_root)
    failures: dict[str, str] = {}
    work = []
    for j in jobs:
        cands = folders.get(j.rec.id) or folders.get(j.rec.id.split("__")[-1], [])
        if len(cands) > 1:  # same id under several classes/splits: prefer the record's class folder
            cands = [c for c in cands if os.path.basename(os.path.dirname(c)) in (j.rec.cls, j.rec.cls.replace(" ", "_"))] or cands
        if len(cands) > 1:  # split folders with a repeated name (ids train__x, test__x): the record's split
            cands = [c for c in cands if any(SPLIT_DIR_NAMES.get(part.lower()) in j.rec.splits
                                             for part in os.path.relpath(c, jpeg_root).split(os.sep))] or cands
        if not cands:
            failures[j.rec.id] = "flow missing: no JPEG folder named after the video"
            continue
        work.append((root, j.rec, cands[0], flow_rel_path(j.rec), tolerance, j.gop, j.crf, j.entropy))
    t0 = time.time()
    by_id = {j.rec.id: j.rec for j in jobs}
    for vid, reason in failures.items():
        journal.failed(by_id[vid], reason)
    results = []
    for r in _run(work, workers, progress):
        journal.record(by_id[r["id"]], r)
        if r["status"] == "failed":
            failures[r["id"]] = r["reason"]
        results.append(r)
    done = [r for r in results if r["status"] == "done"]
    return {"backend": "jpeg-import", "device": f"cpu x{workers}", "computed": len(done), "failed": len(failures),
            "pairs": sum(r["pairs"] for r in done), "wall_seconds": round(time.time() - t0, 2),
            "pairs_per_second": None, "jpeg_root": os.path.abspath(jpeg_root)}


def _run(work: list[tuple], workers: int, progress: bool) -> Iterator[dict]:
    return run_parallel(import_one, work, workers, "flow import", progress)
