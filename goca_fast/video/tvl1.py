"""Batched TV-L1 optical flow in torch: the Zach-Pock-Bischof duality algorithm as OpenCV's DualTVL1 runs it.

The official GOCA author "couldn't find a way to batch-wise optical flow computation with open-CV".
This solves N frame pairs of one size at once (N×H×W tensors) on a GPU or the CPU, following
opencv_contrib's `optflow::DualTVL1OpticalFlow` step by step, with its defaults:

  tau 0.25, lambda 0.15, theta 0.3, nscales 5, warps 5, epsilon 0.01, innerIterations 30,
  outerIterations 10, scaleStep 0.8, gamma 0, medianFiltering 5, useInitialFlow false

* Images are float grey levels 0..255. Pyramid: bilinear resize by scaleStep with OpenCV's
  half-pixel mapping and output size round(size·scaleStep); levels stop before a side < 16 px.
  The flow is zero at the coarsest level; between levels it is resized bilinearly and divided
  by scaleStep. The dual variables p restart at zero on every level.
* Each warp samples I1 and its centred-difference gradient (replicated border) at x + u with
  bicubic interpolation (Keys a = -0.75, zero outside the image) -> grid_sample "bicubic".
  OpenCV 5's float remap samples at the exact positions (measured: max 0.001 grey-level
  difference to an exact bicubic); OpenCV 4.x rounds positions to 1/32 px.
* Then up to outerIterations × [5×5 median filter of u (replicated border); innerIterations ×
  (thresholding step for v, divergence of p (backward differences), u = v + θ·div p,
  forward-difference gradient of u, p = (p + τ/θ·∇u) / (1 + τ/θ·|∇u|))], stopping a pair as soon
  as the sum over its pixels of |u_new − u|² drops to epsilon²·H·W (checked after every inner
  step, exactly OpenCV's rule, but per pair: converged pairs are frozen while others go on).

Pure tensor math: no I/O. gamma (illumination term) is not implemented (OpenCV's default is 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn.functional as F

FLT_EPSILON = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class TVL1Params:
    """OpenCV DualTVL1 parameters (defaults = cv2.optflow.DualTVL1OpticalFlow_create())."""
    tau: float = 0.25
    lambda_: float = 0.15
    theta: float = 0.3
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    median_filtering: int = 5

    def check(self) -> None:
        if self.nscales < 1 or self.warps < 1 or self.inner_iterations < 1 or self.outer_iterations < 1:
            raise ValueError("nscales, warps and iterations must be >= 1")
        if not 0 < self.scale_step < 1:
            raise ValueError(f"scale_step must be in (0, 1), got {self.scale_step}")
        if self.median_filtering not in (0, 1, 3, 5):
            raise ValueError(f"median_filtering must be 0/1 (off), 3 or 5, got {self.median_filtering}")
        if self.tau <= 0 or self.theta <= 0 or self.lambda_ <= 0 or self.epsilon < 0:
            raise ValueError("tau, theta, lambda must be > 0 and epsilon >= 0")


def opencv_tvl1(params: TVL1Params = TVL1Params()):
    """The matching cv2.optflow DualTVL1 object (needs opencv-contrib)."""
    t = cv2.optflow.DualTVL1OpticalFlow_create()
    t.setTau(params.tau)
    t.setLambda(params.lambda_)
    t.setTheta(params.theta)
    t.setScalesNumber(params.nscales)
    t.setWarpingsNumber(params.warps)
    t.setEpsilon(params.epsilon)
    t.setInnerIterations(params.inner_iterations)
    t.setOuterIterations(params.outer_iterations)
    t.setScaleStep(params.scale_step)
    t.setGamma(0.0)
    t.setMedianFiltering(params.median_filtering)
    t.setUseInitialFlow(False)
    return t


# ----------------------------------------------------------------------------- building blocks


def _linear_taps(src: int, dst: int, scale: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OpenCV INTER_LINEAR taps along one axis: src pos = (d + 0.5)·scale − 0.5, clamped at the borders."""
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = pos - i0
    lo = i0 < 0
    frac[lo], i0[lo] = 0.0, 0
    hi = i0 >= src - 1
    frac[hi], i0[hi] = 0.0, src - 1
    i1 = np.minimum(i0 + 1, src - 1)
    t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return t(i0), t(i1), t(frac.astype(np.float32))


def resize_linear(x: torch.Tensor, size: tuple[int, int], scale: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Bilinear resize of (..., H, W) to size=(h, w) like cv2.resize(INTER_LINEAR) on float images.

    scale = (src/dst) per axis for the coordinate mapping; default H/h and W/w (cv2 with dsize),
    pass (1/fy, 1/fx) to mimic cv2.resize(..., fx, fy) whose mapping uses the given factors.
    """
    h, w = size
    sh, sw = scale if scale is not None else (x.shape[-2] / h, x.shape[-1] / w)
    j0, j1, fx = _linear_taps(x.shape[-1], w, sw, x.device)
    x = x.index_select(-1, j0) * (1 - fx) + x.index_select(-1, j1) * fx  # horizontal first, as OpenCV
    i0, i1, fy = _linear_taps(x.shape[-2], h, sh, x.device)
    fy = fy[:, None]
    return x.index_select(-2, i0) * (1 - fy) + x.index_select(-2, i1) * fy


def centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(I(x+1) − I(x−1))/2 per axis with a replicated border (OpenCV's centeredGradient)."""
    p = F.pad(img.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    gx = 0.5 * (p[..., 1:-1, 2:] - p[..., 1:-1, :-2])
    gy = 0.5 * (p[..., 2:, 1:-1] - p[..., :-2, 1:-1])
    return gx, gy


def median_filter(u: torch.Tensor, k: int) -> torch.Tensor:
    """k×k median per channel with a replicated border (cv2.medianBlur on float32), u: N×C×H×W."""
    n, c, h, w = u.shape
    r = k // 2
    p = F.pad(u, (r, r, r, r), mode="replicate")
    patches = p.unfold(2, k, 1).unfold(3, k, 1)  # N×C×H×W×k×k (a view)
    return patches.reshape(n, c, h, w, k * k).median(dim=-1).values


def _batcher_pairs(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sorting network for n = 2^m wires (compare-exchange pairs, low index = min)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@lru_cache(maxsize=None)
def median_network(count: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """Compare-exchange ops (a, b, keep_min_in_a, keep_max_in_b) whose last result in wire `count//2` is the median.

    Built from a Batcher network on the next power of two (extra wires = +inf, folded away), then
    pruned backwards to the ops the median depends on: 25 values -> a fixed min/max program with no
    data-dependent branches, which torch.compile fuses into one kernel.
    """
    size = 1 << (count - 1).bit_length()
    wires: list[Optional[int]] = list(range(count)) + [None] * (size - count)  # None = +inf
    ops = []
    for a, b in _batcher_pairs(size):
        if wires[b] is None:
            continue                      # min(x, inf) = x: nothing moves
        if wires[a] is None:
            wires[a], wires[b] = wires[b], None
            continue
        ops.append((wires[a], wires[b]))  # registers: min -> first, max -> second
    target = wires[count // 2]
    live = {target}
    kept = []
    for x, y in reversed(ops):
        want_min, want_max = x in live, y in live
        if not (want_min or want_max):
            continue
        kept.append((x, y, want_min, want_max))
        live.update((x, y))
    return tuple(reversed(kept)) + ((target, target, False, False),)


_NETWORKS = {3: median_network(9), 5: median_network(25)}  # plain constants for torch.compile to trace


def median_filter_network(u: torch.Tensor, k: int) -> torch.Tensor:
    """Same result as median_filter via a selection network of elementwise min/max (for torch.compile)."""
    r = k // 2
    p = F.pad(u, (r, r, r, r), mode="replicate")
    h, w = u.shape[-2:]
    regs = [p[..., i:i + h, j:j + w] for i in range(k) for j in range(k)]
    net = _NETWORKS[k]
    for x, y, keep_min, keep_max in net[:-1]:
        a, b = regs[x], regs[y]
        if keep_min:
            regs[x] = torch.minimum(a, b)
        if keep_max:
            regs[y] = torch.maximum(a, b)
    return regs[net[-1][0]]


def divergence(p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """div of the dual field p (N×2×2×H×W: component, direction) with OpenCV's backward differences."""
    px, py = p[:, :, 0], p[:, :, 1]
    out.copy_(px)
    out[..., 1:] -= px[..., :-1]
    out += py
    out[..., 1:, :] -= py[..., :-1, :]
    return out


def _pyramid_sizes(h: int, w: int, params: TVL1Params) -> list[tuple[int, int]]:
    sizes = [(h, w)]
    for _ in range(1, params.nscales):
        ph, pw = sizes[-1]
        nh, nw = int(round(ph * params.scale_step)), int(round(pw * params.scale_step))
        if nh < 16 or nw < 16:  # OpenCV stops the pyramid there
            break
        sizes.append((nh, nw))
    return sizes


# ----------------------------------------------------------------------------- one level


def _warp_sampler(stack: torch.Tensor, u: torch.Tensor, base_x: torch.Tensor, base_y: torch.Tensor) -> torch.Tensor:
    """Bicubic samples of stack (N×C×H×W) at (x + u1, y + u2), zero outside (cv2.remap INTER_CUBIC)."""
    h, w = stack.shape[-2:]
    x = base_x + u[:, 0]
    y = base_y + u[:, 1]
    grid = torch.stack((x * (2.0 / max(w - 1, 1)) - 1.0, y * (2.0 / max(h - 1, 1)) - 1.0), dim=-1)
    return F.grid_sample(stack, grid, mode="bicubic", padding_mode="zeros", align_corners=True)


def _step(u: torch.Tensor, p: torch.Tensor, iw: torch.Tensor, rho_c: torch.Tensor, neg_inv_grad: torch.Tensor,
          active: Optional[torch.Tensor], lt: float, taut: float, theta: float
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One inner TV-L1 iteration for all pairs -> (u, p, per-pair sum |Δu|²); inactive pairs keep u, p.

    Written as plain tensor expressions so torch.compile can fuse it into a few kernels.
    """
    # v = u + TH(rho): OpenCV's three-way thresholding, as a coefficient clamp(-rho/|∇I1|², ±λθ) on ∇I1
    rho = (iw * u).sum(1) + rho_c
    c = (rho * neg_inv_grad).clamp(-lt, lt).unsqueeze(1)
    px, py = p[:, :, 0], p[:, :, 1]
    div = px - F.pad(px[..., :-1], (1, 0)) + py - F.pad(py[..., :-1, :], (0, 0, 1, 0))  # backward differences
    u_new = u + c * iw + theta * div
    d = u_new - u
    err = (d * d).sum(dim=(1, 2, 3))
    ux = F.pad(u_new[..., 1:] - u_new[..., :-1], (0, 1))                             # forward differences,
    uy = F.pad(u_new[..., 1:, :] - u_new[..., :-1, :], (0, 0, 0, 1))                  # zero at the far border
    ng = 1.0 + taut * torch.sqrt(ux * ux + uy * uy)
    p_new = torch.stack(((px + taut * ux) / ng, (py + taut * uy) / ng), dim=2)
    if active is not None:
        m = active[:, None, None, None]
        u_new = torch.where(m, u_new, u)
        p_new = torch.where(m[..., None], p_new, p)
    return u_new, p_new, err


_compiled: dict[str, object] = {}


def _get_fns(compile: bool):
    """(inner step, median filter): eager, or fused by torch.compile (static shapes, one graph per level size)."""
    if not compile:
        return _step, median_filter
    if not _compiled:
        import torch._dynamo.config as dcfg
        for name in ("recompile_limit", "cache_size_limit"):  # 5 levels per distinct video size
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 256))
        _compiled["step"] = torch.compile(_step, dynamic=False)
        _compiled["median"] = torch.compile(median_filter_network, dynamic=False)
    return _compiled["step"], _compiled["median"]


def _solve_level(i0: torch.Tensor, i1: torch.Tensor, u: torch.Tensor, params: TVL1Params,
                 check_every: int, stats: Optional[dict], compile: bool = False) -> torch.Tensor:
    """Refine u (N×2×H×W) on one pyramid level (OpenCV's procOneScale for N pairs)."""
    n, h, w = i0.shape
    dev = i0.device
    step, median = _get_fns(compile)
    i1x, i1y = centered_gradient(i1)
    stack = torch.stack((i1, i1x, i1y), dim=1)
    del i1x, i1y
    base_y, base_x = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                                    torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    p = torch.zeros(n, 2, 2, h, w, device=dev)
    lt = params.lambda_ * params.theta
    taut = params.tau / params.theta
    eps_scaled = params.epsilon ** 2 * h * w
    for _ in range(params.warps):
        s = _warp_sampler(stack, u, base_x, base_y)
        iw = s[:, 1:3].contiguous()                      # ∇I1 at x + u0
        grad = (iw * iw).sum(1)                          # |∇I1|²
        rho_c = s[:, 0] - (iw * u).sum(1) - i0           # I1(x+u0) − ∇I1·u0 − I0
        neg_inv_grad = -1.0 / grad.clamp_min(FLT_EPSILON)
        del s, grad
        active = torch.ones(n, dtype=torch.bool, device=dev)
        # None while every pair iterates (eager fast path); the compiled step always takes a mask (one graph)
        mask: Optional[torch.Tensor] = active if compile else None
        done = False
        it = 0
        for _outer in range(params.outer_iterations):
            if params.median_filtering > 1:
                med = median(u, params.median_filtering)
                u = med if mask is None else torch.where(mask[:, None, None, None], med, u)
                del med
            for _inner in range(params.inner_iterations):
                u, p, err = step(u, p, iw, rho_c, neg_inv_grad, mask, lt, taut, params.theta)
                active = active & (err > eps_scaled)
                it += 1
                if dev.type == "cpu" or it % check_every == 0:
                    n_active = int(active.sum())
                    if n_active == 0:
                        done = True
                        break
                    mask = None if (n_active == n and not compile) else active
                elif mask is not None:
                    mask = active
            if done:
                break
        if stats is not None:
            stats.setdefault("iterations", []).append(it)
    return u


def tvl1_flow(i0: torch.Tensor, i1: torch.Tensor, params: TVL1Params = TVL1Params(),
              check_every: int = 10, stats: Optional[dict] = None, compile: bool = False) -> torch.Tensor:
    """TV-L1 flow from i0 to i1 for N pairs at once -> N×2×H×W float32 (u = x, v = y, in pixels).

    i0, i1: N×H×W grey images, uint8 or float in 0..255, on any device (the work runs there).
    check_every: on GPUs, how many inner steps between the host checks for "all pairs converged"
    (each check is a device sync; convergence itself is tested per pair after every step).
    compile: fuse the inner iteration with torch.compile (worth it on GPUs; compiles once per level size).
    """
    params.check()
    if i0.shape != i1.shape or i0.dim() != 3:
        raise ValueError(f"expected two N×H×W tensors of one shape, got {tuple(i0.shape)} and {tuple(i1.shape)}")
    n, h, w = i0.shape
    if h < 3 or w < 3:
        raise ValueError(f"images must be at least 3×3, got {h}×{w}")
    i0 = i0.float()
    i1 = i1.float()
    sizes = _pyramid_sizes(h, w, params)
    inv = 1.0 / params.scale_step
    pyr0, pyr1 = [i0], [i1]
    for k in range(1, len(sizes)):
        pyr0.append(resize_linear(pyr0[-1], sizes[k], (inv, inv)))
        pyr1.append(resize_linear(pyr1[-1], sizes[k], (inv, inv)))
    u = torch.zeros(n, 2, *sizes[-1], device=i0.device)
    with torch.no_grad():
        for k in range(len(sizes) - 1, -1, -1):
            u = _solve_level(pyr0[k], pyr1[k], u, params, check_every, stats, compile)
            if k:
                u = resize_linear(u, sizes[k - 1]) * inv
    return u


def flow_numpy(frames_grey: np.ndarray, params: TVL1Params = TVL1Params(), device: str = "cpu",
               batch: int = 16) -> np.ndarray:
    """Consecutive-frame flows of a T×H×W uint8 grey clip -> (T−1)×H×W×2 float32, `batch` pairs at a time."""
    g = torch.from_numpy(np.ascontiguousarray(frames_grey))
    out = []
    for s in range(0, len(g) - 1, batch):
        e = min(s + batch, len(g) - 1)
        a = g[s:e].to(device, non_blocking=True)
        b = g[s + 1:e + 1].to(device, non_blocking=True)
        out.append(tvl1_flow(a, b, params).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, *g.shape[1:], 2), np.float32)


__all__ = ["TVL1Params", "tvl1_flow", "flow_numpy", "opencv_tvl1", "resize_linear", "median_filter",
           "centered_gradient"]
