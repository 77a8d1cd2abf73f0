"""The CUDA Sinkhorn kernel (sources in `kernels/`): finds or builds it, says why it is unavailable, runs goca_codes.

Where the extension comes from, in order: the prebuilt `goca_fast._sinkhorn_cuda` (setup.py with
GOCA_FAST_BUILD_CUDA=1), else a JIT build with torch.utils.cpp_extension.load into `$GOCA_FAST_CACHE/kernels`
(default `~/.cache/goca_fast/kernels`), made once per torch version and reused. GOCA_FAST_NO_CUDA_EXT=1 disables
both. `goca_fast.method.assign.goca_codes(backend="auto")` uses the kernel on CUDA tensors when `available(scores)`.

Single process (or group of size 1): one fused cooperative launch for the whole computation. With a process
group: one launch per sweep, with the column statistics all-reduced between launches (see kernels/sinkhorn.h).
No host synchronisation and only torch-allocated memory, so the call can be captured in a CUDA graph. What each
sweep does comes from goca_fast.method.sweep_plan, the one description of the schedule.

Two kernel variants: 2 (the default) and 1 (the first design, kept selectable until a GPU run has measured both
side by side; the benchmark and the GPU tests run both).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from goca_fast.method.guidance import GuidanceParams
from goca_fast.method.sweep_plan import STATS_MAX_SUM, STATS_SUM, sweep_plan

SOURCES = Path(__file__).resolve().parents[1] / "kernels"
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_VARIANT = 2


def cache_dir() -> Path:
    """Where JIT builds go: $GOCA_FAST_CACHE/kernels, default ~/.cache/goca_fast/kernels."""
    root = os.environ.get("GOCA_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "goca_fast")
    return Path(root) / "kernels"


def _cpp_extension():
    """torch.utils.cpp_extension, imported only when a build is needed: importing it warns on machines without CUDA."""
    from torch.utils import cpp_extension
    return cpp_extension


def _nvcc() -> Optional[str]:
    CUDA_HOME = _cpp_extension().CUDA_HOME
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return os.path.join(CUDA_HOME, "bin", "nvcc")
    return shutil.which("nvcc")


def _jit_build() -> tuple[Optional[object], str]:
    sources = sorted(SOURCES.glob("*.cu")) + [SOURCES / "binding.cpp"]
    if len(sources) < 2 or not all(s.exists() for s in sources):
        return None, f"not prebuilt, and the kernel sources for a JIT build are not in {SOURCES}"
    if _nvcc() is None:
        return None, "not prebuilt, and no nvcc for a JIT build (set CUDA_HOME or put nvcc on PATH)"
    build = cache_dir() / re.sub(r"[^\w.]+", "_", f"torch{torch.__version__}-cuda{torch.version.cuda}")
    build.mkdir(parents=True, exist_ok=True)
    print(f"goca_fast: building the CUDA Sinkhorn kernel in {build} (first use only, about a minute)",
          file=sys.stderr, flush=True)
    try:
        ext = _cpp_extension().load(name="goca_fast_sinkhorn_cuda", sources=[str(s) for s in sources],
                                    build_directory=str(build),
                                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"])
    except (RuntimeError, OSError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"JIT build failed ({first}); build log in {build}"
    return ext, ""


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Optional[object], str]:
    if os.environ.get("GOCA_FAST_NO_CUDA_EXT"):
        return None, "disabled by GOCA_FAST_NO_CUDA_EXT"
    if torch.version.cuda is None:
        return None, "this torch build has no CUDA support"
    if not torch.cuda.is_available():
        return None, "torch sees no CUDA device"
    try:
        from goca_fast import _sinkhorn_cuda  # type: ignore[attr-defined]
        return _sinkhorn_cuda, ""
    except ImportError:
        return _jit_build()


@functools.lru_cache(maxsize=None)
def _max_k(device_index: int) -> int:
    return int(_load()[0].max_k(device_index))


def available(scores: Optional[torch.Tensor] = None) -> tuple[bool, str]:
    """(True, "") when the kernel can run (on `scores`, when given), else (False, a one-line reason)."""
    ext, why = _load()
    if ext is None:
        return False, why
    if scores is not None:
        if not scores.is_cuda:
            return False, "the scores are not on a CUDA device"
        if scores.dim() == 2:
            kmax = _max_k(scores.device.index if scores.device.index is not None else torch.cuda.current_device())
            if scores.shape[1] > kmax:
                return False, f"K={scores.shape[1]} exceeds the kernel's limit of {kmax} prototypes on this device"
    return True, ""


def _kernel_inputs(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores as the kernel reads them: one of its dtypes for both, unit stride along K (any row stride)."""
    if a.dtype != b.dtype or a.dtype not in _KERNEL_DTYPES:
        a, b = a.float(), b.float()
    return tuple(t.detach() if t.stride(1) == 1 or t.shape[1] == 1 else t.detach().contiguous() for t in (a, b))


def _all_reduce_stats(state: list[torch.Tensor], kind: int, group) -> None:
    """Combine the ranks' column statistics between sweeps (kernels/sinkhorn.h, goca::Stats)."""
    colmax, colacc = state[0], state[1]
    if kind == STATS_MAX_SUM:
        local = colmax[:-2].clone()
        dist.all_reduce(colmax, op=dist.ReduceOp.MAX, group=group)
        colacc.mul_(torch.exp2(local - colmax[:-2]))
    if kind in (STATS_SUM, STATS_MAX_SUM):
        dist.all_reduce(colacc, group=group)


def goca_codes(scores_rgb: torch.Tensor, scores_flow: torch.Tensor, params: GuidanceParams, group=None,
               keep_last: Optional[int] = None, *, per_sweep: bool = False, ctas: int = 0,
               variant: int = DEFAULT_VARIANT) -> tuple[torch.Tensor, torch.Tensor]:
    """goca_fast.method.assign.goca_codes on the CUDA kernel; same arguments.

    per_sweep: one launch per sweep even without a process group (the group path minus its all-reduces; for
    benchmarks and tests). ctas: blocks per launch, 0 = one per SM (a tuning knob). variant: kernel design 1 or 2."""
    ext, why = _load()
    if ext is None:
        raise RuntimeError(f"CUDA Sinkhorn extension unavailable: {why}")
    if scores_rgb.dim() != 2 or scores_rgb.shape != scores_flow.shape:
        raise ValueError(f"scores must be two B×K matrices of the same shape, got {tuple(scores_rgb.shape)} and "
                         f"{tuple(scores_flow.shape)}")
    if variant not in (1, 2):
        raise ValueError(f"kernel variant must be 1 or 2, got {variant!r}")
    plan = sweep_plan(iterations=params.iterations, cycles=params.cycles, epsilon=params.epsilon,
                      prior_epsilon=params.prior_epsilon, sign=params.sign)
    sr, sf = _kernel_inputs(scores_rgb, scores_flow)
    B, K = sr.shape
    keep = min(keep_last, B) if keep_last else B
    codes = [torch.empty(keep, K, dtype=torch.float32, device=sr.device) for _ in range(2)]
    state = ext.new_state(sr, sf, ctas, variant)
    sweeps, passes = plan.flat_sweeps(), plan.flat_passes()
    n = len(plan.sweeps)
    grouped = group is not None and dist.get_world_size(group) > 1
    if not (grouped or per_sweep):
        ext.sweeps(sr, sf, codes[0], codes[1], state, sweeps, passes, variant, 0, n)
    else:
        for s, sweep in enumerate(plan.sweeps):
            ext.sweeps(sr, sf, codes[0], codes[1], state, sweeps, passes, variant, s, 1)
            if grouped:
                _all_reduce_stats(state, sweep.stats_after, group)
    return codes[0], codes[1]
