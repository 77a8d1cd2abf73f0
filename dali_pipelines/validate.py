"""Which indexed videos the DALI evaluation loader can read, checked once before an evaluation and cached; the rest
are excluded with a reason (`dali_excluded.jsonl`). (The training loader trusts the index instead: goca-prepare and
goca-flow write its frame counts and sizes from the files, and a start-up cost per video does not scale to
Kinetics; a broken file costs its training batch one sample at run time.)

Measured with DALI 1.53's decoder (`frames=` per sample, CPU backend): zero-byte, junk, truncated and corrupt files
raise a Python exception for the batch (no crash); B-frames, variable frame rate and odd sizes decode the right
frames; but a frame index past the end of the file comes back as a black frame, silently. The frame counts and
sizes the sampler and the crop parameters are computed from come from the index, so they must be the file's:
every video must open, have the index's frame count and size, and have a flow video of the same frame count at
2H×W. The check only demuxes (`goca_fast.video.io.probe_video`); results are cached by (path, size, mtime),
so a second run over the same dataset is instant. Files that break after this check fail at run time as one
batch, which the loader then decodes with the CPU loader (the broken video costs one sample).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from goca_fast.runtime.atomic import file_stamp, write_atomic
from goca_fast.data.index import VideoRecord
from goca_fast.video.io import VideoReadError, probe_video
from goca_fast.runtime.parallel import run_parallel

log = logging.getLogger(__name__)
CACHE_FILE = "dali_check.json"
REPORT_FILE = "dali_excluded.jsonl"
_VERSION = 2  # 2: checks with probe_video and the index's size


def check_record(root: str, rec: VideoRecord, with_flow: bool) -> Optional[str]:
    """None when the DALI loader can read this record, else the reason (one line)."""
    try:
        rgb = probe_video(os.path.join(root, rec.rgb))
        if rgb.frames != rec.frames:
            return f"{rec.rgb}: {rgb.frames} frames in the file, {rec.frames} in the index"
        if (rgb.width, rgb.height) != (rec.width, rec.height):
            return f"{rec.rgb}: {rgb.width}x{rgb.height} in the file, {rec.width}x{rec.height} in the index"
        if not with_flow:
            return None
        if not rec.flow:
            return "no flow video in the index"
        flow = probe_video(os.path.join(root, rec.flow))
    except VideoReadError as e:
        return str(e)
    if flow.frames != rgb.frames:
        return f"flow has {flow.frames} frames, rgb {rgb.frames}"
    if (flow.width, flow.height) != (rgb.width, 2 * rgb.height):
        return f"flow video is {flow.width}x{flow.height}, expected {rgb.width}x{2 * rgb.height} for rgb " \
               f"{rgb.width}x{rgb.height}"
    return None


def _check_job(root: str, rec_json: dict, with_flow: bool) -> dict:
    rec = VideoRecord.from_json(rec_json)
    return {"id": rec.id, "reason": check_record(root, rec, with_flow)}


def validate_for_dali(root: str | os.PathLike, records: Sequence[VideoRecord], with_flow: bool, workers: int = 1,
                      cache_dir: Optional[str | os.PathLike] = None,
                      progress: bool = False) -> tuple[list[VideoRecord], list[dict]]:
    """(records the DALI loader can read, excluded [{id, path, reason}]). The cache and the report go to
    `cache_dir` (default: the dataset root, or ~/.cache/goca_fast when the root is read-only)."""
    root = os.fspath(root)
    cdir = Path(cache_dir) if cache_dir else Path(root)
    if not os.access(cdir, os.W_OK):
        digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
        cdir = Path("~/.cache/goca_fast").expanduser() / f"dali_{digest}"
    cache_path = cdir / CACHE_FILE
    cache: dict = {}
    if cache_path.is_file():
        try:
            old = json.loads(cache_path.read_text())
            cache = old["entries"] if old.get("version") == _VERSION else {}
        except (ValueError, KeyError):
            cache = {}

    def key(rec: VideoRecord) -> str:
        paths = [rec.rgb] + ([rec.flow] if with_flow and rec.flow else [])
        stats = [file_stamp(os.path.join(root, p)) for p in paths]
        return json.dumps([rec.id, paths, stats, rec.frames, with_flow])

    keys = {r.id: key(r) for r in records}
    todo = [r for r in records if keys[r.id] not in cache]
    if todo:
        jobs = [(root, r.to_json(), with_flow) for r in todo]
        for res in run_parallel(_check_job, jobs, min(workers, len(jobs)), "dali check", progress):
            cache[keys[res["id"]]] = res["reason"]
        cdir.mkdir(parents=True, exist_ok=True)
        live = set(keys.values())
        write_atomic(str(cache_path), json.dumps({"version": _VERSION,
                                                   "entries": {k: v for k, v in cache.items() if k in live}}))
    good, excluded = [], []
    for r in records:
        reason = cache[keys[r.id]]
        if reason is None:
            good.append(r)
        else:
            excluded.append({"id": r.id, "path": r.rgb, "reason": reason})
    if excluded:
        cdir.mkdir(parents=True, exist_ok=True)
        write_atomic(str(cdir / REPORT_FILE), "".join(json.dumps(e) + "\n" for e in excluded))
        log.warning("DALI loader: %d of %d videos excluded (e.g. %s: %s); full list in %s", len(excluded),
                    len(records), excluded[0]["id"], excluded[0]["reason"], cdir / REPORT_FILE)
    return good, excluded
