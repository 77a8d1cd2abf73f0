"""Process-group set-up from torchrun or SLURM environment variables, and small collective helpers.

Single-process runs need no environment at all; every helper is a no-op then. Launchers: torchrun (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set by it), or `srun` directly, one task per GPU (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID; the rendezvous host is the first host of the step's node list, MASTER_PORT or 29500).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from goca_fast.config import ConfigError
from goca_fast.runtime.device import resolve_device

# How long a collective may wait for the other ranks before the job ends (engine.dist_timeout_s). It must cover the
# longest stretch one rank works alone while the others wait: a checkpoint write, the kNN monitor on rank 0.
DEFAULT_DIST_TIMEOUT_S = 300.0


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


def _expand_ranges(ranges: str) -> list[str]:
    """'01-03,7' → ['01', '02', '03', '7']: SLURM keeps the zero padding of each range's first number."""
    out = []
    for part in ranges.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r}")
        if sep and int(hi) < int(lo):
            raise ValueError(f"range {part!r} runs backwards")
        out.extend([lo] if not sep else [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)])
    return out


def _split_hosts(text: str) -> list[str]:
    """'a[1-2],b3' → ['a[1-2]', 'b3']: commas inside brackets separate ranges, not hosts."""
    items, depth, current = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError("unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise ValueError("unbalanced brackets")
    return items + [current]


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in full, in order: 'node[01-03]' → node01 node02 node03; 'a,b' → a b;
    'gpu-[1,3-5]' → gpu-1 gpu-3 gpu-4 gpu-5; 'a[1-2],b3' → a1 a2 b3; 'r[1-2]n[1-2]' → r1n1 r1n2 r2n1 r2n2."""
    hosts: list[str] = []
    try:
        for item in _split_hosts(nodelist.strip()):
            if not item or "[]" in item:
                raise ValueError("empty host name or range")
            names = [""]
            for text, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
                suffixes = [text + r for r in _expand_ranges(ranges)] if ranges else [text]
                names = [n + s for n in names for s in suffixes]
            hosts.extend(names)
    except ValueError as e:
        raise ConfigError(f"cannot parse SLURM node list {nodelist!r}: {e}") from None
    return hosts


def slurm_hostnames(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list: `scontrol show hostnames` where SLURM is installed, else our own parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_slurm_nodelist(nodelist)


def env_rank_info(env: Optional[dict] = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) when neither is set."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def is_elastic_restart(env: Optional[dict] = None) -> bool:
    """Whether torchrun restarted this worker after a failure (--max-restarts): the run then continues from its
    latest checkpoint."""
    env = os.environ if env is None else env
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def rendezvous_host(env: Optional[dict] = None) -> str:
    """MASTER_ADDR, else the first host of the SLURM step's (or job's) node list, else 127.0.0.1."""
    env = dict(os.environ if env is None else env)
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return slurm_hostnames(nodelist)[0] if nodelist else "127.0.0.1"


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> DistInfo:
    """Join the process group if launched by torchrun/SLURM; pick the device (cuda:<local rank> or cpu).

    `timeout_s` bounds every collective: a rank that dies or hangs ends the others after at most that long (gloo
    raises, NCCL's watchdog aborts the process) instead of leaving the job idle on its allocation."""
    rank, world, local = env_rank_info()
    use_cuda = resolve_device(device, "engine.device").type == "cuda"  # each rank takes the GPU of its local rank
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        os.environ["MASTER_ADDR"] = rendezvous_host()
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(rank), str(world)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, dev)


_COLLECTIVE_FAILURE = re.compile(r"timed out|connection (closed|reset)|broken pipe|NCCL (error|communicator)|"
                                 r"ProcessGroup|gloo", re.IGNORECASE)


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` means another rank died or stopped responding (as opposed to a bug in this rank)."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and dist.is_initialized() and bool(_COLLECTIVE_FAILURE.search(str(error))))


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
