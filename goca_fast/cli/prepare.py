"""`goca-prepare`: raw UCF101 / HMDB51 / Kinetics-400 / class-folder trees -> a prepared dataset root."""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Optional, Sequence

from goca_fast.cli.help import HelpFormatter
from goca_fast.prepare.build import REPORT_FILE, prepare_dataset, reason_kind
from goca_fast.prepare.datasets import SCANNERS, scan_dataset
from goca_fast.prepare.sources import SplitFileError
from goca_fast.video.io import ENTROPY_CODERS, PREPARED_ENTROPY
from goca_fast.video.transcode import PrepareOptions


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
    p.add_argument("--entropy", choices=ENTROPY_CODERS, default=PREPARED_ENTROPY,
                   help="H.264 entropy coder: cavlc decodes with about a third less CPU, cabac makes smaller files")
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
        by_kind[reason_kind(e["reason"])].append(e)
    for kind, items in sorted(by_kind.items()):
        print(f"  exclude  {kind} ({len(items)}):")
        for e in items:
            print(f"    {e['id']}: {e['reason']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    opts = PrepareOptions(short_side=a.short_side, gop=a.gop, crf=a.crf, entropy=a.entropy, fps=a.fps,
                          min_frames=a.min_frames, max_gap=a.max_gap, upscale=not a.no_upscale)
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
