"""`goca-flow`: TV-L1 optical flow for every video of a prepared dataset -> flow videos + updated index."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from goca_fast.cli.help import HelpFormatter
from goca_fast.data.index import DatasetIndexError
from goca_fast.prepare.flow import FlowSettings, extract_flow
from goca_fast.prepare.flow_files import merge_shards
from goca_fast.prepare.flow_jpeg import import_jpeg_flow
from goca_fast.runtime.device import resolve_device
from goca_fast.video.flow_codec import FLOW_CRF
from goca_fast.video.io import ENTROPY_CODERS, PREPARED_ENTROPY
from goca_fast.video.tvl1 import TVL1Params


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like 0/4, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goca-flow", description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="exit status: 0 when at least one video has flow, 1 when none has, "
                                       "2 for usage errors (a shard i/n: 0 when one of its videos has flow)")
    p.add_argument("--root", required=True, help="prepared dataset root (made by goca-prepare)")
    p.add_argument("--backend", choices=["opencv", "torch"], default="opencv",
                   help="opencv: DualTVL1 on CPU cores; torch: batched TV-L1 (a GPU when there is one)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="opencv: processes (one per core); torch: decode/encode threads")
    p.add_argument("--device", default="auto", help="torch backend: cuda, cuda:1, cpu or auto")
    p.add_argument("--batch", type=int, default=32, help="torch backend: frame pairs solved at once")
    p.add_argument("--compile", action="store_true", help="torch backend: fuse the solver with torch.compile")
    p.add_argument("--shard", default="0/1",
                   help="i/n: this process takes every n-th video from the i-th; with n > 1 the index is written "
                        "by one --merge after the last shard")
    p.add_argument("--merge", action="store_true",
                   help="write index.jsonl from every shard's journal (after a sharded run); computes nothing")
    p.add_argument("--gop", type=int, default=16, help="keyframe interval of the flow videos (frames)")
    p.add_argument("--crf", type=float, default=FLOW_CRF, help="flow video quality (0 = lossless)")
    p.add_argument("--entropy", choices=ENTROPY_CODERS, default=PREPARED_ENTROPY,
                   help="H.264 entropy coder: cavlc decodes with about a third less CPU, cabac makes smaller files")
    p.add_argument("--limit", type=int, default=None, help="only this many videos (a trial run)")
    p.add_argument("--import-jpeg", default=None, metavar="DIR",
                   help="instead of computing: import MemDPC/CoCLR/GOCA flow JPEG folders from DIR")
    p.add_argument("--frame-tolerance", type=int, default=5,
                   help="--import-jpeg: largest |#JPEGs - (#RGB frames - 1)| that is padded/trimmed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in ("tau", "lambda_", "theta", "nscales", "warps", "epsilon", "inner_iterations", "outer_iterations",
              "scale_step", "median_filtering"):
        default = getattr(TVL1Params(), f)
        p.add_argument("--" + f.rstrip("_").replace("_", "-"), dest=f, type=type(default), default=default,
                       help="TV-L1 parameter (OpenCV default)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if a.workers < 1 or a.batch < 1:
            raise ValueError("--workers and --batch must be >= 1")
        shard = _parse_shard(a.shard)
        params = TVL1Params(tau=a.tau, lambda_=a.lambda_, theta=a.theta, nscales=a.nscales, warps=a.warps,
                            epsilon=a.epsilon, inner_iterations=a.inner_iterations,
                            outer_iterations=a.outer_iterations, scale_step=a.scale_step,
                            median_filtering=a.median_filtering)
        params.check()
        if not os.path.isdir(a.root):
            raise ValueError(f"dataset root {a.root} does not exist")
        if a.merge:
            report = merge_shards(os.path.abspath(a.root), workers=a.workers)
        elif a.import_jpeg is not None:
            if not os.path.isdir(a.import_jpeg):
                raise ValueError(f"JPEG flow directory {a.import_jpeg} does not exist")
            report = import_jpeg_flow(a.root, a.import_jpeg, workers=a.workers, tolerance=a.frame_tolerance,
                                      gop=a.gop, crf=a.crf, shard=shard, progress=not a.no_progress,
                                      entropy=a.entropy)
        else:
            device = a.device
            if a.backend == "torch":
                device = str(resolve_device(device, "--device"))  # a ConfigError is a ValueError
            settings = FlowSettings(backend=a.backend, device=device, batch=a.batch, compile=a.compile,
                                    params=params, gop=a.gop, crf=a.crf, entropy=a.entropy)
            report = extract_flow(a.root, settings, workers=a.workers, shard=shard, limit=a.limit,
                                  progress=not a.no_progress)
    except (ValueError, DatasetIndexError) as e:
        parser.error(str(e))
    if "computed" in report:
        print(f"goca-flow: shard {a.shard}: {report['computed']} computed now, {report['already_done']} already done, "
              f"{report['failed']} failed" + (f" (start-up {report['startup_seconds']} s)" if "startup_seconds" in report
                                            else ""))
    if report.get("pairs_per_second"):
        print(f"goca-flow: {report['pairs']} frame pairs at {report['pairs_per_second']} pairs/s ({report['device']})")
    if not report["merged"]:
        print(f"goca-flow: index not written (shard {a.shard}); once every shard has finished, run "
              f"goca-flow --root {a.root} --merge")
        return 0 if report["computed"] + report["already_done"] > 0 else 1
    print(f"goca-flow: {report['with_flow']} of {report['videos']} videos have flow; "
          f"excluded {report['excluded_by_reason']}")
    if report["with_flow"] == 0:
        what = "merged" if a.merge else "imported" if a.import_jpeg is not None else "computed"
        print(f"goca-flow: nothing usable: no video has flow ({report.get('failed', 0)} failed, none {what}); "
              f"see excluded.jsonl", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
