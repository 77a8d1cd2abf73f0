"""Does the guidance matter, on data nobody tuned on? GOCA with the KL prior against the same recipe without a prior
(and, on request, with the official prior sign), over several seeds, on three independently generated families.

The data (benchmarks/guidance_data.py): three families of motion-only videos (appearance carries no label) that
differ in pictures, motions, sizes, codecs and clip counts. The recipe (configs/guidance.yaml) was tuned on
photos-camera only; textures-object and rasters-camera are reported untouched. Each family is written in UCF101
layout and taken through `goca-prepare` and `goca-flow` exactly like user data. Every run is
`python -m goca_fast.cli.pretrain --config configs/guidance.yaml` in its own process, then `goca-eval knn --fusion
weighted` (R@1 of RGB, flow, their official average and the fused features, every test video against the train
split) and `goca-eval codes` (how well the RGB network predicts the flow codes on held-out clips). The variant "kl"
also keeps the pretraining's own kNN table, whose "random init" row is the same network at its initial weights
(same seed = same initial weights, data order and augmentations in every variant):

    kl        the default prior (goca.prior_sign=kl)
    none      no prior (goca.prior_start_epoch past the last epoch: each stream clustered alone)
    official  the released code's prior sign (goca.prior_sign=official)

    python -m benchmarks.guidance_bench [--families photos-camera,textures-object,rasters-camera]
        [--seeds 31 7 11 1 2] [--variants kl,none] [--jobs 2] [--work DIR] [--quick] [key=value ...]

Runs are kept under --work (each run's bench.json) and reused when asked again with the same overrides, so an
interrupted bench resumes and families can be run one at a time. Writes benchmarks/results/<name>-cpu.{json,md,png}:
per family and variant the mean R@1 with its 95 % confidence interval over seeds (Student t), the paired differences
KL − no prior and KL − random init (mean, 95 % CI, paired t-test p), fused − the better single stream, the targets,
the code diagnostics; the JSON also holds every run. --quick is the CI size (a few videos, 1 epoch, <name>-quick-*).
"""
from __future__ import annotations

import argparse
import json
import math
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

from benchmarks.guidance_data import FAMILIES, TUNING_FAMILY, FamilySpec, write_family  # noqa: E402
from benchmarks.report import device_name, markdown_table, write_results  # noqa: E402

CONFIG = ROOT / "configs" / "guidance.yaml"
VARIANTS = {"kl": ["goca.prior_sign=kl"], "none": ["goca.prior_start_epoch=100000"],
            "official": ["goca.prior_sign=official"]}
REFERENCE_VARIANT = "kl"   # its pretraining also writes the random-init table
SHORT_SIDE = 64            # goca-prepare --short-side
QUICK_OVERRIDES = ["optim.epochs=1", "optim.warmup_epochs=0", "data.batch_size=4", "goca.prior_start_epoch=0",
                   "goca.queue_length=0", "data.frames_per_group=[4]", "data.stride=1", "data.min_distance=2",
                   "data.crop_size=28", "data.scale_range=[32,36]", "eval.clips=1", "data.workers=0"]
STREAMS = (("rgb", "RGB"), ("flow", "flow"), ("both", "RGB+flow avg"), ("fused", "fused"))
TARGETS = {"kl_minus_none": 5.0, "kl_minus_random": 15.0}


def quick_spec(spec: FamilySpec) -> FamilySpec:
    """The CI size of a family: one video per class and split, 12 frames (frame size and everything else kept, so
    the flow the test checks is the flow of the full size)."""
    return spec.resized(train_per_class=1, test_per_class=1, frames=12)


def prepare_dataset(work: Path, spec: FamilySpec, short_side: int, *, workers: int | None = None) -> Path:
    """Raw UCF101-layout videos -> goca-prepare -> goca-flow (each step skipped when its output is complete).
    `workers` None = the tools' default, one process per core; the count does not change how a video is encoded."""
    from goca_fast.cli import prepare
    from goca_fast.cli import flow as extract
    raw, prepared = work / "raw", work / "prepared"
    marker = raw / "generated.json"
    params = spec.to_json()
    if not marker.is_file() or json.loads(marker.read_text()) != params:
        write_family(raw, spec)
        marker.write_text(json.dumps(params))
    common = ["--no-progress"] + ([] if workers is None else ["--workers", str(workers)])
    if prepare.main(["--dataset", "ucf101", "--src", str(raw / "UCF-101"), "--splits-dir",
                     str(raw / "ucfTrainTestlist"), "--out", str(prepared), "--short-side", str(short_side),
                     "--min-frames", str(min(spec.frames, 12)), *common]) != 0:
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


def run_pretraining(root: Path, runs: Path, name: str, seed: int, overrides: Sequence[str], *,
                    reference: bool) -> dict:
    """One pretraining process, `goca-eval knn --fusion weighted` and `goca-eval codes` of its checkpoint: R@k of
    the trained network per stream (and fused), the code diagnostics and, for the `reference` run, the random-init
    table of its pretraining; with the CPU seconds of all three. Kept in <run>/bench.json and reused when the
    overrides are the same."""
    run_dir = runs / name
    saved = run_dir / "bench.json"
    args = [sys.executable, "-m", "goca_fast.cli.pretrain", "--config", str(CONFIG), "--fresh",
            f"data.root={root}", f"output_dir={runs}", f"name={name}", f"seed={seed}", "engine.progress=false",
            f"eval.knn_after_training={str(reference).lower()}", *overrides]
    if saved.is_file():
        old = json.loads(saved.read_text())
        if old.get("args") == args[3:]:
            return old
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cpu = _run_measured(args, env, f"pretraining {name}")
    common = ["--no-cache", "--workers", "0"]
    cpu += _run_measured([sys.executable, "-m", "goca_fast.cli.eval", "knn", str(run_dir), "--fusion", "weighted",
                          *common], env, f"goca-eval knn on {name}")
    cpu += _run_measured([sys.executable, "-m", "goca_fast.cli.eval", "codes", str(run_dir), *common], env,
                         f"goca-eval codes on {name}")
    evaluated = json.loads((run_dir / "eval" / "knn.json").read_text())
    result = {"args": args[3:], "recall": evaluated["recall"], "queries": evaluated["query"]["evaluated"],
              "gallery": evaluated["gallery"]["evaluated"], "fusion_weights": evaluated["protocol"]["fusion"]["weights"],
              "codes": json.loads((run_dir / "eval" / "codes.json").read_text()), "cpu_s": round(cpu, 1),
              "wall_s": round(time.time() - t0, 1)}
    if reference:
        result["random_init"] = json.loads((run_dir / "knn.json").read_text())["knn"]["random init"]
    saved.write_text(json.dumps(result, indent=2))
    return result


# The supervised probe: the KL run's RGB network fine-tuned with the labels, same clips and augmentation as its
# pretraining (lr 0.002: at 0.01 and 0.05 the tiny network's loss rose above chance within three epochs).
PROBE_ARGS = ["--streams", "rgb", "--epochs", "40", "--lr", "0.002", "--backbone-lr-ratio", "1", "--dropout", "0",
              "--schedule", "cosine", "--warmup-epochs", "2", "--batch-size", "16", "--test-clips", "3",
              "--test-crops", "1", "--workers", "1", "--device", "cpu", "--seed", "0"]
QUICK_PROBE_ARGS = PROBE_ARGS + ["--epochs", "1", "--batch-size", "4", "--warmup-epochs", "0"]  # later ones win


def run_probe(run_dir: Path, args: Sequence[str] = PROBE_ARGS) -> dict:
    """Can the RGB network learn the classes at all, given them? Its held-out top-1/top-5 after supervised
    fine-tuning and the training loss of the first and last epochs; kept in <run>/eval/probe/probe.json."""
    out = run_dir / "eval" / "probe"
    saved = out / "probe.json"
    if saved.is_file() and json.loads(saved.read_text()).get("args") == list(args):
        return json.loads(saved.read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cpu = _run_measured([sys.executable, "-m", "goca_fast.cli.eval", "finetune", str(run_dir), "--out", str(out),
                         "--fresh", *args], env, f"supervised probe on {run_dir.name}")
    tuned = json.loads((out / "finetune.json").read_text())
    losses = [h["loss"] for h in tuned["history"]]
    result = {"args": list(args), **tuned["accuracy"]["rgb"], "test_videos": tuned["test"]["evaluated"],
              "classes": tuned["protocol"]["num_classes"], "train_loss_first": losses[0],
              "train_loss_last": losses[-1], "cpu_s": round(cpu, 1)}
    saved.write_text(json.dumps(result, indent=2))
    return result


# --------------------------------------------------------------------------- statistics


def t_quantile(n: int) -> float:
    """Two-sided 95 % Student-t quantile for n values (n - 1 degrees of freedom)."""
    from scipy import stats
    return float(stats.t.ppf(0.975, n - 1))


def mean_ci(values: Sequence[float]) -> dict:
    """Mean, sample sd and the 95 % confidence interval of the mean (Student t; none for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": round(mean, 4), "n": n}
    sd = statistics.stdev(values)
    half = t_quantile(n) * sd / math.sqrt(n)
    return {"mean": round(mean, 4), "sd": round(sd, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)],
            "n": n}


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """a − b over seeds (same seed = same data order and initial weights): mean, 95 % CI and the two-sided paired
    t-test p-value (1.0 when every difference is equal, 0.0 if they are equal and not zero)."""
    from scipy import stats
    diffs = [x - y for x, y in zip(a, b)]
    out = {**mean_ci(diffs), "per_seed": [round(d, 2) for d in diffs]}
    if len(diffs) >= 2:
        if statistics.pstdev(diffs) == 0:
            out["p"] = 1.0 if diffs[0] == 0 else 0.0
        else:
            out["p"] = float(stats.ttest_rel(a, b).pvalue)
    return out


def r1(recall: dict, stream: str) -> float | None:
    per = recall.get(stream)
    return None if per is None else float(per["1"])


def family_summary(runs: dict[str, dict[int, dict]], seeds: Sequence[int]) -> dict:
    """Per variant and stream the mean and CI of R@1 over `seeds`; paired differences, targets, code diagnostics."""
    out: dict = {"variants": {}, "paired": {}, "targets": {}, "codes": {}}
    reference = runs.get(REFERENCE_VARIANT, {})
    rand = {s: reference[s]["random_init"] for s in seeds if s in reference and "random_init" in reference[s]}
    per_variant = {v: {s: per[s]["recall"] for s in seeds if s in per} for v, per in runs.items()}
    if rand:
        per_variant["random init"] = rand
    for variant, per_seed in per_variant.items():
        out["variants"][variant] = {stream: mean_ci(vals) for stream, _ in STREAMS
                                    if (vals := [r1(r, stream) for r in per_seed.values()]) and None not in vals}
    common = sorted(set.intersection(*(set(p) for p in per_variant.values()))) if per_variant else []

    def col(variant: str, stream: str) -> list[float]:
        return [r1(per_variant[variant][s], stream) for s in common]
    if "kl" in per_variant and common:
        for other, key in (("none", "kl_minus_none"), ("random init", "kl_minus_random"), ("official",
                                                                                          "kl_minus_official")):
            if other in per_variant:
                out["paired"][key] = paired(col("kl", "rgb"), col(other, "rgb"))
        best = [max(r, f) for r, f in zip(col("kl", "rgb"), col("kl", "flow"))]
        out["paired"]["fused_minus_better_stream"] = paired(col("kl", "fused"), best)
        for key, need in TARGETS.items():
            if key in out["paired"]:
                d = out["paired"][key]
                out["targets"][key] = {"need": f">= {need:g} and CI above 0", "met": bool(
                    d["mean"] >= need and d.get("ci95", [0])[0] > 0)}
        d = out["paired"]["fused_minus_better_stream"]
        out["targets"]["fused_minus_better_stream"] = {"need": ">= 0", "met": bool(d["mean"] >= 0)}
    for variant, per in runs.items():
        codes = [per[s]["codes"] for s in seeds if s in per]
        out["codes"][variant] = {
            f"{role}_{stat}": mean_ci([c[role][stat] for c in codes])
            for role in ("train", "test") for stat in ("agreement", "agreement_by_chance", "rgb_flow_nmi")
            if all(stat in c[role] for c in codes)}
        for role in ("train", "test"):
            for stream in ("rgb", "flow"):
                out["codes"][variant][f"{role}_class_nmi_{stream}"] = mean_ci([c[role]["class_nmi"][stream]
                                                                               for c in codes])
    queries = {per[s]["queries"] for per in runs.values() for s in seeds if s in per}
    gallery = {per[s]["gallery"] for per in runs.values() for s in seeds if s in per}
    out["queries"], out["gallery"] = sorted(queries), sorted(gallery)
    return out


def _fmt(stat: dict | None, digits: int = 1) -> str:
    if not stat:
        return ""
    if "ci95" in stat:
        return f"{stat['mean']:.{digits}f} [{stat['ci95'][0]:.{digits}f}, {stat['ci95'][1]:.{digits}f}]"
    return f"{stat['mean']:.{digits}f}"


def markdown_report(families: dict[str, dict], tuned_on: str) -> str:
    """Per family: R@1 by variant, paired differences with targets, code diagnostics."""
    parts = []
    for family, summary in families.items():
        role = "tuned on" if family == tuned_on else "untouched"
        parts.append(f"## {family} ({role}; {'/'.join(map(str, summary['queries']))} test queries, "
                     f"{'/'.join(map(str, summary['gallery']))} gallery videos)\n")
        rows = [{"variant": v, **{name: _fmt(per.get(s)) for s, name in STREAMS},
                 "seeds": next(iter(per.values()))["n"] if per else 0} for v, per in summary["variants"].items()]
        parts.append("R@1 in %, mean [95 % CI] over seeds\n\n"
                     + markdown_table(rows, ["variant", "seeds"] + [n for _, n in STREAMS]) + "\n")
        rows = []
        for key, d in summary["paired"].items():
            target = summary["targets"].get(key, {})
            rows.append({"difference (RGB R@1 unless said)": key.replace("_", " "), "mean [95 % CI]": _fmt(d),
                         "per seed": " / ".join(f"{x:+.1f}" for x in d["per_seed"]),
                         "paired t p": f"{d['p']:.3g}" if "p" in d else "",
                         "target": target.get("need", ""), "met": {True: "yes", False: "**no**"}.get(
                             target.get("met"), "")})
        if rows:
            parts.append(markdown_table(rows, list(rows[0])) + "\n")
        rows = [{"variant": v, **{k.replace("_", " "): _fmt(s, digits=1 if "agreement" in k else 3)
                                  for k, s in c.items()}} for v, c in summary["codes"].items()]
        if rows:
            parts.append("Codes (goca-eval codes, per view): agreement = % of views whose RGB code is their flow "
                         "code\n\n" + markdown_table(rows, list(rows[0])) + "\n")
    return "\n".join(parts)


def probe_report(probes: dict[str, dict[int, dict]]) -> str:
    """Markdown table of the supervised probes ('' when none ran)."""
    rows = [(f, seed, pr) for f, per in probes.items() for seed, pr in per.items()]
    if not rows:
        return ""
    lines = ["", "## Supervised probe (the KL run's RGB network fine-tuned with the labels)", "",
             "| family | seed | test videos | chance | top-1 | top-5 | train loss first -> last epoch |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {f} | {seed} | {pr['test_videos']} | {100 / pr['classes']:.1f} | {pr['top1']:.1f} | "
              f"{pr['top5']:.1f} | {pr['train_loss_first']:.2f} -> {pr['train_loss_last']:.2f} |" for f, seed, pr in rows]
    return "\n".join(lines) + "\n"


def plot_report(families: dict[str, dict], runs: dict[str, dict[str, dict[int, dict]]], path: Path) -> None:
    """One panel per family: RGB R@1 of every run as dots, the mean and its 95 % CI as a bar, per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.6), squeeze=False)
    for ax, (family, summary) in zip(axes[0], families.items()):
        names = list(summary["variants"])
        for i, v in enumerate(names):
            stat = summary["variants"][v]["rgb"]
            if v == "random init":
                vals = [r["random_init"]["rgb"]["1"] for r in runs[family][REFERENCE_VARIANT].values()]
            else:
                vals = [r["recall"]["rgb"]["1"] for r in runs[family][v].values()]
            ax.scatter([i] * len(vals), vals, s=14, color="grey", zorder=3)
            lo, hi = stat.get("ci95", [stat["mean"]] * 2)
            ax.bar(i, stat["mean"], color="C0" if v == "kl" else "C7", alpha=0.6)
            ax.errorbar(i, stat["mean"], yerr=[[stat["mean"] - lo], [hi - stat["mean"]]], color="k", capsize=4)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(family, fontsize=10)
        ax.set_ylabel("RGB kNN R@1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[31, 7, 11, 1, 2])
    p.add_argument("--variants", default="kl,none", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--work", default="/tmp/goca_guidance_bench", help="dataset and run directories")
    p.add_argument("--quick", action="store_true", help="CI size: one video per class and split, 1 epoch")
    p.add_argument("--name", default="guidance")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (each run uses about one core)")
    p.add_argument("--prepare-workers", type=int, default=None,
                   help="processes for goca-prepare and goca-flow (default: one per core)")
    p.add_argument("--probe-seeds", type=int, nargs="*", default=[],
                   help="seeds whose KL runs get the supervised probe (labels instead of the prior)")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. optim.epochs=30")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    families = [f.strip() for f in a.families.split(",") if f.strip()]
    bad = [v for v in variants if v not in VARIANTS] + [f for f in families if f not in FAMILIES]
    if bad:
        p.error(f"unknown variants or families {bad}; variants: {', '.join(VARIANTS)}; families: "
                f"{', '.join(FAMILIES)}")
    if REFERENCE_VARIANT not in variants:
        p.error(f"--variants must include {REFERENCE_VARIANT!r} (the comparisons are against it)")
    if a.jobs < 1:
        p.error(f"--jobs must be >= 1, got {a.jobs}")
    work = Path(a.work).expanduser() / ("quick" if a.quick else "full")
    extra = (QUICK_OVERRIDES if a.quick else []) + list(a.overrides)
    t0 = time.time()
    roots, data_s = {}, {}
    for family in families:
        t = time.time()
        spec = quick_spec(FAMILIES[family]) if a.quick else FAMILIES[family]
        roots[family] = prepare_dataset(work / family, spec, SHORT_SIDE, workers=a.prepare_workers)
        data_s[family] = round(time.time() - t, 1)
    # seeds outermost: an interrupted bench still has every family and variant of the first seeds
    jobs = [(family, seed, variant) for seed in a.seeds for family in families for variant in variants]

    def one(job: tuple[str, int, str]) -> dict:
        family, seed, variant = job
        return run_pretraining(roots[family], work / family / "runs", f"{variant}-s{seed}", seed,
                               VARIANTS[variant] + extra, reference=variant == REFERENCE_VARIANT)

    runs: dict[str, dict[str, dict[int, dict]]] = {f: {v: {} for v in variants} for f in families}
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:  # threads only wait: each run is its own process
        for (family, seed, variant), res in zip(jobs, pool.map(one, jobs)):
            runs[family][variant][seed] = res
            rec = res["recall"]
            print(f"{family:16s} {variant:9s} seed {seed:3d}: " + "  ".join(
                f"{s} {r1(rec, s):.1f}" for s, _ in STREAMS if r1(rec, s) is not None)
                + (f"  (random init rgb {r1(res['random_init'], 'rgb'):.1f})" if "random_init" in res else "")
                + f"  codes test agreement {res['codes']['test'].get('agreement', float('nan')):.1f} %"
                + f"  ({res['cpu_s']} CPU s)", flush=True)
    probe_args = QUICK_PROBE_ARGS if a.quick else PROBE_ARGS
    probes = {f: {seed: run_probe(work / f / "runs" / f"{REFERENCE_VARIANT}-s{seed}", probe_args)
                  for seed in a.probe_seeds} for f in families}
    for f, per in probes.items():
        for seed, pr in per.items():
            print(f"{f:16s} supervised probe seed {seed:3d}: top-1 {pr['top1']:.1f}  top-5 {pr['top5']:.1f}  "
                  f"train loss {pr['train_loss_first']:.2f} -> {pr['train_loss_last']:.2f}", flush=True)
    summaries = {f: family_summary(runs[f], a.seeds) for f in families}
    name = a.name + ("-quick" if a.quick else "")
    rows = [{"family": f, "variant": v, "stream": s, **stat} for f, sm in summaries.items()
            for v, per in sm["variants"].items() for s, stat in per.items()]
    meta = {"device": device_name(torch.device("cpu")), "config": str(CONFIG.relative_to(ROOT)),
            "overrides": extra, "tuned_on": TUNING_FAMILY, "families": {
                f: {**FAMILIES[f].to_json(), "short_side": SHORT_SIDE, "data_seconds": data_s[f]}
                for f in families},
            "seeds": a.seeds, "metric": "kNN R@1 in %, every test video against the train split; mean and 95 % "
            "Student-t CI over seeds; paired differences over seeds", "wall_seconds": round(time.time() - t0, 1)}
    path = write_results(name, rows, ["family", "variant", "stream", "mean", "ci95", "n"], meta)
    saved = json.loads(path.read_text())
    saved["summary"] = summaries
    saved["runs"] = {f: {v: {str(s): r for s, r in per.items()} for v, per in fv.items()} for f, fv in runs.items()}
    saved["supervised_probe"] = {f: {str(s): r for s, r in per.items()} for f, per in probes.items()}
    path.write_text(json.dumps(saved, indent=2))
    md = path.with_suffix(".md")
    header = md.read_text().split("\n|", 1)[0].rstrip()
    md.write_text(header + "\n\n" + markdown_report(summaries, TUNING_FAMILY) + probe_report(probes))
    plot_report(summaries, runs, path.with_suffix(".png"))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
