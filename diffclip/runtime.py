"""How a program runs: the device, the numeric precision and the seeds, one vocabulary for every diffclip program.

Precision names and meanings are open_clip's (``open_clip_train/precision.py`` and ``open_clip.factory``):

========== ======================= =============================================== ============
name       weights                 autocast                                        input dtype
========== ======================= =============================================== ============
fp32       fp32                    none                                            fp32
amp        fp32                    device default (fp16 on CUDA, bf16 on CPU)      fp32
amp_bf16   fp32                    bf16                                            fp32
amp_fp16   fp32                    fp16                                            fp32
bf16       bf16, norms kept fp32   none                                            bf16
fp16       fp16, norms kept fp32   none                                            fp16
pure_bf16  all bf16                none                                            bf16
pure_fp16  all fp16                none                                            fp16
========== ======================= =============================================== ============

A gradient scaler is used where the autocast dtype is fp16 (``amp`` on CUDA, ``amp_fp16``), as open_clip does for
``amp``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from diffclip.errors import InputError

PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_fp16", "bf16", "fp16", "pure_bf16", "pure_fp16")
PRECISION_HELP = ("fp32; amp (autocast: fp16 on CUDA, bf16 on CPU), amp_bf16, amp_fp16 (autocast in that dtype); "
                  "bf16/fp16 (low-precision weights, norms in fp32); pure_bf16/pure_fp16 (every weight cast) "
                  "- open_clip's names and meanings")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def autocast_dtype(precision: str, device_type: str = "cuda") -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device_type`` (None: no autocast). Raises ValueError if unknown."""
    _check(precision)
    if precision == "amp":
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    return {"amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}.get(precision)


def get_autocast(precision: str, device_type: str = "cuda") -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context of ``precision`` (``contextlib.nullcontext`` where there is none), as
    open_clip's ``get_autocast``. Raises ValueError for an unknown precision."""
    dtype = autocast_dtype(precision, device_type)
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device_type, dtype=dtype)


def get_input_dtype(precision: str) -> torch.dtype | None:
    """The dtype inputs are cast to (None: leave them fp32), as open_clip's ``get_input_dtype``."""
    _check(precision)
    if precision in ("bf16", "pure_bf16"):
        return torch.bfloat16
    if precision in ("fp16", "pure_fp16"):
        return torch.float16
    return None


def needs_grad_scaler(precision: str, device_type: str) -> bool:
    """True where the autocast dtype is fp16 (loss scaling against gradient underflow)."""
    return autocast_dtype(precision, device_type) == torch.float16


def cast_model(model: nn.Module, precision: str) -> nn.Module:
    """Casts ``model``'s weights in place for ``precision`` and returns it: ``bf16``/``fp16`` cast every weight
    but the normalisation layers' (LayerNorm, GroupNorm, RMSNorm stay fp32, as open_clip keeps them),
    ``pure_*`` cast everything; the other precisions leave the weights fp32."""
    dtype = get_input_dtype(precision)
    if dtype is None:
        return model
    model.to(dtype)
    if not precision.startswith("pure_"):
        for m in model.modules():
            if isinstance(m, _NORMS):
                m.float()
    return model


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto``/None -> cuda when available, else mps when available, else cpu; otherwise the named device.

    Raises ValueError (one line, naming the device) for an unknown name or a device this machine lacks."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"--device {name}: MPS is not available on this machine")
    return device


def stable_seed(*parts) -> int:
    """A seed in [0, 2**63) from ``parts`` (strings, ints, tuples of them: hashed through their ``repr`` with
    BLAKE2b), the same in every process and run, unlike ``hash()`` under Python's hash randomisation.

    >>> stable_seed("emoji", "1F600") == stable_seed("emoji", "1F600") != stable_seed("emoji", "1F601")
    True
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seeds Python's, numpy's and torch's global generators with ``seed + rank`` (numpy's modulo 2**32)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


ENVIRONMENT_PACKAGES = ("diffclip", "torch", "torchvision", "timm", "open_clip_torch", "numpy", "scipy",
                        "scikit-learn", "webdataset", "pillow")


def environment(packages: tuple[str, ...] = ENVIRONMENT_PACKAGES) -> dict:
    """What a measured number depends on besides the code: ``{"date": ISO-8601 UTC, "cpu": model name (from
    /proc/cpuinfo where there is one), "cpu_count", "torch_threads", "load_average": the 1-min load average or
    None, "platform", "python", "cuda": device name or None, "packages": {distribution: version or None}}``."""
    import datetime
    import os
    import platform
    from importlib import metadata

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "packages": versions}


def describe_environment(env: dict) -> str:
    """One line for a results table: ``2026-12-04, AMD EPYC 7B13 (2 CPUs, load 0.1), Linux-..., Python 3.12.3;
    torch 2.14.1, timm 1.0.24, ...`` from :func:`environment`'s dict."""
    load = f", load {env['load_average']:.1f} at start" if env.get("load_average") is not None else ""
    gpu = f", {env['cuda']}" if env.get("cuda") else ""
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return (f"{env['date'][:10]}, {env['cpu']} ({env['cpu_count']} CPUs{load}){gpu}, {env['platform']}, "
            f"Python {env['python']}; {pkgs}")
