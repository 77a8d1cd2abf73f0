"""Feature queue (SwAV/GOCA): past embeddings whose prototype scores are prepended to the batch before Sinkhorn.

One queue per stream × assigned clip. A queue is only used once it is full (the official code's "last row
non-zero" test, tracked here with a counter so that an all-zero embedding cannot fool it); the current batch's
embeddings are pushed after its codes are computed.
"""
from __future__ import annotations

import torch


def local_queue_length(queue_length: int, batch_size: int, world_size: int) -> int:
    """Per-process length: the global length rounded down to a multiple of bs·W, divided by W (official)."""
    usable = queue_length - queue_length % (batch_size * world_size)
    return usable // world_size


class FeatureQueue:
    def __init__(self, streams: int, slots: int, length: int, dim: int, device: torch.device | str = "cpu"):
        if length <= 0:
            raise ValueError(f"queue length must be positive, got {length}")
        self.embeddings = torch.zeros(streams, slots, length, dim, device=device)
        self.filled = 0

    @property
    def length(self) -> int:
        return self.embeddings.shape[2]

    @property
    def full(self) -> bool:
        return self.filled >= self.length

    def extend_scores(self, stream: int, slot: int, scores: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Prepend the queued embeddings' scores against the current prototypes (only when full)."""
        if not self.full:
            return scores
        queued = self.embeddings[stream, slot].to(prototypes.dtype) @ prototypes.t()
        return torch.cat([queued.to(scores.dtype), scores], dim=0)

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor) -> None:
        """embeddings: streams × slots × bs × D, placed at the front; the oldest rows fall off the end."""
        bs = embeddings.shape[2]
        if bs >= self.length:
            self.embeddings.copy_(embeddings[:, :, -self.length:])
        else:
            self.embeddings[:, :, bs:] = self.embeddings[:, :, :-bs].clone()
            self.embeddings[:, :, :bs] = embeddings.to(self.embeddings.dtype)
        self.filled = min(self.length, self.filled + bs)

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings.cpu(), "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if state["embeddings"].shape != self.embeddings.shape:
            raise ValueError(f"queue in checkpoint has shape {tuple(state['embeddings'].shape)}, "
                             f"this run needs {tuple(self.embeddings.shape)}")
        self.embeddings.copy_(state["embeddings"])
        self.filled = int(state["filled"])
