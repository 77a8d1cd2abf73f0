"""Kinetics scale: what the index, pretraining start-up, flow sharding, evaluation start-up and kNN retrieval cost
at 300k and 650k videos.

    python benchmarks/scale_bench.py [--sizes 300000,650000] [--parts index,startup,flow,eval,knn] [--cache DIR]

The datasets are synthetic Kinetics-700-shaped indexes (700 classes; 1 video in 20 in "val", 1 in 10 in "test",
the rest "train") whose RGB and flow files are hard links to four small real videos (170x128, 100 frames, H.264
GOP 16, with their flow videos; a copy per 60,000 links), so every path exists and decodes and the whole tree costs
directory entries only.
They are built once into --cache (goca-prepare's master index, index.jsonl, and the flow journal a finished
goca-flow run leaves: the flow part measures restarts and merges of a completed extraction).

Every measurement runs in a fresh process (clean peak RSS):
  index    read_index + the train/val split selection; the records' RSS, and the RecordTable a loader holds.
  startup  `python -m goca_fast.pretrain` with configs/k400_r2plus1d.yaml on the index (2 workers, batch 8, CPU
           loader, and the DALI loader on DALI's CPU backend), from process start to the engine's first batch;
           the process is ended there (the step itself is not start-up). Counted with an audit hook: how often
           index.jsonl is opened, how many video files the training process opens before the first batch.
  flow     goca-flow start-up of shard 0/1 and 0/64 on the completed extraction (all flow journaled: no job),
           and the merge (`goca-flow --merge`, linear: one stat per video).
  eval     what `goca-eval knn` does before its first extraction batch, without the checkpoint: read the index,
           select train (gallery) and val (queries) with their file checks, the disjointness check, the dataset
           and loader, the first batch (2 workers, 5 clips x 3 crops of 16 frames).
  knn      recall_at_k on random 512-d features: gallery x queries 60k x 5k, 120k x 10k, 240k x 20k; seconds,
           ns per gallery-query pair (flat = linear) and the peak RSS above the features themselves.
Writes benchmarks/results/scale-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

T_PROCESS = time.time()   # before the heavy imports: start-up is measured from here

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402

CLASSES = 700
SEED_VIDEOS = 4
SEED_FRAMES, SEED_W, SEED_H = 100, 170, 128
KNN_SIZES = ((60_000, 5_000), (120_000, 10_000), (240_000, 20_000))
KNN_DIM = 512
COLUMNS = ["part", "videos", "variant", "seconds", "peak_rss_mib", "index_rss_mib", "detail"]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _private_mib(pid: int) -> float:
    """Private (unshared) memory of a process: what a forked loader worker did not share with its parent."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return 0.0
    return sum(int(fields.get(k, "0 kB").split()[0]) for k in ("Private_Clean", "Private_Dirty")) / 1024


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


# ----------------------------------------------------------------------------------------------- datasets
def _seed_videos(cache: Path) -> list[tuple[str, str]]:
    """Four small real RGB videos and their flow videos (made once)."""
    from goca_fast.video.flow_codec import write_flow_video
    from goca_fast.video.io import write_video
    out = []
    rng = np.random.default_rng(0)
    for k in range(SEED_VIDEOS):
        rgb, flow = cache / "seeds" / f"rgb{k}.mp4", cache / "seeds" / f"flow{k}.mp4"
        if not flow.is_file():
            base = rng.integers(0, 256, (SEED_H, SEED_W + SEED_FRAMES, 3), dtype=np.uint8)
            frames = np.stack([base[:, t:t + SEED_W] for t in range(SEED_FRAMES)])
            write_video(rgb, frames, 25, gop=16)
            write_flow_video(flow, rng.integers(100, 156, (SEED_FRAMES, SEED_H, SEED_W, 2), dtype=np.uint8), 25,
                             gop=16)
        out.append((str(rgb), str(flow)))
    return out


LINKS_PER_FILE = 60_000   # ext4 allows 65,000 hard links per file


def _link_source(root: Path, seed: tuple[str, str], use: int) -> tuple[str, str]:
    """A copy of the seed pair (inside `root`) that still has room for one more hard link."""
    copy = use // LINKS_PER_FILE
    out = []
    for src in seed:
        dst = root / ".seeds" / f"{copy}-{os.path.basename(src)}"
        if not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        out.append(str(dst))
    return out[0], out[1]


def _split(i: int) -> str:
    return "val" if i % 20 == 0 else "test" if i % 10 == 5 else "train"


def build_root(cache: Path, n: int) -> Path:
    """The synthetic Kinetics-shaped dataset of `n` videos (built once; `.complete` marks a finished build)."""
    from dataclasses import replace
    from goca_fast.data.index import MASTER_INDEX, VideoRecord, write_index
    from goca_fast.prepare.flow_files import FlowJournal, Journals, flow_rel_path
    from goca_fast.runtime.atomic import write_atomic
    root = cache / f"k700x{n}"
    if (root / ".complete").is_file():
        return root
    seeds = _seed_videos(cache)
    classes = [f"class_{c:03d}" for c in range(CLASSES)]
    t0 = time.time()
    records = []
    for c in classes:
        for kind in ("rgb", "flow"):
            (root / kind / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = classes[i % CLASSES]
        vid = f"k{i:07d}_000000_000010"
        rgb, flow = f"rgb/{c}/{vid}.mp4", f"flow/{c}/{vid}.mp4"
        for src, dst in zip(_link_source(root, seeds[i % SEED_VIDEOS], i // SEED_VIDEOS), (rgb, flow)):
            if not (root / dst).exists():
                os.link(src, root / dst)
        records.append(VideoRecord(id=vid, rgb=rgb, flow=None, label=i % CLASSES, cls=c, frames=SEED_FRAMES,
                                   fps=25.0, width=SEED_W, height=SEED_H, splits=[_split(i)]))
    write_atomic(str(root / MASTER_INDEX), "".join(json.dumps(r.to_json()) + "\n" for r in records))
    with FlowJournal(str(root), (0, 1), Journals()) as journal:   # what a finished goca-flow run leaves
        for r in records:
            journal.done(r)
    write_index(root, [replace(r, flow=flow_rel_path(r)) for r in records], classes)
    (root / ".complete").write_text(f"built in {time.time() - t0:.0f} s\n")
    return root


# ----------------------------------------------------------------------------------------------- parts
def part_index(root: Path) -> list[dict]:
    r0 = _rss_mib()
    t0 = time.perf_counter()
    from goca_fast.data.index import RecordTable, read_index, select_split
    t_import = time.perf_counter() - t0
    r_import = _rss_mib()
    t0 = time.perf_counter()
    records, _ = read_index(root)
    t_read = time.perf_counter() - t0
    r_read = _rss_mib()
    t0 = time.perf_counter()
    train, val = select_split(records, "train"), select_split(records, "val")
    t_select = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = RecordTable(train)
    t_table = time.perf_counter() - t0
    as_list = _worker_private(lambda: sum(r.frames for r in train), freeze=False)
    as_table = _worker_private(lambda: sum(table[i].frames for i in range(len(table))), freeze=True)
    return [{"part": "index", "videos": len(records), "variant": "read_index + splits",
             "seconds": round(t_read + t_select, 2), "peak_rss_mib": round(_peak_mib()),
             "index_rss_mib": round(r_read - r_import),
             "detail": f"read {t_read:.2f} s, split selection {t_select:.2f} s ({len(train)} train, {len(val)} val); "
                       f"imports {t_import:.1f} s / {r_import - r0:.0f} MiB; RecordTable of train {t_table:.1f} s, "
                       f"{table.nbytes / 2**20:.0f} MiB; a forked worker that has read every train record: "
                       f"{as_list:.0f} MiB private from a list, {as_table:.0f} MiB from the RecordTable after "
                       f"gc.freeze"}]


def _worker_private(read_all, freeze: bool) -> float:
    """Private memory of a forked child (a loader worker) after it has read every record and run a collection,
    i.e. how much of its parent's memory it had to copy."""
    import gc
    if freeze:
        gc.collect()
        gc.freeze()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        before = _private_mib(os.getpid())
        read_all()
        gc.collect()
        os.write(w, f"{_private_mib(os.getpid()) - before}".encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = float(f.read())
    os.waitpid(pid, 0)
    if freeze:
        gc.unfreeze()
    return out


def part_startup(root: Path, loader: str, out_dir: Path) -> list[dict]:
    """The pretraining CLI in this process, ended at the engine's first batch."""
    import logging
    opened = {"index": 0, "videos": 0}
    root_s = str(root)

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and args[0].startswith(root_s):
            if args[0].endswith("index.jsonl"):
                opened["index"] += 1
            elif args[0].endswith(".mp4"):
                opened["videos"] += 1

    videos = _index_size(root)
    sys.addaudithook(audit)
    main_pid = os.getpid()

    class FirstBatch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not record.getMessage().startswith("first batch") or os.getpid() != main_pid:
                return
            workers = _children(main_pid)
            row = {"part": "startup", "videos": videos, "variant": f"pretrain, {loader} loader",
                   "seconds": round(time.time() - T_PROCESS, 2), "peak_rss_mib": round(_peak_mib()),
                   "index_rss_mib": None,
                   "detail": f"index.jsonl opened {opened['index']}x; video files opened by the training process "
                             f"up to the first batch (the batch's own and prefetched ones): {opened['videos']}; loader workers' private memory "
                             f"{(', '.join(f'{_private_mib(p):.0f}' for p in workers) + ' MiB') if workers else 'none (no workers)'}"}
            (out_dir / "startup.json").write_text(json.dumps([row]))
            os._exit(0)   # start-up ends here; the step is not start-up

    logging.getLogger("goca_fast").addHandler(FirstBatch())
    from goca_fast.cli.pretrain import main
    main(["--config", str(REPO / "configs" / "k400_r2plus1d.yaml"), f"data.root={root}", f"data.loader={loader}",
          "data.workers=2", "data.batch_size=8", "engine.amp=off", "engine.tensorboard=false",
          "eval.knn_after_training=false", "eval.monitor_every=0", "optim.epochs=1", "optim.warmup_epochs=0",
          "engine.max_iters_per_epoch=1",
          f"output_dir={out_dir / 'runs'}", "--fresh"])
    raise SystemExit("the run ended without a first batch")


def _index_size(root: Path) -> int:
    with open(root / "index.jsonl", "rb") as f:
        return sum(1 for _ in f)


def part_flow(root: Path) -> list[dict]:
    from goca_fast.prepare.flow import FlowSettings, extract_flow
    from goca_fast.prepare.flow_files import merge_shards
    rows = []
    n = _index_size(root)
    for shard in ((0, 1), (0, 64)):
        t0 = time.perf_counter()
        rep = extract_flow(str(root), FlowSettings(), shard=shard)
        rows.append({"part": "flow", "videos": n, "variant": f"goca-flow start-up, shard {shard[0]}/{shard[1]}",
                     "seconds": round(rep["startup_seconds"], 2), "peak_rss_mib": round(_peak_mib()),
                     "index_rss_mib": None,
                     "detail": f"{rep['shard_videos']} videos in the shard, {rep['computed']} computed, "
                               f"{rep['already_done']} already done; whole run {time.perf_counter() - t0:.1f} s"
                               + (" (includes the merge)" if shard[1] == 1 else "")})
    t0 = time.perf_counter()
    rep = merge_shards(str(root))
    rows.append({"part": "flow", "videos": n, "variant": "goca-flow --merge", "seconds": round(time.perf_counter() - t0, 2),
                 "peak_rss_mib": round(_peak_mib()), "index_rss_mib": None,
                 "detail": f"{rep['with_flow']} of {rep['videos']} with flow; {rep['merge_seconds']} s inside"})
    return rows


def part_eval(root: Path) -> list[dict]:
    from goca_fast.data.cpu_loader import EvalClipDataset, make_eval_loader
    from goca_fast.data.index import read_index
    from goca_fast.data.views import ViewSpec
    from goca_fast.eval.splits import check_disjoint_records, split_records
    t0 = time.perf_counter()
    index = read_index(root)
    t_read = time.perf_counter() - t0
    recs = [split_records(root, split, ["rgb", "flow"], index) for split in ("train", "val")]
    check_disjoint_records(recs[0], recs[1])
    t_splits = time.perf_counter() - t0 - t_read
    views = ViewSpec(clip_length=16, stride=2, num_clips=5, crops=3, crop_size=112, short_side=128)
    loader = make_eval_loader(EvalClipDataset(root, recs[0].records, views, with_flow=True), batch_size=4,
                              num_workers=2)
    first = next(iter(loader))
    seconds = time.perf_counter() - t0
    return [{"part": "eval", "videos": len(index[0]), "variant": "goca-eval start-up (no checkpoint)",
             "seconds": round(seconds, 2), "peak_rss_mib": round(_peak_mib()), "index_rss_mib": None,
             "detail": f"read {t_read:.1f} s, gallery {len(recs[0].records)} + queries {len(recs[1].records)} with "
                       f"their file checks {t_splits:.1f} s, first batch of {first.rgb.shape[0]} videos at "
                       f"{seconds:.1f} s"}]


def part_knn(gallery: int, queries: int) -> list[dict]:
    import torch
    from goca_fast.eval.retrieval import recall_at_k
    torch.manual_seed(0)
    g, q = torch.randn(gallery, KNN_DIM), torch.randn(queries, KNN_DIM)
    gy, qy = torch.randint(0, CLASSES, (gallery,)), torch.randint(0, CLASSES, (queries,))
    base = _rss_mib()
    t0 = time.perf_counter()
    r = recall_at_k(q, qy, g, gy)
    seconds = time.perf_counter() - t0
    features = (g.nbytes + q.nbytes) / 2**20
    return [{"part": "knn", "videos": gallery + queries, "variant": f"gallery {gallery} x queries {queries}, d {KNN_DIM}",
             "seconds": round(seconds, 2), "peak_rss_mib": round(_peak_mib()), "index_rss_mib": None,
             "detail": f"{1e9 * seconds / (gallery * queries):.2f} ns per pair; peak {(_peak_mib() - base):.0f} MiB "
                       f"above the {features:.0f} MiB of features; R@1 {r[1]:.2f} (chance {100 / CLASSES:.2f})"}]


# ----------------------------------------------------------------------------------------------- driver
def _run_part(args: list[str], out_dir: Path) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-part", *args, "--out", str(out_dir)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    result = out_dir / f"{args[0]}.json"
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"scale_bench: part {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = json.loads(result.read_text())
    result.unlink()
    print(f"  {' '.join(args)}: {time.time() - t0:.0f} s", file=sys.stderr)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="300000,650000", help="index sizes (videos)")
    p.add_argument("--parts", default="index,startup,flow,eval,knn")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/goca_fast/scale_bench"))
    p.add_argument("--name", default="scale")
    p.add_argument("--run-part", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.run_part:
        part, out = a.run_part[0], Path(a.out)
        if part == "knn":
            rows = part_knn(int(a.run_part[1]), int(a.run_part[2]))
        elif part == "startup":
            rows = part_startup(Path(a.run_part[1]), a.run_part[2], out)
        else:
            rows = {"index": part_index, "flow": part_flow, "eval": part_eval}[part](Path(a.run_part[1]))
        (out / f"{part}.json").write_text(json.dumps(rows))
        return 0
    parts = a.parts.split(",")
    unknown = set(parts) - {"index", "startup", "flow", "eval", "knn"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    cache, tmp = Path(a.cache), Path(a.cache) / "tmp"
    rows: list[dict] = []
    for n in ([] if parts == ["knn"] else [int(x) for x in a.sizes.split(",")]):
        t0 = time.time()
        root = build_root(cache, n)
        print(f"dataset of {n} videos at {root} ({time.time() - t0:.0f} s)", file=sys.stderr)
        for part in parts:
            if part == "startup":
                for loader in ("cpu", "dali"):
                    rows += _run_part(["startup", str(root), loader], tmp)
            elif part != "knn":
                rows += _run_part([part, str(root)], tmp)
    if "knn" in parts:
        for gallery, queries in KNN_SIZES:
            rows += _run_part(["knn", str(gallery), str(queries)], tmp)
    meta = {"device": f"CPU {os.uname().machine} ({os.cpu_count()} threads)", "device_tag": "cpu",
            "cores": os.cpu_count(), "classes": CLASSES,
            "seed_videos": f"{SEED_VIDEOS} x {SEED_W}x{SEED_H}, {SEED_FRAMES} frames, H.264 GOP 16, hard-linked",
            "splits": "val 1/20, test 1/10, train the rest", "knn_dim": KNN_DIM,
            "rss": "peak_rss_mib: the measuring process's peak RSS (imports included); index_rss_mib: RSS added by "
                   "read_index"}
    path = write_results(a.name, rows, COLUMNS, meta)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
