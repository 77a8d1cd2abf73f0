"""Optimiser, LARC and the per-iteration LR schedule.

The official recipe (docs/official_behaviour.md#optimiser) is SGD(momentum 0.9, weight decay 1e-4) over *all*
parameters in one group, wrapped in NVIDIA apex's LARC(trust_coefficient=0.001, clip=False), with an LR array
that does a linear warmup to ``base_lr * sqrt(global batch)`` and then a cosine decay. apex is not pip-installable, so :class:`LARC`
re-implements its semantics here; ``use_apex=True`` selects the real apex classes when they are installed.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

__all__ = ["LARC", "OptimSettings", "build_optimizer", "lr_schedule", "set_lr", "SCALINGS"]

SCALINGS = ("sqrt", "linear", "none")
LINEAR_SCALING_REFERENCE_BATCH = 256  # the usual "lr × batch / 256" rule (Goyal et al.)


class LARC:
    """Layer-wise adaptive rate control around any torch optimizer, with apex ``LARC`` semantics.

    Per parameter ``w`` with a gradient ``g``, in the group's weight decay ``wd`` and lr:

    * if ``||w|| != 0`` and ``||g|| != 0``:
      ``r = trust * ||w|| / (||g|| + wd * ||w|| + eps)``; with ``clip``: ``r = min(r / lr, 1)``;
      ``g <- (g + wd * w) * r``.
    * otherwise ``g`` is left as it is, and **no weight decay is applied** to that parameter in this step
      (apex only folds the decay into the gradient inside the rescaling branch, and the inner step sees wd = 0).
      For ``||w|| == 0`` that is the same as plain SGD (wd·w = 0); for ``||g|| == 0`` the parameter only moves by
      its momentum buffer. We reproduce this exactly because the official recipe was trained with it.

    The inner optimizer then steps with every LARC group's ``weight_decay`` temporarily set to 0 (restored
    afterwards, also when the step raises). Groups with ``larc=False`` (see :func:`build_optimizer`) are passed
    through untouched: no rescaling, and the inner optimizer applies their own weight decay.

    Unlike apex, the norms are never read back to the host, so a step does not synchronise the GPU.

    This is a wrapper, not a ``torch.optim.Optimizer`` subclass (like apex): ``param_groups``, ``state``,
    ``state_dict()`` and ``load_state_dict()`` are the inner optimizer's, so checkpoints hold a plain SGD state
    (as the official ones do) and ``torch.amp.GradScaler`` works with it (``scaler.step(larc)``,
    ``scaler.unscale_(larc)``). ``torch.optim.lr_scheduler`` classes reject it; use :func:`set_lr`.
    """

    def __init__(self, optimizer: Any, trust_coefficient: float = 0.001, clip: bool = False,
                 eps: float = 1e-8) -> None:
        if not trust_coefficient > 0:
            raise ValueError(f"LARC trust_coefficient must be > 0, got {trust_coefficient}")
        if not eps >= 0:
            raise ValueError(f"LARC eps must be >= 0, got {eps}")
        self.optim = optimizer  # apex's attribute name; the official logger reads optimizer.optim.param_groups
        self.trust_coefficient = float(trust_coefficient)
        self.clip = bool(clip)
        self.eps = float(eps)

    # --- the Optimizer surface, delegated -------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optim.param_groups = value

    @property
    def state(self) -> Any:
        return self.optim.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optim.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optim.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.optim.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optim.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optim.add_param_group(param_group)

    def __repr__(self) -> str:
        return (f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, eps={self.eps},\n"
                f"     optim={self.optim!r})")

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # --- the step ---------------------------------------------------------------------------------------
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Rescale the gradients in place (apex semantics), then run the inner step without weight decay."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved: list[tuple[dict[str, Any], Any]] = []
        try:
            with torch.no_grad():
                for group in self.optim.param_groups:
                    if not group.get("larc", True):
                        continue
                    wd = float(group.get("weight_decay", 0.0) or 0.0)
                    if "weight_decay" in group:
                        saved.append((group, group["weight_decay"]))
                        group["weight_decay"] = 0.0
                    self._rescale_group(group, wd)
            self.optim.step()
        finally:
            for group, wd in saved:
                group["weight_decay"] = wd
        return loss

    def _rescale_group(self, group: dict[str, Any], wd: float) -> None:
        lr = float(group["lr"])
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("LARC does not support sparse gradients")
            w_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(g)
            ratio = self.trust_coefficient * w_norm / (g_norm + w_norm * wd + self.eps)
            if self.clip:
                ratio = torch.clamp(ratio / lr, max=1.0)  # lr == 0 gives inf -> 1, as apex's min(r / lr, 1)
            apply = (w_norm != 0) & (g_norm != 0)
            # Branch-free so nothing is read back to the host; where `apply` is False both are exact no-ops
            # (g += w·0, g *= 1), i.e. apex's "leave the gradient alone".
            ratio = torch.where(apply, ratio, torch.ones_like(ratio))
            if wd != 0.0:
                g.add_(p * torch.where(apply, torch.full_like(w_norm, wd), torch.zeros_like(w_norm)))
            g.mul_(ratio)


def _is_no_decay(name: str, p: torch.Tensor) -> bool:
    """BN/LN affine weights and biases: the usual LARS/LARC exclusion (1-D tensors or ``*.bias``)."""
    return p.ndim <= 1 or name.endswith(".bias")


def build_optimizer(named_params: Iterable[tuple[str, torch.nn.Parameter]], *, lr: float,
                    momentum: float = 0.9, weight_decay: float = 1e-4, larc: bool = True,
                    trust_coefficient: float = 0.001, larc_clip: bool = False,
                    exclude_bn_bias_from_wd_and_larc: bool = False, use_apex: bool = False) -> Any:
    """SGD (+ LARC) as in the official recipe: one group with every parameter, no exclusions.

    ``exclude_bn_bias_from_wd_and_larc`` puts 1-D parameters and biases in a second group with weight decay 0
    and ``larc=False`` (plain SGD at the group lr), the common better recipe for LARS-type training.
    ``use_apex`` selects apex's ``LARC`` (and ``FusedSGD`` when present); it cannot express the exclusion,
    because apex's LARC rescales every group.

    Parameters whose ``grad`` is None at step time (e.g. frozen prototypes) are not touched at all.
    """
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    named = list(named_params)
    if not named:
        raise ValueError("build_optimizer got no parameters")
    if use_apex and exclude_bn_bias_from_wd_and_larc and larc:
        raise ValueError("exclude_bn_bias_from_wd_and_larc needs our LARC (use_apex=False): "
                         "apex's LARC rescales every group")

    if exclude_bn_bias_from_wd_and_larc:
        decay = [p for n, p in named if not _is_no_decay(n, p)]
        no_decay = [p for n, p in named if _is_no_decay(n, p)]
        groups: list[dict[str, Any]] = []
        if decay:
            groups.append({"params": decay, "weight_decay": weight_decay, "larc": True})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0, "larc": False})
    else:
        groups = [{"params": [p for _, p in named]}]

    sgd_cls: Any = torch.optim.SGD
    larc_cls: Any = LARC
    if use_apex:
        larc_cls, fused_sgd = _import_apex()
        if fused_sgd is not None:
            sgd_cls = fused_sgd
    sgd = sgd_cls(groups, lr=float(lr), momentum=momentum, weight_decay=weight_decay, nesterov=False)
    if not larc:
        return sgd
    return larc_cls(sgd, trust_coefficient=trust_coefficient, clip=larc_clip)


def _import_apex() -> tuple[Any, Any]:
    """apex's LARC class and FusedSGD (or None). The registry's ``apex`` is an unrelated package."""
    try:
        larc_cls = importlib.import_module("apex.parallel.LARC").LARC
    except (ImportError, AttributeError) as e:
        raise ImportError(f"use_apex=True but NVIDIA apex (apex.parallel.LARC) is not importable ({e}); "
                          "build it from github.com/NVIDIA/apex or set use_apex=False") from None
    try:
        fused_sgd = importlib.import_module("apex.optimizers").FusedSGD
    except (ImportError, AttributeError):
        fused_sgd = None
    return larc_cls, fused_sgd


def lr_schedule(base_lr: float, final_lr: float, start_warmup: float, warmup_iters: int, total_iters: int,
                world_batch: int, scaling: str = "sqrt", fix_lr: bool = False) -> np.ndarray:
    """The official per-iteration LR array (length ``total_iters``), index it with the global iteration.

    peak = base_lr · sqrt(world_batch) ("sqrt", official), base_lr · world_batch / 256 ("linear") or base_lr
    ("none"). Warmup: ``linspace(start_warmup, peak, warmup_iters)`` with the endpoint included, then
    ``final + ½(peak − final)(1 + cos(π t / (total − warmup)))`` for t in [0, total − warmup). So the peak
    appears twice and, exactly as officially, ``start_warmup`` is absolute and may exceed the peak for small
    batches.
    ``fix_lr`` makes every entry ``final_lr``.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    if int(total_iters) != total_iters or total_iters < 1:
        raise ValueError(f"total_iters must be a positive integer, got {total_iters}")
    if int(warmup_iters) != warmup_iters or warmup_iters < 0:
        raise ValueError(f"warmup_iters must be a non-negative integer, got {warmup_iters}")
    if warmup_iters > total_iters:
        raise ValueError(f"warmup_iters ({warmup_iters}) exceeds total_iters ({total_iters})")
    if int(world_batch) != world_batch or world_batch < 1:
        raise ValueError(f"world_batch must be a positive integer, got {world_batch}")
    for name, v in (("base_lr", base_lr), ("final_lr", final_lr), ("start_warmup", start_warmup)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    total_iters, warmup_iters = int(total_iters), int(warmup_iters)
    if fix_lr:
        return np.full(total_iters, float(final_lr), dtype=np.float64)

    if scaling == "sqrt":
        peak = base_lr * math.sqrt(world_batch)
    elif scaling == "linear":
        peak = base_lr * world_batch / LINEAR_SCALING_REFERENCE_BATCH
    else:
        peak = float(base_lr)
    warmup = np.linspace(start_warmup, peak, warmup_iters, dtype=np.float64)
    n_cos = total_iters - warmup_iters
    t = np.arange(n_cos, dtype=np.float64)
    cosine = final_lr + 0.5 * (peak - final_lr) * (1.0 + np.cos(np.pi * t / max(n_cos, 1)))
    return np.concatenate([warmup, cosine])


def set_lr(optimizer: Any, lr: float) -> None:
    """Set every group's lr. Stored as a python float so the optimizer state stays ``weights_only``-loadable
    (a numpy scalar from the schedule array would not be)."""
    lr = float(lr)
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass(frozen=True)
class OptimSettings:
    """The optimiser and its LR schedule as plain values (made by `goca_fast.plan` from `optim.*`)."""

    epochs: int
    base_lr: float
    lr_scaling: str
    final_lr: float
    start_warmup: float
    warmup_epochs: int
    fix_lr: bool
    momentum: float
    weight_decay: float
    larc: bool
    larc_trust: float
    larc_clip: bool
    exclude_bn_bias: bool
    use_apex: bool

    def schedule(self, iters_per_epoch: int, global_batch: int) -> np.ndarray:
        """The per-iteration LR array of the whole run (see :func:`lr_schedule`)."""
        return lr_schedule(self.base_lr, self.final_lr, self.start_warmup,
                           warmup_iters=iters_per_epoch * self.warmup_epochs, total_iters=iters_per_epoch * self.epochs,
                           world_batch=global_batch, scaling=self.lr_scaling, fix_lr=self.fix_lr)

    def optimizer(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float) -> Any:
        """SGD (+ LARC) over `named_params` starting at `lr` (see :func:`build_optimizer`)."""
        return build_optimizer(named_params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               larc=self.larc, trust_coefficient=self.larc_trust, larc_clip=self.larc_clip,
                               exclude_bn_bias_from_wd_and_larc=self.exclude_bn_bias, use_apex=self.use_apex)
