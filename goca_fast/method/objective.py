"""The GOCA objective: codes for the assigned clips (plain, prior-guided or mixed) and the swapped-prediction loss.

Merge modes (docs/official_behaviour.md#merge-modes):
  prior: per stream, codes from goca_codes (prior switched on from `prior_start_epoch`); RGB codes predicted from
         RGB scores, flow codes from flow scores; the two losses averaged. With prior_to="rgb" (not in the official
         code) only the RGB codes are guided, by the flow stream's own assignment, and flow is clustered alone: a
         strong symmetric prior would pull the flow clusters toward RGB's appearance clusters.
  mix:   the 2N RGB and flow clips form one list; every assigned RGB and flow clip gets its own plain Sinkhorn and
         is predicted from all 2N−1 other clips (cross-modal prediction). The official code indexes these blocks
         by *group*; we use clip indices, which coincide with the official defaults.
  avg:   one merged stream (see GocaModel), plain SwAV.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from goca_fast.method.assign import goca_codes, sinkhorn
from goca_fast.method.guidance import GuidanceParams
from goca_fast.method.loss import swapped_prediction
from goca_fast.models.goca_model import StreamOutput
from goca_fast.method.queue import FeatureQueue


@dataclass
class ObjectiveResult:
    loss: torch.Tensor
    codes: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # stream → clip → bs×K codes
    prior_on: bool = False
    queue_update: Optional[torch.Tensor] = None  # streams × slots × bs × D, to push once the step is known good


def split_blocks(t: torch.Tensor, num_clips: int) -> list[torch.Tensor]:
    return list(t.chunk(num_clips, dim=0))


@dataclass(frozen=True, kw_only=True)
class GocaObjective:
    """The objective's settings (config section `goca`, as plain values); call it on a batch's outputs."""

    merge: str                      # prior | mix | avg
    num_clips: int                  # clips per video
    assign_clips: tuple[int, ...]   # the clips that get codes
    epsilon: float
    prior_epsilon: float
    iterations: int
    cycles: int
    prior_sign: str                 # kl | official
    prior_to: str = "both"          # both | rgb: the streams whose codes the other stream's assignment guides
    prior_start_epoch: int
    temperature: float
    official_loss_scale: bool = False
    backend: str = "auto"           # assignment backend, resolved once for the process group
    group: Any = None               # process group of the Sinkhorn sums (None: single process)

    def __post_init__(self) -> None:
        if self.merge not in ("prior", "mix", "avg"):
            raise ValueError(f"merge must be prior, mix or avg, got {self.merge!r}")
        if self.prior_to not in ("both", "rgb"):
            raise ValueError(f"prior_to must be both or rgb, got {self.prior_to!r}")
        if self.prior_to == "rgb" and self.cycles != 1:
            raise ValueError("prior_to='rgb' has one guided pass: cycles must be 1")
        object.__setattr__(self, "assign_clips", tuple(self.assign_clips))

    @property
    def guidance(self) -> GuidanceParams:
        """The guided assignment's numbers, as goca_codes takes them."""
        return GuidanceParams(self.epsilon, self.prior_epsilon, self.iterations, self.cycles, self.prior_sign)

    def queue_shape(self, streams: int) -> tuple[int, int]:
        """(streams, slots) of the feature queue for this mode."""
        return (streams if self.merge != "avg" else 1), len(self.assign_clips)

    def __call__(self, outputs: dict[str, StreamOutput], prototypes: torch.Tensor, epoch: int,
                 queue: Optional[FeatureQueue] = None) -> ObjectiveResult:
        """Codes and loss for one batch. The queue is read, not written: push `queue_update` after the step."""
        names = list(outputs)
        scores = {s: split_blocks(outputs[s].scores, self.num_clips) for s in names}
        embs = {s: split_blocks(outputs[s].embeddings, self.num_clips) for s in names}
        bs = scores[names[0]][0].shape[0]
        protos = prototypes.detach()

        def with_queue(si: int, slot: int, s: torch.Tensor) -> torch.Tensor:
            return s.detach() if queue is None else queue.extend_scores(si, slot, s.detach(), protos)

        codes: dict[str, dict[int, torch.Tensor]] = {s: {} for s in names}
        prior_on = (self.merge == "prior" and len(names) == 2 and epoch >= self.prior_start_epoch)
        for slot, i in enumerate(self.assign_clips):
            ext = {s: with_queue(si, slot, scores[s][i]) for si, s in enumerate(names)}
            if prior_on and self.prior_to == "rgb":
                p_f = sinkhorn(ext["flow"], self.epsilon, self.iterations, group=self.group)
                codes["rgb"][i] = sinkhorn(ext["rgb"], self.epsilon, self.iterations, prior=p_f,
                                           prior_epsilon=self.prior_epsilon, prior_sign=self.prior_sign,
                                           group=self.group, keep_last=bs)
                codes["flow"][i] = p_f[-bs:]
            elif prior_on:
                q_r, q_f = goca_codes(ext["rgb"], ext["flow"], self.guidance, backend=self.backend, group=self.group,
                                      keep_last=bs)
                codes["rgb"][i], codes["flow"][i] = q_r, q_f
            else:
                for s in names:
                    codes[s][i] = sinkhorn(ext[s], self.epsilon, self.iterations, group=self.group, keep_last=bs)

        if self.merge == "mix":
            blocks = [b for s in names for b in scores[s]]
            mixed = {si * self.num_clips + i: codes[s][i] for si, s in enumerate(names) for i in self.assign_clips}
            loss = swapped_prediction(blocks, mixed, self.temperature)
        else:
            loss = sum(swapped_prediction(scores[s], codes[s], self.temperature) for s in names) / len(names)
        if self.official_loss_scale:
            loss = loss / len(self.assign_clips)

        update = None
        if queue is not None:
            update = torch.stack([torch.stack([embs[s][i].detach() for i in self.assign_clips]) for s in names])
        return ObjectiveResult(loss, codes, prior_on, update)
