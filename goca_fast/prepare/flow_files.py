"""The flow side of a prepared dataset, shared by flow extraction (`goca-flow`), JPEG import and `goca-prepare`:
where a video's flow video lives, whether it is usable, which videos still need one, and the index rewrite that
records the outcome."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from goca_fast.data.index import (CLASSES_FILE, EXCLUDED_FILE, INDEX_FILE, MASTER_EXCLUDED, MASTER_INDEX,
                                  DatasetIndexError, VideoRecord, write_index)
from goca_fast.video.io import VideoReadError, probe_video
from goca_fast.video.flow_codec import FLOW_CRF

REPORT_FILE = "flow_report.json"


def flow_rel_path(rec: VideoRecord) -> str:
    """flow/<class dir>/<id>.mp4 next to rgb/<class dir>/<id>.mp4."""
    rel = rec.rgb.replace("\\", "/")
    return "flow/" + rel[4:] if rel.startswith("rgb/") else "flow/" + rel


def load_master(root: str) -> tuple[list[VideoRecord], list[str], list[dict]]:
    """RGB records, classes and prepare's exclusions (master files, or index.jsonl for other roots)."""
    ipath = os.path.join(root, MASTER_INDEX)
    epath = os.path.join(root, MASTER_EXCLUDED)
    if not os.path.isfile(ipath):
        ipath, epath = os.path.join(root, INDEX_FILE), os.path.join(root, EXCLUDED_FILE)
    cpath = os.path.join(root, CLASSES_FILE)
    if not os.path.isfile(ipath) or not os.path.isfile(cpath):
        raise DatasetIndexError(f"{root} is not a prepared dataset (no {MASTER_INDEX}/{INDEX_FILE} and "
                                f"{CLASSES_FILE}); run goca-prepare first")
    with open(cpath, encoding="utf-8") as f:
        classes = [ln.rstrip("\n") for ln in f if ln.strip()]
    with open(ipath, encoding="utf-8") as f:
        records = [VideoRecord.from_json(json.loads(ln)) for ln in f if ln.strip()]
    excluded = []
    if os.path.isfile(epath):
        with open(epath, encoding="utf-8") as f:
            excluded = [json.loads(ln) for ln in f if ln.strip()]
        if epath.endswith(EXCLUDED_FILE):  # an index without master: drop earlier flow failures, they are retried
            excluded = [e for e in excluded if not str(e.get("reason", "")).startswith("flow")]
    if not os.path.isfile(os.path.join(root, MASTER_INDEX)):
        records = [replace(r, flow=None) for r in records]
    return records, classes, excluded


def check_flow_file(root: str, rec: VideoRecord) -> Optional[str]:
    """None if the flow video is usable for `rec`, else the reason (missing, unreadable, mismatch)."""
    path = os.path.join(root, flow_rel_path(rec))
    if not os.path.isfile(path):
        return "flow missing"
    try:
        info = probe_video(path)
    except VideoReadError as e:
        return f"flow unreadable: {e}"
    if info.frames != rec.frames:
        return f"flow frame count mismatch: rgb {rec.frames}, flow {info.frames}"
    if (info.width, info.height) != (rec.width, 2 * rec.height):
        return f"flow size mismatch: {info.width}x{info.height}, expected {rec.width}x{2 * rec.height}"
    return None


def finalise_index(root: str, records: Sequence[VideoRecord], classes: Sequence[str], excluded: Sequence[dict],
                   failures: dict[str, str], workers: int = 8) -> tuple[list[VideoRecord], list[dict]]:
    """Rewrite index.jsonl: records whose flow video checks out get its path, the others are excluded.

    Every flow file is probed (cheap: packet table only), so shards of one dataset run by
    separate processes end with a complete index whichever finishes last.
    """
    with ThreadPoolExecutor(max(1, workers)) as ex:
        reasons = list(ex.map(lambda r: check_flow_file(root, r), records))
    keep, excl = [], list(excluded)
    for rec, why in zip(records, reasons):
        if why is None:
            keep.append(replace(rec, flow=flow_rel_path(rec)))
        else:
            excl.append({"id": rec.id, "path": flow_rel_path(rec), "reason": failures.get(rec.id, why)})
    write_index(root, keep, list(classes), excl)
    return keep, excl


@dataclass
class FlowJob:
    root: str
    rec: VideoRecord
    gop: int = 16
    crf: float = FLOW_CRF

    @property
    def out(self) -> str:
        return os.path.join(self.root, flow_rel_path(self.rec))


def pending_jobs(root: str, records: Sequence[VideoRecord], shard: tuple[int, int] = (0, 1), gop: int = 16,
                 crf: float = FLOW_CRF) -> tuple[list[FlowJob], int]:
    """Jobs for this shard whose flow video is missing or does not match its RGB; (jobs, already done)."""
    mine = [r for i, r in enumerate(records) if i % shard[1] == shard[0]]
    jobs, done = [], 0
    for r in mine:
        why = check_flow_file(root, r)
        if why is None:
            done += 1
            continue
        out = os.path.join(root, flow_rel_path(r))
        if why != "flow missing" and os.path.exists(out):
            os.unlink(out)  # a stale flow video that does not match its RGB: recompute
        jobs.append(FlowJob(root, r, gop, crf))
    return jobs, done
