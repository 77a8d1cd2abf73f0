"""GOCA assignment: Sinkhorn-Knopp equipartition codes, optionally guided by the other stream's codes.

The official iterate (spec §1.7) on a B×K score matrix S is

    X = S/ε                         (no prior)
    X = (S + s·ε2·log P)/(ε + ε2)   (prior P, s = +1 "kl", s = -1 "official")
    Q = exp(X)ᵀ; Q /= ΣQ; iterations × [rows /= row sums; /= K; columns /= column sums; /= B]; return (B·Q)ᵀ

It materialises exp(X) and rewrites it ~10 times per iteration, and it overflows for ε ≲ 0.011 with cosine
scores. Here the same fixed point is computed with scaling vectors instead: Q_bk = E_bk·u_k·v_b with
E = exp(X − max_k X) written once; each iteration is two mat-vec products (u = 1/(K·Eᵀv), v = 1/(B·E u)).
The per-sample shift only changes the *initial* column weights, which are kept exactly as v0 = exp(m_b − M).

The prior never needs P itself: log P_bk = X'_bk + h_b + (per-prototype term), and per-prototype factors of a
kernel are cancelled by the first row normalisation. So a prior pass is an ordinary pass on the logits
(S + s·ε2·X')/(ε+ε2) with per-sample initial log-weights s·ε2·h/(ε+ε2) (this is also what the CUDA kernel does).

If a row sum ever falls below what fp32 represents with full precision (extreme ε or scores), the pass is redone
in the log domain (log-sum-exp potentials), which is exact and finite everywhere. Everything runs in fp32 with
autocast disabled, whatever dtype the scores arrive in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

PriorSign = Literal["kl", "official"]
Backend = Literal["auto", "torch", "cuda"]

# A row sum below this may be built from denormal fp32 terms: switch that pass to the log domain.
_TINY_ROW_SUM = 1e-25


def _sign(prior_sign: str) -> float:
    if prior_sign == "kl":
        return 1.0
    if prior_sign == "official":
        return -1.0
    raise ValueError(f"prior_sign must be 'kl' or 'official', got {prior_sign!r}")


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


@dataclass
class _Pass:
    """Result of one Sinkhorn pass: codes (or None) and the per-sample log offset h of log(codes)."""
    codes: Optional[torch.Tensor]
    h: torch.Tensor


# Logits of a pass as a linear combination Σ coef·S of score matrices: a prior pass never materialises log P.
Terms = list[tuple[torch.Tensor, float]]


def _fill_logits(out: torch.Tensor, terms: Terms) -> torch.Tensor:
    (first, a), *rest = terms
    torch.mul(first, a, out=out)
    for t, b in rest:
        if b != 0.0:
            out.add_(t, alpha=b)
    return out


def _pass_scaling(terms: Terms, offset: Optional[torch.Tensor], iterations: int, batch_global: float, group,
                  keep_last: Optional[int], want_codes: bool, work: torch.Tensor) -> Optional[_Pass]:
    """Scaling-vector Sinkhorn in the preallocated `work` buffer (B×K, overwritten).

    Returns None when fp32 cannot represent some row sum with full precision; the caller then uses the log domain.
    """
    K = work.shape[1]
    E = _fill_logits(work, terms)
    m = E.amax(dim=1)
    E.sub_(m[:, None]).exp_()
    w = m if offset is None else m + offset
    M = _all_reduce(w.max().reshape(1).clone(), group, dist.ReduceOp.MAX)
    v = torch.exp(w - M)
    for _ in range(iterations):
        r = E.t().mv(v)
        _all_reduce(r, group)
        if not bool(torch.isfinite(r).all()) or float(r.min()) < _TINY_ROW_SUM:
            return None
        u = 1.0 / (K * r)
        c = E.mv(u)
        v = 1.0 / (batch_global * c)
    h = -m - torch.log(c)
    codes = None
    if want_codes:
        rows = slice(-keep_last, None) if keep_last else slice(None)
        codes = E[rows] * u[None, :]
        codes /= c[rows, None]
    return _Pass(codes, h)


def _global_logsumexp_rows(L: torch.Tensor, group) -> torch.Tensor:
    """log Σ_b exp(L_bk) over the global batch, per prototype k."""
    mx = L.amax(dim=0)
    _all_reduce(mx, group, dist.ReduceOp.MAX)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = torch.exp(L - mx[None, :]).sum(dim=0)
    _all_reduce(s, group)
    return torch.log(s) + mx


def _pass_logdomain(terms: Terms, offset: Optional[torch.Tensor], iterations: int, group,
                    keep_last: Optional[int], want_codes: bool, work: torch.Tensor) -> _Pass:
    """Log-domain Sinkhorn with potentials f (prototypes) and g (samples): finite for any finite logits."""
    L = _fill_logits(work, terms)
    if offset is not None:
        L.add_(offset[:, None])
    g = torch.zeros(L.shape[0], dtype=L.dtype, device=L.device)
    for _ in range(iterations):
        f = -_global_logsumexp_rows(L + g[:, None], group)
        g = -torch.logsumexp(L + f[None, :], dim=1)
    h = g if offset is None else g + offset
    codes = None
    if want_codes:
        rows = slice(-keep_last, None) if keep_last else slice(None)
        codes = torch.exp(L[rows] + f[None, :] + g[rows, None])
    return _Pass(codes, h)


def _run_pass(terms: Terms, offset: Optional[torch.Tensor], iterations: int, batch_global: float, group,
              keep_last: Optional[int], want_codes: bool, work: torch.Tensor) -> _Pass:
    out = _pass_scaling(terms, offset, iterations, batch_global, group, keep_last, want_codes, work)
    if out is None:
        out = _pass_logdomain(terms, offset, iterations, group, keep_last, want_codes, work)
    return out


def _prep(scores: torch.Tensor, epsilon: float, iterations: int, group) -> tuple[torch.Tensor, float]:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a B×K matrix, got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    n = torch.tensor([float(scores.shape[0])], device=scores.device)
    batch_global = float(_all_reduce(n, group).item())
    return scores.detach().float(), batch_global


def _autocast_off(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int, prior: Optional[torch.Tensor] = None,
             prior_epsilon: float = 0.0, prior_sign: PriorSign = "kl", group=None,
             keep_last: Optional[int] = None) -> torch.Tensor:
    """Equipartition codes for B_local×K `scores` (the official iterate, computed stably in fp32).

    prior: B_local×K codes of the other stream (rows summing to 1) to pull toward (`kl`) or push away from
    (`official`, the released code's sign) with weight `prior_epsilon`. group: process group over which the
    batch is split (None = this process holds the whole batch). keep_last: return only the last rows (the
    current batch when queue rows were prepended).
    """
    with _autocast_off(scores.device):
        S, batch_global = _prep(scores, epsilon, iterations, group)
        terms: Terms = [(S, 1.0 / epsilon)]
        if prior is not None and prior_epsilon != 0.0:
            if prior.shape != scores.shape:
                raise ValueError(f"prior shape {tuple(prior.shape)} differs from scores {tuple(scores.shape)}")
            s = _sign(prior_sign)
            # log P with P's zeros clamped to the smallest normal fp32: the official iterate would give ±inf there.
            logp = torch.log(prior.detach().float().clamp_min(torch.finfo(torch.float32).tiny))
            denom = epsilon + prior_epsilon
            terms = [(S, 1.0 / denom), (logp, s * prior_epsilon / denom)]
        work = torch.empty_like(S)
        return _run_pass(terms, None, iterations, batch_global, group, keep_last, True, work).codes


@torch.no_grad()
def goca_codes(scores_rgb: torch.Tensor, scores_flow: torch.Tensor, epsilon: float, prior_epsilon: float,
               iterations: int, cycles: int = 1, prior_sign: PriorSign = "kl", backend: Backend = "auto",
               group=None, keep_last: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior-guided codes for both streams (spec §1.7).

    P_f = SK(S_f), P_r = SK(S_r); then `cycles` times: Q_r = SK(S_r | P_f), Q_f = SK(S_f | P_r); P_r, P_f = Q_r, Q_f.
    Returns (codes_rgb, codes_flow), float32, rows summing to 1 (only the last `keep_last` rows when given).
    """
    if cycles not in (1, 2):
        raise ValueError(f"cycles must be 1 or 2, got {cycles}")
    if scores_rgb.shape != scores_flow.shape:
        raise ValueError(f"RGB scores {tuple(scores_rgb.shape)} and flow scores {tuple(scores_flow.shape)} differ")
    s = _sign(prior_sign)
    if _use_kernel(backend, scores_rgb):
        from goca_fast import kernels
        return kernels.goca_codes(scores_rgb, scores_flow, epsilon, prior_epsilon, iterations, cycles, s,
                                  group, keep_last)
    with _autocast_off(scores_rgb.device):
        S_r, batch_global = _prep(scores_rgb, epsilon, iterations, group)
        S_f = scores_flow.detach().float()
        work = torch.empty_like(S_r)
        # logits of each stream's current pass as coefficients of (S_r, S_f)
        c_r, c_f = (1.0 / epsilon, 0.0), (0.0, 1.0 / epsilon)

        def run(coef, offset, want):
            return _run_pass([(S_r, coef[0]), (S_f, coef[1])], offset, iterations, batch_global, group,
                             keep_last, want, work)

        p_r, p_f = run(c_r, None, False), run(c_f, None, False)
        denom = epsilon + prior_epsilon
        a = s * prior_epsilon / denom
        for cycle in range(cycles):
            last = cycle == cycles - 1
            # X_new = (S_self + s·ε2·log P_other)/(ε+ε2) with log P_other = X_other + h_other (+ per-prototype terms,
            # which Sinkhorn cancels): again a combination of S_r and S_f, with per-sample offset a·h_other.
            n_r = (1.0 / denom + a * c_f[0], a * c_f[1])
            n_f = (a * c_r[0], 1.0 / denom + a * c_r[1])
            q_r = run(n_r, a * p_f.h, last)
            q_f = run(n_f, a * p_r.h, last)
            c_r, c_f, p_r, p_f = n_r, n_f, q_r, q_f
        return p_r.codes, p_f.codes


def _use_kernel(backend: str, scores: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend not in ("auto", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {backend!r}")
    from goca_fast import kernels
    if backend == "cuda":
        if not scores.is_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors")
        ok, why = kernels.available(scores)
        if not ok:
            raise RuntimeError(f"backend='cuda' requested but the CUDA Sinkhorn extension is unavailable: {why}")
        return True
    return scores.is_cuda and kernels.available(scores)[0]


def official_sinkhorn_reference(scores: torch.Tensor, epsilon: float, iterations: int,
                                prior: Optional[torch.Tensor] = None, prior_epsilon: float = 0.0,
                                prior_sign: PriorSign = "kl") -> torch.Tensor:
    """The plain official iterate, written straight from the spec (for tests and the benchmark baseline).

    It keeps the official's dtype (whatever `scores` is), its materialised exp and its overflow behaviour.
    """
    S = scores.detach()
    if prior is None or prior_epsilon == 0.0:
        X = S / epsilon
    else:
        s = _sign(prior_sign)
        X = (S + s * prior_epsilon * torch.log(prior / S.shape[0])) / (epsilon + prior_epsilon)
    Q = torch.exp(X).t()
    Q /= Q.sum()
    K, B = Q.shape
    for _ in range(iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def official_goca_reference(scores_rgb: torch.Tensor, scores_flow: torch.Tensor, epsilon: float,
                            prior_epsilon: float, iterations: int, cycles: int = 1,
                            prior_sign: PriorSign = "kl") -> tuple[torch.Tensor, torch.Tensor]:
    """The official 4-call (cycles=1) computation with materialised exp-matrices: the benchmark baseline."""
    P_f = official_sinkhorn_reference(scores_flow, epsilon, iterations)
    P_r = official_sinkhorn_reference(scores_rgb, epsilon, iterations)
    for _ in range(cycles):
        Q_r = official_sinkhorn_reference(scores_rgb, epsilon, iterations, P_f, prior_epsilon, prior_sign)
        Q_f = official_sinkhorn_reference(scores_flow, epsilon, iterations, P_r, prior_epsilon, prior_sign)
        P_r, P_f = Q_r, Q_f
    return P_r, P_f
