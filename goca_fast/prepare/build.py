"""`goca-prepare`: raw UCF101 / HMDB51 / Kinetics-400 / class-folder trees -> a prepared dataset root.

Every usable input is decoded with PyAV (any codec FFmpeg reads: H.264, XviD/MPEG-4 part 2, MJPEG,
Cinepak, ...), brought to constant frame rate, resized to a short side of 256 (even width and
height) and re-encoded as CFR H.264 yuv420p with a fixed short GOP and no B-frames (what NVDEC/DALI and our
seeking reader want), one video at a time by `goca_fast.video.transcode`. Output layout:

    <out>/rgb/<class>/<id>.mp4          re-encoded videos (written to a temp file, then renamed)
    <out>/index.jsonl, classes.txt      the index (all splits), read by every loader
    <out>/excluded.jsonl                every input left out, with the reason
    <out>/prepare.json                  the encoding parameters (a rerun with others is refused)
    <out>/prepare_index.jsonl           RGB-only master index (goca-flow builds index.jsonl from it)
    <out>/prepare_report.json           counts by reason, sizes and timings

Resumable: a finished output exists only under its final name, so a rerun probes and reuses it and
encodes only what is missing. Nothing here raises on a bad input; it is excluded and reported.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Optional, Sequence

import cv2
import numpy as np

from goca_fast.runtime.atomic import remove_stale_temps, write_atomic
from goca_fast.data.index import MASTER_EXCLUDED, MASTER_INDEX, VideoRecord, write_index
from goca_fast.prepare.sources import SourceDataset, safe_name
from goca_fast.video.transcode import ExcludedInput, PrepareOptions, transcode
from goca_fast.video.io import VideoReadError, probe_video, set_decoder_threads
from goca_fast.prepare.flow_files import check_flow_file, flow_rel_path
from goca_fast.runtime.parallel import run_parallel

log = logging.getLogger(__name__)

PARAMS_FILE = "prepare.json"
REPORT_FILE = "prepare_report.json"
@dataclass
class Job:
    src: str
    out_root: str
    rel: str
    id: str


def process_one(job: Job, opts: PrepareOptions, check: bool = False) -> dict:
    """Encode one video unless its output already exists; never raises (failures -> 'excluded').

    check=True decodes the source only (nothing is written) and reports what would be kept.
    """
    t0 = time.perf_counter()
    out = os.path.join(job.out_root, job.rel)
    res = {"id": job.id, "src": job.src, "rel": job.rel}
    if not check and os.path.isfile(out):
        try:
            info = probe_video(out)
            if info.frames < opts.min_frames:  # kept from a run with a lower --min-frames
                return {**res, "status": "excluded", "reason": f"too short: {info.frames} frames < {opts.min_frames}",
                        "seconds": time.perf_counter() - t0}
            return {**res, "status": "skipped", "frames": info.frames, "fps": info.fps, "width": info.width,
                    "height": info.height, "bytes": os.path.getsize(out), "seconds": time.perf_counter() - t0}
        except VideoReadError:
            os.unlink(out)  # cannot happen with atomic writes, unless the disk lied: redo it
    try:
        info = transcode(job.src, None if check else out, opts)
        return {**res, **info, "status": "checked" if check else "encoded",
                "bytes": 0 if check else os.path.getsize(out), "src_bytes": os.path.getsize(job.src),
                "seconds": time.perf_counter() - t0}
    except ExcludedInput as e:
        return {**res, "status": "excluded", "reason": str(e), "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - one bad video never stops the run
        return {**res, "status": "excluded", "reason": f"failed: {type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0}


def _worker_init() -> None:
    set_decoder_threads(1)
    try:
        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def _run_jobs(jobs: list[Job], opts: PrepareOptions, workers: int, progress: bool,
              check: bool = False) -> Iterator[dict]:
    return run_parallel(process_one, [(j, opts, check) for j in jobs], workers, "check" if check else "prepare",
                        progress, _worker_init)


def _check_params(out: str, opts: PrepareOptions, force: bool) -> None:
    path = os.path.join(out, PARAMS_FILE)
    want = opts.encoding()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            have = json.load(f)
        have.setdefault("entropy", "cabac")  # written before the entropy coder was a setting: CABAC then
        if have != want and not force:
            diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
            raise ValueError(f"{out} was prepared with other parameters {diff} (old, new); "
                             f"use another --out, or --force to re-encode everything")
        if have != want and force:
            shutil.rmtree(os.path.join(out, "rgb"), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    write_atomic(path, json.dumps(want, indent=1) + "\n")


def write_master(out: str, records: Sequence[VideoRecord], excluded: Sequence[dict]) -> None:
    write_atomic(os.path.join(out, MASTER_INDEX), "".join(json.dumps(r.to_json()) + "\n" for r in records))
    write_atomic(os.path.join(out, MASTER_EXCLUDED), "".join(json.dumps(e) + "\n" for e in excluded))


def keep_valid_flow(out: str, records: Sequence[VideoRecord], reencoded: set[str]) -> tuple[list[VideoRecord], dict]:
    """Records with their flow path where a flow video from an earlier goca-flow still matches.

    Why: index.jsonl is rewritten on every run; without this a rerun of goca-prepare on a
    dataset with flow would set every "flow" to null and pretraining would skip every video.
    A flow video whose RGB was re-encoded in this run was computed from other pixels: it is
    deleted, so goca-flow recomputes it. Returns (records, {"kept", "recompute": {reason: n}}).
    """
    kept, recompute, result = 0, Counter(), []
    for rec in records:
        path = os.path.join(out, flow_rel_path(rec))
        if not os.path.isfile(path):
            result.append(rec)
            continue
        why = "RGB re-encoded in this run" if rec.id in reencoded else check_flow_file(out, rec)
        if why is None:
            kept += 1
            result.append(replace(rec, flow=flow_rel_path(rec)))
            continue
        os.unlink(path)
        recompute[reason_kind(why)] += 1
        result.append(rec)
    return result, {"kept": kept, "recompute": dict(recompute)}


def prepare_dataset(source: SourceDataset, out: str, opts: PrepareOptions = PrepareOptions(), workers: int = 1,
                    progress: bool = False, force: bool = False, limit: Optional[int] = None,
                    check: bool = False) -> dict:
    """Encode `source` into the prepared root `out`; write index + report; return the report dict.

    check=True only decodes every source and returns the report of what would be kept or
    excluded and why; nothing is written.
    """
    opts.check()
    out = os.path.abspath(out)
    if not check:
        _check_params(out, opts, force)
        remove_stale_temps(os.path.join(out, "rgb"))
    videos = source.videos[:limit] if limit else source.videos
    jobs = [Job(v.path, out, f"rgb/{safe_name(v.cls)}/{v.id}.mp4", v.id) for v in videos]
    by_id = {v.id: v for v in videos}
    label = {c: i for i, c in enumerate(source.classes)}
    t0 = time.time()
    results = list(_run_jobs(jobs, opts, workers, progress, check))
    records, excluded = [], list(source.problems)
    for r in results:
        v = by_id[r["id"]]
        if r["status"] == "excluded":
            excluded.append({"id": r["id"], "path": r["src"], "reason": r["reason"]})
            continue
        records.append(VideoRecord(id=v.id, rgb=r["rel"], flow=None, label=label[v.cls], cls=v.cls,
                                   frames=int(r["frames"]), fps=float(r["fps"]), width=int(r["width"]),
                                   height=int(r["height"]), splits=list(v.splits)))
    order = {v.id: i for i, v in enumerate(videos)}
    records.sort(key=lambda rec: order[rec.id])
    flow = {"kept": 0, "recompute": {}}
    if not check:
        write_master(out, records, excluded)
        indexed, flow = keep_valid_flow(out, records, {r["id"] for r in results if r["status"] == "encoded"})
        write_index(out, indexed, source.classes, excluded)
    enc = [r for r in results if r["status"] in ("encoded", "checked")]
    report = {
        "videos": len(jobs), "kept": len(records), "encoded": sum(r["status"] == "encoded" for r in results),
        "skipped_existing": sum(r["status"] == "skipped" for r in results),
        "excluded": len(excluded),
        "excluded_by_reason": dict(Counter(reason_kind(e["reason"]) for e in excluded)),
        "splits": dict(Counter(s for rec in records for s in rec.splits)),
        "flow_kept": flow["kept"], "flow_to_recompute": flow["recompute"],
        "wall_seconds": round(time.time() - t0, 2), "workers": workers,
        "encode_cpu_seconds_per_video": round(float(np.mean([r["seconds"] for r in enc])), 3) if enc else None,
        "output_bytes_per_video": int(np.mean([r["bytes"] for r in enc])) if enc and not check else None,
        "source_bytes_per_video": int(np.mean([r["src_bytes"] for r in enc])) if enc else None,
        "frames_per_video": round(float(np.mean([r["frames"] for r in enc])), 1) if enc else None,
        "resampled_to_cfr": sum(bool(r.get("resampled")) for r in enc),
        "reordered_timestamps": sum(bool(r.get("reordered_timestamps")) for r in enc),
        "options": asdict(opts),
    }
    if check:
        report["check"] = True
        report["would_keep"] = [{"id": r["id"], "frames": r["frames"], "fps": round(r["fps"], 3),
                                 "size": f"{r['width']}x{r['height']}", "resampled": r["resampled"]}
                                for r in results if r["status"] == "checked"]
        report["would_exclude"] = [{"id": e["id"], "path": e["path"], "reason": e["reason"]} for e in excluded]
    else:
        write_atomic(os.path.join(out, REPORT_FILE), json.dumps(report, indent=1) + "\n")
    return report


def reason_kind(reason: str) -> str:
    """Group reasons for the summary ("too short: 12 frames < 31" -> "too short")."""
    return reason.split(":")[0].split(" (")[0]
