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

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Optional, Sequence

import numpy as np

from goca_fast.runtime.atomic import remove_stale_temps, write_atomic
from goca_fast.cli.help import HelpFormatter
from goca_fast.prepare.datasets import SCANNERS, scan_dataset
from goca_fast.data.index import MASTER_EXCLUDED, MASTER_INDEX, VideoRecord, write_index
from goca_fast.prepare.sources import SourceDataset, SplitFileError, safe_name
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
        import cv2
        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


def _run_jobs(jobs: list[Job], opts: PrepareOptions, workers: int, progress: bool,
              check: bool = False) -> Iterator[dict]:
    return run_parallel(process_one, [(j, opts, check) for j in jobs], workers, "check" if check else "prepare",
                        progress, _worker_init, preload=["goca_fast.prepare.build"])


def _check_params(out: str, opts: PrepareOptions, force: bool) -> None:
    path = os.path.join(out, PARAMS_FILE)
    want = opts.encoding()
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            have = json.load(f)
        if have != want and not force:
            diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
            raise ValueError(f"{out} was prepared with other parameters {diff} (old, new); "
                             f"use another --out, or --force to re-encode everything")
        if have != want and force:
            import shutil
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
        recompute[_reason_kind(why)] += 1
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
        "excluded_by_reason": dict(Counter(_reason_kind(e["reason"]) for e in excluded)),
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


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary ("too short: 12 frames < 31" -> "too short")."""
    return reason.split(":")[0].split(" (")[0]


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goca-prepare", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="exit status: 0 when at least one video is usable, 1 when none is, "
                                       "2 for usage errors")
    p.add_argument("--dataset", required=True, choices=sorted(SCANNERS), help="source layout")
    p.add_argument("--src", required=True, help="raw dataset root (class folders of videos)")
    p.add_argument("--out", default=None, help="prepared dataset root to write (required unless --check)")
    p.add_argument("--check", action="store_true",
                   help="decode-only dry run: print what would be kept or excluded and why; write nothing")
    p.add_argument("--splits-dir", default=None,
                   help="split/annotation files (UCF ucfTrainTestlist, HMDB testTrainMulti_7030_splits, "
                        "K400 CSVs); default: searched under --src")
    p.add_argument("--short-side", type=int, default=256, help="output short side in pixels (aspect kept)")
    p.add_argument("--gop", type=int, default=16, help="keyframe interval of the H.264 output (frames)")
    p.add_argument("--crf", type=float, default=18, help="libx264 quality (lower = better, larger files)")
    p.add_argument("--fps", type=float, default=None, help="output frame rate (default: the source's)")
    p.add_argument("--min-frames", type=int, default=31, help="shorter videos are excluded")
    p.add_argument("--max-gap", type=float, default=1.0, help="longest timestamp gap (s) CFR resampling may fill")
    p.add_argument("--no-upscale", action="store_true", help="keep sources smaller than --short-side as they are")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes")
    p.add_argument("--limit", type=int, default=None, help="only the first N videos (a trial run)")
    p.add_argument("--force", action="store_true", help="re-encode if --out was prepared with other parameters")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _print_check(report: dict) -> None:
    """Per reason, what a real run would keep or exclude."""
    print(f"goca-prepare --check: {report['kept']} of {report['videos']} videos would be kept, "
          f"{report['excluded']} excluded (nothing written)")
    for v in report["would_keep"]:
        print(f"  keep     {v['id']}: {v['frames']} frames at {v['fps']} fps, {v['size']}"
              f"{' (resampled to CFR)' if v['resampled'] else ''}")
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for e in report["would_exclude"]:
        by_kind[_reason_kind(e["reason"])].append(e)
    for kind, items in sorted(by_kind.items()):
        print(f"  exclude  {kind} ({len(items)}):")
        for e in items:
            print(f"    {e['id']}: {e['reason']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    opts = PrepareOptions(short_side=a.short_side, gop=a.gop, crf=a.crf, fps=a.fps, min_frames=a.min_frames,
                          max_gap=a.max_gap, upscale=not a.no_upscale)
    try:
        opts.check()
        if a.workers < 1:
            raise ValueError(f"workers must be >= 1, got {a.workers}")
        if a.out is None and not a.check:
            raise ValueError("--out is required (or --check for a dry run)")
        source = scan_dataset(a.dataset, a.src, a.splits_dir)
    except (SplitFileError, ValueError) as e:
        parser.error(str(e))
    if not source.videos:
        print(f"goca-prepare: nothing usable: no videos found for {a.dataset} under {a.src} "
              f"({len(source.problems)} problems, e.g. {source.problems[:1]})", file=sys.stderr)
        return 1
    try:
        report = prepare_dataset(source, a.out or a.src, opts, workers=a.workers, progress=not a.no_progress,
                                 force=a.force, limit=a.limit, check=a.check)
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:  # e.g. --out on a read-only file system
        print(f"goca-prepare: error: cannot write {a.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    if a.check:
        _print_check(report)
    else:
        print(f"goca-prepare: {report['kept']} videos kept ({report['encoded']} encoded, "
              f"{report['skipped_existing']} already done), {report['excluded']} excluded "
              f"{report['excluded_by_reason']} -> {os.path.abspath(a.out)}")
        print(f"goca-prepare: splits {report['splits']}; see excluded.jsonl and {REPORT_FILE}")
        if report["flow_kept"] or report["flow_to_recompute"]:
            lost = sum(report["flow_to_recompute"].values())
            new = report["kept"] - report["flow_kept"] - lost
            print(f"goca-prepare: flow kept for {report['flow_kept']} videos"
                  + (f"; FLOW MUST BE RECOMPUTED for {lost} ({report['flow_to_recompute']})" if lost else "")
                  + (f"; {new} still without flow" if new else "")
                  + (f": run goca-flow --root {os.path.abspath(a.out)}" if lost or new else ""))
    if report["kept"] == 0:
        print(f"goca-prepare: nothing usable: all {report['videos']} inputs excluded "
              f"{report['excluded_by_reason']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
