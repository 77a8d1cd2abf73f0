"""The flow side of a prepared dataset, shared by flow extraction (`goca-flow`), JPEG import and `goca-prepare`:
where a video's flow video lives, whether it is usable, which videos still need one, and the index rewrite that
records the outcome.

Each extraction shard keeps a journal (`flow_journal/shard-I-of-N.jsonl`): one line per flow video it verified
(with the file's size and modification time) or failed on. A flow file whose size and time match a journal line is
known to be good without opening it, so restarting a shard or merging the shards costs one stat per video, not one
probe: linear, and cheap at Kinetics scale. Files no journal vouches for (older runs, a kill between the rename and
the journal line) are probed as before."""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Collection, Mapping, Optional, Sequence, TextIO

import numpy as np

from goca_fast.runtime.atomic import file_stamp, write_atomic
from goca_fast.data.index import (CLASSES_FILE, EXCLUDED_FILE, INDEX_FILE, MASTER_EXCLUDED, MASTER_INDEX,
                                  DatasetIndexError, VideoRecord, write_index)
from goca_fast.video.io import PREPARED_ENTROPY, VideoReadError, probe_video
from goca_fast.video.flow_codec import FLOW_CRF

REPORT_FILE = "flow_report.json"
JOURNAL_DIR = "flow_journal"


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


@dataclass
class Journals:
    """What every shard's journal says: the flow files verified ("<id> <size>:<mtime_ns>", every one ever written:
    a file changed since has another size or time, so order does not matter) and failures (id -> reason)."""

    verified: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)


def journal_path(root: str, shard: tuple[int, int]) -> str:
    return os.path.join(root, JOURNAL_DIR, f"shard-{shard[0]:05d}-of-{shard[1]:05d}.jsonl")


def read_journals(root: str) -> Journals:
    """Every journal under `root` (a line torn by a kill is skipped)."""
    out = Journals()
    jdir = os.path.join(root, JOURNAL_DIR)
    names = sorted(n for n in os.listdir(jdir) if n.endswith(".jsonl")) if os.path.isdir(jdir) else []
    for name in names:
        with open(os.path.join(jdir, name), encoding="utf-8") as f:
            for line in f:
                try:
                    e = json.loads(line)
                    vid = str(e["id"])
                except (ValueError, KeyError, TypeError):
                    continue
                if "stat" in e:
                    out.verified.add(f"{vid} {e['stat']}")
                elif "failed" in e:
                    out.failed[vid] = str(e["failed"])
    return out


class FlowJournal:
    """The append-only journal of one shard; each line is flushed as it is written, so a killed shard loses at most
    the line it was writing (and that video is then probed, not recomputed). Every line is also added to `known`
    (what `read_journals` gave at the start), so the run's end sees all journals without reading them again."""

    def __init__(self, root: str, shard: tuple[int, int], known: Journals):
        self.root, self.known = root, known
        path = journal_path(root, shard)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file: TextIO = open(path, "a", encoding="utf-8")

    def done(self, rec: VideoRecord) -> None:
        """Vouch for the flow video of `rec` as it is on disk now."""
        key = file_stamp(os.path.join(self.root, flow_rel_path(rec)))
        if key is not None:
            self._write({"id": rec.id, "stat": key})
            self.known.verified.add(f"{rec.id} {key}")

    def failed(self, rec: VideoRecord, reason: str) -> None:
        self._write({"id": rec.id, "failed": reason})
        self.known.failed[rec.id] = reason

    def record(self, rec: VideoRecord, result: dict) -> None:
        """Journal one job's result ({"status": "done"} or {"status": "failed", "reason": ...})."""
        if result["status"] == "done":
            self.done(rec)
        else:
            self.failed(rec, result["reason"])

    def _write(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "FlowJournal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def flow_states(root: str, records: Sequence[VideoRecord], verified: Collection[str],
                workers: int = 8) -> tuple[list[Optional[str]], set[int]]:
    """(per record: None when its flow video is usable, else the reason; the positions that were probed). One stat
    per video; only files no journal vouches for (size and modification time) are probed, in `workers` threads."""
    keys = [file_stamp(os.path.join(root, flow_rel_path(r))) for r in records]
    reasons: list[Optional[str]] = ["flow missing" if k is None else None for k in keys]
    unknown = [i for i, (r, k) in enumerate(zip(records, keys)) if k is not None and f"{r.id} {k}" not in verified]
    if unknown:
        with ThreadPoolExecutor(max(1, workers)) as ex:
            for i, why in zip(unknown, ex.map(lambda i: check_flow_file(root, records[i]), unknown)):
                reasons[i] = why
    return reasons, set(unknown)


def finalise_index(root: str, records: Sequence[VideoRecord], classes: Sequence[str], excluded: Sequence[dict],
                   failures: Mapping[str, str], verified: Collection[str] = (),
                   workers: int = 8) -> tuple[list[VideoRecord], list[dict]]:
    """Rewrite index.jsonl (the merge): records whose flow video checks out get its path, the others are excluded
    (with the reason a shard gave in `failures`, else why the file is not usable). Linear: one stat per video,
    a probe only for files the journals (`verified`) do not vouch for."""
    keep, excl = [], list(excluded)
    for rec, why in zip(records, flow_states(root, records, verified, workers)[0]):
        if why is None:
            keep.append(replace(rec, flow=flow_rel_path(rec)))
        else:
            excl.append({"id": rec.id, "path": flow_rel_path(rec), "reason": failures.get(rec.id, why)})
    write_index(root, keep, list(classes), excl)
    return keep, excl


def merged_report(root: str, keep: Sequence[VideoRecord], excl: Sequence[dict]) -> dict:
    """The index-wide part of a report: how many videos have flow, why the others were left out."""
    sample = keep[:1000]   # a size per video would be one more stat per video of the index
    return {"with_flow": len(keep),
            "excluded_by_reason": dict(Counter(str(e["reason"]).split(":")[0] for e in excl)),
            "flow_bytes_per_video": int(np.mean([os.path.getsize(os.path.join(root, flow_rel_path(r)))
                                                 for r in sample])) if sample else None,
            "flow_bytes_sample": len(sample)}


MasterIndex = tuple[list[VideoRecord], list[str], list[dict]]   # load_master's (records, classes, exclusions)


def finish_shard(root: str, master: MasterIndex, shard: tuple[int, int], report: dict, journals: Journals) -> dict:
    """End of one extraction or import run: with one shard, merge now from `journals` (the journals as read at the
    start plus this run's lines) into index.jsonl and flow_report.json; shard i/n of n > 1 writes its own report
    beside its journal and leaves the index to one `merge_shards`."""
    if shard[1] > 1:
        report["merged"] = False
        write_atomic(journal_path(root, shard)[:-len(".jsonl")] + ".report.json", json.dumps(report, indent=1) + "\n")
        return report
    records, classes, excluded = master
    keep, excl = finalise_index(root, records, classes, excluded, journals.failed, journals.verified)
    report.update(merged_report(root, keep, excl), merged=True)
    write_atomic(os.path.join(root, REPORT_FILE), json.dumps(report, indent=1) + "\n")
    return report


def merge_shards(root: str, workers: int = 8) -> dict:
    """`goca-flow --merge`: index.jsonl from prepare's master index and every shard's journal (one stat per video;
    a probe only for flow files no journal vouches for); returns the merge report (also flow_report.json)."""
    t0 = time.time()
    records, classes, excluded = load_master(root)
    journals = read_journals(root)
    keep, excl = finalise_index(root, records, classes, excluded, journals.failed, journals.verified, workers)
    report = {"videos": len(records), "merged": True, **merged_report(root, keep, excl),
              "merge_seconds": round(time.time() - t0, 2)}
    write_atomic(os.path.join(root, REPORT_FILE), json.dumps(report, indent=1) + "\n")
    return report


@dataclass
class FlowJob:
    root: str
    rec: VideoRecord
    gop: int = 16
    crf: float = FLOW_CRF
    entropy: str = PREPARED_ENTROPY

    @property
    def out(self) -> str:
        return os.path.join(self.root, flow_rel_path(self.rec))


def shard_records(records: Sequence[VideoRecord], shard: tuple[int, int]) -> list[VideoRecord]:
    """Every n-th record from the i-th: shard (i, n)."""
    return [r for i, r in enumerate(records) if i % shard[1] == shard[0]]


def pending_jobs(root: str, records: Sequence[VideoRecord], shard: tuple[int, int] = (0, 1), gop: int = 16,
                 crf: float = FLOW_CRF, journal: Optional[FlowJournal] = None,
                 verified: Collection[str] = (), entropy: str = PREPARED_ENTROPY) -> tuple[list[FlowJob], int]:
    """Jobs for this shard whose flow video is missing or does not match its RGB; (jobs, already done). Files found
    good by a probe are added to `journal`, so the next start need not probe them again."""
    mine = shard_records(records, shard)
    reasons, probed = flow_states(root, mine, verified)
    jobs, done = [], 0
    for i, (r, why) in enumerate(zip(mine, reasons)):
        if why is None:
            done += 1
            if journal is not None and i in probed:
                journal.done(r)
            continue
        out = os.path.join(root, flow_rel_path(r))
        if why != "flow missing" and os.path.exists(out):
            os.unlink(out)  # a stale flow video that does not match its RGB: recompute
        jobs.append(FlowJob(root, r, gop, crf, entropy))
    return jobs, done
