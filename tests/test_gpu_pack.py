"""The GPU check pack (benchmarks/gpu/check.sh) on a CPU machine: --dry-run of every stage runs the steps that need
no CUDA (environment report, the benchmarks' CPU rows on tiny sizes, the short pretraining and its resume), marks the
CUDA steps skipped with the reason, writes the summaries elsewhere than benchmarks/results/, and records a failing
and a timed-out step while the stage goes on. Each test is one subprocess run of the pack (about 15-90 s on 2 cores).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu" / "check.sh"
RESULTS = ROOT / "benchmarks" / "results"
CUDA_REASON = "dry run: needs CUDA"


def snapshot() -> dict[str, tuple[int, str]]:
    """mtime and content hash of every file in benchmarks/results/."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(RESULTS.iterdir()) if p.is_file()}


def pack(*args: str, env: dict[str, str] | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("OUT", "GOCA_FAST_RESULTS_DIR")}
    return subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**base, **(env or {})})


def dry_run(stage: str, out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    before = snapshot()
    r = pack(stage, "--dry-run", "--out", str(out), *extra)
    after = snapshot()  # other processes may write other result files meanwhile: compare what this run wrote
    written = {p.name for p in out.iterdir() if p.is_file()}
    assert written and all(before.get(n) == after.get(n) for n in written), "a dry run changed benchmarks/results/"
    summary = json.loads((out / f"gpu-check-{stage}-dry-run.json").read_text())
    assert (out / f"gpu-check-{stage}-dry-run.md").read_text().startswith(f"# GPU check: {stage}")
    assert summary["dry_run"] is True and summary["date"].endswith("+00:00") and summary["commit"]
    return r, summary


def steps(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in summary["steps"]}


def check_common(r: subprocess.CompletedProcess, summary: dict[str, Any], names: list[str], cuda_steps: list[str],
                 out: Path) -> dict[str, dict[str, Any]]:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    st = steps(summary)
    assert list(st) == names
    for n in cuda_steps:
        assert st[n]["status"] == "skipped" and st[n]["reason"] == CUDA_REASON, st[n]
    assert st["env"]["status"] == "ok" and summary["device"].startswith("CPU")
    env = json.loads((out / "env-dry-run.json").read_text())
    assert env["cuda_available"] is False and env["bandwidth"]["host_to_host_GBps"] > 0
    ran = [s for s in st.values() if s["status"] == "ok"]
    assert all(s["rc"] == 0 and s["wall_s"] > 0 and s["command"] and (out / "logs" / f"{s['name']}.log").is_file()
               for s in ran)
    return st


def rows(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    assert data["meta"]["device_tag"] == "cpu" and data["meta"]["commit"]
    return data["rows"]


def test_bad_arguments_exit_2_with_one_line():
    for args in (["warp"], [], ["kernel", "--out", "/tmp/x"], ["kernel", "--budget", "0"],
                 ["kernel", "--dry-run", "--inject-failure", "no-such-step"]):
        r = pack(*args, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("check.sh: error:"), r.stderr


def test_kernel_dry_run(tmp_path):
    r, summary = dry_run("kernel", tmp_path)
    st = check_common(r, summary, ["env", "build", "gpu-tests", "sinkhorn-bench", "sanitizer-memcheck",
                                   "sanitizer-racecheck", "sanitizer-synccheck", "static-report"],
                      ["build", "gpu-tests", "sanitizer-memcheck", "sanitizer-racecheck", "sanitizer-synccheck"],
                      tmp_path)
    assert st["sinkhorn-bench"]["status"] == "ok"
    assert str(tmp_path / "sinkhorn-cpu.json") in st["sinkhorn-bench"]["results"]
    rs = rows(tmp_path / "sinkhorn-cpu.json")
    assert rs and all(x["B"] == 64 and x["K"] == 100 and x["ms"] > 0 for x in rs)
    assert st["static-report"]["status"] == "skipped" and st["static-report"]["reason"]


@pytest.mark.slow
def test_train_dry_run(tmp_path):
    r, summary = dry_run("train", tmp_path)
    st = check_common(r, summary, ["env", "build", "train-bench", "pretrain", "resume-eval", "train-bench-compile"],
                      ["build", "train-bench-compile"], tmp_path)
    assert all(st[n]["status"] == "ok" for n in ("train-bench", "pretrain", "resume-eval"))
    rs = rows(tmp_path / "train-cpu.json")
    assert rs and all("error" not in x and x["clips_per_s"] > 0 and x["arch"] == "tiny" for x in rs)
    assert any("R@1" in ln for ln in st["resume-eval"]["tail"])  # the kNN table after the resumed epoch


@pytest.mark.slow
def test_flow_dry_run(tmp_path):
    r, summary = dry_run("flow", tmp_path)
    st = check_common(r, summary, ["env", "flow-bench", "flow-bench-compile"], ["flow-bench-compile"], tmp_path)
    assert st["flow-bench"]["status"] == "ok"
    speed = [x for x in rows(tmp_path / "flow-cpu.json") if "pairs_per_s" in x]
    assert {x["method"].split(",")[0].split(" (")[0] for x in speed} >= {"opencv", "torch cpu"}
    assert all(x["pairs_per_s"] > 0 for x in speed)


@pytest.mark.slow
def test_dali_dry_run(tmp_path):
    r, summary = dry_run("dali", tmp_path)
    st = check_common(r, summary, ["env", "dali-unpack", "dali-import", "dali-tests", "loader-bench"], ["dali-tests"],
                      tmp_path)
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        carried = any(ROOT.glob(".gpu-store/part.*")) or any(ROOT.glob(".gpu-parts/p*/part.*")) or \
            any(ROOT.glob(".gpu-wheels/*.whl"))
        if not carried:
            assert st["dali-unpack"]["status"] == "skipped" and "carried" in st["dali-unpack"]["reason"]
            assert st["dali-import"]["status"] == "skipped" and st["dali-import"]["rc"] == 77
            assert st["dali-import"]["reason"] == "skipped: DALI not carried"
    assert st["loader-bench"]["status"] == "ok"
    official = [x for x in rows(tmp_path / "loader-cpu.json") if x["loader"] == "official"]
    assert official and official[0]["clips_per_s"] > 0


def test_failing_and_timed_out_steps_are_recorded_and_the_stage_goes_on(tmp_path):
    r, summary = dry_run("kernel", tmp_path, "--inject-failure", "env", "--inject-timeout", "gpu-tests")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    st = steps(summary)
    assert st["env"]["status"] == "failed" and st["env"]["rc"] == 1
    assert "RuntimeError: injected failure" in st["env"]["error"]
    assert st["gpu-tests"]["status"] == "timeout" and st["gpu-tests"]["rc"] is None
    assert st["gpu-tests"]["wall_s"] < 30 and "2 s timeout" in st["gpu-tests"]["error"]
    assert st["sinkhorn-bench"]["status"] == "ok"  # later steps still ran
    assert rows(tmp_path / "sinkhorn-cpu.json")
    assert summary["exit_code"] == 1
    md = (tmp_path / "gpu-check-kernel-dry-run.md").read_text()
    assert "| gpu-tests | timeout |" in md and "injected failure" in md


@pytest.mark.slow
def test_real_run_without_cuda_copies_results_into_out(tmp_path):
    """Not a dry run, on a CPU: the build step fails with its reason, the steps that need it are skipped, and every
    result file lands both in the results folder (here redirected) and in $OUT, the logs in $OUT/logs."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("checks the failure path on a machine without a CUDA device")
    res, out = tmp_path / "results", tmp_path / "out"
    r = pack("kernel", "--inject-timeout", "static-report",
             env={"GOCA_FAST_RESULTS_DIR": str(res), "OUT": str(out)})
    assert r.returncode == 1
    st = steps(json.loads((res / "gpu-check-kernel-cuda.json").read_text()))
    assert st["build"]["status"] == "failed" and "kernel unavailable" in st["build"]["error"]
    assert st["sinkhorn-bench"]["status"] == "skipped" and "needs step build" in st["sinkhorn-bench"]["reason"]
    assert st["static-report"]["status"] == "timeout"
    for name in ("env-cuda.json", "env-cuda.md", "gpu-check-kernel-cuda.json", "gpu-check-kernel-cuda.md"):
        assert (res / name).read_bytes() == (out / name).read_bytes()
    assert (out / "logs" / "build.log").is_file()
