"""LARC, build_optimizer and the LR schedule, checked against independent hand computations."""
from __future__ import annotations

import copy
import math
import sys
import types

import numpy as np
import pytest
import torch

from goca_fast.train.optim import LARC, build_optimizer, lr_schedule, set_lr


# --- an independent re-derivation of apex LARC + torch SGD(momentum, dampening 0), in numpy float64 -----------
def manual_larc_sgd(weights, grads_per_step, lrs, momentum, wd, trust, clip, eps=1e-8):
    ws = [np.array(w, dtype=np.float64) for w in weights]
    bufs = [None] * len(ws)
    for grads, lr in zip(grads_per_step, lrs):
        for i, g in enumerate(grads):
            if g is None:
                continue
            w = ws[i]
            wn, gn = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
            if wn != 0 and gn != 0:
                r = trust * wn / (gn + wd * wn + eps)
                if clip:
                    r = min(r / lr, 1.0)
                d = (g + wd * w) * r
            else:  # apex leaves the gradient alone, and the inner step runs with wd = 0
                d = g.copy()
            bufs[i] = d.copy() if bufs[i] is None else momentum * bufs[i] + d
            ws[i] = w - lr * bufs[i]
    return ws


def _params(rng, shapes):
    return [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s))) for s in shapes]


def _run_larc(params, grads_per_step, lrs, momentum, wd, trust, clip):
    opt = LARC(torch.optim.SGD(params, lr=lrs[0], momentum=momentum, weight_decay=wd),
               trust_coefficient=trust, clip=clip)
    for grads, lr in zip(grads_per_step, lrs):
        set_lr(opt, lr)
        for p, g in zip(params, grads):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()
        assert opt.param_groups[0]["weight_decay"] == wd  # restored after every step
    return opt


@pytest.mark.parametrize("clip", [False, True])
def test_larc_matches_manual_apex_formula(clip):
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (5,), (2, 2, 3)]
    params = _params(rng, shapes)
    w0 = [p.detach().numpy().copy() for p in params]
    grads = [[rng.standard_normal(s) * 10 ** rng.uniform(-3, 1) for s in shapes] for _ in range(5)]
    lrs = [0.5, 1.0, 3.0, 2.0, 0.01]
    _run_larc(params, grads, lrs, momentum=0.9, wd=1e-4, trust=0.001, clip=clip)
    expected = manual_larc_sgd(w0, grads, lrs, momentum=0.9, wd=1e-4, trust=0.001, clip=clip)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-12, atol=1e-14)
    # LARC really changed things: plain SGD would have moved far more with these lrs
    assert not np.allclose(params[0].detach().numpy(), w0[0] - 0.5 * grads[0][0], atol=1e-3)


def test_larc_float32_close_to_manual():
    rng = np.random.default_rng(1)
    shapes = [(8, 4), (4,)]
    params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s)).float()) for s in shapes]
    w0 = [p.detach().double().numpy() for p in params]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    opt = LARC(torch.optim.SGD(params, lr=1.0, momentum=0.9, weight_decay=1e-4))
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = torch.from_numpy(gi.copy())
        opt.step()
    expected = manual_larc_sgd(w0, [[x.astype(np.float64) for x in g] for g in grads], [1.0] * 3,
                               momentum=0.9, wd=1e-4, trust=0.001, clip=False)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().double().numpy(), e, rtol=1e-5, atol=1e-6)


def test_larc_zero_norm_params_get_plain_update_without_weight_decay():
    lr, wd = 0.1, 0.5
    zero_w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))      # ||w|| = 0
    zero_g = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))  # gets ||g|| = 0
    no_grad = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))  # grad None: untouched
    opt = LARC(torch.optim.SGD([zero_w, zero_g, no_grad], lr=lr, momentum=0.9, weight_decay=wd))
    g = torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)
    zero_w.grad = g.clone()
    zero_g.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(zero_w.detach(), -lr * g, rtol=0, atol=0)   # raw gradient, no rescale
    torch.testing.assert_close(zero_g.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64), rtol=0, atol=0)
    assert no_grad.item() == 3.0 and no_grad not in opt.state  # no step state, no decay
    assert opt.param_groups[0]["weight_decay"] == wd
    # second step: zero_w is now non-zero -> rescaled; zero_g still zero-grad -> stays (buffer is zero)
    zero_w.grad = g.clone()
    zero_g.grad = torch.zeros(2, dtype=torch.float64)
    expected = manual_larc_sgd([np.zeros(3)], [[g.numpy()], [g.numpy()]], [lr, lr], 0.9, wd, 0.001, False)[0]
    opt.step()
    np.testing.assert_allclose(zero_w.detach().numpy(), expected, rtol=1e-12)
    torch.testing.assert_close(zero_g.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64), rtol=0, atol=0)


def test_larc_restores_weight_decay_when_inner_step_raises():
    p = torch.nn.Parameter(torch.ones(2))
    inner = torch.optim.SGD([p], lr=0.1, weight_decay=0.25)
    opt = LARC(inner)

    def boom():
        raise RuntimeError("inner failure")

    inner.step = boom
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="inner failure"):
        opt.step()
    assert opt.param_groups[0]["weight_decay"] == 0.25


def test_larc_group_excluded_is_plain_sgd_with_its_weight_decay():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = LARC(torch.optim.SGD([{"params": [w]}, {"params": [b], "larc": False, "weight_decay": 0.1}],
                               lr=0.2, momentum=0.9, weight_decay=1e-4))
    w.grad = torch.tensor([0.1, 0.1], dtype=torch.float64)
    b.grad = torch.tensor([0.3], dtype=torch.float64)
    opt.step()
    assert b.item() == pytest.approx(0.5 - 0.2 * (0.3 + 0.1 * 0.5), abs=1e-15)
    exp_w = manual_larc_sgd([np.array([1.0, 2.0])], [[np.array([0.1, 0.1])]], [0.2], 0.9, 1e-4, 0.001, False)[0]
    np.testing.assert_allclose(w.detach().numpy(), exp_w, rtol=1e-12)


def test_larc_state_dict_is_inner_sgd_state_and_resumes_identically():
    torch.manual_seed(0)
    make = lambda: torch.nn.Linear(4, 3)  # noqa: E731
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a.named_parameters(), lr=0.5)
    x = torch.randn(8, 4)
    for _ in range(2):
        opt_a.zero_grad()
        a(x).pow(2).sum().backward()
        opt_a.step()
    sd = copy.deepcopy(opt_a.state_dict())  # state_dict() shares the live momentum buffers, a file would not
    assert set(sd) == {"state", "param_groups"} and "momentum_buffer" in sd["state"][0]
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b.named_parameters(), lr=0.5)
    opt_b.load_state_dict(sd)
    for m, o in ((a, opt_a), (b, opt_b)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def _grad_scaler():
    try:
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    except (AttributeError, TypeError, RuntimeError) as e:  # older torch: no CPU GradScaler
        pytest.skip(f"torch.amp.GradScaler('cpu') unavailable in torch {torch.__version__}: {e}")


def test_larc_works_with_grad_scaler():
    torch.manual_seed(0)
    ref, amp = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    amp.load_state_dict(ref.state_dict())
    opt_ref = build_optimizer(ref.named_parameters(), lr=0.7)
    opt_amp = build_optimizer(amp.named_parameters(), lr=0.7)
    scaler = _grad_scaler()
    x = torch.randn(16, 5)
    for _ in range(3):
        opt_ref.zero_grad()
        ref(x).pow(2).mean().backward()
        opt_ref.step()
        opt_amp.zero_grad()
        scaler.scale(amp(x).pow(2).mean()).backward()
        scaler.unscale_(opt_amp)            # the grad-clipping path: explicit unscale, then step
        scaler.step(opt_amp)
        scaler.update()
    for pr, pa in zip(ref.parameters(), amp.parameters()):
        torch.testing.assert_close(pr, pa, rtol=1e-6, atol=1e-7)
    assert opt_amp.param_groups[0]["weight_decay"] == 1e-4

    # an inf gradient: the step (and LARC) is skipped, parameters unchanged, the scale backs off
    before = [p.detach().clone() for p in amp.parameters()]
    scale_before = scaler.get_scale()
    opt_amp.zero_grad()
    scaler.scale(amp(x).pow(2).mean()).backward()
    amp.weight.grad[0, 0] = float("inf")
    scaler.step(opt_amp)
    scaler.update()
    for p, q in zip(amp.parameters(), before):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    assert scaler.get_scale() < scale_before


# --- build_optimizer ------------------------------------------------------------------------------------
def _net():
    return torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.Flatten(),
                               torch.nn.Linear(8, 3, bias=False))


def test_build_optimizer_official_single_group():
    net = _net()
    opt = build_optimizer(net.named_parameters(), lr=0.3)
    assert isinstance(opt, LARC) and isinstance(opt.optim, torch.optim.SGD)
    assert opt.trust_coefficient == 0.001 and opt.clip is False and opt.eps == 1e-8
    (g,) = opt.param_groups
    assert len(g["params"]) == len(list(net.parameters()))
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.3, 0.9, 1e-4, False)
    assert opt.param_groups[0]["lr"] == 0.3
    assert isinstance(build_optimizer(net.named_parameters(), lr=0.3, larc=False), torch.optim.SGD)


def test_build_optimizer_exclusion_groups():
    net = _net()
    opt = build_optimizer(net.named_parameters(), lr=0.3, exclude_bn_bias_from_wd_and_larc=True)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "3.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "1.weight"]
    assert decay["weight_decay"] == 1e-4 and decay["larc"] is True
    assert no_decay["weight_decay"] == 0.0 and no_decay["larc"] is False


def test_build_optimizer_bad_args():
    net = _net()
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(net.named_parameters(), lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(net.named_parameters(), lr=-1)
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer([], lr=0.1)


def test_use_apex_without_apex_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # makes `import apex...` raise ImportError
    with pytest.raises(ImportError, match="apex"):
        build_optimizer(_net().named_parameters(), lr=0.1, use_apex=True)


def test_use_apex_selects_apex_classes(monkeypatch):
    class FakeApexLARC(LARC):
        pass

    class FakeFusedSGD(torch.optim.SGD):
        pass

    mods = {"apex": types.ModuleType("apex"), "apex.parallel": types.ModuleType("apex.parallel"),
            "apex.parallel.LARC": types.ModuleType("apex.parallel.LARC"),
            "apex.optimizers": types.ModuleType("apex.optimizers")}
    mods["apex.parallel.LARC"].LARC = FakeApexLARC
    mods["apex.optimizers"].FusedSGD = FakeFusedSGD
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    opt = build_optimizer(_net().named_parameters(), lr=0.1, use_apex=True)
    assert type(opt) is FakeApexLARC and type(opt.optim) is FakeFusedSGD
    with pytest.raises(ValueError, match="apex"):
        build_optimizer(_net().named_parameters(), lr=0.1, use_apex=True, exclude_bn_bias_from_wd_and_larc=True)


# --- LR schedule -----------------------------------------------------------------------------------------
PEAK_640 = 3.794733192202055  # 0.15 * sqrt(640), by hand: sqrt(640) = 25.298221281347036


def test_lr_schedule_official_values():
    s = lr_schedule(base_lr=0.15, final_lr=0.0006, start_warmup=0.3, warmup_iters=10, total_iters=30,
                    world_batch=640)
    assert s.shape == (30,) and s.dtype == np.float64
    assert s[0] == pytest.approx(0.3, abs=1e-15)
    assert s[3] == pytest.approx(0.3 + 3 * (PEAK_640 - 0.3) / 9, rel=1e-12)  # linspace step = (peak-start)/9
    assert s[9] == pytest.approx(PEAK_640, rel=1e-12)       # endpoint included
    assert s[10] == pytest.approx(PEAK_640, rel=1e-12)      # cosine t=0: the peak appears twice
    assert s[20] == pytest.approx((PEAK_640 + 0.0006) / 2, rel=1e-12)  # t=10 of 20: cos(pi/2)=0
    # last: t=19 of 20, cos(19 pi/20) = -cos(pi/20) = -0.9876883405951378
    assert s[29] == pytest.approx(0.0006 + 0.5 * (PEAK_640 - 0.0006) * (1 - 0.9876883405951378), rel=1e-12)
    assert np.all(np.diff(s[10:]) < 0)


def test_lr_schedule_scalings_and_fix_lr():
    lin = lr_schedule(0.1, 0.0, 0.0, 2, 4, world_batch=512, scaling="linear")
    assert lin[1] == pytest.approx(0.2)
    none = lr_schedule(0.1, 0.0, 0.0, 2, 4, world_batch=512, scaling="none")
    assert none[1] == pytest.approx(0.1)
    fixed = lr_schedule(0.15, 0.0048, 0.3, 10, 50, world_batch=64, fix_lr=True)
    assert fixed.shape == (50,) and np.all(fixed == 0.0048)
    no_warm = lr_schedule(0.1, 0.0, 0.0, 0, 4, world_batch=4)
    assert no_warm[0] == pytest.approx(0.2) and no_warm[2] == pytest.approx(0.1)
    all_warm = lr_schedule(0.1, 0.0, 0.0, 5, 5, world_batch=1)
    np.testing.assert_allclose(all_warm, [0.0, 0.025, 0.05, 0.075, 0.1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(warmup_iters=11, total_iters=10), "exceeds total_iters"),
    (dict(total_iters=0), "total_iters"),
    (dict(warmup_iters=-1), "warmup_iters"),
    (dict(world_batch=0), "world_batch"),
    (dict(scaling="cubic"), "scaling"),
    (dict(base_lr=float("nan")), "base_lr"),
    (dict(final_lr=-0.1), "final_lr"),
])
def test_lr_schedule_bad_args(kwargs, match):
    args = dict(base_lr=0.1, final_lr=0.0, start_warmup=0.0, warmup_iters=2, total_iters=10, world_batch=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match) as e:
        lr_schedule(**args)
    assert "\n" not in str(e.value)


def test_set_lr_stores_python_float_so_state_is_weights_only_loadable(tmp_path):
    opt = build_optimizer(_net().named_parameters(), lr=0.1)
    sched = lr_schedule(0.15, 0.0048, 0.3, 2, 5, world_batch=8)
    set_lr(opt, sched[3])
    assert type(opt.param_groups[0]["lr"]) is float
    torch.save(opt.state_dict(), tmp_path / "o.pth")
    loaded = torch.load(tmp_path / "o.pth", weights_only=True)
    assert loaded["param_groups"][0]["lr"] == pytest.approx(sched[3])
