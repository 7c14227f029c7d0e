"""Process-group set-up: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), SLURM (``SLURM_PROCID``...) or one
plain process. NCCL on CUDA, gloo on CPU; multi-node through torchrun's rendezvous or SLURM's variables."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffclip.errors import RunError
from diffclip.runtime import resolve_device

__all__ = ["DistInfo", "init_distributed", "world_info_from_env", "barrier", "all_reduce_mean", "cleanup"]


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def _first_slurm_host() -> str | None:
    """The first hostname of the job's node list (``node[03-05,09]`` -> ``node03``)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    return (m.group(1) + (m.group(2) or "")) if m else None


def world_info_from_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's variables, else SLURM's, else ``(0, 0, 1)``.

    Under SLURM (``srun`` starting one task per device) ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` are
    copied to ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``, and ``MASTER_ADDR`` (when unset) is the job's first node
    (``scontrol show hostnames``), ``MASTER_PORT`` 29500 unless set.
    """
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        rank, local_rank = int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0))
        world = int(os.environ["SLURM_NTASKS"])
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
        if "MASTER_ADDR" not in os.environ:
            host = _first_slurm_host()
            if host is None:
                raise RunError("SLURM job without MASTER_ADDR: export MASTER_ADDR (the first node's hostname)")
            os.environ["MASTER_ADDR"] = host
        os.environ.setdefault("MASTER_PORT", "29500")
        return rank, local_rank, world
    return 0, 0, 1


def init_distributed(device: str | None = "auto", backend: str | None = None) -> DistInfo:
    """Initialises the default process group when there is more than one process.

    Args:
        device: a name for :func:`diffclip.runtime.resolve_device`: "auto"/None (cuda when available, else mps,
            else cpu), "cpu", "cuda" (this process uses ``cuda:LOCAL_RANK``), "cuda:N" or "mps".
        backend: default "nccl" on CUDA, "gloo" on CPU.

    Returns:
        The :class:`DistInfo` of this process.

    Raises:
        ValueError: an unknown device name, or a device this machine lacks (one line naming it).
    """
    rank, local_rank, world_size = world_info_from_env()
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    info = DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, distributed=world_size > 1)
    if info.distributed and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    return info


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over the ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if info.distributed:
        dist.all_reduce(value)
        value /= info.world_size
    return value


def cleanup(info: DistInfo) -> None:
    """Destroys the process group after a barrier (a rank leaving while a peer still talks to it can abort)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
