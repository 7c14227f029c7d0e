"""Process-group set-up: torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), SLURM (``SLURM_PROCID``...) or one
plain process. NCCL on CUDA, gloo on CPU; multi-node through torchrun's rendezvous or SLURM's variables. Preemption:
:class:`PreemptionSignal` records SIGTERM/SIGUSR1/SIGUSR2 and the ranks agree once per step to stop together."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffclip.errors import InputError, RunError
from diffclip.runtime import resolve_device

__all__ = ["DistInfo", "init_distributed", "world_info_from_env", "first_host", "barrier", "all_reduce_mean", "cleanup",
           "PreemptionSignal", "PREEMPTION_SIGNALS", "preemption_signals_blocked", "PREEMPTED_EXIT", "requeue_slurm_job"]

log = logging.getLogger("diffclip.train")

#: SIGTERM (a scheduler's kill, torchrun forwarding it), SIGUSR1 (SLURM's ``--signal=USR1@120``), SIGUSR2 (submitit)
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
#: the exit status of a run stopped by a preemption signal after its checkpoint (sysexits' EX_TEMPFAIL: try again)
PREEMPTED_EXIT = 75


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


def first_host(nodelist: str) -> str:
    """The first hostname of a SLURM node list, compressed or not (``gpu[01-04]`` -> ``gpu01``,
    ``node[03-05,09],login1`` -> ``node03``), expanded by python-hostlist (SLURM's own syntax).

    Raises:
        InputError: a node list that does not parse, or holds no host (one line naming it)."""
    import hostlist

    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as e:
        raise InputError(f"SLURM_JOB_NODELIST {nodelist!r}: not a node list ({e})") from None
    if not hosts:
        raise InputError(f"SLURM_JOB_NODELIST {nodelist!r}: no host in it")
    return hosts[0]


def world_info_from_env() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from torchrun's variables, else SLURM's, else ``(0, 0, 1)``.

    Under SLURM (``srun`` starting one task per device) ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` are
    copied to ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``, and ``MASTER_ADDR`` (when unset) is the first node of
    ``SLURM_JOB_NODELIST`` (:func:`first_host`), ``MASTER_PORT`` 29500 unless set.

    Raises:
        RunError: a SLURM job with neither ``MASTER_ADDR`` nor a node list. InputError: a node list that does not
            parse.
    """
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        rank, local_rank = int(os.environ["SLURM_PROCID"]), int(os.environ.get("SLURM_LOCALID", 0))
        world = int(os.environ["SLURM_NTASKS"])
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
        if "MASTER_ADDR" not in os.environ:
            nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
            if not nodelist:
                raise RunError("SLURM job without MASTER_ADDR: export MASTER_ADDR (the first node's hostname)")
            os.environ["MASTER_ADDR"] = first_host(nodelist)
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


class PreemptionSignal:
    """Records the preemption signals this process receives; the handler does nothing else (the checkpoint is written
    by the training loop, outside it, so a second signal during the save changes nothing).

    Install before any data-loader worker is forked: workers inherit the handler, so a signal sent to the whole
    process group (torchrun's ``killpg``) does not kill them mid-step. Handlers are installed from the main thread
    only (elsewhere Python refuses); :meth:`restore` puts the previous ones back.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.received: signal.Signals | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def agreed(self, info: DistInfo) -> bool:
        """Whether any rank has received a signal: one ``all_reduce(MAX)`` of a 0/1 flag, so every rank returns the
        same answer after the same step. Call on every rank, at the same point of each step."""
        flag = self.received is not None
        if info.distributed:
            t = torch.tensor([int(flag)], dtype=torch.int32, device=info.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


_KILL_WORKERS_AT_EXIT = False


def _kill_blocked_workers() -> None:
    """At exit, SIGKILLs the child processes still alive (data-loader workers left by an error): they block SIGTERM,
    so multiprocessing's exit hook, which terminates daemonic children with SIGTERM and then joins them, would hang.
    atexit runs hooks last-registered first, so this one runs before multiprocessing's."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


@contextlib.contextmanager
def preemption_signals_blocked():
    """Blocks the preemption signals in this thread while data-loader workers are forked (they inherit the mask):
    torch's workers answer SIGTERM from anyone but their parent by dying, and torchrun sends it to the whole
    process group. A signal arriving meanwhile stays pending and is delivered (recorded) on leaving."""
    global _KILL_WORKERS_AT_EXIT
    if not _KILL_WORKERS_AT_EXIT:  # once: before multiprocessing's own exit hook, which would wait for them forever
        atexit.register(_kill_blocked_workers)
        _KILL_WORKERS_AT_EXIT = True
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def requeue_slurm_job() -> bool:
    """``scontrol requeue $SLURM_JOB_ID``: puts this SLURM job back in the queue (it restarts with the same script).
    Returns whether scontrol succeeded; a missing job id, scontrol or a refusal is logged as a warning."""
    job = os.environ.get("SLURM_JOB_ID")
    scontrol = shutil.which("scontrol")
    if not job or not scontrol:
        log.warning("--requeue-on-preempt: %s; the job is not requeued",
                    "SLURM_JOB_ID is not set (not a SLURM job)" if not job else "scontrol is not on PATH")
        return False
    out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if out.returncode:
        log.warning("--requeue-on-preempt: scontrol requeue %s failed (status %d): %s", job, out.returncode,
                    (out.stderr or out.stdout).strip().splitlines()[-1:] or "")
        return False
    log.info("requeued SLURM job %s (scontrol requeue)", job)
    return True
