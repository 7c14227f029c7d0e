"""Train or fine-tune a ViT classifier: differential (``diff_vit_*``) or standard (``std_vit_*``, timm's ``vit_*``)
attention, from scratch, from a timm checkpoint or from a DiffCLIP/CLIP checkpoint's vision tower with a new head.

Examples::

    # a 38K-parameter DiffViT on Fashion-MNIST (idx files of the Debian package), 1 channel, patch 7
    python training/finetune.py --model diff_vit_nano_patch4_28 --dataset fashion_mnist \\
        --data-root /usr/share/datasets/fashion-mnist --in-chans 1 --patch-size 7 --embed-dim 40 --depth 3 \\
        --epochs 10 --output runs/fmnist_diff

    # the vision tower of a DiffCLIP checkpoint, new 37-way head, layer-wise lr decay
    python training/finetune.py --model DiffCLIP-Tiny-64 --init path/to/saved_model --dataset pets \\
        --data-root data/pets --lr 1e-4 --layer-decay 0.75 --output runs/pets

The loop is nanoGPT-plain; the pieces come from timm: the models, ``create_transform`` (RandAugment, random
erasing), ``Mixup`` (mixup / cutmix), the label-smoothing losses, ``create_optimizer_v2`` (AdamW, layer decay,
no weight decay on 1-D parameters) and the cosine scheduler with warm-up. The test split is evaluated after
every epoch. The run folder ``--output`` has the trainer's layout (``training/run_folder.py``): the run lock,
``params.txt``, ``out.log``, ``results.jsonl`` (one ``"type": "epoch"`` record per epoch) + ``tensorboard/``,
``checkpoints/`` (``epoch_{e}.pt`` and, with ``--save-every-n-steps``, ``step_{s}.pt``; the two newest are kept;
``--resume`` continues from the newest that loads, at the exact step: the same weights as a run never stopped),
plus ``best.pt`` (the classifier of the best epoch, for ``eval/visualize.py`` and ``eval/cka.py``) and
``results.json`` (``acc1``/``acc5`` of the last epoch as fractions, ``best_acc1``, parameter count, epochs, wall
and CPU time).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffclip.training.checkpoint import checkpoint_step, find_loadable, load_checkpoint, save_checkpoint, set_rng_state
from diffclip.training.distributed import DistInfo
from diffclip.training.run_folder import RunLock
from diffclip.training.train import MetricsLogger, backward, optimizer_step
from torch import nn

from diffclip.classifier import (
    build_model,
    build_transforms,
    count_params,
    is_diffclip_name,
    random_train_transform,
)
from diffclip.cli import ArgumentParser, UsageError, nonneg_int, one_line, positive_int, setup_logging
from diffclip.cli import run as run_program
from diffclip.errors import RunError
from diffclip.files import check_writable, save_torch, write_json, write_text
from diffclip.hub import check_state_dict
from diffclip.metrics import classification_metrics
from diffclip.runtime import (
    PRECISION_HELP,
    PRECISIONS,
    cast_model,
    get_autocast,
    get_input_dtype,
    needs_grad_scaler,
    resolve_device,
    seed_everything,
)

log = logging.getLogger("diffclip.finetune")

__all__ = ["parse_args", "classifier_kwargs", "build_datasets", "evaluate", "main", "run", "AUG_PRESETS"]

# --aug presets; every field can also be set by its own flag (--randaug, --mixup, ...), which wins.
AUG_PRESETS = {
    "none": dict(randaug=None, mixup=0.0, cutmix=0.0, smoothing=0.0, reprob=0.0, hflip=0.0, scale=None),
    "light": dict(randaug=None, mixup=0.0, cutmix=0.0, smoothing=0.1, reprob=0.0, hflip=0.5, scale=(0.8, 1.0)),
    "strong": dict(randaug="rand-m9-mstd0.5", mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, hflip=0.5,
                   scale=(0.5, 1.0)),
}


# ---------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description="Train / fine-tune a (differential) ViT classifier.")
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True,
                   help="a timm model (diff_vit_*, std_vit_*, vit_*...) or a diffclip config name (DiffCLIP-Tiny-64...)"
                        " whose vision tower gets a new head")
    m.add_argument("--init", default="scratch",
                   help="'scratch', a checkpoint file for a timm model (.pt/.pth/.safetensors; its head is dropped),"
                        " or for a diffclip config name anything diffclip.create_model(pretrained=...) takes")
    m.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the model's)")
    m.add_argument("--in-chans", type=positive_int, default=None, help="image channels (1 = grayscale; default 3)")
    m.add_argument("--patch-size", type=positive_int, default=None)
    m.add_argument("--embed-dim", type=positive_int, default=None)
    m.add_argument("--depth", type=positive_int, default=None)
    m.add_argument("--num-heads", type=positive_int, default=None, help="the baseline's head count (even for diff models)")
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
    d.add_argument("--workers", type=nonneg_int, default=2)
    d.add_argument("--cache", action="store_true",
                   help="decode and transform once into memory: the eval split, and the train split when it has no "
                        "random augmentation (small datasets such as MNIST)")
    d.add_argument("--train-subset", type=positive_int, default=None, help="use only the first N training images")
    d.add_argument("--eval-subset", type=positive_int, default=None, help="use only the first N evaluation images")
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
    o.add_argument("--precision", choices=PRECISIONS, default="fp32", help=PRECISION_HELP)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    o.add_argument("--device", default="auto", help="auto (cuda if available, else mps, else cpu), cpu, cuda, mps")
    r = p.add_argument_group("output")
    r.add_argument("--output", required=True, help="run folder: checkpoints/, results.jsonl, tensorboard/, best.pt, "
                   "results.json (the trainer's layout)")
    r.add_argument("--resume", nargs="?", const="latest", choices=("latest",), default=None,
                   help="continue from the newest checkpoint of OUTPUT that loads ('--resume' = '--resume latest')")
    r.add_argument("--save-every-n-steps", type=nonneg_int, default=0, help="also checkpoint every n steps, "
                   "mid-epoch included (0: at the end of each epoch only)")
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
    if args.init != "scratch" and not is_diffclip_name(args.model) and not Path(args.init).is_file():
        raise UsageError(f"--init {args.init} is not 'scratch' or a checkpoint file")


def classifier_kwargs(args: argparse.Namespace, num_classes: int) -> dict:
    """The flags as the keywords of :func:`diffclip.classifier.build_model` (the recipe stored in checkpoints)."""
    return dict(model_name=args.model, num_classes=num_classes, drop_path_rate=args.drop_path,
                img_size=args.img_size, in_chans=args.in_chans, patch_size=args.patch_size, embed_dim=args.embed_dim,
                depth=args.depth, num_heads=args.num_heads, mlp_ratio=args.mlp_ratio,
                qkv_bias=None if args.qkv_bias is None else bool(args.qkv_bias), lambda_init=args.lambda_init)


def _augmentation(args: argparse.Namespace) -> dict:
    return dict(randaug=args.randaug, hflip=args.hflip, scale=args.scale, reprob=args.reprob)


# ---------------------------------------------------------------------------------------------------- data
class _Deferred:
    """A transform set after the dataset is built (the model, built from the class count, decides it)."""

    transform = None

    def __call__(self, img):
        return self.transform(img)


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
@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str = "fp32", progress: bool = False) -> dict:
    """Mean cross-entropy and :func:`diffclip.metrics.classification_metrics` (``acc1``, ``acc5`` with >= 5
    classes, ``mean_per_class_recall``; fractions, as every metric of diffclip) of ``model`` over ``loader``."""
    from tqdm import tqdm

    model.eval()
    logits_all, targets = [], []
    autocast, input_dtype = get_autocast(precision, device.type), get_input_dtype(precision)
    for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
        x, y = x.to(device, dtype=input_dtype or x.dtype), y.to(device)
        with autocast():
            logits = model(x)
        logits_all.append(logits.float().cpu())
        targets.append(y.cpu())
    logits, y = torch.cat(logits_all), torch.cat(targets)
    metrics = classification_metrics(logits, y)
    metrics.setdefault("acc5", 1.0)  # fewer than 5 classes: every class is in the top 5
    return {"loss": F.cross_entropy(logits, y).item(), **metrics}


def _checkpoint_names(ckpt_dir: Path) -> list[Path]:
    return [p for p in ckpt_dir.glob("*.pt") if p.name.startswith(("epoch_", "step_"))]


def run(args: argparse.Namespace) -> dict:
    """Trains and evaluates as described by ``args`` in the run folder ``args.output`` (locked for the run's
    life); returns the final results dict (also in results.json)."""
    out = Path(args.output)
    check_writable(out / "results.json", "--output")
    lock = RunLock(out, "another --output")
    try:
        if (out / "last.pt").exists() or (out / "log.jsonl").exists():
            raise UsageError(f"--output {out} is a run folder of the older finetune (last.pt, log.jsonl), which this "
                             "one cannot continue (its best.pt still loads for analysis): give another --output")
        has_run = (out / "checkpoints").is_dir() or (out / "results.jsonl").exists()
        if has_run and not args.resume:
            raise UsageError(f"--output {out} holds a run already: pass --resume to continue it, or another --output")
        if args.resume and not has_run:
            raise UsageError(f"--resume: {out} holds no run to continue (no checkpoints/)")
        return _train(args, out)
    finally:
        lock.release(remove_if_empty=True)


def _train(args: argparse.Namespace, out: Path) -> dict:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from tqdm import tqdm

    t_start, cpu_start = time.time(), time.process_time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    progress = not args.no_progress

    seed_everything(args.seed)
    # Datasets first (the class count sizes the head); their transforms depend on the model, set after it.
    train_tf, eval_tf = _Deferred(), _Deferred()
    train_ds, eval_ds = build_datasets(args, train_tf, eval_tf)
    num_classes = len(eval_ds.classnames)
    if len(train_ds.classnames) != num_classes:
        raise UsageError(f"train and eval splits disagree on the classes ({len(train_ds.classnames)} vs {num_classes})")
    use_mixup = args.mixup > 0 or args.cutmix > 0
    drop_last = use_mixup and len(train_ds) >= args.batch_size
    steps = len(train_ds) // args.batch_size if drop_last else math.ceil(len(train_ds) / args.batch_size)
    if steps == 0:
        raise UsageError(f"the training split has fewer images ({len(train_ds)}) than one batch")
    ckpt_dir = out / "checkpoints"
    resume = (None, None)
    if args.resume:
        resume = find_loadable(ckpt_dir, steps) or (None, None)

    recipe = classifier_kwargs(args, num_classes)
    init = None if args.init == "scratch" or resume[1] is not None else args.init
    try:
        model, data_cfg = build_model(**recipe, init=init, mean=args.mean, std=args.std)
    except (OSError, pickle.UnpicklingError) as e:
        raise UsageError(f"--init {args.init}: {one_line(e)}") from None
    train_tf.transform, eval_tf.transform = build_transforms(data_cfg, **_augmentation(args))
    if resume[1] is not None:
        try:
            check_state_dict(model, resume[1]["state_dict"], source=f"checkpoint {resume[0].name} (written for "
                             f"--model {resume[1].get('model_name')})")
        except RuntimeError as e:
            raise UsageError(f"--resume: {one_line(e)}") from None
    if args.cache:
        eval_ds = _cached(eval_ds, "eval", args.workers, progress)
        if not random_train_transform(**_augmentation(args)):
            train_ds = _cached(train_ds, "train", args.workers, progress)
    cast_model(model.to(device), args.precision)
    n_params = count_params(model)

    mixup = None
    if use_mixup:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    # the training loader starts its workers afresh each epoch (seeded from the epoch's seed): a resumed epoch
    # replays the same order and augmentations
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=args.batch_size, shuffle=True,
                                               drop_last=drop_last, num_workers=args.workers)
    eval_loader = torch.utils.data.DataLoader(eval_ds, batch_size=max(args.batch_size, 256), shuffle=False,
                                              num_workers=args.workers, persistent_workers=args.workers > 0)
    assert len(train_loader) == steps

    opt_kw = {"layer_decay": args.layer_decay} if args.layer_decay else {}
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.wd, **opt_kw)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.epochs, min_lr=args.min_lr,
                                       warmup_lr=args.lr * 1e-3, warmup_epochs=args.warmup_epochs,
                                       step_on_epochs=False, updates_per_epoch=steps)
    scaler = torch.amp.GradScaler(device.type) if needs_grad_scaler(args.precision, device.type) else None
    state = SimpleNamespace(model=model, optimizer=optimizer, scaler=scaler, step=0, epoch=0, args=args)
    info = DistInfo(device=device)
    # what the checkpoints carry beside the trainer's entries (the classifier recipe, as in best.pt)
    run = {"best_acc1": -1.0, "metrics": None, "wall_time": 0.0, "cpu_time": 0.0, "epoch_loss": [0.0, 0]}
    classifier = {"classifier": recipe, "num_classes": num_classes, "classnames": [str(c) for c in train_ds.classnames],
                  "data_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()}}

    # ---- the run folder: logs, and the checkpoint to continue from ----
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(logging.INFO, out / "out.log")
    write_text(out / "params.txt", "".join(f"{k}: {v}\n" for k, v in sorted(vars(args).items())))
    metrics_log = MetricsLogger(out / "results.jsonl", out / "tensorboard")
    batches_done = 0
    if resume[1] is not None:
        try:
            batches_done = load_checkpoint(resume[0], state, info, resume[1])
        except (ValueError, KeyError) as e:
            raise UsageError(f"--resume: {resume[0]} was written with another optimizer ({one_line(e)}); use a new "
                             "--output") from None
        run.update({k: resume[1][k] for k in run})
        scheduler.step_update(state.step)
        metrics_log.log("resume", state.step, {}, epoch=state.epoch, batches_done=batches_done,
                        checkpoint=str(resume[0]))
    elif args.resume:
        log.info("--resume: no checkpoint in %s yet: starting from scratch", ckpt_dir)
    log.info("%s: %s parameters, %s train / %s eval images, %d classes, %d epochs", args.model, f"{n_params:,}",
             f"{len(train_ds):,}", f"{len(eval_ds):,}", num_classes, args.epochs)

    saved = sorted(_checkpoint_names(ckpt_dir), key=lambda p: checkpoint_step(p, steps))
    wall0, cpu0 = run["wall_time"], run["cpu_time"]

    def run_wall() -> float:
        return wall0 + time.time() - t_start

    def run_cpu() -> float:
        return cpu0 + time.process_time() - cpu_start

    def save(name: str, batches: int, epoch: int) -> None:
        """A checkpoint; the two newest are kept (a newest file that does not read falls back to the other)."""
        path = ckpt_dir / name
        run.update(wall_time=run_wall(), cpu_time=run_cpu())
        save_checkpoint(path, state, batches, info, epoch=epoch, delete=saved[:-1], extra={**classifier, **run})
        saved[:] = [p for p in saved[-1:] if p != path] + [path]

    autocast, input_dtype = get_autocast(args.precision, device.type), get_input_dtype(args.precision)
    try:
        for epoch in range(state.epoch, args.epochs):
            state.epoch = epoch
            t0 = time.time()
            seed_everything(args.seed * 1000 + epoch)  # data order / augmentation reproducible across resumes
            model.train()
            batches = iter(train_loader)
            if batches_done:  # inside the epoch: the same batches are drawn and passed over, then the generators
                for _ in range(batches_done):  # are where the checkpoint left them
                    next(batches)
                set_rng_state(resume[1]["rng"][0])
            run["epoch_loss"] = run["epoch_loss"] if batches_done else [0.0, 0]
            bar = tqdm(batches, total=steps, initial=batches_done, desc=f"epoch {epoch + 1}/{args.epochs}",
                       leave=False, disable=not progress)
            for done, (x, y) in enumerate(bar, start=batches_done + 1):
                x, y = x.to(device, dtype=input_dtype or x.dtype), y.to(device)
                if mixup is not None and x.size(0) % 2 == 0:
                    x, y_t = mixup(x, y)
                    loss_fn = criterion
                else:
                    y_t = y
                    loss_fn = criterion if mixup is None else nn.CrossEntropyLoss(label_smoothing=args.smoothing)
                with autocast():
                    logits = model(x)
                loss = loss_fn(logits.float(), y_t)
                if not math.isfinite(loss.item()):
                    raise RunError(f"loss is {loss.item()} at epoch {epoch + 1}; lower --lr or use fp32")
                optimizer.zero_grad(set_to_none=True)
                backward(loss, scaler)
                optimizer_step(optimizer, scaler, args.clip_grad, model.parameters())
                state.step += 1
                scheduler.step_update(state.step)
                run["epoch_loss"][0] += loss.item() * x.size(0)
                run["epoch_loss"][1] += x.size(0)
                bar.set_postfix(loss=f"{run['epoch_loss'][0] / run['epoch_loss'][1]:.4f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if args.save_every_n_steps and state.step % args.save_every_n_steps == 0 and done < steps:
                    save(f"step_{state.step}.pt", done, epoch)  # (the epoch's last step: the epoch's checkpoint)
            batches_done = 0
            train_time = time.time() - t0
            metrics = evaluate(model, eval_loader, device, args.precision, progress)
            is_best = metrics["acc1"] > run["best_acc1"]
            run.update(best_acc1=max(run["best_acc1"], metrics["acc1"]), metrics=metrics)
            rec = {"train_loss": run["epoch_loss"][0] / run["epoch_loss"][1],
                   "lr": max(g["lr"] for g in optimizer.param_groups), "eval_loss": metrics["loss"],
                   "acc1": metrics["acc1"], "acc5": metrics["acc5"], "best_acc1": run["best_acc1"],
                   "epoch_time": time.time() - t0, "train_time": train_time, "wall_time": run_wall(),
                   "cpu_time": run_cpu()}
            metrics_log.log("epoch", state.step, rec, epoch=epoch + 1)
            log.info("epoch %d/%d: train_loss %.4f eval_loss %.4f acc1 %.4f acc5 %.4f (%.1fs)", epoch + 1, args.epochs,
                     rec["train_loss"], metrics["loss"], metrics["acc1"], metrics["acc5"], rec["epoch_time"])
            if is_best:
                save_torch(out / "best.pt", {"state_dict": model.state_dict(), "model_name": args.model,
                                             "epoch": epoch + 1, "metrics": metrics, **classifier})
            save(f"epoch_{epoch + 1}.pt", 0, epoch + 1)
    finally:
        metrics_log.close()

    metrics = run["metrics"]
    results = {"model": args.model, "init": args.init, "dataset": args.dataset, "acc1": metrics["acc1"],
               "acc5": metrics["acc5"], "eval_loss": metrics["loss"], "best_acc1": run["best_acc1"],
               "params": n_params, "epochs": args.epochs, "seed": args.seed, "wall_time": run["wall_time"],
               "cpu_time": run["cpu_time"], "train_images": len(train_ds), "eval_images": len(eval_ds),
               "num_classes": num_classes, "args": vars(args)}
    write_json(out / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    results = run(parse_args(argv))
    print(json.dumps({k: v for k, v in results.items() if k != "args"}, indent=2))
    return 0


def cli() -> None:
    run_program(main)


if __name__ == "__main__":
    cli()
