"""GOCA assignment against independent re-derivations: float64 official iterate, POT at convergence, 2 processes;
host synchronisations per call; the backend decided once per process group."""
import logging
import os

import numpy as np
import ot
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from goca_fast.method.assign import goca_codes, resolve_backend, sinkhorn
from goca_fast.method.guidance import GuidanceParams
from helpers import cosine_scores, free_port, goca64, plain_iterate64, rel_err


@pytest.mark.parametrize("sign", ["kl", "official"])
@pytest.mark.parametrize("B,K,eps", [(256, 100, 0.05), (97, 301, 0.02), (512, 1000, 0.03)])
def test_sinkhorn_matches_float64_official_iterate(sign, B, K, eps):
    S, _, _ = cosine_scores(B, K, seed=B + K)
    P = plain_iterate64(cosine_scores(B, K, seed=7)[0], eps, 3)
    s = 1.0 if sign == "kl" else -1.0
    assert rel_err(sinkhorn(S, eps, 3), plain_iterate64(S, eps, 3)) <= 1e-5
    out = sinkhorn(S, eps, 3, prior=torch.from_numpy(P).float(), prior_epsilon=0.03, prior_sign=sign)
    assert rel_err(out, plain_iterate64(S, eps, 3, P, 0.03, s)) <= 1e-5


@pytest.mark.parametrize("sign", ["kl", "official"])
@pytest.mark.parametrize("cycles", [1, 2])
def test_goca_codes_matches_float64_official(sign, cycles):
    Sr, emb, protos = cosine_scores(300, 500, seed=3)
    Sf = F.normalize(emb + 0.7 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(4)), dim=1) @ protos.t()
    s = 1.0 if sign == "kl" else -1.0
    qr, qf = goca_codes(Sr, Sf, GuidanceParams(0.02, 0.03, 3, cycles=cycles, prior_sign=sign), backend="torch")
    rr, rf = goca64(Sr.numpy(), Sf.numpy(), 0.02, 0.03, 3, cycles, s)
    assert rel_err(qr, rr) <= 1e-5 and rel_err(qf, rf) <= 1e-5
    assert qr.dtype == torch.float32 and torch.allclose(qr.sum(1), torch.ones(300), atol=1e-5)


def test_marginals_after_iterations():
    S, _, _ = cosine_scores(400, 50, seed=11)
    Q = sinkhorn(S, 0.05, 50).double()
    assert torch.allclose(Q.sum(1), torch.ones(400, dtype=torch.float64), atol=1e-5)   # each sample's codes sum to 1
    assert torch.allclose(Q.sum(0), torch.full((50,), 400 / 50, dtype=torch.float64), rtol=1e-3)  # equipartition


def test_converged_sinkhorn_equals_pot():
    """At convergence the iterate solves entropic OT with cost −S, reg ε, marginals 1/B (samples), 1/K (protos)."""
    B, K, eps = 120, 40, 0.1
    S, _, _ = cosine_scores(B, K, seed=5)
    a, b = np.full(B, 1 / B), np.full(K, 1 / K)
    gamma = ot.sinkhorn(a, b, -S.double().numpy(), eps, numItermax=100000, stopThr=1e-13)
    assert rel_err(sinkhorn(S, eps, 2000), B * gamma) <= 1e-4


def test_kl_prior_is_kl_regularised_ot_at_convergence():
    """max <Q,S> + εH(Q) − ε2·KL(Q‖P): Gibbs kernel exp((S + ε2 log P)/(ε+ε2)) = POT with that cost and reg ε+ε2."""
    B, K, eps, eps2 = 100, 30, 0.1, 0.05
    S, _, _ = cosine_scores(B, K, seed=6)
    P = plain_iterate64(cosine_scores(B, K, seed=8)[0], eps, 3)
    a, b = np.full(B, 1 / B), np.full(K, 1 / K)
    cost = -(S.double().numpy() + eps2 * np.log(P))
    gamma = ot.sinkhorn(a, b, cost, eps + eps2, numItermax=100000, stopThr=1e-13)
    out = sinkhorn(S, eps, 2000, prior=torch.from_numpy(P).float(), prior_epsilon=eps2, prior_sign="kl")
    assert rel_err(out, B * gamma) <= 1e-4


def test_kl_prior_raises_agreement_official_sign_lowers_it():
    """DESIGN's decision, re-measured: + pulls the codes toward the prior's argmax, − pushes them away."""
    Sr, emb, protos = cosine_scores(256, 1000, D=128, seed=21)
    Sf = F.normalize(emb + 0.8 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(22)), dim=1) @ protos.t()
    none_r = sinkhorn(Sr, 0.02, 3)
    pf = sinkhorn(Sf, 0.02, 3)
    agree = lambda q: float((q.argmax(1) == pf.argmax(1)).float().mean())
    kl = sinkhorn(Sr, 0.02, 3, pf, 0.03, "kl")
    off = sinkhorn(Sr, 0.02, 3, pf, 0.03, "official")
    assert agree(kl) > agree(none_r) + 0.1
    assert agree(off) < agree(none_r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_finite_at_small_epsilon_with_scores_near_one(dtype):
    g = torch.Generator().manual_seed(0)
    S = (0.98 + 0.02 * torch.rand(300, 200, generator=g))
    S[:, :20] = -1.0   # prototypes nobody likes: exp underflows for them in fp32
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(S.numpy().astype(np.float32) / 0.01)).all()  # the plain fp32 iterate overflows
    for scores in (S, S.to(dtype)):
        q = sinkhorn(scores, 0.01, 3)
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        assert torch.allclose(q.sum(1), torch.ones(300), atol=1e-4)
        qr, qf = goca_codes(scores, scores.flip(0), GuidanceParams(0.01, 0.03, 3), backend="torch")
        assert torch.isfinite(qr).all() and torch.isfinite(qf).all()
    # the log-domain result is the float64 iterate's (which does not overflow in float64)
    assert rel_err(sinkhorn(S, 0.01, 3), plain_iterate64(S.numpy(), 0.01, 3)) <= 1e-4


def test_under_autocast_the_assignment_stays_fp32():
    S, _, _ = cosine_scores(64, 32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(S, 0.05, 3)
    assert q.dtype == torch.float32 and rel_err(q, plain_iterate64(S, 0.05, 3)) <= 1e-5


def test_keep_last_returns_the_batch_rows_of_queue_extended_scores():
    S, _, _ = cosine_scores(96, 64, seed=2)
    full = sinkhorn(S, 0.05, 3)
    assert torch.equal(sinkhorn(S, 0.05, 3, keep_last=32), full[-32:])


def test_bad_arguments_are_clear():
    S = torch.rand(8, 4)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(S, 0.0, 3)
    with pytest.raises(ValueError, match="prior_sign"):
        sinkhorn(S, 0.1, 3, prior=torch.full((8, 4), 0.25), prior_epsilon=0.1, prior_sign="plus")
    with pytest.raises(ValueError, match="cycles"):
        goca_codes(S, S, GuidanceParams(0.1, 0.1, 3, cycles=3))
    with pytest.raises((RuntimeError, ValueError), match="CUDA"):
        goca_codes(S, S, GuidanceParams(0.1, 0.1, 3), backend="cuda")   # CPU tensors, or no extension
    from goca_fast.method import cuda_kernel as kernels
    ok, why = kernels.available()
    assert ok or why  # unavailable always comes with a reason


def _worker(rank, world, port, Sr, Sf, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rows = np.array_split(np.arange(Sr.shape[0]), world)[rank]
    g = dist.group.WORLD
    q = sinkhorn(Sr[rows], 0.03, 3, group=g)
    qr, qf = goca_codes(Sr[rows], Sf[rows], GuidanceParams(0.03, 0.02, 3, cycles=2), backend="torch", group=g)
    extreme = sinkhorn((Sr[rows] > 0.2).float() * 2 - 1, 0.005, 3, group=g)  # forces the log-domain path
    torch.save({"q": q, "qr": qr, "qf": qf, "ext": extreme}, os.path.join(out_dir, f"r{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_equals_one_process_on_concatenated_batch(tmp_path):
    Sr, emb, protos = cosine_scores(203, 150, seed=9)  # odd B: ranks hold 102 and 101 rows
    Sf = F.normalize(emb + torch.randn(emb.shape, generator=torch.Generator().manual_seed(10)), dim=1) @ protos.t()
    mp.spawn(_worker, args=(2, free_port(), Sr, Sf, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    whole = {"q": sinkhorn(Sr, 0.03, 3), "ext": sinkhorn((Sr > 0.2).float() * 2 - 1, 0.005, 3)}
    whole["qr"], whole["qf"] = goca_codes(Sr, Sf, GuidanceParams(0.03, 0.02, 3, cycles=2), backend="torch")
    for key in ("q", "qr", "qf", "ext"):
        got = torch.cat([p[key] for p in parts])
        assert torch.allclose(got, whole[key], rtol=1e-5, atol=1e-7), key


# ------------------------------------------------------------------------------------ host synchronisations

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")  # each waits for the device on CUDA


def _count_host_reads(monkeypatch) -> list[str]:
    """Record every Python-level read of a tensor's value (CPU has no sync-debug mode, so count the calls)."""
    calls: list[str] = []
    for name in HOST_READS:
        def counted(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("cycles", [1, 2])
def test_one_host_read_per_call_in_the_normal_case(monkeypatch, cycles):
    Sr, emb, protos = cosine_scores(300, 500, seed=31)
    Sf = F.normalize(emb + 0.7 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(32)), dim=1) @ protos.t()
    with monkeypatch.context() as m:
        reads = _count_host_reads(m)
        qr, qf = goca_codes(Sr, Sf, GuidanceParams(0.02, 0.03, 3, cycles=cycles), backend="torch")
        per_goca_call = len(reads)
        q = sinkhorn(Sr, 0.02, 3, prior=qf, prior_epsilon=0.03)
        per_sinkhorn_call = len(reads) - per_goca_call
    assert per_goca_call <= 1 and per_sinkhorn_call <= 1, reads
    rr, rf = goca64(Sr.numpy(), Sf.numpy(), 0.02, 0.03, 3, cycles, 1.0)
    assert rel_err(qr, rr) <= 1e-5 and rel_err(qf, rf) <= 1e-5
    assert rel_err(q, plain_iterate64(Sr, 0.02, 3, qf.numpy(), 0.03)) <= 1e-5


def test_unrepresentable_pass_redoes_the_call_in_the_log_domain(monkeypatch):
    """ε=0.01, scores near ±1: exp of the row-shifted logits underflows to 0 for whole prototype columns in fp32, so
    the scaling path cannot work; the call is redone in the log domain, still with one host read."""
    g = torch.Generator().manual_seed(33)
    Sr = 0.98 + 0.02 * torch.rand(256, 150, generator=g)
    Sr[:, :15] = -1.0
    Sf = (Sr + 0.005 * torch.randn(Sr.shape, generator=g)).clamp(-1, 1).flip(0)
    shifted = torch.exp((Sr - Sr.amax(dim=1, keepdim=True)) / 0.01)
    assert float(shifted[:, :15].sum()) == 0.0  # these column sums are not representable in fp32
    with monkeypatch.context() as m:
        reads = _count_host_reads(m)
        qr, qf = goca_codes(Sr, Sf, GuidanceParams(0.01, 0.03, 3, cycles=2), backend="torch")
    assert len(reads) <= 1, reads
    assert torch.isfinite(qr).all() and torch.isfinite(qf).all()
    rr, rf = goca64(Sr.numpy(), Sf.numpy(), 0.01, 0.03, 3, 2, 1.0)  # float64: e^100 does not overflow
    assert rel_err(qr, rr) <= 1e-4 and rel_err(qf, rf) <= 1e-4


# ------------------------------------------------------------------------------------ backend per process group

BACKEND_CASES = {"rank1_unusable": (True, False), "all_usable": (True, True)}


def _backend_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from goca_fast.method import cuda_kernel as kernels
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("goca_fast")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    out: dict = {}
    g, cpu = dist.group.WORLD, torch.device("cpu")
    for case, usable in BACKEND_CASES.items():
        ok = usable[rank]
        kernels.available = lambda scores=None, ok=ok: (ok, "" if ok else f"no kernel on rank {rank} (test)")
        out[case] = resolve_backend("auto", cpu, g, num_prototypes=30)
        try:
            out[case + " cuda"] = resolve_backend("cuda", cpu, g, num_prototypes=30)
        except RuntimeError as e:
            out[case + " cuda"] = f"error: {e}"
    out["torch"] = resolve_backend("torch", cpu, g)
    try:  # the per-call "auto" would let this rank choose alone
        goca_codes(torch.rand(4, 3), torch.rand(4, 3), GuidanceParams(0.1, 0.1, 3), backend="auto", group=g)
        out["per-call auto"] = "ran"
    except ValueError as e:
        out["per-call auto"] = f"error: {e}"
    out["log"] = logged
    torch.save(out, os.path.join(out_dir, f"b{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_backend_is_decided_once_for_the_whole_group(tmp_path):
    mp.spawn(_backend_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"b{r}.pt") for r in range(2))
    for r in (r0, r1):
        assert r["rank1_unusable"] == "torch" and r["all_usable"] == "cuda" and r["torch"] == "torch"
        assert r["all_usable cuda"] == "cuda"
        err = r["rank1_unusable cuda"]
        assert err.startswith("error: backend='cuda' requested") and "rank(s) 1 of 2" in err and "\n" not in err
        assert r["per-call auto"].startswith("error: backend='auto' with a process group")
    assert "no kernel on rank 1 (test)" in r1["rank1_unusable cuda"]  # the failing rank says why
    # rank 0 logs each decision in one line, rank 1 nothing
    assert r1["log"] == [] and len(r0["log"]) == 4, r0["log"]
    assert r0["log"][0].startswith("GOCA assignment backend: torch (auto: the CUDA Sinkhorn kernel is unusable on "
                                   "rank(s) 1 of 2")
    assert r0["log"][1] == "GOCA assignment backend: cuda (the CUDA Sinkhorn kernel is usable on all 2 rank(s))"


def test_backend_in_one_process():
    from goca_fast.method import cuda_kernel as kernels
    assert not kernels.available(torch.empty(0, 30))[0]  # CPU tensors: never usable
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match=r"backend='cuda' requested .* unusable on this process \(here: "):
        resolve_backend("cuda", torch.device("cpu"), num_prototypes=30)
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("gpu", torch.device("cpu"))
