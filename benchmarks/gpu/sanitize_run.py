"""Runs the CUDA Sinkhorn kernel once per configuration on small problems, for compute-sanitizer:

    compute-sanitizer --tool memcheck python benchmarks/gpu/sanitize_run.py
    compute-sanitizer --tool racecheck python benchmarks/gpu/sanitize_run.py
    compute-sanitizer --tool synccheck python benchmarks/gpu/sanitize_run.py

Covers both kernel variants, the three block widths (K classes), fp32/bf16/fp16 scores, odd B and K, row-strided
views, keep_last, cycles 1 and 2, the fused launch (rows resident in shared memory) and one launch per sweep. Exits 1
on a non-finite code.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from goca_fast.method import cuda_kernel as kernels  # noqa: E402
from goca_fast.method.guidance import GuidanceParams  # noqa: E402

CASES = [(37, 33, torch.float32, 1), (129, 3001, torch.bfloat16, 2), (65, 5000, torch.float16, 1),
         (17, 10000, torch.float32, 2)]


def main() -> int:
    ok, why = kernels.available()
    if not ok:
        print(f"kernel unavailable: {why}", file=sys.stderr)
        return 2
    bad = 0
    torch.manual_seed(0)
    for variant in (1, 2):
        for B, K, dtype, cycles in CASES:
            sr = torch.randn(B, K + 5, device="cuda").to(dtype)[:, :K]  # row stride K + 5
            sf = torch.randn(B, K, device="cuda").to(dtype)
            fused = kernels.goca_codes(sr, sf, GuidanceParams(0.05, 0.03, 3, cycles=cycles), None, B // 2 + 1,
                                       variant=variant)
            per_sweep = kernels.goca_codes(sr, sf, GuidanceParams(0.05, 0.03, 3, cycles=cycles,
                                           prior_sign="official"), per_sweep=True, variant=variant)
            torch.cuda.synchronize()
            finite = all(bool(torch.isfinite(c).all()) for c in (*fused, *per_sweep))
            bad += not finite
            print(f"v{variant} B={B} K={K} {dtype} cycles={cycles}: {'ok' if finite else 'NON-FINITE'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
