"""Clips/s and peak memory of the full GOCA training step (forward of both streams, assignment, loss, backward,
LARC/SGD step; inputs already in memory) for the configs' models, fp32 against bf16/fp16 autocast and
channels_last_3d (and torch.compile of the two-stream forward), on CPU and on CUDA when present.

    python benchmarks/train_bench.py [--device cpu|cuda|all] [--archs tiny,r2plus1d_18,s3d] [--steps N]
        [--amps off,bf16,fp16] [--layouts ncdhw,cl] [--batch N] [--compile off|also|only] [--max-batch N] [--name train]

Each case runs in its own subprocess (with --case-timeout; a compiled case that does not warm up in time is recorded
as such) so that peak host memory (ru_maxrss) is per case. --max-batch N: doubles the batch of the last autocast
recipe with channels_last_3d until a step fails (out of memory) or N, and reports the largest batch that ran.
Writes benchmarks/results/<name>-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.report import device_name, write_results  # noqa: E402

ARCH_CONFIG = {  # model → (config, crop, batch on cpu, batch on cuda)
    "tiny": ("demo.yaml", None, 16, 64),
    "r2plus1d_18": ("ucf101_r2plus1d.yaml", None, 2, 16),
    "s3d": ("ucf101_s3d_official.yaml", None, 1, 8),
}


def run_case(arch: str, device: str, amp: str, channels_last: bool, steps: int, batch: int,
             compile: bool = False) -> dict:
    from goca_fast.config import load_config
    from goca_fast.data.batch import ClipBatch
    from goca_fast.runtime.distributed import DistInfo
    from dataclasses import replace

    from goca_fast.plan.run import build_trainer, plan_settings
    from goca_fast.train.engine import TrainLoader

    cfg_file, _, _, _ = ARCH_CONFIG[arch]
    cfg = load_config(ROOT / "configs" / cfg_file, [
        f"data.batch_size={batch}", f"engine.amp={amp}", f"model.channels_last={str(channels_last).lower()}",
        "engine.tensorboard=false", "engine.progress=false", "optim.freeze_prototypes_epochs=0",
        "model.prototypes_path=", "data.flow_mode=shared"])
    dev = torch.device(device)
    torch.manual_seed(0)
    H = W = cfg.data.crop_size
    clips_rgb = [torch.randn(batch, 3, t, H, W) for t in cfg.clip_lengths]
    clips_flow = [torch.randn(batch, 2, t, H, W).clamp(-1, 1) for t in cfg.clip_lengths]
    batch_obj = ClipBatch(clips_rgb, clips_flow, torch.zeros(batch, dtype=torch.long), torch.arange(batch))
    batch_obj = batch_obj.to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        plan = replace(plan_settings(cfg, DistInfo(device=dev)), run_dir=Path(tmp))
        trainer = build_trainer(plan, TrainLoader(lambda e, s: [], 1000))
        if compile:  # in place (nn.Module.compile): the trainer keeps calling the same module
            trainer.model.compile()
        t_warm = time.perf_counter()
        for _ in range(2 if compile else 1):  # warm-up (allocations, cudnn autotune, compilation)
            trainer.train_step(batch_obj)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t_warm
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(batch_obj)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / steps
    clips = batch * len(cfg.clip_lengths) * 2  # both streams
    row = {"device": dev.type, "arch": arch, "amp": amp, "channels_last": channels_last, "compile": compile,
           "batch": batch, "warmup_s": warmup_s,
           "clip_recipe": "+".join(f"{n}x{t}" for n, t in zip(cfg.data.clips_per_group, cfg.data.frames_per_group)),
           "crop": H, "ms_per_step": sec * 1e3, "clips_per_s": clips / sec,
           "peak_host_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type == "cuda":
        row["peak_gpu_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def run_in_subprocess(case: dict, timeout: float) -> dict:
    """One case in a fresh process: its own peak memory, and a hang, crash or OOM costs only that row."""
    try:
        r = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                           cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        what = "torch.compile did not warm up" if case.get("compile") else "case did not finish"
        return {**case, "error": f"{what} within {timeout:.0f} s"}
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines() or ["?"]
        oom = "out of memory" in r.stderr.lower() or "OutOfMemoryError" in r.stderr
        return {**case, "error": ("out of memory: " if oom else "") + lines[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--archs", default="tiny,r2plus1d_18,s3d")
    p.add_argument("--steps", type=int, default=0, help="timed steps per case (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--amps", default="", help="autocast modes, comma list of off,bf16,fp16 (default off,bf16 "
                                              "and fp16 on CUDA)")
    p.add_argument("--layouts", default="ncdhw,cl", help="memory layouts: ncdhw (contiguous), cl (channels_last_3d)")
    p.add_argument("--batch", type=int, default=0, help="batch per case (default: per arch and device)")
    p.add_argument("--compile", default="off", choices=["off", "also", "only"],
                   help="add (also) or run only (only) the torch.compile'd case with the last amp + channels_last_3d")
    p.add_argument("--max-batch", type=int, default=0, help="search the largest batch that fits, up to N (0: no)")
    p.add_argument("--case-timeout", type=float, default=900.0, help="seconds per case subprocess")
    p.add_argument("--name", default="train", help="results file name")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case as JSON and print the row
    a = p.parse_args(argv)
    layouts = [{"ncdhw": False, "cl": True}[x] for x in a.layouts.split(",") if x in ("ncdhw", "cl")]
    if not layouts or len(layouts) != len(a.layouts.split(",")):
        p.error(f"--layouts takes a comma list of ncdhw and cl, got {a.layouts!r}")
    if a.case:
        print(json.dumps(run_case(**json.loads(a.case))))
        return 0
    devices = (["cpu"] if a.device in ("cpu", "all") else []) + \
              (["cuda"] if a.device in ("cuda", "all") and torch.cuda.is_available() else [])
    if not devices:
        print("train_bench: no CUDA device", file=sys.stderr)
        return 2
    for device in devices:
        rows: list[dict] = []
        amps = a.amps.split(",") if a.amps else ["off", "bf16"] + (["fp16"] if device == "cuda" else [])
        best = next((m for m in reversed(amps) if m != "off"), amps[-1])  # the recipe compiled / batch-searched
        cols = ["arch", "clip_recipe", "crop", "batch", "amp", "channels_last", "compile", "warmup_s", "ms_per_step",
                "clips_per_s", "peak_host_MiB"] + (["peak_gpu_MiB"] if device == "cuda" else []) + ["search", "error"]
        meta = {"device": device_name(torch.device(device)), "device_tag": device,
                "step": "forward (2 streams) + goca_codes + loss + backward + LARC"}
        if a.max_batch:
            meta["batch_search"] = f"{best} + channels_last_3d, doubling up to {a.max_batch}, 2 timed steps each"

        def record(row: dict) -> dict:
            """Print the row and rewrite the results, so a run killed by its time box keeps what it measured."""
            rows.append(row)
            print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            if a.max_batch:
                meta["largest_batch"] = {r["arch"]: max(x["batch"] for x in rows if x["arch"] == r["arch"] and
                                                        "error" not in x and x["amp"] == best and x["channels_last"]
                                                        and not x.get("compile"))
                                         for r in rows if "error" not in r and r["amp"] == best and r["channels_last"]}
            write_results(a.name, rows, cols, meta)
            return row
        for arch in a.archs.split(","):
            _, _, b_cpu, b_gpu = ARCH_CONFIG[arch]
            base = dict(arch=arch, device=device, steps=a.steps or (3 if device == "cpu" else 20),
                        batch=a.batch or (b_cpu if device == "cpu" else b_gpu))
            cases = [] if a.compile == "only" else [
                dict(amp=amp, channels_last=cl) for amp in amps
                for cl in (layouts if amp != "fp16" else layouts[:1])]
            if a.compile != "off":
                cases.append(dict(amp=best, channels_last=True, compile=True))
            for c in cases:
                record(run_in_subprocess({**base, **c}, a.case_timeout))
            batch = base["batch"] * 2
            while a.max_batch and batch <= a.max_batch:  # doubling: each failure costs one subprocess start
                r = record({**run_in_subprocess({**base, "amp": best, "channels_last": True, "batch": batch,
                                                 "steps": 2}, a.case_timeout), "search": "batch search"})
                if "error" in r:
                    break
                batch *= 2
        if a.max_batch:
            print(f"largest batch that ran: {meta.get('largest_batch')} ({meta['batch_search']})")
        path = write_results(a.name, rows, cols, meta)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
