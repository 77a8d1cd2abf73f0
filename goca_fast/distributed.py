"""Process-group set-up from torchrun or SLURM environment variables, and small collective helpers.

Single-process runs need no environment at all; every helper is a no-op then.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from goca_fast.config import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        """The process group for collectives, or None when single-process."""
        return dist.group.WORLD if self.enabled else None


def first_slurm_host(nodelist: str) -> str:
    """'node[03-05,07],gpu1' → 'node03' (enough to find the rendezvous host without scontrol)."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def env_rank_info(env: Optional[dict] = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) when neither is set."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group if launched by torchrun/SLURM; pick the device (cuda:<local rank> or cpu)."""
    rank, world, local = env_rank_info()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("engine.device=cuda but torch sees no CUDA device (engine.device=auto or cpu runs here)")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = first_slurm_host(os.environ.get("SLURM_NODELIST", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
    return DistInfo(rank, world, local, dev)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
