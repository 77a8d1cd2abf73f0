"""Which indexed videos the DALI loader can read, checked once and cached; the rest are excluded with a report.

DALI 1.34's video decoder kills the process (segfault) on a stream it cannot open, so nothing reaches it that was
not checked here: every video must give a packet table (`dali_pipelines.bitstream.packet_table`: H.264, byte
positions, no B-frames, first packet a keyframe, constant frame rate, even size), the frame count of the index,
and a flow video of the same frame count at 2H×W. The check only demuxes (about 3 ms per video); results are
cached by (path, size, mtime), so a second run over the same dataset is instant.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from dali_pipelines.bitstream import BitstreamError, packet_table
from goca_fast.data.index import VideoRecord, _write_atomic

log = logging.getLogger(__name__)
CACHE_FILE = "dali_check.json"
REPORT_FILE = "dali_excluded.jsonl"
_VERSION = 1


def _stat_key(path: str) -> Optional[str]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def check_record(root: str, rec: VideoRecord, with_flow: bool) -> Optional[str]:
    """None when the DALI loader can read this record, else the reason (one line)."""
    try:
        rgb = packet_table(os.path.join(root, rec.rgb))
        if rgb.frames != rec.frames:
            return f"{rec.rgb}: {rgb.frames} frames in the file, {rec.frames} in the index"
        if not with_flow:
            return None
        if not rec.flow:
            return "no flow video in the index"
        flow = packet_table(os.path.join(root, rec.flow))
    except BitstreamError as e:
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
    from goca_fast.data.prepare import run_parallel

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
        stats = [_stat_key(os.path.join(root, p)) for p in paths]
        return json.dumps([rec.id, paths, stats, rec.frames, with_flow])

    keys = {r.id: key(r) for r in records}
    todo = [r for r in records if keys[r.id] not in cache]
    if todo:
        jobs = [(root, r.to_json(), with_flow) for r in todo]
        for res in run_parallel(_check_job, jobs, min(workers, len(jobs)), "dali check", progress):
            cache[keys[res["id"]]] = res["reason"]
        cdir.mkdir(parents=True, exist_ok=True)
        live = set(keys.values())
        _write_atomic(str(cache_path), json.dumps({"version": _VERSION,
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
        _write_atomic(str(cdir / REPORT_FILE), "".join(json.dumps(e) + "\n" for e in excluded))
        log.warning("DALI loader: %d of %d videos excluded (e.g. %s: %s); full list in %s", len(excluded),
                    len(records), excluded[0]["id"], excluded[0]["reason"], cdir / REPORT_FILE)
    return good, excluded
