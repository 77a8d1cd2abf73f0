"""Clips/s and peak memory of the full GOCA training step (forward of both streams, assignment, loss, backward,
LARC/SGD step; inputs already in memory) for the configs' models, fp32 against bf16/fp16 autocast and
channels_last_3d, on CPU and on CUDA when present.

    python benchmarks/train_bench.py [--device cpu|cuda|all] [--archs tiny,r2plus1d_18,s3d] [--steps N]

Each case runs in its own subprocess so that peak host memory (ru_maxrss) is per case.
Writes benchmarks/results/train-<device>.{json,md}.
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


def run_case(arch: str, device: str, amp: str, channels_last: bool, steps: int, batch: int) -> dict:
    from goca_fast.config import load_config
    from goca_fast.data.batch import ClipBatch
    from goca_fast.distributed import DistInfo
    from goca_fast.engine import Trainer

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
        trainer = Trainer(cfg, DistInfo(device=dev), Path(tmp), lambda e, s: [], 1000)
        trainer.train_step(batch_obj)  # warm-up (allocations, cudnn autotune)
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
    row = {"device": dev.type, "arch": arch, "amp": amp, "channels_last": channels_last, "batch": batch,
           "clip_recipe": "+".join(f"{n}x{t}" for n, t in zip(cfg.data.clips_per_group, cfg.data.frames_per_group)),
           "crop": H, "ms_per_step": sec * 1e3, "clips_per_s": clips / sec,
           "peak_host_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type == "cuda":
        row["peak_gpu_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--archs", default="tiny,r2plus1d_18,s3d")
    p.add_argument("--steps", type=int, default=0, help="timed steps per case (default 3 on CPU, 20 on CUDA)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case as JSON and print the row
    a = p.parse_args(argv)
    if a.case:
        print(json.dumps(run_case(**json.loads(a.case))))
        return 0
    devices = (["cpu"] if a.device in ("cpu", "all") else []) + \
              (["cuda"] if a.device in ("cuda", "all") and torch.cuda.is_available() else [])
    for device in devices:
        rows = []
        amps = ["off", "bf16"] + (["fp16"] if device == "cuda" else [])
        for arch in a.archs.split(","):
            _, _, b_cpu, b_gpu = ARCH_CONFIG[arch]
            for amp in amps:
                for cl in ([False, True] if amp != "fp16" else [False]):
                    case = dict(arch=arch, device=device, amp=amp, channels_last=cl,
                                steps=a.steps or (3 if device == "cpu" else 20), batch=b_cpu if device == "cpu" else b_gpu)
                    r = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                       text=True, cwd=ROOT)
                    if r.returncode != 0:
                        row = {**case, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:200]}
                    else:
                        row = json.loads(r.stdout.strip().splitlines()[-1])
                    rows.append(row)
                    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        cols = ["arch", "clip_recipe", "crop", "batch", "amp", "channels_last", "ms_per_step", "clips_per_s",
                "peak_host_MiB"] + (["peak_gpu_MiB"] if device == "cuda" else [])
        path = write_results("train", rows, cols, {"device": device_name(torch.device(device)), "device_tag": device,
                                                   "step": "forward (2 streams) + goca_codes + loss + backward + LARC"})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
