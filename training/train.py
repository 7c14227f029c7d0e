"""The training step and the epoch loop of contrastive training, and the validation pass.

A step is: the learning rate of the step (linear warm-up, then cosine), forward and backward over
``accum_freq`` micro-batches (:func:`forward_backward`), the gradient of the loss's own parameters averaged
over ranks, optional clipping, the AdamW step (through the grad scaler with fp16), and the clamp of the logit
scale to [0, ln 100].
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from diffclip.errors import InputError, RunError
from diffclip.files import write_text
from diffclip.loss import clamp_logit_scale
from diffclip.metrics import retrieval_metrics

from .distributed import DistInfo, all_reduce_mean, preemption_signals_blocked

__all__ = ["unwrap_model", "param_groups", "cosine_lr", "const_lr", "encode", "backward", "optimizer_step",
           "forward_backward", "train_step", "TrainState", "train_one_epoch", "evaluate_val", "OPEN_CLIP_TAGS",
           "tensorboard_scalars"]

log = logging.getLogger("diffclip.train")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on weight matrices only, through timm's
    ``param_groups_weight_decay`` (open_clip's rule).

    No decay on: every parameter with fewer than 2 dimensions and every bias (LayerNorm gains, the head-wise
    RMSNorm gains ``diff_norm.weight``, the differential-attention vectors ``lambda_q1``/``lambda_k1``/
    ``lambda_q2``/``lambda_k2``, ``logit_scale``), the positional and class embeddings (``visual.pos_embed``,
    ``visual.cls_token`` - what timm's ``no_weight_decay()`` lists - and the text ``positional_embedding``) and
    SigLIP's ``logit_bias``. Decay on the projections, MLP and attention matrices,
    patch embedding and token embedding.

    Returns:
        ``[{"params": decay, "weight_decay": wd, "name": "decay"}, {"params": no_decay, "weight_decay": 0., ...}]``.
    """
    from timm.optim import param_groups_weight_decay

    skip = ["positional_embedding"]
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "no_weight_decay"):
        skip += [f"visual.{n}" for n in visual.no_weight_decay()]
    groups = param_groups_weight_decay(model, weight_decay if weight_decay else 1.0, no_weight_decay_list=skip)
    decay = [p for g in groups if g["weight_decay"] > 0 for p in g["params"]]
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def cosine_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``base_lr * (step + 1) / warmup`` during the warm-up,
    then ``0.5 * (1 + cos(pi * e / E)) * base_lr`` with ``e = step - warmup``, ``E = total_steps - warmup``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base_lr


def const_lr(step: int, base_lr: float, warmup: int, total_steps: int) -> float:
    """Linear warm-up, then constant."""
    return base_lr * (step + 1) / warmup if step < warmup else base_lr


def encode(model: nn.Module, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(image_features, text_features, logit_scale[, logit_bias])``: L2-normalised (B, D) features in fp32,
    the exponentiated scale and, for a SigLIP model, the bias, through ``model``'s forward (so that DDP sees the
    call). ``loss_fn(*encode(...))`` is the loss."""
    out = model(images, texts)
    feats = (F.normalize(out["image_embed"].float(), dim=-1), F.normalize(out["text_embed"].float(), dim=-1),
             out["logit_scale"].float())
    return feats + ((out["logit_bias"].float(),) if "logit_bias" in out else ())


def backward(loss: torch.Tensor, scaler=None) -> None:
    """``loss.backward()``, through the grad scaler (fp16) when one is given."""
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
    else:
        loss.backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler=None, grad_clip_norm: float | None = None,
                   params=None) -> None:
    """The optimizer step after :func:`backward`: unscale (fp16 scaler), clip the gradient norm of ``params``
    (default: the optimizer's) to ``grad_clip_norm``, step, update the scaler."""
    use_scaler = scaler is not None and scaler.is_enabled()
    if grad_clip_norm:
        if use_scaler:
            scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]] if params is None else params
        torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    if use_scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def forward_backward(model: nn.Module, loss_fn: nn.Module, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     scaler=None) -> torch.Tensor:
    """Forward and backward passes of one optimizer step; gradients are accumulated in ``.grad``.

    With one micro-batch this is ``loss(encode(batch)).backward()``. With ``k > 1`` micro-batches it gives the
    gradient of the loss over their union (open_clip's ``--accum-freq`` scheme): the features of every
    micro-batch are first computed without gradients and cached; then each micro-batch ``j`` is encoded again
    with gradients and the loss over the union (cached features of the others, fresh ones of ``j``) is
    backpropagated, which adds the union-loss gradient through micro-batch ``j``. The sum over ``j`` is the
    gradient of the union loss. The logit scale (and SigLIP's bias) enter with gradients in the last pass only,
    so that their gradient is counted once; DDP synchronises gradients in that last pass only (``no_sync``).

    Args:
        model: the model (DDP-wrapped or not); ``model(images, texts)`` returns the DiffCLIP output dict.
        loss_fn: :class:`diffclip.loss.ClipLoss` or :class:`diffclip.loss.SigLipLoss`.
        micro_batches: ``k`` pairs ``(images (b, 3, H, W), texts (b, ctx))`` already on the device.
        autocast: factory of the autocast context.
        scaler: a ``torch.amp.GradScaler`` (fp16) or None.

    Returns:
        The loss of this rank (0-d, detached).
    """
    if len(micro_batches) == 1:
        images, texts = micro_batches[0]
        with autocast():
            loss = loss_fn(*encode(model, images, texts))
        backward(loss, scaler)
        return loss.detach()

    with torch.no_grad(), autocast():
        cached = [encode(model, images, texts)[:2] for images, texts in micro_batches]
    ddp = getattr(model, "_orig_mod", model)  # DDP, possibly inside torch.compile's wrapper
    is_ddp = isinstance(ddp, DistributedDataParallel)
    for j, (images, texts) in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        sync = contextlib.nullcontext() if (last or not is_ddp) else ddp.no_sync()
        with sync:
            with autocast():
                img, txt, *scalars = encode(model, images, texts)
                all_img = torch.cat([c[0] for c in cached[:j]] + [img] + [c[0] for c in cached[j + 1:]])
                all_txt = torch.cat([c[1] for c in cached[:j]] + [txt] + [c[1] for c in cached[j + 1:]])
                loss = loss_fn(all_img, all_txt, *(s if last else s.detach() for s in scalars))
            backward(loss, scaler)
    return loss.detach()


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, scaler=None,
               grad_clip_norm: float | None = None) -> torch.Tensor:
    """One optimizer step (the learning rate must already be set): zero the gradients, forward/backward,
    clip, step, clamp the logit scale.

    Returns:
        The loss of this rank (0-d, detached).
    """
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(model, loss_fn, micro_batches, autocast, scaler)
    optimizer_step(optimizer, scaler, grad_clip_norm)
    clamp_logit_scale(unwrap_model(model).logit_scale)
    return loss


_RANKS = ("mean_rank", "median_rank")

#: results.jsonl field -> TensorBoard tag, per record type: open_clip_train's names (open_clip 3.3.0,
#: src/open_clip_train/train.py ``train_one_epoch``/``evaluate``/``get_clip_metrics``, zero_shot.py) where it has
#: one. ``image_retrieval`` (captions query images) is open_clip's ``text_to_image``, ``text_retrieval`` its
#: ``image_to_text``. Other fields keep ``<type>/<field>``; zero-shot fields are ``val/<set>-zeroshot-val-<name>``.
OPEN_CLIP_TAGS = {
    "train": {"loss": "train/loss", "logit_scale": "train/scale", "lr": "train/lr", "data_time": "train/data_time",
              "batch_time": "train/batch_time", "samples_per_second": "train/samples_per_second",
              "samples_per_second_per_process": "train/samples_per_second_per_gpu"},
    "val": {"val_loss": "val/clip_val_loss", "num_samples": "val/num_samples",
            **{f"image_retrieval_{m}": f"val/text_to_image_{m}" for m in _RANKS},
            **{f"text_retrieval_{m}": f"val/image_to_text_{m}" for m in _RANKS},
            **{f"image_retrieval_recall@{k}": f"val/text_to_image_R@{k}" for k in (1, 5, 10)},
            **{f"text_retrieval_recall@{k}": f"val/image_to_text_R@{k}" for k in (1, 5, 10)}},
    "zeroshot": {"acc1": "val/{dataset}-zeroshot-val-top1", "acc5": "val/{dataset}-zeroshot-val-top5"},
}


def tensorboard_scalars(kind: str, step: int, values: dict, context: dict) -> tuple[int, dict[str, float]]:
    """The TensorBoard global step and ``{tag: number}`` of a results.jsonl record (:data:`OPEN_CLIP_TAGS`).

    As open_clip_train logs them: training records at the optimizer step; evaluations (``val``, ``zeroshot``) at
    the number of epochs done (``context["epoch"] + 1``), with ``val/epoch``; a zero-shot set is named by its
    ``context["dataset"]`` (``val/imagenet-zeroshot-val-top1`` for a folder named ``imagenet``).
    """
    tags = OPEN_CLIP_TAGS.get(kind, {})
    dataset = context.get("dataset", "")
    scalars = {}
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            default = f"val/{{dataset}}-zeroshot-val-{name}" if kind == "zeroshot" else f"{kind}/{name}"
            tag = tags.get(name, default)
            scalars[tag.format(dataset=dataset) if kind == "zeroshot" else tag] = value
    if kind not in ("val", "zeroshot"):
        return step, scalars
    epochs_done = int(context["epoch"]) + 1
    if kind == "val":
        scalars["val/epoch"] = epochs_done
    return epochs_done, scalars


class MetricsLogger:
    """The one place a run's metrics go (rank 0): a line of JSON per record in ``results.jsonl`` and, when
    ``tensorboard_dir`` is given, each number as a TensorBoard scalar under open_clip_train's tag
    (:func:`tensorboard_scalars`): training records at their step, evaluations at the epoch.

    A resumed run passes ``resume_step`` (the checkpoint's step): the records of later steps, which the resumed run
    logs again, are dropped from ``results.jsonl`` (``dropped`` counts them, with any line a kill cut short) and
    TensorBoard hides its events of those steps (``purge_step``), so every step appears once (an evaluation that
    the resumed run repeats, logged at its epoch, not its step, can appear twice there, as in open_clip)."""

    def __init__(self, results_path, tensorboard_dir=None, resume_step: int | None = None, trackers=()):
        self.path = Path(results_path)
        self.tb = None
        self.trackers = list(trackers)  # e.g. training/tracking.py's WandbTracker: log(kind, step, values, context)
        self.dropped = 0
        if resume_step is not None and self.path.is_file():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    step = int(record.get("step", 0))
                except (ValueError, TypeError, AttributeError):
                    step = None
                if step is None or step > resume_step:
                    self.dropped += 1
                else:
                    kept.append(line + "\n")
            if self.dropped:
                write_text(self.path, "".join(kept))
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tensorboard_dir),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, kind: str, step: int, values: dict, **context) -> None:
        """Appends ``{"type": kind, "step": step, **context, **values}``; ``values``' numbers go to TensorBoard
        under open_clip's tags (:func:`tensorboard_scalars`)."""
        with open(self.path, "a") as f:
            f.write(dumps({"type": kind, "step": step, **context, **values}) + "\n")
        if self.tb is not None:
            tb_step, scalars = tensorboard_scalars(kind, step, values, context)
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, tb_step)
        for tracker in self.trackers:
            tracker.log(kind, step, values, context)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


@dataclass
class TrainState:
    """Everything the epoch loop needs; ``step`` counts optimizer steps since the start of training."""

    args: object
    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: object
    dist: DistInfo
    autocast: Callable
    input_dtype: torch.dtype
    lr_fn: Callable[[int], float]
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    epoch: int = 0
    metrics: MetricsLogger | None = None


def _to_device(batch, device, dtype):
    images, texts = batch[0], batch[1]
    return images.to(device=device, dtype=dtype, non_blocking=True), texts.to(device=device, non_blocking=True)


def train_one_epoch(state: TrainState, data, start_batch: int = 0,
                    on_step: Callable[[TrainState, int], None] | None = None) -> None:
    """Trains ``state.epoch`` from micro-batch ``start_batch`` (the loader must start there) to the end.

    Args:
        state: the run; ``state.step`` is advanced.
        data: a ``training.data.DataInfo`` (``dataloader``, ``num_batches``): the batches of this epoch.
        start_batch: micro-batches of this epoch already done (a mid-epoch resume), a multiple of accum_freq.
        on_step: called as ``on_step(state, batches_done_in_epoch)`` after every optimizer step, on every rank
            (checkpointing).
    """
    args, info = state.args, state.dist
    accum = args.accum_freq
    model = state.model
    model.train()
    step_in_epoch, n_steps = start_batch // accum, state.steps_per_epoch
    global_batch = args.batch_size * accum * info.world_size
    bar = tqdm(total=n_steps, initial=step_in_epoch, disable=not info.is_master, desc=f"epoch {state.epoch}",
               unit="step", dynamic_ncols=True, leave=False, mininterval=1.0)
    micro: list = []
    data_time = batch_time = 0.0
    n_timed = 0
    t_last = time.perf_counter()
    t_log = t_last
    batches = iter(data.dataloader)
    with preemption_signals_blocked():  # the first batch forks the loader's workers: they outlive such a signal
        first = next(batches, None)
    for batch in itertools.chain(() if first is None else (first,), batches):
        if step_in_epoch >= n_steps:
            break
        micro.append(_to_device(batch, info.device, state.input_dtype))
        if len(micro) < accum:
            continue
        t_data = time.perf_counter()
        data_time += t_data - t_last
        lr = state.lr_fn(state.step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(model, state.loss_fn, state.optimizer, micro, state.autocast, state.scaler,
                          args.grad_clip_norm)
        micro = []
        state.step += 1
        step_in_epoch += 1
        t_last = time.perf_counter()
        batch_time += t_last - t_data
        n_timed += 1
        bar.update(1)
        if state.step % args.log_every_n_steps == 0 or step_in_epoch == n_steps:
            loss_mean = all_reduce_mean(loss.float(), info).item()
            if info.is_master:
                elapsed = t_last - t_log
                plain = unwrap_model(model)
                scale = plain.logit_scale.exp().item()
                record = {"epoch_progress": step_in_epoch / n_steps, "loss": loss_mean, "lr": lr,
                          "logit_scale": scale, "samples_per_second": n_timed * global_batch / max(elapsed, 1e-9),
                          "samples_per_second_per_process": n_timed * global_batch / info.world_size
                          / max(elapsed, 1e-9), "data_time": data_time / n_timed, "batch_time": batch_time / n_timed}
                if plain.logit_bias is not None:
                    record["logit_bias"] = plain.logit_bias.item()
                bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}", scale=f"{scale:.1f}")
                log.info("epoch %d step %d/%d (%d in epoch) loss %.4f lr %.3e logit_scale %.2f %.1f samples/s "
                         "data %.3fs batch %.3fs", state.epoch, state.step, state.total_steps, step_in_epoch,
                         loss_mean, lr, scale, record["samples_per_second"], record["data_time"],
                         record["batch_time"])
                if state.metrics is not None:
                    state.metrics.log("train", state.step, record, epoch=state.epoch)
            data_time = batch_time = 0.0
            n_timed = 0
            t_log = time.perf_counter()
        if on_step is not None:
            on_step(state, step_in_epoch * accum)
        t_last = time.perf_counter()
    bar.close()
    if step_in_epoch < n_steps:
        raise RunError(f"the data loader of epoch {state.epoch} ended after {step_in_epoch} of {n_steps} steps")


@torch.no_grad()
def evaluate_val(model: nn.Module, loss_fn_local: nn.Module, data, device: torch.device, autocast, input_dtype
                 ) -> dict[str, float]:
    """Validation on one process: the contrastive loss over each batch (mean over batches) and retrieval
    recall@1/5/10 and ranks over the whole set (one caption per image).

    Returns:
        ``{"val_loss", "image_retrieval_recall@k", "text_retrieval_recall@k", "num_samples",
        "image_retrieval_mean_rank", "image_retrieval_median_rank", "text_retrieval_mean_rank",
        "text_retrieval_median_rank"}``: ranks are 1-based, the median rounded down, as open_clip's
        ``get_clip_metrics`` (``image_retrieval``: each caption ranks the images, its ``text_to_image``).
    """
    model.eval()
    imgs, txts, losses = [], [], []
    for batch in data.dataloader:
        images, texts = _to_device(batch, device, input_dtype)
        with autocast():
            img, txt, *scalars = encode(model, images, texts)
            loss = loss_fn_local(img, txt, *scalars)
        losses.append(loss.float().item())
        imgs.append(img.float().cpu())
        txts.append(txt.float().cpu())
    model.train()
    if not imgs:
        raise InputError("the validation set is empty")
    img, txt = torch.cat(imgs), torch.cat(txts)
    out = {"val_loss": sum(losses) / len(losses), "num_samples": img.shape[0]}
    ranks: dict = {}
    out.update(retrieval_metrics(img, txt, torch.arange(img.shape[0]), ranks=ranks))
    for direction in ("image", "text"):
        r = ranks[direction].double()
        out[f"{direction}_retrieval_mean_rank"] = r.mean().item() + 1
        out[f"{direction}_retrieval_median_rank"] = math.floor(r.quantile(0.5).item()) + 1
    return out


def dumps(record: dict) -> str:
    """JSON line of a results record (non-finite floats as strings)."""
    return json.dumps({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in record.items()})
