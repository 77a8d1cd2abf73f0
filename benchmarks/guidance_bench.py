"""Does the guidance matter? GOCA with the KL prior against the same recipe without a prior and with the official
prior sign, on real photographs whose only label is motion, over several seeds.

The data (benchmarks/guidance_data.py): scikit-image photographs seen through 8 camera motions, appearance carrying
no label, written in UCF101 layout and taken through `goca-prepare` and `goca-flow` exactly like user data. Every
run is `python -m goca_fast.cli.pretrain --config configs/guidance.yaml` in its own process (CPU time measured per run),
then the pretraining's own kNN table (held-out photographs' videos against the training videos, R@1, trained network
and the same network at its random initialisation). Variants (everything else identical, same seed = same data
order, augmentations and initial weights):

    kl        the default prior (goca.prior_sign=kl)
    none      no prior (goca.prior_start_epoch past the last epoch: each stream clustered alone)
    official  the released code's prior sign (goca.prior_sign=official)

    python -m benchmarks.guidance_bench [--seeds 31 7 11] [--variants kl,none,official] [--work DIR] [--quick]
                                        [--jobs N] [key=value ...]      (config overrides for every run)

Writes benchmarks/results/<name>-cpu.{json,md}: per variant the mean ± sample standard deviation over the seeds of
R@1 for RGB, flow, RGB+flow (the official average) and the fused features (goca-eval knn --fusion weighted), the
random-init reference, and the CPU seconds per run; the JSON also holds every run's numbers. --quick is the CI
size (a few videos, 1 epoch) and writes <name>-quick-*.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.guidance_data import CLASSES, CameraMotionSpec, write_camera_motion_set  # noqa: E402
from benchmarks.report import device_name, write_results  # noqa: E402

CONFIG = ROOT / "configs" / "guidance.yaml"
VARIANTS = {"kl": ["goca.prior_sign=kl"], "none": ["goca.prior_start_epoch=100000"],
            "official": ["goca.prior_sign=official"]}
# the raw videos (written at height × width) and the short side goca-prepare brings them to
FULL_DATA = dict(train_per_class=12, test_per_class=6, frames=32, num_classes=8, height=96, width=128,
                 short_side=64)
QUICK_DATA = dict(train_per_class=1, test_per_class=1, frames=12, num_classes=8, height=48, width=64,
                  short_side=32)
QUICK_OVERRIDES = ["optim.epochs=1", "optim.warmup_epochs=0", "data.batch_size=4", "goca.prior_start_epoch=0",
                   "goca.queue_length=0", "data.frames_per_group=[4]", "data.stride=1", "data.min_distance=2",
                   "data.crop_size=28", "data.scale_range=[32,36]", "eval.clips=1", "data.workers=0"]


def camera_spec(data: dict) -> CameraMotionSpec:
    """The raw videos of a FULL_DATA / QUICK_DATA size (its first `num_classes` classes)."""
    return CameraMotionSpec(train_per_class=data["train_per_class"], test_per_class=data["test_per_class"],
                            frames=data["frames"], height=data["height"], width=data["width"],
                            classes=CLASSES[:data["num_classes"]])


def prepare_dataset(work: Path, spec: CameraMotionSpec, short_side: int, *, workers: int | None = None) -> Path:
    """Raw UCF101-layout videos -> goca-prepare -> goca-flow (each step skipped when its output is complete).
    `workers` None = the tools' default, one process per core; the count does not change how a video is encoded."""
    from goca_fast.cli import prepare
    from goca_fast.cli import flow as extract
    raw, prepared = work / "raw", work / "prepared"
    marker = raw / "generated.json"
    frames = spec.frames
    params = dict(train_per_class=spec.train_per_class, test_per_class=spec.test_per_class, frames=frames,
                  classes=list(spec.classes), height=spec.height, width=spec.width, seed=spec.seed)
    if not marker.is_file() or json.loads(marker.read_text()) != params:
        write_camera_motion_set(raw, spec)
        marker.write_text(json.dumps(params))
    common = ["--no-progress"] + ([] if workers is None else ["--workers", str(workers)])
    if prepare.main(["--dataset", "ucf101", "--src", str(raw / "UCF-101"), "--splits-dir",
                     str(raw / "ucfTrainTestlist"), "--out", str(prepared), "--short-side", str(short_side),
                     "--min-frames", str(min(frames, 16)), *common]) != 0:
        raise RuntimeError("goca-prepare kept no video")
    if extract.main(["--root", str(prepared), *common]) != 0:
        raise RuntimeError("goca-flow computed no flow")
    return prepared


def _run_measured(args: Sequence[str], env: dict, what: str) -> float:
    """Run one child process to the end; its CPU seconds (user + system, its waited-for helpers included) from
    wait4, so runs going on side by side are measured separately."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{what} failed ({proc.returncode}):\n{err.read().decode(errors='replace')[-3000:]}")
    return usage.ru_utime + usage.ru_stime


def run_pretraining(root: Path, runs: Path, name: str, seed: int, overrides: Sequence[str]) -> dict:
    """One `python -m goca_fast.cli.pretrain` process and one `goca-eval knn --fusion weighted` of its checkpoint: the
    kNN table (trained and random init) with the fused row, and the CPU seconds (user + system) of both."""
    args = [sys.executable, "-m", "goca_fast.cli.pretrain", "--config", str(CONFIG), "--fresh",
            f"data.root={root}", f"output_dir={runs}", f"name={name}", f"seed={seed}", "engine.progress=false",
            *overrides]
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cpu = _run_measured(args, env, f"pretraining {name}")
    knn = json.loads((runs / name / "knn.json").read_text())["knn"]
    # the fused RGB+flow row (weights chosen on the train split) from goca-eval on the trained checkpoint
    cpu += _run_measured([sys.executable, "-m", "goca_fast.cli.eval", "knn", str(runs / name), "--fusion", "weighted",
                          "--no-cache", "--workers", "0"], env, f"goca-eval knn --fusion on {name}")
    evaluated = json.loads((runs / name / "eval" / "knn.json").read_text())
    knn["GOCA"]["fused"] = evaluated["recall"]["fused"]
    return {"knn": knn, "fusion_weights": evaluated["protocol"]["fusion"]["weights"], "cpu_s": round(cpu, 1),
            "wall_s": round(time.time() - t0, 1)}


def r1(knn: dict, model: str, stream: str) -> float | None:
    per = knn.get(model, {}).get(stream)
    return None if per is None else float(per["1"])


def mean_sd(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


STREAMS = (("rgb", "RGB R@1"), ("flow", "flow R@1"), ("both", "RGB+flow avg R@1"), ("fused", "fused R@1"))


def summarise(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """One row per variant plus the random-init reference: mean ± sd over the seeds."""
    rows = []
    for variant, per_seed in runs.items():
        row = {"variant": variant, "seeds": len(per_seed)}
        for stream, col in STREAMS:
            vals = [v for v in (r1(r["knn"], "GOCA", stream) for r in per_seed.values()) if v is not None]
            if vals:
                row[col] = mean_sd(vals)
        row["CPU s per run"] = f"{statistics.mean(r['cpu_s'] for r in per_seed.values()):.0f}"
        rows.append(row)
    first = next(iter(runs.values()))
    ref = {"variant": "random init", "seeds": len(first)}
    for stream, col in STREAMS:
        vals = [v for v in (r1(r["knn"], "random init", stream) for r in first.values()) if v is not None]
        if vals:
            ref[col] = mean_sd(vals)
    rows.append(ref)
    for variant, per_seed in runs.items():  # then every run on its own
        for seed, r in per_seed.items():
            row = {"variant": variant, "seeds": f"seed {seed}", "CPU s per run": f"{r['cpu_s']:.0f}"}
            row.update({col: f"{v:.1f}" for stream, col in STREAMS
                        if (v := r1(r["knn"], "GOCA", stream)) is not None})
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[31, 7, 11])
    p.add_argument("--variants", default="kl,none,official", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--work", default="/tmp/goca_guidance_bench", help="dataset and run directories")
    p.add_argument("--quick", action="store_true", help="CI size: 8 classes, 16 videos, 1 epoch")
    p.add_argument("--name", default="guidance")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (each run uses about one core)")
    p.add_argument("--prepare-workers", type=int, default=None,
                   help="processes for goca-prepare and goca-flow (default: one per core)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. optim.epochs=30")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    data = QUICK_DATA if a.quick else FULL_DATA
    work = Path(a.work).expanduser() / ("quick" if a.quick else "full")
    t0 = time.time()
    root = prepare_dataset(work, camera_spec(data), data["short_side"], workers=a.prepare_workers)
    data_s = time.time() - t0
    extra = (QUICK_OVERRIDES if a.quick else []) + list(a.overrides)
    runs: dict[str, dict[int, dict]] = {}
    # seeds outermost: an interrupted bench still has every variant of the first seeds
    jobs = [(seed, variant) for seed in a.seeds for variant in variants]

    def one(job: tuple[int, str]) -> dict:
        seed, variant = job
        return run_pretraining(root, work / "runs", f"{variant}-s{seed}", seed, VARIANTS[variant] + extra)

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # threads only wait: each run is its own process
        for (seed, variant), res in zip(jobs, pool.map(one, jobs)):
            runs.setdefault(variant, {})[seed] = res
            print(f"{variant:9s} seed {seed:3d}: " + "  ".join(
                f"{s} {r1(res['knn'], 'GOCA', s):.1f}" for s, _ in STREAMS if r1(res["knn"], "GOCA", s) is not None)
                + f"  (random init rgb {r1(res['knn'], 'random init', 'rgb'):.1f}; {res['cpu_s']} CPU s)", flush=True)
    runs = {v: runs[v] for v in variants}
    rows = summarise(runs)
    columns = ["variant", "seeds"] + [c for _, c in STREAMS if any(c in r for r in rows)] + ["CPU s per run"]
    name = a.name + ("-quick" if a.quick else "")
    meta = {"device": device_name(torch.device("cpu")), "config": str(CONFIG.relative_to(ROOT)),
            "overrides": extra, "data": {**data, "videos": "UCF101 layout, split 1"},
            "data_seconds": round(data_s, 1), "seeds": a.seeds, "metric": "kNN R@1 in %, test split against train "
            "split, mean ± sample sd over seeds"}
    path = write_results(name, rows, columns, meta)
    saved = json.loads(path.read_text())  # every run's full kNN tables in the JSON only, not in the Markdown header
    saved["runs"] = {v: {str(s): r for s, r in per.items()} for v, per in runs.items()}
    path.write_text(json.dumps(saved, indent=2))
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
