"""Evaluation of pretrained checkpoints: kNN retrieval, linear probe, fine-tuning, feature export, plots."""
from __future__ import annotations

from typing import Optional

from goca_fast.config import ConfigError


class EvalError(ConfigError):
    """A problem with the user's evaluation inputs, reported as one line (`goca-eval: error: ...`, exit 2)."""


def plural(n: int, word: str, words: Optional[str] = None) -> str:
    """"1 epoch", "2 epochs": a count with its noun in the right number (`words` for irregular plurals)."""
    return f"{n} {word if n == 1 else (words or word + 's')}"
