"""Train or fine-tune a ViT classifier: differential (``diff_vit_*``) or standard (``std_vit_*``, timm's ``vit_*``)
attention, from scratch, from a timm checkpoint or from a DiffCLIP/CLIP checkpoint's vision tower with a new head.

Examples::

    # a 38K-parameter DiffViT on Fashion-MNIST (idx files of the Debian package), 1 channel, patch 7
    python eval/finetune.py --model diff_vit_nano_patch4_28 --dataset fashion_mnist \\
        --data-root /usr/share/datasets/fashion-mnist --in-chans 1 --patch-size 7 --embed-dim 40 --depth 3 \\
        --epochs 10 --output runs/fmnist_diff

    # the vision tower of a DiffCLIP checkpoint, new 37-way head, layer-wise lr decay
    python eval/finetune.py --model DiffCLIP-Tiny-64 --init path/to/saved_model --dataset pets \\
        --data-root data/pets --lr 1e-4 --layer-decay 0.75 --output runs/pets

The loop is nanoGPT-plain; the pieces come from timm: the models, ``create_transform`` (RandAugment, random
erasing), ``Mixup`` (mixup / cutmix), the label-smoothing losses, ``create_optimizer_v2`` (AdamW, layer decay,
no weight decay on 1-D parameters) and the cosine scheduler with warm-up. The test split is evaluated after
every epoch; ``last.pt`` and ``best.pt`` are written atomically (temporary name + ``os.replace``); ``--resume``
continues from ``last.pt``; ``log.jsonl`` and TensorBoard get one record per epoch; ``results.json`` gets the
final metrics (``acc1``/``acc5`` of the last epoch, ``best_acc1``, parameter count, epochs, wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["parse_args", "build_model", "build_transforms", "build_datasets", "load_classifier", "load_vit",
           "eval_transform", "evaluate", "main", "run", "count_params", "AUG_PRESETS", "UsageError"]

# --aug presets; every field can also be set by its own flag (--randaug, --mixup, ...), which wins.
AUG_PRESETS = {
    "none": dict(randaug=None, mixup=0.0, cutmix=0.0, smoothing=0.0, reprob=0.0, hflip=0.0, scale=None),
    "light": dict(randaug=None, mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.0, hflip=0.5, scale=(0.8, 1.0)),
    "strong": dict(randaug="rand-m9-mstd0.5", mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, hflip=0.5,
                   scale=(0.5, 1.0)),
}
PRECISIONS = ("fp32", "bf16", "amp_bf16", "amp", "fp16")


class UsageError(ValueError):
    """Bad input from the command line: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train / fine-tune a (differential) ViT classifier.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True,
                   help="a timm model (diff_vit_*, std_vit_*, vit_*...) or a diffclip config name (DiffCLIP-Tiny-64...)"
                        " whose vision tower gets a new head")
    m.add_argument("--init", default="scratch",
                   help="'scratch', a checkpoint file for a timm model (.pt/.pth/.safetensors; its head is dropped),"
                        " or for a diffclip config name anything diffclip.create_model(pretrained=...) takes")
    m.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    m.add_argument("--in-chans", type=int, default=None, help="image channels (1 = grayscale; default 3)")
    m.add_argument("--patch-size", type=int, default=None)
    m.add_argument("--embed-dim", type=int, default=None)
    m.add_argument("--depth", type=int, default=None)
    m.add_argument("--num-heads", type=int, default=None, help="the baseline's head count (even for diff models)")
    m.add_argument("--mlp-ratio", type=float, default=None)
    m.add_argument("--qkv-bias", type=int, choices=(0, 1), default=None, help="bias on q/k/v (default: the model's)")
    m.add_argument("--lambda-init", default=None, help="differential models: a number or 'schedule'")
    m.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", required=True, help="a dataset name of eval.readers (mnist, fashion_mnist, cifar10...)")
    d.add_argument("--data-root", default=None,
                   help="folder holding the dataset's files (default: the reader's, e.g. Fashion-MNIST's Debian path)")
    d.add_argument("--train-split", default="train")
    d.add_argument("--eval-split", default="test")
    d.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean (default by channels)")
    d.add_argument("--std", type=float, nargs="+", default=None)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--cache", action="store_true",
                   help="decode and transform once into memory: the eval split, and the train split when it has no "
                        "random augmentation (small datasets such as MNIST)")
    d.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    d.add_argument("--eval-subset", type=int, default=None, help="use only the first N evaluation images")
    a = p.add_argument_group("augmentation (timm)")
    a.add_argument("--aug", choices=sorted(AUG_PRESETS), default="none", help="preset; the flags below override it")
    a.add_argument("--randaug", default=None, help="RandAugment spec, e.g. rand-m9-mstd0.5 ('' = off)")
    a.add_argument("--mixup", type=float, default=None, help="mixup alpha")
    a.add_argument("--cutmix", type=float, default=None, help="cutmix alpha")
    a.add_argument("--smoothing", type=float, default=None, help="label smoothing")
    a.add_argument("--reprob", type=float, default=None, help="random-erasing probability")
    a.add_argument("--hflip", type=float, default=None, help="horizontal-flip probability")
    a.add_argument("--scale", type=float, nargs=2, default=None, help="RandomResizedCrop scale range")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--batch-size", type=int, default=128)
    o.add_argument("--opt", default="adamw", help="timm optimizer name")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--min-lr", type=float, default=1e-6)
    o.add_argument("--wd", type=float, default=0.05, help="weight decay (not on 1-D parameters)")
    o.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay for fine-tuning (e.g. 0.75)")
    o.add_argument("--warmup-epochs", type=float, default=1.0)
    o.add_argument("--clip-grad", type=float, default=None)
    o.add_argument("--precision", choices=PRECISIONS, default="fp32")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r = p.add_argument_group("output")
    r.add_argument("--output", required=True, help="run folder: checkpoints, log.jsonl, tb/, results.json")
    r.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.pt")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    for key, value in AUG_PRESETS[args.aug].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.randaug == "":
        args.randaug = None
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise UsageError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if not 0 <= args.drop_path < 1:
        raise UsageError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if args.lambda_init is not None and args.lambda_init != "schedule":
        try:
            args.lambda_init = float(args.lambda_init)
        except ValueError:
            raise UsageError(f"--lambda-init must be a number or 'schedule', got {args.lambda_init!r}") from None
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            raise UsageError("mixup/cutmix need an even --batch-size")
    if args.data_root is not None and not Path(args.data_root).exists():
        raise UsageError(f"--data-root {args.data_root} does not exist")
    if args.init != "scratch" and not _is_diffclip_name(args.model) and not Path(args.init).is_file():
        raise UsageError(f"--init {args.init} is not 'scratch' or a checkpoint file")


# ---------------------------------------------------------------------------------------------------- model
def _is_diffclip_name(name: str) -> bool:
    import diffclip

    return name in diffclip.list_models() or name.startswith("hf-hub:")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _model_kwargs(args: argparse.Namespace, num_classes: int) -> dict:
    kw = dict(num_classes=num_classes, drop_path_rate=args.drop_path)
    for key in ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.qkv_bias is not None:
        kw["qkv_bias"] = bool(args.qkv_bias)
    if args.lambda_init is not None:
        if not args.model.startswith("diff_vit"):
            raise UsageError("--lambda-init applies to diff_vit_* models only")
        kw["lambda_init"] = args.lambda_init
    return kw


def _set_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth, linearly increasing over the blocks (timm's rule), on an already built ViT."""
    from timm.layers import DropPath

    n = len(model.blocks)
    for i, blk in enumerate(model.blocks):
        r = rate * i / max(n - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(r) if r > 0 else nn.Identity())


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights of a checkpoint file: safetensors, a plain state dict, or a dict holding one under
    ``model``/``state_dict``/``module`` (``module.`` prefixes removed). Loaded with ``weights_only=True``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickles that need more than weights are not loaded
            raise UsageError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_backbone(model: nn.Module, path: str) -> None:
    """Loads a timm-layout checkpoint into ``model``, all weights but the classifier head (which keeps its
    fresh initialisation); position embeddings are resampled to the model's grid when the sizes differ."""
    from timm.layers import resample_abs_pos_embed

    sd = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("head.")}
    own = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], list(model.patch_embed.grid_size),
                                                 num_prefix_tokens=prefix)
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise UsageError(f"{path}: shapes do not fit the model for {bad[:3]} (e.g. {tuple(sd[bad[0]].shape)} vs "
                         f"{tuple(own[bad[0]].shape)}); pass the matching --embed-dim/--depth/--patch-size")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise UsageError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def build_model(args: argparse.Namespace, num_classes: int, load_init: bool = True) -> tuple[nn.Module, dict]:
    """Builds the classifier of ``args`` with a fresh ``num_classes``-way head.

    Returns:
        ``(model, data_cfg)`` with ``data_cfg`` = {"img_size", "in_chans", "mean", "std"} for the transforms.
    """
    import timm

    import diffclip  # noqa: F401  (registers diff_vit_* / std_vit_*)

    if _is_diffclip_name(args.model):
        for key in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "lambda_init"):
            if getattr(args, key) is not None:
                raise UsageError(f"--{key.replace('_', '-')} cannot change the tower of {args.model}")
        if args.in_chans not in (None, 3):
            raise UsageError(f"the tower of {args.model} takes 3-channel images; drop --in-chans")
        pretrained = args.init if load_init and args.init != "scratch" else None
        try:
            clip = diffclip.create_model(args.model, pretrained=pretrained)
        except FileNotFoundError as e:
            raise UsageError(f"--init {args.init}: {e}") from None
        model = clip.visual
        model.reset_classifier(num_classes)
        model.train()
        if args.drop_path:
            _set_drop_path(model, args.drop_path)
        if args.img_size is not None and args.img_size != model.patch_embed.img_size[0]:
            model.set_input_size(img_size=args.img_size)
        pp = clip.preprocess_cfg
        data_cfg = dict(img_size=model.patch_embed.img_size[0], in_chans=3, mean=tuple(pp.get("mean", (0.485, 0.456, 0.406))),
                        std=tuple(pp.get("std", (0.229, 0.224, 0.225))))
    else:
        if not timm.is_model(args.model):
            raise UsageError(f"unknown model {args.model!r}: not a timm model (diff_vit_*, std_vit_*, vit_*...) "
                             f"nor a diffclip config ({', '.join(diffclip.list_models())})")
        try:
            model = timm.create_model(args.model, **_model_kwargs(args, num_classes))
        except (ValueError, TypeError, AssertionError) as e:
            raise UsageError(f"cannot build {args.model}: {e}") from None
        if load_init and args.init != "scratch":
            _load_backbone(model, args.init)
        in_chans = args.in_chans or 3
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
        img_size = img[0] if img is not None else (args.img_size or model.pretrained_cfg.get("input_size", (3, 224))[-1])
        data_cfg = dict(img_size=img_size, in_chans=in_chans,
                        mean=(0.5,) * in_chans if in_chans != 3 else (0.485, 0.456, 0.406),
                        std=(0.5,) * in_chans if in_chans != 3 else (0.229, 0.224, 0.225))
    if args.mean is not None:
        data_cfg["mean"] = tuple(args.mean)
    if args.std is not None:
        data_cfg["std"] = tuple(args.std)
    for key in ("mean", "std"):
        if len(data_cfg[key]) != data_cfg["in_chans"]:
            raise UsageError(f"--{key} needs {data_cfg['in_chans']} values, got {len(data_cfg[key])}")
    return model, data_cfg


# ---------------------------------------------------------------------------------------------------- data
class ToMode:
    """PIL image -> the image mode the model takes ('L' for 1 channel, 'RGB' for 3); picklable for workers."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


class _Deferred:
    """A transform set after the dataset is built (the model, built from the class count, decides it)."""

    transform = None

    def __call__(self, img):
        return self.transform(img)


def build_transforms(args: argparse.Namespace, data_cfg: dict):
    """(train, eval) transforms from timm's ``create_transform``: PIL image -> normalised float tensor."""
    from timm.data import create_transform
    from torchvision import transforms as T

    size, mean, std = data_cfg["img_size"], data_cfg["mean"], data_cfg["std"]
    mode = ToMode("L" if data_cfg["in_chans"] == 1 else "RGB")
    if data_cfg["in_chans"] not in (1, 3):
        raise UsageError(f"--in-chans must be 1 or 3, got {data_cfg['in_chans']}")
    if _random_train_tf(args):
        train = create_transform(size, is_training=True, auto_augment=args.randaug, hflip=args.hflip,
                                 scale=tuple(args.scale) if args.scale else (1.0, 1.0), ratio=(3 / 4, 4 / 3),
                                 re_prob=args.reprob, mean=mean, std=std, interpolation="bicubic")
    else:
        train = create_transform(size, is_training=False, crop_pct=1.0, mean=mean, std=std, interpolation="bicubic")
    evalt = create_transform(size, is_training=False, crop_pct=1.0, mean=mean, std=std, interpolation="bicubic")
    return T.Compose([mode, train]), T.Compose([mode, evalt])


def build_datasets(args: argparse.Namespace, train_tf=None, eval_tf=None):
    """(train, eval) datasets through ``eval.readers.build_dataset``; errors become one-line UsageErrors."""
    from diffclip.eval.readers import build_dataset

    out = []
    for split, tf, subset in ((args.train_split, train_tf, args.train_subset), (args.eval_split, eval_tf, args.eval_subset)):
        try:
            ds = build_dataset(args.dataset, args.data_root, split, tf)
        except (ValueError, FileNotFoundError, RuntimeError, KeyError) as e:
            raise UsageError(f"dataset {args.dataset!r} ({split}) in {args.data_root}: {e}") from None
        names = list(ds.classnames)
        if subset is not None:
            ds = torch.utils.data.Subset(ds, range(min(subset, len(ds))))
            ds.classnames = names
        if len(ds) == 0:
            raise UsageError(f"dataset {args.dataset!r} ({split}) in {args.data_root} is empty")
        out.append(ds)
    return out[0], out[1]


def _random_train_tf(args: argparse.Namespace) -> bool:
    return bool(args.randaug or args.reprob > 0 or args.hflip > 0 or args.scale is not None)


def _cached(ds, name: str, workers: int, progress: bool):
    """The dataset decoded and transformed once, held as tensors (for deterministic transforms only)."""
    from tqdm import tqdm

    loader = torch.utils.data.DataLoader(ds, batch_size=512, num_workers=workers)
    xs, ys = [], []
    for x, y in tqdm(loader, desc=f"caching {name}", leave=False, disable=not progress):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    out = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    out.classnames = list(ds.classnames)
    return out


# ---------------------------------------------------------------------------------------------------- loop
def _autocast(precision: str, device: torch.device):
    if precision in ("amp_bf16", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("amp", "fp16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str = "fp32", progress: bool = False) -> dict:
    """Mean cross-entropy, top-1 and top-5 accuracy (percent) of ``model`` over ``loader``."""
    from tqdm import tqdm

    model.eval()
    n, loss, c1, c5 = 0, 0.0, 0, 0
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        x, y = x.to(device), y.to(device)
        with _autocast(precision, device):
            logits = model(x)
        logits = logits.float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.size(1)), dim=1).indices
        c1 += (top[:, 0] == y).sum().item()
        c5 += (top == y[:, None]).any(dim=1).sum().item()
        n += y.numel()
    return {"loss": loss / n, "acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n}


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> dict:
    """Trains and evaluates as described by ``args``; returns the final results dict (also in results.json)."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    t_start, cpu_start = time.time(), time.process_time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress

    ckpt = None
    if args.resume:
        if not (out / "last.pt").is_file():
            raise UsageError(f"--resume: no {out / 'last.pt'} to resume from")
        ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)

    _seed_everything(args.seed)
    # Datasets first (the class count sizes the head); their transforms depend on the model, set after it.
    train_tf, eval_tf = _Deferred(), _Deferred()
    train_ds, eval_ds = build_datasets(args, train_tf, eval_tf)
    num_classes = len(eval_ds.classnames)
    model, data_cfg = build_model(args, num_classes, load_init=ckpt is None)
    train_tf.transform, eval_tf.transform = build_transforms(args, data_cfg)
    if len(train_ds.classnames) != num_classes:
        raise UsageError(f"train and eval splits disagree on the classes ({len(train_ds.classnames)} vs {num_classes})")
    if args.cache:
        eval_ds = _cached(eval_ds, "eval", args.workers, progress)
        if not _random_train_tf(args):
            train_ds = _cached(train_ds, "train", args.workers, progress)
    model.to(device)
    n_params = count_params(model)

    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    loader_kw = dict(num_workers=args.workers, persistent_workers=args.workers > 0)
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                                               drop_last=mixup is not None and len(train_ds) >= args.batch_size,
                                               **loader_kw)
    eval_loader = torch.utils.data.DataLoader(eval_ds, batch_size=max(args.batch_size, 256), shuffle=False, **loader_kw)
    if len(train_loader) == 0:
        raise UsageError(f"the training split has fewer images ({len(train_ds)}) than one batch")

    opt_kw = {"layer_decay": args.layer_decay} if args.layer_decay else {}
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.wd, **opt_kw)
    steps = len(train_loader)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs, min_lr=args.min_lr,
                                       warmup_lr=args.lr * 1e-3, warmup_epochs=args.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps)
    start_epoch, best_acc1, num_updates, prev_wall, prev_cpu = 0, -1.0, 0, 0.0, 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError):
            raise UsageError(f"--resume: {out / 'last.pt'} was written for another model or optimizer "
                             f"({ckpt.get('args', {}).get('model')}); use a new --output") from None
        start_epoch, best_acc1 = ckpt["epoch"] + 1, ckpt["best_acc1"]
        num_updates, prev_wall = ckpt["num_updates"], ckpt.get("wall_time", 0.0)
        prev_cpu = ckpt.get("cpu_time", 0.0)
        print(f"resuming {out / 'last.pt'} after epoch {ckpt['epoch'] + 1}", file=sys.stderr)
    print(f"{args.model}: {n_params:,} parameters, {len(train_ds):,} train / {len(eval_ds):,} eval images, "
          f"{num_classes} classes, {args.epochs} epochs", file=sys.stderr)

    writer = SummaryWriter(str(out / "tb"))
    log = open(out / "log.jsonl", "a")
    scaler = torch.amp.GradScaler(device.type) if args.precision in ("amp", "fp16") else None
    metrics = None
    try:
        for epoch in range(start_epoch, args.epochs):
            t0 = time.time()
            _seed_everything(args.seed * 1000 + epoch)  # data order / augmentation reproducible across resumes
            model.train()
            tot, seen = 0.0, 0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=not progress)
            for x, y in bar:
                x, y = x.to(device), y.to(device)
                if mixup is not None and x.size(0) % 2 == 0:
                    x, y_t = mixup(x, y)
                    loss_fn = criterion
                else:
                    y_t = y
                    loss_fn = criterion if mixup is None else nn.CrossEntropyLoss(label_smoothing=args.smoothing)
                with _autocast(args.precision, device):
                    logits = model(x)
                loss = loss_fn(logits.float(), y_t)
                if not math.isfinite(loss.item()):
                    raise RuntimeError(f"loss is {loss.item()} at epoch {epoch + 1}; lower --lr or use fp32")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if args.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                num_updates += 1
                scheduler.step_update(num_updates)
                tot += loss.item() * x.size(0)
                seen += x.size(0)
                bar.set_postfix(loss=f"{tot / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            train_time = time.time() - t0
            metrics = evaluate(model, eval_loader, device, args.precision, progress)
            is_best = metrics["acc1"] > best_acc1
            best_acc1 = max(best_acc1, metrics["acc1"])
            wall = prev_wall + time.time() - t_start
            cpu = prev_cpu + time.process_time() - cpu_start
            rec = {"epoch": epoch + 1, "train_loss": tot / seen, "lr": max(g["lr"] for g in optimizer.param_groups),
                   "eval_loss": metrics["loss"], "acc1": metrics["acc1"], "acc5": metrics["acc5"],
                   "best_acc1": best_acc1, "epoch_time": time.time() - t0, "train_time": train_time, "wall_time": wall,
                   "cpu_time": cpu}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            for key in ("train_loss", "eval_loss", "acc1", "acc5", "lr"):
                writer.add_scalar(key, rec[key], epoch + 1)
            print(f"epoch {epoch + 1}/{args.epochs}: train_loss {rec['train_loss']:.4f} eval_loss {metrics['loss']:.4f} "
                  f"acc1 {metrics['acc1']:.2f} acc5 {metrics['acc5']:.2f} ({rec['epoch_time']:.1f}s)", file=sys.stderr)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                     "best_acc1": best_acc1, "num_updates": num_updates, "wall_time": wall, "cpu_time": cpu,
                     "args": vars(args),
                     "num_classes": num_classes, "classnames": [str(c) for c in train_ds.classnames],
                     "data_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()},
                     "metrics": metrics}
            _save(state, out / "last.pt")
            if is_best:
                _save({k: v for k, v in state.items() if k != "optimizer"}, out / "best.pt")
    finally:
        log.close()
        writer.close()

    if metrics is None:  # resumed a finished run: report the stored metrics
        metrics = ckpt["metrics"]
    results = {"model": args.model, "init": args.init, "dataset": args.dataset, "acc1": metrics["acc1"],
               "acc5": metrics["acc5"], "eval_loss": metrics["loss"], "best_acc1": best_acc1, "params": n_params,
               "epochs": args.epochs, "seed": args.seed, "wall_time": _last_log(out).get("wall_time", 0.0),
               "cpu_time": _last_log(out).get("cpu_time"), "train_images": len(train_ds), "eval_images": len(eval_ds),
               "num_classes": num_classes, "args": vars(args)}
    _write_json(results, out / "results.json")
    return results


def _last_log(out: Path) -> dict:
    """The last epoch record of log.jsonl (wall and CPU time of the whole run, resumes included)."""
    lines = (out / "log.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


# ---------------------------------------------------------------------------------------------------- reuse
def load_classifier(path: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """A model trained by this script (``best.pt`` / ``last.pt``), rebuilt from its stored arguments.

    Returns:
        ``(model in eval mode, checkpoint dict without the optimizer)``; ``ckpt["data_cfg"]`` gives the transforms.
    """
    if not Path(path).is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "args" not in ckpt or "model" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint written by eval/finetune.py")
    args = argparse.Namespace(**ckpt["args"])
    model, _ = build_model(args, ckpt["num_classes"], load_init=False)
    model.load_state_dict(ckpt["model"])
    ckpt.pop("optimizer", None)
    return model.to(device).eval(), ckpt


def eval_transform(data_cfg: dict):
    """The evaluation transform (resize, tensor, normalise) for a model's ``data_cfg``."""
    args = argparse.Namespace(randaug=None, reprob=0.0, hflip=0.0, scale=None)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items()}
    return build_transforms(args, cfg)[1]


def load_vit(spec: str, device: str = "cpu") -> tuple[nn.Module, dict, str]:
    """A ViT for analysis (attention maps, CKA) from a spec:

    * a checkpoint written by this script (``runs/x/best.pt``): the trained classifier;
    * a diffclip config name, optionally with weights as ``NAME@PRETRAINED`` (``DiffCLIP-Tiny-64@path/to/dir``):
      its vision tower (no head).

    Returns:
        ``(model in eval mode, data_cfg, label)``.
    """
    import diffclip

    name, _, pretrained = spec.partition("@")
    if Path(spec).is_file():
        model, ckpt = load_classifier(spec, device)
        return model, ckpt["data_cfg"], f"{ckpt['args']['model']} ({'/'.join(Path(spec).resolve().parts[-3:-1])})"
    if name in diffclip.list_models() or name.startswith("hf-hub:"):
        try:
            clip = diffclip.create_model(name, pretrained=pretrained or None)
        except FileNotFoundError as e:
            raise UsageError(f"{spec}: {e}") from None
        pp = clip.preprocess_cfg
        data_cfg = dict(img_size=clip.visual.patch_embed.img_size[0], in_chans=3,
                        mean=tuple(pp.get("mean", (0.485, 0.456, 0.406))), std=tuple(pp.get("std", (0.229, 0.224, 0.225))))
        return clip.visual.to(device).eval(), data_cfg, f"{name} vision tower"
    raise UsageError(f"{spec!r} is neither a checkpoint file of eval/finetune.py nor a diffclip model name "
                     f"({', '.join(diffclip.list_models())}), optionally NAME@PRETRAINED")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        results = run(args)
    except UsageError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. a diverging loss
        print(f"finetune.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in results.items() if k != "args"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
