"""The GPU check pack: one command per stage does everything of that stage on a lent GPU machine, time-boxed.

    bash benchmarks/gpu/check.sh kernel|train|flow|dali|all [--quick] [--dry-run] [--budget S] [--out DIR]

Every step is a subprocess with its own timeout (its process group is killed when it runs over), bounded further by
the stage budget (default 480 s, 200 s with --quick), so a stage plus one rerun fit the machine's loan. A failing
step records its error and the stage goes on. Results: the benchmarks write benchmarks/results/<name>-<tag>.{md,json}
(benchmarks/report.py), this driver adds env-<tag>.{md,json} and gpu-check-<stage>-<tag>.{md,json} (rewritten after
every step, so a killed run still leaves what it did); with $OUT set every result file is also copied into $OUT, and
the full step logs (and junit XML) go to $OUT/logs. --dry-run (for a CPU machine and CI): runs every step that does not
need CUDA, the benchmarks' CPU rows on tiny sizes, and writes into $GOCA_FAST_RESULTS_DIR via --out, $OUT or a new
temporary folder, never into benchmarks/results/. Exit: 0 when no step failed, 1 otherwise, 2 for bad arguments.

Test-only hooks (hidden options, used by tests/test_gpu_pack.py): --inject-failure STEP makes STEP a command that
exits 3 with an error line; --inject-timeout STEP makes it sleep past a 2 s timeout. A step exiting 77 counts as
skipped (its last output line is the reason).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
STAGES = ("kernel", "train", "flow", "dali")
TAIL = 40
SKIP_RC = 77
SITE = Path(os.environ.get("GOCA_GPU_SITE", "/tmp/site"))  # carried DALI unpacks here (see docs/gpu.md)


@dataclass
class Step:
    """One time-boxed command. cmd None: skipped with `note`. dry: the CPU command of a dry run (None and cuda:
    skipped in a dry run, `note` or "needs CUDA" the reason). needs: a step that must have succeeded. expect: text
    the output must contain."""
    name: str
    cmd: Optional[list[str]]
    timeout: float
    cuda: bool = True
    dry: Optional[list[str]] = None
    note: str = ""
    needs: str = ""
    expect: tuple[str, ...] = ()


@dataclass
class Ctx:
    quick: bool
    dry: bool
    results: Path
    logs: Path
    work: Path
    out: Optional[Path]
    tag: str
    env: dict[str, str] = field(default_factory=dict)


def env_step(c: Ctx) -> Step:
    cmd = [PY, "benchmarks/gpu/env_report.py", "--out", str(c.results), "--tag", c.tag]
    return Step("env", cmd, 120, cuda=False, dry=cmd + ["--mib", "64", "--repeats", "3"])


def build_step() -> Step:
    probe = ("import sys; from goca_fast.method import cuda_kernel as kernels; ok, why = kernels.available(); "
             "print('kernel available' if ok else f'kernel unavailable: {why}', kernels.cache_dir()); sys.exit(not ok)")
    return Step("build", [PY, "-c", probe], 360)


def pretrain_cmd(c: Ctx, resume: bool) -> list[str]:
    """The CPU demo config, 2 epochs (+1 resumed, then the kNN table); the dry run shrinks it to seconds on a CPU."""
    cmd = [PY, "-m", "goca_fast.cli.pretrain"] + ([] if resume else ["--fresh"]) + [
        f"output_dir={c.work / 'runs'}", "name=gpu-check", f"data.cache_dir={c.work / 'cache'}",
        f"eval.knn_after_training={str(resume).lower()}", "engine.progress=false"]
    if c.dry:
        return cmd + ["engine.device=cpu", f"optim.epochs={2 if resume else 1}", "data.synthetic.num_classes=2",
                      "data.synthetic.videos_per_class=8", "data.synthetic.frames=24", "data.batch_size=4",
                      "data.workers=0", "eval.compare_random_init=false", "optim.warmup_epochs=0",
                      "goca.prior_start_epoch=0", "eval.clips=1", "engine.tensorboard=false"]
    return cmd + ["engine.device=cuda", "engine.amp=auto", f"optim.epochs={3 if resume else 2}",
                  f"data.workers={min(8, os.cpu_count() or 1)}"]


def stage_steps(stage: str, c: Ctx) -> list[Step]:
    q = c.quick
    if stage == "kernel":
        sink = [PY, "benchmarks/sinkhorn_bench.py", "--device", "cuda", "--sizes", "640x3000,4096x3000,16384x3000",
                "--dtypes", "fp32,bf16"] + (["--no-compile", "--repeats", "20"] if q else [])
        static = ROOT / "benchmarks" / "gpu" / "static_report.py"  # ptxas/SASS figures: nvcc only, for the GPU's own arch
        archs = ",".join("sm_" + x.replace("+PTX", "").replace(".", "")
                         for x in c.env.get("TORCH_CUDA_ARCH_LIST", "").replace(",", ";").split(";") if x.strip())
        return [env_step(c), build_step(),
                Step("gpu-tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_kernels.py", "-p",
                                   "no:cacheprovider", f"--junitxml={c.logs / 'junit-kernel.xml'}"], 240,
                     needs="build"),
                # the benchmark before the sanitizers: if the stage budget runs out, the slow racecheck is what goes
                Step("sinkhorn-bench", sink, 150 if q else 240, needs="build",
                     dry=[PY, "benchmarks/sinkhorn_bench.py", "--device", "cpu", "--sizes", "64x100", "--repeats",
                          "1"]),
                *[Step(f"sanitizer-{t}", ["compute-sanitizer", "--tool", t, "--error-exitcode", "1", PY,
                                          "benchmarks/gpu/sanitize_run.py"], 150, needs="build")
                  for t in ("memcheck", "racecheck", "synccheck")],
                Step("static-report", [PY, "benchmarks/gpu/static_report.py"] + (["--arch", archs] if archs else [])
                     if static.exists() else None, 120, note="dry run: needs no GPU, but minutes of nvcc on few cores"
                     if static.exists() else "benchmarks/gpu/static_report.py not present")]
    if stage == "train":
        bench = [PY, "benchmarks/train_bench.py", "--device", "cuda", "--archs", "r2plus1d_18"]
        return [env_step(c), build_step(),
                Step("train-bench", bench + (["--amps", "off,bf16", "--steps", "5", "--max-batch", "64"] if q
                                             else ["--max-batch", "256", "--case-timeout", "150"]), 200 if q else 300,
                     dry=[PY, "benchmarks/train_bench.py", "--device", "cpu", "--archs", "tiny", "--steps", "1",
                          "--amps", "off", "--layouts", "cl", "--batch", "2"]),
                Step("pretrain", pretrain_cmd(c, False), 180, dry=pretrain_cmd(c, False)),
                Step("resume-eval", pretrain_cmd(c, True), 180, needs="pretrain", dry=pretrain_cmd(c, True),
                     expect=("resumed from", "kNN retrieval")),
                Step("train-bench-compile", None if q else bench + [
                    "--amps", "bf16", "--compile", "only", "--name", "train-compile", "--case-timeout", "240"], 270,
                     note="--quick: no torch.compile case" if q else "")]
    if stage == "flow":
        batches = "16,128" if q else "16,32,64,128"
        return [env_step(c),
                Step("flow-bench", [PY, "benchmarks/flow_bench.py", "--batch", batches, "--no-compile"]
                     + (["--quick", "--speed-pairs", "128"] if q else []), 150 if q else 240,
                     dry=[PY, "benchmarks/flow_bench.py", "--pairs", "1", "--speed-pairs", "2", "--real"]),
                Step("flow-bench-compile", [PY, "benchmarks/flow_bench.py", "--batch", "64" if q else batches,
                                            "--compile-only", "--name", "flow-compiled"], 150 if q else 240)]
    if stage == "dali":
        parts = sorted(ROOT.glob(".gpu-store/part.*")) or sorted(ROOT.glob(".gpu-parts/p*/part.*"))
        wheels = sorted(ROOT.glob(".gpu-wheels/*.whl"))
        if parts:  # the packed DALI site (docs/gpu.md): one tar.xz of a site folder, split into parts
            unpack = ["bash", "-c", f'mkdir -p {SITE} && {{ [ -f {SITE}/.ok ] || {{ cat "$@" | xz -d | tar -x -C '
                                    f'{SITE} && touch {SITE}/.ok; }}; }} && echo "DALI site ready in {SITE}"',
                      "unpack", *map(str, parts)]
        elif wheels:
            unpack = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(SITE),
                      *map(str, wheels)]
        else:
            unpack = None
        check = [PY, "benchmarks/gpu/dali_import.py"] + ["--carried"] * bool(unpack) + ["--dry-run"] * c.dry
        return [env_step(c),
                Step("dali-unpack", unpack, 300, cuda=False, note="no DALI parts (.gpu-store/, .gpu-parts/) or "
                     "wheels (.gpu-wheels/) carried" if unpack is None else ""),
                Step("dali-import", check, 60, cuda=False),
                Step("dali-tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_dali.py", "-p",
                                    "no:cacheprovider", f"--junitxml={c.logs / 'junit-dali.xml'}"], 200,
                     needs="dali-import"),
                Step("loader-bench", [PY, "benchmarks/loader_bench.py", "--loaders", "dali_gpu,official", "--workers",
                                      str(os.cpu_count() or 1), "--cache", str(c.work / "loader_cache")]
                     + (["--videos", "8", "--batches", "10"] if q else []), 200 if q else 360, needs="dali-import",
                     dry=[PY, "benchmarks/loader_bench.py", "--loaders", "official", "--workers", "1", "--batches", "1",
                          "--warmup", "0", "--videos", "2", "--batch-size", "2", "--cache",
                          str(c.work / "loader_cache")])]
    raise ValueError(stage)


def tail(text: str, n: int = TAIL) -> list[str]:
    """The last n lines, progress-bar carriage returns resolved to what the terminal would show."""
    return [ln.rsplit("\r", 1)[-1].rstrip() for ln in text.splitlines()[-n:]]


def error_line(lines: list[str]) -> str:
    """The most telling line of a failure: the last one that names an error, else the last line."""
    lines = [ln for ln in lines if ln.strip()]
    hits = [ln for ln in lines if any(w in ln for w in ("Error", "error", "FAILED", "failed", "ERROR"))]
    return (hits or lines or ["(no output)"])[-1].strip()[:300]


def run_step(s: Step, c: Ctx, timeout: float, cmd: list[str]) -> dict[str, Any]:
    """Run cmd in its own process group with stdout+stderr into logs/<step>.log; kill the group on timeout."""
    log = c.logs / f"{s.name}.log"
    t0 = time.monotonic()
    rec: dict[str, Any] = {"command": shlex.join(cmd), "timeout_s": round(timeout)}
    with open(log, "w") as f:
        f.write(f"$ {rec['command']}\n")
        f.flush()
        try:
            p = subprocess.Popen(cmd, cwd=ROOT, env=c.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return {**rec, "status": "failed", "rc": 127, "wall_s": 0.0, "error": f"{cmd[0]}: {e.strerror or e}"}
        try:
            rc: Optional[int] = p.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also on SIGTERM of the driver: no orphaned step keeps the GPU busy
            if p.poll() is None:
                for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
                    try:
                        os.killpg(p.pid, sig)
                        p.wait(wait)
                        break
                    except (subprocess.TimeoutExpired, ProcessLookupError):
                        pass
    text = log.read_text(errors="replace").split("\n", 1)[-1]  # without the "$ command" header
    out = tail(text)
    rec.update(rc=rc, wall_s=round(time.monotonic() - t0, 1), tail=out, log=str(log))
    if rc is None:
        rec.update(status="timeout", error=f"killed after the {timeout:.0f} s timeout")
    elif rc == SKIP_RC:
        rec.update(status="skipped", reason=([ln for ln in out if ln.strip()] or ["exit 77"])[-1].strip())
    elif rc != 0:
        rec.update(status="failed", error=error_line(out))
    elif missing := [e for e in s.expect if e not in text]:
        rec.update(status="failed", error=f"exit 0 but the output lacks {missing}")
    else:
        rec["status"] = "ok"
    return rec


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("GOCA_FAST_COMMIT", "unknown")  # a copied tree without .git: the caller says the commit


def write_summary(stage: str, c: Ctx, summary: dict[str, Any]) -> list[Path]:
    """gpu-check-<stage>-<tag>.{json,md}: every step's command, outcome, wall time and output tail."""
    envf = c.results / f"env-{c.tag}.json"
    if any(s["name"] == "env" and s["status"] == "ok" for s in summary["steps"]) and envf.exists():
        summary["env"] = json.loads(envf.read_text())
        summary["device"] = summary["env"].get("gpu") or f"CPU {summary['env'].get('cpu')} ({os.cpu_count()} cores)"
    base = c.results / f"gpu-check-{stage}-{c.tag}"
    base.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    head = [f"- {k}: {summary[k]}" for k in ("device", "date", "commit", "dry_run", "quick", "budget_s", "wall_s",
                                             "exit_code") if k in summary]
    rows = ["| step | status | rc | wall s | timeout s | note |", "|---|---|---|---|---|---|"]
    body = []
    for s in summary["steps"]:
        note = s.get("error") or s.get("reason") or ""
        rows.append(f"| {s['name']} | {s['status']} | {s.get('rc', '')} | {s.get('wall_s', '')} | "
                    f"{s.get('timeout_s', '')} | {note.replace('|', '/')} |")
        if "command" in s:
            body.append(f"## {s['name']}: {s['status']}\n\n`{s['command']}`\n\n```\n" + "\n".join(s.get("tail", []))
                        + "\n```\n")
    base.with_suffix(".md").write_text(f"# GPU check: {stage}\n\n" + "\n".join(head) + "\n\n" + "\n".join(rows)
                                       + "\n\n" + "\n".join(body))
    return [base.with_suffix(".json"), base.with_suffix(".md")]


def to_out(c: Ctx, files: list[Path]) -> None:
    """Copy result files into $OUT (a real run; a dry run writes there directly)."""
    if c.out is not None and c.out.resolve() != c.results.resolve():
        c.out.mkdir(parents=True, exist_ok=True)
        for f in files:
            if f.is_file():
                shutil.copy2(f, c.out / f.name)


def run_stage(stage: str, c: Ctx, budget: float, inject: dict[str, str]) -> int:
    steps = stage_steps(stage, c)
    if stage == "dali":  # only here: the carried site also holds an OpenCV that must not change the other stages
        c.env["PYTHONPATH"] = os.pathsep.join([str(SITE), c.env["PYTHONPATH"]])
    unknown = set(inject) - {s.name for s in steps}
    if unknown:
        fail(f"--inject-*: no step {sorted(unknown)} in stage {stage} (steps: {', '.join(s.name for s in steps)})")
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    summary: dict[str, Any] = {"stage": stage, "tag": c.tag, "device": "unknown", "date": date, "commit": git_commit(),
                               "dry_run": c.dry, "quick": c.quick, "budget_s": budget, "results_dir": str(c.results),
                               "steps": []}
    print(f"== stage {stage}: {len(steps)} steps, budget {budget:.0f} s, results in {c.results}\n   plan: "
          + ", ".join(f"{s.name} ({s.timeout:.0f} s)" for s in steps), flush=True)
    t0 = time.monotonic()
    done: dict[str, str] = {}
    for s in steps:
        cmd = (s.dry if s.dry is not None else None if s.cuda else s.cmd) if c.dry else s.cmd
        timeout = s.timeout
        if s.name in inject:
            cmd = [PY, "-c", "import sys; print('about to fail'); sys.exit('RuntimeError: injected failure')"
                   if inject[s.name] == "failure" else "import time; print('sleeping', flush=True); time.sleep(60)"]
            timeout = 2 if inject[s.name] == "timeout" else timeout
        left = budget - (time.monotonic() - t0)
        rec: dict[str, Any] = {"name": s.name}
        if cmd is None:
            rec.update(status="skipped", reason=s.note if s.cmd is None else s.note or "dry run: needs CUDA")
        elif s.needs and not c.dry and done.get(s.needs) != "ok" and s.name not in inject:
            rec.update(status="skipped", reason=f"needs step {s.needs}, which is {done.get(s.needs, 'absent')}")
        elif left < 10:
            rec.update(status="skipped", reason=f"stage budget of {budget:.0f} s spent")
        else:
            print(f"-- {s.name}: {shlex.join(cmd)} (timeout {min(timeout, left):.0f} s)", flush=True)
            start = time.time()
            rec.update(run_step(s, c, min(timeout, left), cmd))
            rec["results"] = sorted(str(f) for f in c.results.glob("*") if f.is_file()
                                    and f.stat().st_mtime >= start - 1 and not f.name.startswith("gpu-check-"))
            to_out(c, [Path(f) for f in rec["results"]])
            if s.name == "build" and rec["status"] != "ok":  # later steps would each retry the JIT build
                c.env["GOCA_FAST_NO_CUDA_EXT"] = "1"
                rec["note"] = "later steps run with GOCA_FAST_NO_CUDA_EXT=1 (torch path)"
        done[s.name] = rec["status"]
        summary["steps"].append(rec)
        print(f"   {s.name}: {rec['status']}" + "".join(f" ({rec[k]})" for k in ("error", "reason") if k in rec)
              + (f" in {rec['wall_s']} s" if "wall_s" in rec else ""), flush=True)
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        summary["exit_code"] = int(any(r["status"] in ("failed", "timeout") for r in summary["steps"]))
        to_out(c, write_summary(stage, c, summary))
    print(f"== stage {stage}: exit {summary['exit_code']} after {summary['wall_s']} s; summary "
          f"{c.results / f'gpu-check-{stage}-{c.tag}.md'}", flush=True)
    return summary["exit_code"]


def fail(msg: str) -> NoReturn:
    print(f"check.sh: error: {msg}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block
        fail(f"{message} (usage: check.sh {{{','.join(STAGES)},all}} [--quick] [--dry-run] [--budget S] [--out DIR])")


def gpu_arch() -> Optional[str]:
    """The visible GPU's compute capability from nvidia-smi (e.g. "9.0"), without initialising CUDA here."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
        caps = sorted(set(r.stdout.split())) if r.returncode == 0 else []
        return ";".join(caps) or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: Optional[list[str]] = None) -> int:
    ap = Parser(prog="check.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=[*STAGES, "all"])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (a stage in about 3 min)")
    ap.add_argument("--dry-run", action="store_true", help="CPU machine: run what needs no CUDA, write elsewhere")
    ap.add_argument("--budget", type=float, default=None, help="seconds per stage (default 480, 200 with --quick)")
    ap.add_argument("--out", help="results folder of a dry run (default $OUT, else a new temporary folder)")
    ap.add_argument("--inject-failure", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--inject-timeout", action="append", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.budget is not None and a.budget <= 0:
        fail(f"--budget must be positive, got {a.budget}")
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    if a.dry_run:
        results = Path(a.out or out or tempfile.mkdtemp(prefix="goca-gpu-dry-"))
    else:
        if a.out:
            fail("--out is for dry runs; a real run writes into benchmarks/results/ (and $OUT when set)")
        from_env = os.environ.get("GOCA_FAST_RESULTS_DIR")
        results = Path(from_env) if from_env else ROOT / "benchmarks" / "results"
    if a.dry_run and results.resolve() == (ROOT / "benchmarks" / "results").resolve():
        fail("a dry run must not write into benchmarks/results/")
    work = Path(tempfile.gettempdir()) / "goca-gpu-check" / ("dry" if a.dry_run else "run")
    logs = out / "logs" if out else results / "logs" if a.dry_run else work / "logs"
    for d in (results, work, logs):
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOCA_FAST_RESULTS_DIR": str(results), "MAX_JOBS": str(os.cpu_count() or 1),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    if a.dry_run:  # its CPU rows only show that the code runs; one thread each keeps a shared CI machine usable
        env.setdefault("OMP_NUM_THREADS", "1")
    elif "TORCH_CUDA_ARCH_LIST" not in os.environ and (arch := gpu_arch()):
        env["TORCH_CUDA_ARCH_LIST"] = arch  # only the GPU's own architecture: the build compiles once, not per arch
    if "CUDA_HOME" not in env:
        # torch guesses CUDA_HOME from nvcc's folder, which is wrong for a /usr/local/bin/nvcc wrapper (seen on the
        # CI machine: it then misses cuda_runtime.h); take the first candidate that holds the CUDA headers
        nvcc = shutil.which("nvcc")
        for home in ([Path(os.path.realpath(nvcc)).parents[1]] if nvcc else []) + [Path("/usr/local/cuda")]:
            if (home / "include" / "cuda_runtime.h").is_file():
                env["CUDA_HOME"] = str(home)
                break
    inject = {**{s: "failure" for s in a.inject_failure}, **{s: "timeout" for s in a.inject_timeout}}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds run_step, which kills the running step
    rc = 0
    for stage in (["kernel", "train", "flow"] if a.stage == "all" else [a.stage]):
        c = Ctx(a.quick, a.dry_run, results, logs, work, out, "dry-run" if a.dry_run else "cuda", dict(env))
        rc |= run_stage(stage, c, a.budget or (200 if a.quick else 480), inject)
    return rc


if __name__ == "__main__":
    sys.exit(main())
