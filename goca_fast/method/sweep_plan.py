"""The CUDA kernel's schedule for goca_codes: which sweeps run, with which pass coefficients, and what each leaves
to all-reduce. One source: the launcher (goca_fast.method.cuda_kernel) hands this plan to the kernel, which only reads it, and
the CPU model of the kernel in the tests walks the same plan, so a change of schedule is tested without a GPU.

Pass p (0: no prior, 1..cycles: guided) has logits α_st·S_rgb + β_st·S_flow for stream st (in log2 units, as the
kernel's exp2 wants them) and prior offsets `offset`·h, h being the other stream's per-sample log2 factor of the
previous pass. A pass is `iterations` of [prototype step (over rows), sample step (over prototypes)]; a *sweep* does
one sample step per row and the next prototype step's column statistics, so goca_codes takes (cycles+1)·iterations+1
sweeps:
  init:   sweep 0, the first prototype step of pass 0 (column log-sum-exp);
  middle: a sample step and the next prototype step of the same pass;
  bridge: the last sample step of pass p (its h gives the offsets) and the first prototype step of pass p+1;
  last:   the last sample step of the last pass, which writes the codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# The kernel's codes for these (kernels/sinkhorn.h: goca::SweepKind, goca::Stats).
INIT, MIDDLE, BRIDGE, LAST = 0, 1, 2, 3
STATS_NONE, STATS_SUM, STATS_MAX_SUM = 0, 1, 2
MAX_SWEEPS = 128  # kernels/sinkhorn.h kMaxSweeps: the plan travels in the launch parameters
MAX_PASSES = 3    # pass 0 + up to 2 guided cycles

_LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class Sweep:
    kind: int         # INIT, MIDDLE, BRIDGE or LAST
    sample_pass: int  # pass whose sample step this sweep runs (0 for INIT, which runs none)
    init_pass: int    # pass whose prototype step it accumulates (unused by LAST)

    @property
    def stats_after(self) -> int:
        """What this sweep leaves for the next one, and what ranks must all-reduce before it runs:
        MAX_SUM (column maxima + sums relative to them) after a pass's first prototype step, SUM after a later one."""
        return {INIT: STATS_MAX_SUM, BRIDGE: STATS_MAX_SUM, MIDDLE: STATS_SUM}.get(self.kind, STATS_NONE)


@dataclass(frozen=True)
class PassCoefficients:
    alpha: tuple[float, float]  # per stream (RGB, flow): weight of S_rgb, log2 units
    beta: tuple[float, float]   # per stream: weight of S_flow, log2 units
    offset: float               # prior offset weight: the stream's offsets are offset·h(other stream)


@dataclass(frozen=True)
class SweepPlan:
    sweeps: tuple[Sweep, ...]
    passes: tuple[PassCoefficients, ...]

    def flat_sweeps(self) -> list[int]:
        """[kind, sample_pass, init_pass] per sweep, the launcher's format."""
        return [v for s in self.sweeps for v in (s.kind, s.sample_pass, s.init_pass)]

    def flat_passes(self) -> list[float]:
        """[α_rgb, α_flow, β_rgb, β_flow, offset] per pass, the launcher's format."""
        return [v for p in self.passes for v in (*p.alpha, *p.beta, p.offset)]


def pass_coefficients(*, epsilon: float, prior_epsilon: float, sign: float, cycles: int
                      ) -> tuple[PassCoefficients, ...]:
    """The guided passes as linear combinations of the two score matrices (as goca_fast.method.assign derives them):
    X_new = (S_self + s·ε2·log P_other)/(ε+ε2), log P_other = X_other + h_other (+ per-prototype terms Sinkhorn
    cancels), so every pass's logits stay a combination of S_rgb and S_flow."""
    alpha, beta, offset = [1.0 / epsilon, 0.0], [0.0, 1.0 / epsilon], 0.0
    denom = epsilon + prior_epsilon
    a = sign * prior_epsilon / denom
    out = []
    for q in range(cycles + 1):
        if q:
            alpha = [1.0 / denom + a * alpha[1], a * alpha[0]]
            beta = [a * beta[1], 1.0 / denom + a * beta[0]]
            offset = a
        out.append(PassCoefficients((alpha[0] * _LOG2E, alpha[1] * _LOG2E), (beta[0] * _LOG2E, beta[1] * _LOG2E),
                                    offset))
    return tuple(out)


def sweep_plan(*, iterations: int, cycles: int, epsilon: float, prior_epsilon: float, sign: float) -> SweepPlan:
    """The kernel's schedule for one goca_codes call; one-line ValueError for what the kernel cannot run."""
    if iterations < 1 or cycles not in (1, 2) or not epsilon > 0:
        raise ValueError(f"need iterations >= 1, cycles in (1, 2), epsilon > 0; got {iterations}, {cycles}, "
                         f"{epsilon}")
    n = (cycles + 1) * iterations + 1
    if n > MAX_SWEEPS:
        raise ValueError(f"{iterations} iterations with cycles={cycles} take {n} sweeps; the kernel runs at most "
                         f"{MAX_SWEEPS}")
    sweeps = []
    for s in range(n):
        if s == 0:
            kind = INIT
        elif s == n - 1:
            kind = LAST
        else:
            kind = BRIDGE if s % iterations == 0 else MIDDLE
        sweeps.append(Sweep(kind, sample_pass=0 if s == 0 else (s - 1) // iterations,
                            init_pass=min(s // iterations, cycles)))
    return SweepPlan(tuple(sweeps), pass_coefficients(epsilon=epsilon, prior_epsilon=prior_epsilon, sign=sign,
                                                      cycles=cycles))
