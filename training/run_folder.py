"""The run folder every training program writes (``training/main.py`` and ``training/finetune.py``), and its lock.

One layout::

    <run>/.lock            the run lock (:class:`RunLock`): the PID of the process that holds it
    <run>/params.txt       the flags, one ``name: value`` a line
    <run>/out.log          the log
    <run>/results.jsonl    one JSON record per log step / evaluation (``training.train.MetricsLogger``)
    <run>/tensorboard/     the same numbers as TensorBoard scalars
    <run>/checkpoints/     ``epoch_{e}.pt`` / ``step_{s}.pt`` (``training.checkpoint``): ``--resume`` continues
                           from the newest that loads, at the exact step

plus what the program makes of it: the trainer's ``final_model/``, finetune's ``best.pt`` and ``results.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from diffclip.cli import UsageError

__all__ = ["RunLock"]


class RunLock:
    """An exclusive lock on a run folder for the run's life (``fcntl.flock`` on ``<run>/.lock``, holding the PID).
    The kernel drops it when the process ends, however it ends, so a killed run never blocks ``--resume``.

    Args:
        run_dir: the run folder (created when missing).
        other: what the user can give instead, for the message (``"another --name"``).

    Raises:
        UsageError: another process holds the lock; one line naming the folder and the holder's PID.
    """

    def __init__(self, run_dir: str | os.PathLike, other: str = "another run folder"):
        run_dir = Path(run_dir)
        self.created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise UsageError(f"run folder {run_dir} is in use by the run of PID {holder}: wait for it, or give "
                             f"{other}") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self, remove_if_empty: bool = False) -> None:
        """Drops the lock; with ``remove_if_empty``, a folder this lock created that holds nothing but the lock
        file is removed (a run that stopped on bad input leaves nothing behind)."""
        with contextlib.suppress(OSError):
            if remove_if_empty and self.created and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
                self.path.unlink()  # while still locked: a process that opened it before is refused
                self.path.parent.rmdir()
        with contextlib.suppress(OSError):
            os.close(self.fd)
