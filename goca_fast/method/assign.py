"""GOCA assignment: Sinkhorn-Knopp equipartition codes, optionally guided by the other stream's codes.

The official iterate (docs/official_behaviour.md#assignment) on a B×K score matrix S is

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

If a row sum ever falls below what fp32 represents with full precision (extreme ε or scores), the call is redone
in the log domain (log-sum-exp potentials), which is exact and finite everywhere. That test is accumulated on the
device and read on the host once per call, so the iterations never wait for the GPU. Everything runs in fp32 with
autocast disabled, whatever dtype the scores arrive in.

The backend (this torch path or the CUDA kernel) issues different collectives, so with a process group it must be
the same on every rank: `resolve_backend` decides it once for the group, before training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal, Optional, TypeVar, Union

import torch
import torch.distributed as dist

from goca_fast.method import cuda_kernel as kernels
from goca_fast.method.guidance import GuidanceParams, PriorSign, sign_value

Backend = Literal["auto", "torch", "cuda"]
ResolvedBackend = Literal["torch", "cuda"]

log = logging.getLogger("goca_fast")

# A row sum below this may be built from denormal fp32 terms: the call is then redone in the log domain.
_TINY_ROW_SUM = 1e-25


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


def _pass_scaling(terms: Terms, offset: Optional[torch.Tensor], iterations: int,
                  batch_global: Union[float, torch.Tensor], group, keep_last: Optional[int], want_codes: bool,
                  work: torch.Tensor) -> tuple[_Pass, torch.Tensor]:
    """Scaling-vector Sinkhorn in the preallocated `work` buffer (B×K, overwritten).

    Returns the pass and a device bool: False when fp32 could not represent some row sum with full precision
    (then the result is meaningless and the caller redoes the call in the log domain). The flag is not read
    here, so the iterations never synchronise with the host.
    """
    K = work.shape[1]
    E = _fill_logits(work, terms)
    m = E.amax(dim=1)
    E.sub_(m[:, None]).exp_()
    w = m if offset is None else m + offset
    M = _all_reduce(w.max().reshape(1).clone(), group, dist.ReduceOp.MAX)
    v = torch.exp(w - M)
    representable = torch.ones((), dtype=torch.bool, device=work.device)
    for _ in range(iterations):
        r = E.t().mv(v)
        _all_reduce(r, group)
        smallest, largest = r.aminmax()  # NaN propagates into both, and fails the test below
        representable &= (smallest >= _TINY_ROW_SUM) & torch.isfinite(largest)
        u = 1.0 / (K * r)
        c = E.mv(u)
        v = 1.0 / (batch_global * c)
    h = -m - torch.log(c)
    codes = None
    if want_codes:
        rows = slice(-keep_last, None) if keep_last else slice(None)
        codes = E[rows] * u[None, :]
        codes /= c[rows, None]
    return _Pass(codes, h), representable


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


# One Sinkhorn pass, given its logits, per-sample initial log-weights and whether its codes are wanted.
PassFn = Callable[[Terms, Optional[torch.Tensor], bool], _Pass]
T = TypeVar("T")


def _run_chain(chain: Callable[[PassFn], T], iterations: int, batch_global: Union[float, torch.Tensor], group,
               keep_last: Optional[int], work: torch.Tensor) -> T:
    """Run `chain` (the call's sequence of passes) with scaling passes; redo all of it in the log domain if any
    pass was not representable in fp32.

    The passes chain through the offsets h, so one bad pass taints every later one: hence the whole call is redone,
    and the representability flag (identical on every rank: it depends only on all-reduced row sums) is read on the
    host once, at the end.
    """
    all_representable = []

    def scaling(terms: Terms, offset: Optional[torch.Tensor], want_codes: bool) -> _Pass:
        out, representable = _pass_scaling(terms, offset, iterations, batch_global, group, keep_last, want_codes,
                                           work)
        all_representable.append(representable)
        return out

    def log_domain(terms: Terms, offset: Optional[torch.Tensor], want_codes: bool) -> _Pass:
        return _pass_logdomain(terms, offset, iterations, group, keep_last, want_codes, work)

    result = chain(scaling)
    if bool(torch.stack(all_representable).all()):  # the call's only host synchronisation
        return result
    return chain(log_domain)


def _prep(scores: torch.Tensor, epsilon: float, iterations: int,
          group) -> tuple[torch.Tensor, Union[float, torch.Tensor]]:
    """fp32 scores and the global batch size: a float without a group, else a device scalar (no host sync)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be a B×K matrix, got shape {tuple(scores.shape)}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if group is None:
        batch_global: Union[float, torch.Tensor] = float(scores.shape[0])
    else:
        n = torch.tensor([float(scores.shape[0])], device=scores.device)
        batch_global = _all_reduce(n, group).reshape(())
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
            s = sign_value(prior_sign)
            # log P with P's zeros clamped to the smallest normal fp32: the official iterate would give ±inf there.
            logp = torch.log(prior.detach().float().clamp_min(torch.finfo(torch.float32).tiny))
            denom = epsilon + prior_epsilon
            terms = [(S, 1.0 / denom), (logp, s * prior_epsilon / denom)]
        work = torch.empty_like(S)
        return _run_chain(lambda run: run(terms, None, True).codes, iterations, batch_global, group, keep_last, work)


@torch.no_grad()
def goca_codes(scores_rgb: torch.Tensor, scores_flow: torch.Tensor, params: GuidanceParams, *,
               backend: Backend = "auto", group=None, keep_last: Optional[int] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prior-guided codes for both streams (docs/official_behaviour.md#prior-and-cycles).

    P_f = SK(S_f), P_r = SK(S_r); then `cycles` times: Q_r = SK(S_r | P_f), Q_f = SK(S_f | P_r); P_r, P_f = Q_r, Q_f.
    Returns (codes_rgb, codes_flow), float32, rows summing to 1 (only the last `keep_last` rows when given).
    """
    if scores_rgb.shape != scores_flow.shape:
        raise ValueError(f"RGB scores {tuple(scores_rgb.shape)} and flow scores {tuple(scores_flow.shape)} differ")
    if _use_kernel(backend, scores_rgb, group):
        return kernels.goca_codes(scores_rgb, scores_flow, params, group, keep_last)
    epsilon, prior_epsilon, iterations, cycles, s = (params.epsilon, params.prior_epsilon, params.iterations,
                                                     params.cycles, params.sign)
    with _autocast_off(scores_rgb.device):
        S_r, batch_global = _prep(scores_rgb, epsilon, iterations, group)
        S_f = scores_flow.detach().float()
        work = torch.empty_like(S_r)
        denom = epsilon + prior_epsilon
        a = s * prior_epsilon / denom

        def chain(run: PassFn) -> tuple[torch.Tensor, torch.Tensor]:
            # logits of each stream's current pass as coefficients of (S_r, S_f)
            c_r, c_f = (1.0 / epsilon, 0.0), (0.0, 1.0 / epsilon)

            def run_pass(coef, offset, want):
                return run([(S_r, coef[0]), (S_f, coef[1])], offset, want)

            p_r, p_f = run_pass(c_r, None, False), run_pass(c_f, None, False)
            for cycle in range(cycles):
                last = cycle == cycles - 1
                # X_new = (S_self + s·ε2·log P_other)/(ε+ε2) with log P_other = X_other + h_other (+ per-prototype
                # terms, which Sinkhorn cancels): again a combination of S_r and S_f, with per-sample offset
                # a·h_other.
                n_r = (1.0 / denom + a * c_f[0], a * c_f[1])
                n_f = (a * c_r[0], 1.0 / denom + a * c_r[1])
                q_r = run_pass(n_r, a * p_f.h, last)
                q_f = run_pass(n_f, a * p_r.h, last)
                c_r, c_f, p_r, p_f = n_r, n_f, q_r, q_f
            return p_r.codes, p_f.codes

        return _run_chain(chain, iterations, batch_global, group, keep_last, work)


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _use_kernel(backend: str, scores: torch.Tensor, group) -> bool:
    if backend == "torch":
        return False
    if backend not in ("auto", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {backend!r}")
    if backend == "auto" and _group_size(group) > 1:
        raise ValueError("backend='auto' with a process group lets each rank choose on its own (a rank whose kernel "
                         "is unusable would issue other collectives); decide once with resolve_backend()")
    if backend == "cuda":
        if not scores.is_cuda:
            raise ValueError("backend='cuda' needs CUDA tensors")
        ok, why = kernels.available(scores)
        if not ok:
            raise RuntimeError(f"backend='cuda' requested but the CUDA Sinkhorn extension is unavailable: {why}")
        return True
    return scores.is_cuda and kernels.available(scores)[0]


def _kernel_usable_here(device: torch.device, num_prototypes: Optional[int]) -> tuple[bool, str]:
    """Whether this process can run the kernel on `device` for K = num_prototypes (an empty probe: no work)."""
    probe = torch.empty(0, num_prototypes or 1, device=device)
    return kernels.available(probe)


def resolve_backend(requested: Backend, device: torch.device, group=None, *,
                    num_prototypes: Optional[int] = None) -> ResolvedBackend:
    """The assignment backend of the whole process group, decided once before training: "torch" or "cuda".

    The kernel and the torch path issue different collectives, so a rank that fell back on its own (say, its JIT
    build failed) would hang the others or silently corrupt the codes. Every rank says whether the kernel is usable
    here; "auto" takes it only if all can, and "cuda" where some rank cannot is an error on every rank. Collective:
    call it on every rank of `group`. Rank 0 logs the choice and why.
    """
    if requested not in ("auto", "torch", "cuda"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'cuda', got {requested!r}")
    if requested == "torch":
        _log_backend(group, "torch", "requested")
        return "torch"
    ok, why = _kernel_usable_here(torch.device(device), num_prototypes)
    world = _group_size(group)
    if world == 1:
        unusable = [] if ok else [0]
    else:
        # one slot per rank, so that every rank learns which ranks cannot use the kernel
        flags = torch.zeros(world, device=device)
        flags[dist.get_rank(group)] = 0.0 if ok else 1.0
        dist.all_reduce(flags, group=group)
        unusable = [rank for rank, flag in enumerate(flags.tolist()) if flag > 0]
    if not unusable:
        _log_backend(group, "cuda", f"the CUDA Sinkhorn kernel is usable on all {world} rank(s)")
        return "cuda"
    where = "this process" if world == 1 else f"rank(s) {', '.join(map(str, unusable))} of {world}"
    detail = f"here: {why}" if not ok else "this rank could use it"
    if requested == "cuda":
        raise RuntimeError(f"backend='cuda' requested but the CUDA Sinkhorn kernel is unusable on {where} ({detail}); "
                           f"set goca.backend=auto or torch")
    _log_backend(group, "torch", f"auto: the CUDA Sinkhorn kernel is unusable on {where} ({detail})")
    return "torch"


def _log_backend(group, backend: str, why: str) -> None:
    if group is None or dist.get_rank(group) == 0:
        log.info("GOCA assignment backend: %s (%s)", backend, why)
