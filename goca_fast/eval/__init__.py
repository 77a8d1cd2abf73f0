"""Evaluation of pretrained checkpoints: kNN retrieval, linear probe, fine-tuning, feature export, plots."""
from __future__ import annotations

from goca_fast.config import ConfigError


class EvalError(ConfigError):
    """A problem with the user's evaluation inputs, reported as one line (`goca-eval: error: ...`, exit 2)."""
