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

from diffclip.errors import InputError, one_line
from diffclip.files import save_torch
from diffclip.hub import load_state_dict, torch_load

from .distributed import DistInfo

__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "read_checkpoint", "check_checkpoint",
           "check_optimizer_state", "find_loadable", "checkpoint_step"]

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
                "args": {k: v for k, v in vars(state.args).items()
                         if isinstance(v, (str, int, float, bool, type(None), list, tuple, dict))},  # --aug-cfg: dict
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
    if "logit_bias" in legacy and isinstance(ckpt["state_dict"], dict):
        ckpt["state_dict"]["logit_bias"] = legacy["logit_bias"]
    check_checkpoint(ckpt, path)
    return ckpt


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_checkpoint(ckpt: dict, path: str | Path) -> None:
    """Checks the structure of a training checkpoint before any of it is used: ``step``, ``epoch`` and
    ``batches_done`` are integers >= 0 with ``epoch <= step`` (every epoch has a step); ``state_dict`` maps names
    to tensors; ``optimizer`` is an optimizer state (``state``, ``param_groups`` of parameter indices); ``scaler``
    is None or a dict; ``rng`` (when present) holds one generator state per process that the generators accept.

    Raises:
        ValueError: one line naming ``path`` and the entry that is wrong.
    """
    def bad(what: str):
        return InputError(f"{path}: {what}; not a checkpoint written by diffclip's training programs")

    for key in ("step", "epoch", "batches_done"):
        if not _is_count(ckpt.get(key)):
            raise bad(f"{key!r} is {ckpt.get(key)!r}, expected an integer >= 0")
    if ckpt["epoch"] > ckpt["step"]:
        raise bad(f"epoch {ckpt['epoch']} after only {ckpt['step']} steps")
    sd = ckpt["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise bad("'state_dict' is not a dict of named tensors")
    opt = ckpt["optimizer"]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(groups, list) and groups
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) and all(_is_count(i) for i in g["params"])
                    for g in groups)):
        raise bad("'optimizer' is not an optimizer state (state, param_groups of parameter indices)")
    if not all(isinstance(s, dict) for s in opt["state"].values()):
        raise bad("'optimizer' state entries are not dicts")
    if ckpt.get("scaler") is not None and not isinstance(ckpt["scaler"], dict):
        raise bad(f"'scaler' is a {type(ckpt['scaler']).__name__}, expected a dict or None")
    rngs = ckpt.get("rng")
    if rngs is None:
        return
    if not isinstance(rngs, list) or not all(isinstance(r, dict) for r in rngs):
        raise bad("'rng' is not a list of generator states (one per process)")
    current = rng_state()
    try:
        for rank, state in enumerate(rngs):
            cuda = state.get("cuda", [])
            if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                                     for t in cuda):
                raise bad(f"'rng' of process {rank}: 'cuda' is not a list of CUDA generator states")
            try:  # the generators themselves are the judges of their states
                set_rng_state({k: v for k, v in state.items() if k != "cuda"})
            except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
                raise bad(f"'rng' of process {rank} is not a generator state ({type(e).__name__}: {one_line(e)})"
                          ) from None
    finally:
        set_rng_state({k: v for k, v in current.items() if k != "cuda"})


def check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, source: str) -> None:
    """Checks an optimizer state read from a checkpoint (``read_checkpoint(...)["optimizer"]``) against
    ``optimizer``: the same number of parameter groups, of the same sizes, and per-parameter state tensors of
    the parameters' shapes (what ``optimizer.load_state_dict`` would otherwise take or fail on mid-step).

    Raises:
        ValueError: one line naming ``source`` and what differs.
    """
    mine = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g["params"]) for g in saved["param_groups"]]
    if mine != theirs:
        raise InputError(f"{source}: its optimizer has parameter groups of {theirs} parameters, this model's "
                         f"{mine}: a checkpoint of another model or optimizer")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    indices = [i for g in saved["param_groups"] for i in g["params"]]
    for index, param in zip(indices, params):
        for name, value in saved["state"].get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                raise InputError(f"{source}: optimizer state {name!r} of parameter {index} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")


def find_loadable(ckpt_dir: str | Path, steps_per_epoch: int) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``ckpt_dir`` that reads, as ``(path, checkpoint)``, or None when none does.
    Newer files that do not read (empty, truncated, foreign) are passed over with a warning naming each and why."""
    ckpt_dir = Path(ckpt_dir)
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name)] if ckpt_dir.is_dir() else []
    # newest first; at equal steps an epoch_ file (written after the epoch's evaluation) before a step_ file
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
    check_optimizer_state(ckpt["optimizer"], state.optimizer, f"checkpoint {path}")
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
