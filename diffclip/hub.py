"""Weights: hub download, our safetensors format, the DiffCLIP authors' checkpoints, open_clip/OpenAI weights.

Formats read by :func:`load_pretrained`:

* ours: a directory (or hub repo) with ``config.json`` + ``model.safetensors`` written by
  ``DiffCLIP.save_pretrained`` (huggingface_hub's ``PyTorchModelHubMixin`` conventions), or any ``.safetensors``;
* the authors' release (``hammh0a/DiffCLIP_ViTB16_CC3M`` / ``_CC12M``, file ``checkpoint_best.pt``): a pickle
  with the weights under ``state_dict`` (maybe ``module.``-prefixed) beside optimizer state, an
  ``argparse.Namespace`` and numpy scalars. It is read with ``torch.load(weights_only=True)`` and the explicit
  allow-list :data:`CHECKPOINT_SAFE_GLOBALS`; a pickle that names anything else is refused. Our names match
  the release's, so no key mapping is needed;
* training checkpoints of ``training/main.py`` (weights under ``state_dict``);
* open_clip / OpenAI CLIP state dicts (``visual.conv1``, ``class_embedding``, ``in_proj_weight``...), mapped by
  :func:`convert_open_clip_state_dict` onto the ``OpenCLIP-*`` configs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors.torch import load_file

from .errors import InputError, WeightsMismatchError, one_line
from .hf_clip import check_hf_config, hf_clip_to_open_clip, is_hf_clip_state_dict
from .open_clip_format import OPEN_CLIP_CONFIG, VISION_BLOCK_NAMES, check_open_clip_config

__all__ = ["HF_HUB_PREFIX", "RELEASES", "CHECKPOINT_SAFE_GLOBALS", "download", "resolve_pretrained", "torch_load", "check_state_dict",
           "read_state_dict", "convert_open_clip_state_dict", "load_state_dict", "load_pretrained"]

HF_HUB_PREFIX = "hf-hub:"
#: release tags per model name -> hub repo of the authors' checkpoint
RELEASES = {
    "DiffCLIP-ViT-B-16": {"cc3m": "hf-hub:hammh0a/DiffCLIP_ViTB16_CC3M/checkpoint_best.pt",
                          "cc12m": "hf-hub:hammh0a/DiffCLIP_ViTB16_CC12M/checkpoint_best.pt"},
}
#: weight files tried, in order, in a hub repo or a local directory named without a file
WEIGHT_FILES = ("model.safetensors", "checkpoint_best.pt", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin", "pytorch_model.bin")


def _numpy_globals() -> list:
    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    found += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return found


#: the only non-tensor types a checkpoint pickle may contain (besides containers and primitives)
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
                           pathlib.PureWindowsPath, *_numpy_globals()]


def download(repo_id: str, filename: str) -> str:
    """Downloads ``filename`` of hub repo ``repo_id`` or returns the cached copy (huggingface_hub's cache).

    ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` are read at call time, so a mirror or a test server can be set
    after import.

    Returns:
        The local path (str).

    Raises:
        FileNotFoundError: the repo or file does not exist on the hub.
        ConnectionError: the hub cannot be reached and there is no cached copy.
    """
    where = dict(endpoint=os.environ.get("HF_ENDPOINT"), cache_dir=os.environ.get("HF_HUB_CACHE"))
    unreachable = (f"cannot reach the hub ({os.environ.get('HF_ENDPOINT', 'huggingface.co')}) and there is no cached "
                   f"copy of {repo_id}/{filename}")
    try:
        return hf_hub_download(repo_id, filename, **where)
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: test it first)
        raise ConnectionError(unreachable) from None
    except (EntryNotFoundError, RepositoryNotFoundError) as e:
        raise FileNotFoundError(f"hub repo {repo_id!r} has no file {filename!r} ({type(e).__name__})") from None
    except HfHubHTTPError as e:
        raise ConnectionError(f"hub error for {repo_id}/{filename}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # a transport error huggingface_hub lets through (a reset connection, a broken proxy)
        if not _is_network_error(e):
            raise
        try:  # what huggingface_hub does for a refused connection: the cached copy, if any
            return hf_hub_download(repo_id, filename, local_files_only=True, **where)
        except LocalEntryNotFoundError:
            raise ConnectionError(f"{unreachable} ({type(e).__name__}: {one_line(e)})") from None


def _is_network_error(e: Exception) -> bool:
    """An OSError or an error of the HTTP stack under huggingface_hub (requests/urllib3 for 0.x, httpx for 1.x,
    httpx2 for 2.x)."""
    return isinstance(e, OSError) or type(e).__module__.split(".")[0] in (
        "requests", "urllib3", "httpx", "httpx2", "httpcore", "h11")


def _download_hub_weights(spec: str) -> str:
    parts = spec.split("/")
    if len(parts) > 2:
        return download("/".join(parts[:2]), "/".join(parts[2:]))
    for name in WEIGHT_FILES:
        try:
            return download(spec, name)
        except FileNotFoundError:
            continue
    raise FileNotFoundError(f"hub repo {spec!r} has none of the weight files {', '.join(WEIGHT_FILES)}")


def resolve_pretrained(pretrained: str, model_name: str | None = None) -> str:
    """Turns a ``pretrained`` argument into a local weights file.

    Args:
        pretrained: a release tag of ``model_name`` (see :data:`RELEASES`), ``hf-hub:org/repo[/file]``,
            a directory holding ``model.safetensors`` (or ``checkpoint_best.pt``), or a file.
        model_name: the config name, used for release tags.

    Raises:
        FileNotFoundError, ConnectionError: see :func:`download`; a local path that does not exist.
    """
    tags = RELEASES.get(model_name or "", {})
    if pretrained.lower() in tags:
        pretrained = tags[pretrained.lower()]
    if pretrained.startswith(HF_HUB_PREFIX):
        return _download_hub_weights(pretrained[len(HF_HUB_PREFIX):])
    path = Path(pretrained).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return str(path / name)
        raise FileNotFoundError(f"directory {path} has no model.safetensors (nor {', '.join(WEIGHT_FILES[1:])})")
    if not path.is_file():
        known = f"; release tags of {model_name}: {', '.join(tags)}" if tags else ""
        raise FileNotFoundError(f"pretrained weights not found: {pretrained!r} (expected a file, a directory with "
                                f"model.safetensors, or hf-hub:org/repo{known})")
    return str(path)


def _named_globals(stream) -> list[str]:
    """The globals (``module.name``) one pickle in ``stream`` names, read with :mod:`pickletools` (nothing is
    unpickled); the stream is left after its STOP."""
    names: list[str] = []
    strings: list[str] = []  # strings pushed so far, for STACK_GLOBAL (module, name)
    memo: dict[int, object] = {}
    last = None
    for op, arg, _ in pickletools.genops(stream):
        if op.name == "GLOBAL":
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "MEMOIZE":
            memo[len(memo)] = last
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = last
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(arg)
            if isinstance(last, str):
                strings.append(last)
        else:
            last = arg if isinstance(arg, str) else None
            if isinstance(arg, str) and op.name != "STOP":
                strings.append(arg)
    return names


def _forbidden_globals(path: Path) -> list[str]:
    """The globals named by the pickles of ``path`` (a zip checkpoint's ``data.pkl``; else the pickles at the
    start of a legacy or plain pickle file) that the allow-list does not hold, in order, without repeats."""
    try:  # torch's own allow-list (a private name: without it every global not of ours is listed)
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except ImportError:
        allowed = set()
    allowed |= {f"{g.__module__}.{g.__qualname__}" for g in CHECKPOINT_SAFE_GLOBALS}
    names: list[str] = []
    with open(path, "rb") as f:
        streams = [f]
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                streams = [io.BytesIO(z.read(member))] if member else []
        f.seek(0)
        for stream in streams:
            for _ in range(8):  # legacy format: magic number, protocol, system info, the object, storage keys
                try:
                    names += _named_globals(stream)
                except Exception:  # the raw tensor bytes after the pickles, or no pickle at all
                    break
    names = [re.sub(r"^__builtin__\.", "builtins.", n) for n in names]  # protocol 2's name of the module
    return list(dict.fromkeys(n for n in names if n not in allowed))


def _torch_reason(e: BaseException) -> str:
    """The cause in a torch.load error, in one line, without torch's advice to load with ``weights_only=False``
    (which could run code) or to allow-list the type."""
    text = str(e).replace(getattr(torch.serialization, "UNSAFE_MESSAGE", "\0"), "")
    text = re.sub(r"Weights only load failed\.|Please file an issue with the following.*?WeightsUnpickler error:|"
                  r"Check the documentation of torch\.load.*|Please use `torch\.serialization\..*", "", text,
                  flags=re.S)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def torch_load(path: str | os.PathLike) -> Any:
    """The one reader of PyTorch pickles in diffclip: ``torch.load(weights_only=True)`` on the CPU with the
    allow-list :data:`CHECKPOINT_SAFE_GLOBALS` (zip, legacy and plain pickle files; torch's warning about a
    pickle protocol is silenced).

    Raises:
        FileNotFoundError: no such file.
        pickle.UnpicklingError: the pickle names a type outside the allow-list (it could run code); one line
            naming the file and those globals. Nothing of the file is run.
        ValueError: one line naming the file when it is empty, truncated or not a PyTorch file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if p.stat().st_size == 0:
        raise InputError(f"{path}: empty file; expected a PyTorch checkpoint")
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch stops at the first global it refuses, or earlier at an opcode it does not read (protocol 4's
        # FRAME): the globals are then found by reading the opcodes, without unpickling anything
        forbidden = _forbidden_globals(p) or re.findall(r"GLOBAL (\S+)", str(e))[:1]
        if forbidden:
            raise pickle.UnpicklingError(f"refusing to unpickle {path}: it names {', '.join(forbidden[:4])}, "
                                         f"outside the allow-list of types that cannot run code") from None
        raise InputError(f"{path}: not a PyTorch checkpoint ({_torch_reason(e)})") from None
    except (EOFError, IndexError, KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:
        raise InputError(f"{path}: not a readable PyTorch checkpoint, truncated or another format "
                         f"({_torch_reason(e)})") from None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Reads the model weights of a checkpoint file, without free unpickling.

    ``.safetensors`` files are read with safetensors; anything else with :func:`torch_load` (the allow-list).
    The weights are taken from ``state_dict`` (or ``model``) when the file holds a training checkpoint, and
    ``module.`` / ``_orig_mod.`` prefixes are removed.

    Returns:
        A dict of parameter name -> tensor.

    Raises:
        FileNotFoundError: no such file.
        pickle.UnpicklingError: the pickle names a type outside the allow-list (it could run code).
        ValueError: one line naming the file: empty, truncated, not a checkpoint, or no state dict in it.
    """
    if str(path).endswith(".safetensors"):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            sd = load_file(path)
        except Exception as e:  # safetensors raises its own error type
            raise InputError(f"{path}: not a safetensors file ({one_line(e)})") from None
    else:
        obj = torch_load(path)
        sd = obj
        if isinstance(obj, dict):
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(obj.get(key), dict):
                    sd = obj[key]
                    break
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{path}: holds no state dict of tensors; expected model weights or a checkpoint")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


def _split_in_proj(out: dict, prefix: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, w in zip(("q_proj", "k_proj", "v_proj"), weight.chunk(3, dim=0)):
        out[f"{prefix}.{name}.weight"] = w
    if bias is not None:
        for name, b in zip(("q_proj", "k_proj", "v_proj"), bias.chunk(3, dim=0)):
            out[f"{prefix}.{name}.bias"] = b


def is_open_clip_state_dict(sd: dict) -> bool:
    """True for open_clip / OpenAI CLIP layouts (``visual.class_embedding`` or fused ``in_proj_weight``)."""
    return "visual.class_embedding" in sd or any(k.endswith("attn.in_proj_weight") for k in sd)


def convert_open_clip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps an open_clip / OpenAI CLIP ViT state dict onto our names (``OpenCLIP-*`` configs).

    ``attn.in_proj_weight/bias`` -> ``q_proj``/``k_proj``/``v_proj``; ``visual.conv1`` -> ``visual.patch_embed.proj``;
    ``visual.class_embedding`` (C,) -> ``visual.cls_token`` (1, 1, C); ``visual.positional_embedding`` (N, C) ->
    ``visual.pos_embed`` (1, N, C); ``visual.ln_pre/ln_post`` -> ``visual.norm_pre/norm``; ``visual.proj`` ->
    ``image_projection``; vision blocks ``ln_1/ln_2/mlp.c_fc/mlp.c_proj`` -> timm's ``norm1/norm2/mlp.fc1/mlp.fc2``.
    Non-weight entries of OpenAI's files (``input_resolution``, ``context_length``, ``vocab_size``, ``attn_mask``)
    are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    vis_block = {theirs: ours for ours, theirs in VISION_BLOCK_NAMES.items()}
    for k, v in sd.items():
        if k in ("input_resolution", "context_length", "vocab_size") or k.endswith("attn_mask"):
            continue
        if k.endswith("attn.in_proj_bias"):
            continue  # handled with its weight
        if k.endswith("attn.in_proj_weight"):
            prefix = k[: -len(".in_proj_weight")]
            _split_in_proj(out, prefix, v, sd.get(prefix + ".in_proj_bias"))
            continue
        out[k] = v
    renamed: dict[str, torch.Tensor] = {}
    for k, v in out.items():
        if k == "visual.class_embedding":
            k, v = "visual.cls_token", v.reshape(1, 1, -1)
        elif k == "visual.positional_embedding":
            k, v = "visual.pos_embed", v.unsqueeze(0)
        elif k == "visual.proj":
            k = "image_projection"
        elif k.startswith("visual.conv1."):
            k = k.replace("visual.conv1.", "visual.patch_embed.proj.")
        elif k.startswith("visual.ln_pre."):
            k = k.replace("visual.ln_pre.", "visual.norm_pre.")
        elif k.startswith("visual.ln_post."):
            k = k.replace("visual.ln_post.", "visual.norm.")
        elif k.startswith("visual.transformer.resblocks."):
            rest = k[len("visual.transformer.resblocks."):]
            idx, name = rest.split(".", 1)
            for old, new in vis_block.items():
                if name.startswith(old + "."):
                    name = new + name[len(old):]
                    break
            k = f"visual.blocks.{idx}.{name}"
        renamed[k] = v
    return renamed


def check_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Checks that ``sd`` fits ``model`` strictly (names and shapes) without loading it.

    Raises:
        RuntimeError: one line naming every missing and unexpected key, or every shape mismatch
            (a checkpoint of another architecture).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise WeightsMismatchError(f"{source} does not match the model: {len(missing)} missing keys "
                           f"[{', '.join(missing)}], {len(unexpected)} unexpected keys [{', '.join(unexpected)}]")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if sd[k].shape != own[k].shape]
    if wrong:
        raise WeightsMismatchError(f"{source} is for another architecture: shapes (checkpoint vs model) differ for "
                           f"{'; '.join(wrong)}")


def load_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Loads ``sd`` strictly into ``model`` after :func:`check_state_dict` (whose RuntimeError it raises)."""
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)


def _file_beside(path: str, pretrained: str, filename: str) -> Path | None:
    """``filename`` in the folder of the weights file ``path``, or at the root of the hub repo of ``pretrained``
    (None when there is none, or the hub cannot be reached)."""
    local = Path(path).parent / filename
    if local.is_file():
        return local
    if pretrained.startswith(HF_HUB_PREFIX):
        try:
            return Path(download("/".join(pretrained[len(HF_HUB_PREFIX):].split("/")[:2]), filename))
        except (FileNotFoundError, ConnectionError):
            return None
    return None


def _json_or_none(path: Path | None) -> Any:
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def load_pretrained(model: torch.nn.Module, pretrained: str, model_name: str | None = None) -> str:
    """Resolves ``pretrained`` (:func:`resolve_pretrained`), reads it (:func:`read_state_dict`), converts
    open_clip layouts and loads it strictly (:func:`load_state_dict`). The config saved beside the weights is
    checked first against the model's: our ``config.json`` (``DiffCLIP.check_saved_config``: every field that
    differs is named), a transformers ``config.json`` (:func:`diffclip.hf_clip.check_hf_config`) or an
    ``open_clip_config.json`` (:func:`diffclip.open_clip_format.check_open_clip_config`: ``quick_gelu``, heads).

    Returns:
        The local file that was loaded.
    """
    path = resolve_pretrained(pretrained, model_name)
    sd = read_state_dict(path)
    # the config saved beside the weights, checked against the config the model was built from
    config = _file_beside(path, pretrained, "config.json") if hasattr(model, "vision_cfg") else None
    saved = _json_or_none(config)
    if isinstance(saved, dict) and "vision_cfg" in saved and hasattr(model, "check_saved_config"):  # ours
        model.check_saved_config(saved, source=str(config))
    if is_hf_clip_state_dict(sd):  # a transformers CLIPModel: its config.json sits beside the weights
        if config is not None:
            check_hf_config(config, {"vision_cfg": model.vision_cfg, "text_cfg": model.text_cfg},
                            model_name or type(model).__name__)
        sd = hf_clip_to_open_clip(sd)
    if is_open_clip_state_dict(sd):
        oc_config = _file_beside(path, pretrained, OPEN_CLIP_CONFIG) if hasattr(model, "vision_cfg") else None
        if oc_config is not None:
            check_open_clip_config(oc_config, {"vision_cfg": model.vision_cfg, "text_cfg": model.text_cfg},
                                   model_name or type(model).__name__)
        sd = convert_open_clip_state_dict(sd)
    # SigLIP's bias (open_clip's rule, but keeping the model's initial value where open_clip puts 0): weights that
    # have one give the model one; a model built with one keeps its initial value when the weights have none
    if "logit_bias" in sd and getattr(model, "logit_bias", "absent") is None:
        model.logit_bias = torch.nn.Parameter(torch.zeros_like(sd["logit_bias"]))
    if "logit_bias" not in sd and isinstance(getattr(model, "logit_bias", None), torch.nn.Parameter):
        sd = {**sd, "logit_bias": model.logit_bias.detach().clone()}
    load_state_dict(model, sd, source=f"{pretrained}" + (f" ({path})" if path != pretrained else ""))
    return path
