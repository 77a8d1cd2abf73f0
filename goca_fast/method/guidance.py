"""The numbers of the prior-guided assignment, in one value shared by the torch path and the CUDA kernel."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PriorSign = Literal["kl", "official"]


def sign_value(prior_sign: str) -> float:
    """+1 for "kl" (the prior pulls codes toward the other stream), -1 for "official" (the official code's sign)."""
    if prior_sign == "kl":
        return 1.0
    if prior_sign == "official":
        return -1.0
    raise ValueError(f"prior_sign must be 'kl' or 'official', got {prior_sign!r}")


@dataclass(frozen=True)
class GuidanceParams:
    """ε (entropy of the plain assignment), ε2 (weight of the other stream's prior), Sinkhorn iterations per pass,
    guidance cycles (1 or 2) and the prior's sign (docs/official_behaviour.md#prior-and-cycles)."""

    epsilon: float
    prior_epsilon: float
    iterations: int
    cycles: int = 1
    prior_sign: PriorSign = "kl"

    def __post_init__(self) -> None:
        if self.cycles not in (1, 2):
            raise ValueError(f"cycles must be 1 or 2, got {self.cycles}")
        sign_value(self.prior_sign)

    @property
    def sign(self) -> float:
        return sign_value(self.prior_sign)
