"""Training checkpoints of every training program (``training/main.py``, ``training/finetune.py``): atomic saves
and exact resumption, mid-epoch included.

A checkpoint is one file ``{run}/checkpoints/epoch_{e}.pt`` (end of epoch ``e``, 1-based as in open_clip) or
``step_{s}.pt`` (after optimizer step ``s``), written by rank 0 atomically (:func:`diffclip.files.save_torch`:
a temporary name, then a rename), so a killed run leaves either the previous or the new file, never half a file.
``--resume latest`` takes the newest checkpoint that loads (:func:`find_loadable`), passing over (and logging)
newer files that are empty, truncated or not checkpoints. It holds:

* ``state_dict`` (the model weights, no ``module.`` prefix: :func:`diffclip.hub.read_state_dict` and
  ``diffclip.create_model(name, pretrained=file)`` read it; with ``--siglip`` it holds ``logit_bias``),
* ``optimizer``, ``scaler``, ``step`` (optimizer steps done), ``epoch`` (the epoch to continue, 0-based),
  ``batches_done`` (micro-batches of that epoch already consumed: the data position),
* ``rng``: the Python, NumPy, torch (and CUDA) generator states of every rank,
* ``model_name``, ``model_config`` (``DiffCLIP.model_config``: a resume with a ``--model`` of another config is
  refused, naming the fields that differ), ``args`` (the flags, for reference), ``world_size``,
* and what the program adds (``extra``): finetune's classifier recipe, best accuracy, times and epoch sums.

Only tensors, containers and primitives are stored, so :func:`diffclip.hub.torch_load` (``weights_only``) reads it.
"""

from __future__ import annotations

import logging
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from diffclip.errors import InputError
from diffclip.files import save_torch
from diffclip.hub import load_state_dict, torch_load

from .distributed import DistInfo

__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "read_checkpoint", "find_latest",
           "find_loadable", "checkpoint_step"]

log = logging.getLogger("diffclip.train")

_NAME = re.compile(r"^(epoch|step)_(\d+)\.pt$")


def rng_state() -> dict:
    """The generator states of this process (Python, NumPy, torch CPU and CUDA), as tensors and primitives."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng(info: DistInfo) -> list[dict]:
    mine = rng_state()
    if not info.distributed:
        return [mine]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return out


def checkpoint_step(path: str | Path, steps_per_epoch: int) -> int:
    """The optimizer step a checkpoint file name stands for (``epoch_e`` = ``e * steps_per_epoch``)."""
    m = _NAME.match(Path(path).name)
    if not m:
        raise InputError(f"not a checkpoint name: {path}")
    return int(m.group(2)) * (steps_per_epoch if m.group(1) == "epoch" else 1)


def find_latest(ckpt_dir: str | Path, steps_per_epoch: int) -> Path | None:
    """The checkpoint of the highest step in ``ckpt_dir`` (temporary files ignored), or None."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name)]
    if not found:
        return None
    # at equal steps an epoch_ file (written after the epoch's evaluation) wins over a step_ file
    return max(found, key=lambda p: (checkpoint_step(p, steps_per_epoch), p.name.startswith("epoch")))


def save_checkpoint(path: str | Path, state, batches_done: int, info: DistInfo, *, epoch: int | None = None,
                    delete: list[Path] | None = None, extra: dict | None = None) -> None:
    """Writes a checkpoint of ``state`` atomically; call on every rank.

    Args:
        path: the final file name.
        state: the run: anything with ``model``, ``optimizer``, ``scaler`` (or None), ``step``, ``epoch`` and
            ``args`` (an ``argparse.Namespace`` with ``model``), as ``training.train.TrainState``.
        batches_done: micro-batches of ``epoch`` already consumed.
        info: this process's place; the RNG states of all ranks are gathered to rank 0.
        epoch: the epoch to continue from (default ``state.epoch``).
        delete: older checkpoints to remove once the new one is in place (rank 0).
        extra: more entries for the checkpoint (tensors, containers and primitives only).
    """
    from .train import unwrap_model

    rngs = _gather_rng(info)
    if info.is_master:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = unwrap_model(state.model)
        ckpt = {"state_dict": model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                "step": state.step, "epoch": state.epoch if epoch is None else epoch, "batches_done": batches_done,
                "rng": rngs, "world_size": info.world_size, "model_name": state.args.model,
                "model_config": getattr(model, "model_config", None),
                "args": {k: v for k, v in vars(state.args).items() if isinstance(v, (str, int, float, bool, type(None)))},
                **(extra or {})}
        save_torch(path, ckpt)
        log.info("saved checkpoint %s (step %d, epoch %d, %d batches into it)", path, state.step, ckpt["epoch"],
                 batches_done)
        for old in delete or []:
            if old != path and old.exists():
                old.unlink()
    if info.distributed:
        dist.barrier()


def read_checkpoint(path: str | Path) -> dict:
    """Reads a training checkpoint of this program (allow-listed unpickling).

    Raises:
        FileNotFoundError: no such file. pickle.UnpicklingError: a type outside the allow-list.
        ValueError: one line naming the file: empty, truncated, another format, or not a training checkpoint.
    """
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt or "step" not in ckpt or "state_dict" not in ckpt:
        raise InputError(f"{path}: not a training checkpoint of diffclip's training programs (use --pretrained for "
                         "weights)")
    legacy = ckpt.pop("loss_state", None) or {}  # SigLIP's bias, before it moved onto the model
    if "logit_bias" in legacy:
        ckpt["state_dict"]["logit_bias"] = legacy["logit_bias"]
    return ckpt


def find_loadable(ckpt_dir: str | Path, steps_per_epoch: int) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``ckpt_dir`` that reads, as ``(path, checkpoint)``, or None when none does.
    Newer files that do not read (empty, truncated, foreign) are passed over with a warning naming each and why."""
    ckpt_dir = Path(ckpt_dir)
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name)] if ckpt_dir.is_dir() else []
    found.sort(key=lambda p: (checkpoint_step(p, steps_per_epoch), p.name.startswith("epoch")), reverse=True)
    for path in found:
        try:
            return path, read_checkpoint(path)
        except (OSError, ValueError, pickle.UnpicklingError) as e:
            log.warning("--resume latest: passing over %s: %s", path.name, str(e).splitlines()[0])
    return None


def load_checkpoint(path: str | Path, state, info: DistInfo, ckpt: dict | None = None) -> int:
    """Restores model, loss, optimizer, scaler, step, epoch and this rank's RNG state from ``path`` (or from
    ``ckpt``, the checkpoint already read from it).

    Returns:
        ``batches_done``: the micro-batches of ``state.epoch`` to skip.

    Raises:
        FileNotFoundError: no such file; ValueError: not a training checkpoint of this program;
        RuntimeError: the checkpoint is of another model (one line listing the names that differ).
    """
    from .train import unwrap_model

    path = Path(path)
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    model = unwrap_model(state.model)
    written_for = ckpt.get("model_name")
    load_state_dict(model, ckpt["state_dict"], source=f"checkpoint {path.name}"
                    + (f" (written for --model {written_for})" if written_for else ""))
    state.optimizer.load_state_dict(ckpt["optimizer"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step, state.epoch = int(ckpt["step"]), int(ckpt["epoch"])
    rngs = ckpt.get("rng") or []
    if len(rngs) == info.world_size:
        set_rng_state(rngs[info.rank])
    else:
        log.warning("checkpoint was written by %d processes, this run has %d: RNG states not restored",
                    len(rngs), info.world_size)
    log.info("resumed from %s: step %d, epoch %d, %d batches into it", path, state.step, state.epoch,
             ckpt["batches_done"])
    return int(ckpt["batches_done"])
