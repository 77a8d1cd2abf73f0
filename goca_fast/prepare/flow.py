"""`goca-flow`: TV-L1 optical flow for every video of a prepared dataset -> flow videos + updated index.

For each RGB video (already at the 256 short side the official README prescribes), the flow from
grey frame t to t+1 is computed with OpenCV's DualTVL1 defaults (backend `opencv`: one process
per core) or our batched torch TV-L1 (backend `torch`: many frame pairs at once, GPU or CPU),
clipped to ±20 px, quantised exactly like MemDPC/CoCLR/GOCA and written by `codec.write_flow_video`
with the RGB frame count (the last flow repeated) at <root>/flow/<class>/<id>.mp4.

Resumable and atomic per video: a finished flow video exists only under its final name and is
skipped when its frame count and size match the RGB video (known from the shard journals without
opening the file, goca_fast.prepare.flow_files). Failures are listed, never fatal. A single run
(shard 0/1) ends by rewriting index.jsonl from prepare's master index: videos with a valid flow
video get its path; the rest go to excluded.jsonl with the reason. Shards i/n (a SLURM array)
leave that to one `goca-flow --merge` after the last shard.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Iterator, Optional

import numpy as np
import cv2
import torch
from tqdm import tqdm

from goca_fast.runtime.atomic import remove_stale_temps
from goca_fast.video.io import (PREPARED_ENTROPY, VideoReadError, check_entropy, read_all_frames,
                                 set_decoder_threads)
from goca_fast.video.flow_codec import FLOW_CRF, pad_flow_to_frames, quantise_flow, write_flow_video
from goca_fast.prepare.flow_files import (FlowJob, FlowJournal, finish_shard, load_master, pending_jobs,
                                          read_journals)
from goca_fast.runtime.parallel import process_pool
from goca_fast.video.tvl1 import TVL1Params, opencv_tvl1, tvl1_flow

# ----------------------------------------------------------------------------- per-video work


def grey_frames(rgb: np.ndarray) -> np.ndarray:
    """T×H×W×3 RGB uint8 -> T×H×W grey uint8 (OpenCV's BT.601 weights, what MemDPC/GOCA used via BGR2GRAY)."""
    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb])


def flows_to_video(path: str, flows: np.ndarray, frames: int, fps: float, gop: int, crf: float,
                   entropy: str) -> None:
    """(T−1)×H×W×2 float px -> quantised flow video with `frames` frames (last flow repeated)."""
    write_flow_video(path, pad_flow_to_frames(quantise_flow(flows), frames), fps, gop=gop, crf=crf, entropy=entropy)


def load_grey(job: FlowJob) -> np.ndarray:
    """Decode the RGB video; its frame count must be the index's (else the video is not usable)."""
    rgb = read_all_frames(os.path.join(job.root, job.rec.rgb))
    if len(rgb) != job.rec.frames:
        raise VideoReadError(f"rgb decodes to {len(rgb)} frames, index says {job.rec.frames}")
    if len(rgb) < 2:
        raise VideoReadError("rgb has fewer than 2 frames")
    return grey_frames(rgb)


_CV_PARAMS = TVL1Params()


def _cv_init(params: TVL1Params) -> None:
    global _CV_PARAMS
    _CV_PARAMS = params
    set_decoder_threads(1)
    cv2.setNumThreads(1)


def opencv_job(job: FlowJob) -> dict:
    """One video with OpenCV DualTVL1 (a fresh object per video: OpenCV shrinks nscales for small images)."""
    t0 = time.perf_counter()
    try:
        g = load_grey(job)
        tv = opencv_tvl1(_CV_PARAMS)
        flows = np.stack([tv.calc(g[i], g[i + 1], None) for i in range(len(g) - 1)])
        flows_to_video(job.out, flows, job.rec.frames, job.rec.fps, job.gop, job.crf, job.entropy)
        return {"id": job.rec.id, "status": "done", "pairs": len(g) - 1, "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - one bad video never stops the run
        return {"id": job.rec.id, "status": "failed", "reason": f"flow failed: {type(e).__name__}: {e}",
                "seconds": time.perf_counter() - t0}


def _run_opencv(jobs: list[FlowJob], params: TVL1Params, workers: int) -> Iterator[dict]:
    if workers <= 1:
        _cv_init(params)
        for j in jobs:
            yield opencv_job(j)
        return
    with process_pool(workers, _cv_init, (params,)) as ex:
        for f in as_completed([ex.submit(opencv_job, j) for j in jobs]):
            yield f.result()


def _run_torch(jobs: list[FlowJob], params: TVL1Params, device: str, batch: int, compile: bool,
               io_threads: int) -> Iterator[dict]:
    """Decode ahead and encode behind in threads; the solver takes `batch` frame pairs at a time."""
    dev = torch.device(device)
    loader = ThreadPoolExecutor(max(1, io_threads))
    writer = ThreadPoolExecutor(max(1, io_threads))
    pending = [loader.submit(load_grey, j) for j in jobs[:io_threads + 1]]
    nxt = len(pending)
    writes: list = []
    try:
        for k, job in enumerate(jobs):
            t0 = time.perf_counter()
            fut = pending.pop(0)
            if nxt < len(jobs):
                pending.append(loader.submit(load_grey, jobs[nxt]))
                nxt += 1
            try:
                g = torch.from_numpy(fut.result())
                if dev.type == "cuda":
                    g = g.pin_memory().to(dev, non_blocking=True)
                out = []
                for s in range(0, len(g) - 1, batch):
                    e = min(s + batch, len(g) - 1)
                    out.append(tvl1_flow(g[s:e], g[s + 1:e + 1], params, compile=compile).permute(0, 2, 3, 1))
                flows = torch.cat(out).cpu().numpy()
                w = writer.submit(flows_to_video, job.out, flows, job.rec.frames, job.rec.fps, job.gop, job.crf,
                                  job.entropy)
                writes.append((job, w, len(g) - 1, time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001
                yield {"id": job.rec.id, "status": "failed", "reason": f"flow failed: {type(e).__name__}: {e}",
                       "seconds": time.perf_counter() - t0}
            while writes and (writes[0][1].done() or len(writes) > 2 * io_threads):
                yield _write_result(*writes.pop(0))
        while writes:
            yield _write_result(*writes.pop(0))
    finally:
        loader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)


def _write_result(job: FlowJob, fut, pairs: int, seconds: float) -> dict:
    try:
        fut.result()
        return {"id": job.rec.id, "status": "done", "pairs": pairs, "seconds": seconds}
    except Exception as e:  # noqa: BLE001
        return {"id": job.rec.id, "status": "failed", "reason": f"flow failed: {type(e).__name__}: {e}",
                "seconds": seconds}


# ----------------------------------------------------------------------------- driver


def _progress(it: Iterator[dict], total: int, enabled: bool, desc: str) -> Iterator[dict]:
    if not enabled:
        yield from it
        return
    with tqdm(total=total, desc=desc, unit="video", file=sys.stderr) as bar:
        for r in it:
            bar.update(1)
            if r.get("pairs"):
                bar.set_postfix(pairs_per_s=f"{r['pairs'] / max(r['seconds'], 1e-9):.1f}")
            yield r


@dataclass(frozen=True)
class FlowSettings:
    """How flow is computed and stored: the TV-L1 backend (OpenCV on CPU processes, or the batched torch solver on
    `device`, `batch` frame pairs at a time, optionally torch.compile'd), its parameters, and the flow video's
    keyframe interval and quality."""

    backend: str = "opencv"         # opencv | torch
    device: str = "cpu"             # torch backend only
    batch: int = 16
    compile: bool = False
    params: TVL1Params = TVL1Params()
    gop: int = 16
    crf: float = FLOW_CRF
    entropy: str = PREPARED_ENTROPY


def extract_flow(root: str, settings: FlowSettings = FlowSettings(), *, workers: int = 1,
                 shard: tuple[int, int] = (0, 1), limit: Optional[int] = None, progress: bool = False) -> dict:
    """Compute the missing flow videos of this shard under `root` and return the report. One shard (0/1) ends by
    rewriting the index; shard i/n of n > 1 leaves that to one `merge_shards` once every shard has finished."""
    backend, device, params, gop, crf = settings.backend, settings.device, settings.params, settings.gop, settings.crf
    params.check()
    check_entropy(settings.entropy)
    if backend not in ("opencv", "torch"):
        raise ValueError(f"unknown backend {backend!r}; use opencv or torch")
    root = os.path.abspath(root)
    t_start = time.time()
    records, classes, excluded = load_master(root)
    remove_stale_temps(os.path.join(root, "flow"))
    journals = read_journals(root)
    with FlowJournal(root, shard, journals) as journal:
        jobs, done_before = pending_jobs(root, records, shard, gop, crf, journal, journals.verified, settings.entropy)
        if limit is not None:
            jobs = jobs[:limit]
        startup = time.time() - t_start
        t0 = time.time()
        if backend == "opencv":
            it = _run_opencv(jobs, params, workers)
        else:
            it = _run_torch(jobs, params, device, settings.batch, settings.compile, io_threads=max(1, workers))
        by_id = {j.rec.id: j.rec for j in jobs}
        results = []
        for r in _progress(it, len(jobs), progress, f"flow ({backend})"):
            journal.record(by_id[r["id"]], r)
            results.append(r)
    wall = time.time() - t0
    failures = {r["id"]: r["reason"] for r in results if r["status"] == "failed"}
    done = [r for r in results if r["status"] == "done"]
    pairs = sum(r["pairs"] for r in done)
    report = {"backend": backend, "device": device if backend == "torch" else f"cpu x{workers}",
              "videos": len(records), "shard_videos": len(jobs) + done_before, "computed": len(done),
              "already_done": done_before, "failed": len(failures), "startup_seconds": round(startup, 2),
              "pairs": pairs, "wall_seconds": round(wall, 2),
              "pairs_per_second": round(pairs / wall, 2) if wall > 0 and pairs else None,
              "shard": list(shard), "params": params.__dict__}
    return finish_shard(root, (records, classes, excluded), shard, report, journals)
