"""What a run runs on: the device, the autocast dtype and the loader backend, one resolver each, shared by training,
evaluation, flow extraction and the command lines."""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from goca_fast.config import ConfigError

AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_device(name: str = "auto", setting: str = "device") -> torch.device:
    """'auto' → cuda when torch sees a GPU, else cpu; 'cpu'; 'cuda' or 'cuda:N' (an error without a GPU).

    `setting` names the option in the one-line error (e.g. engine.device, --device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name} but torch sees no CUDA device ({setting}=auto or cpu runs here)")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"{setting} must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device, setting: str = "amp") -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32: 'auto' = bf16 on a GPU and fp32 on the CPU; 'bf16' | 'fp16' | 'off'.
    The Sinkhorn assignment runs in fp32 whatever this says."""
    if mode not in AMP_MODES:
        raise ConfigError(f"{setting} must be auto, bf16, fp16 or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if mode == "fp16" else torch.bfloat16


def dali_available() -> bool:
    """Whether the DALI pipelines import here (nvidia-dali installed)."""
    try:
        importlib.import_module("dali_pipelines.eval")  # imports the training pipeline and nvidia.dali too
    except ImportError:
        return False
    return True


def choose_loader(requested: str, device: torch.device, setting: str = "data.loader") -> str:
    """'cpu' or 'dali' for a `requested` loader: auto = DALI on a GPU when its pipelines import, else the CPU loader;
    'dali' where DALI does not import is an error."""
    if requested not in ("auto", "cpu", "dali"):
        raise ConfigError(f"{setting} must be auto, cpu or dali, got {requested!r}")
    if requested == "cpu" or (requested == "auto" and device.type != "cuda"):
        return "cpu"
    if dali_available():
        return "dali"
    if requested == "dali":
        raise ConfigError(f"{setting}=dali but the DALI pipelines are not available here (pip install -e '.[dali]'); "
                          f"use {setting}=cpu")
    return "cpu"
