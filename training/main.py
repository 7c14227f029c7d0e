"""Contrastive training of DiffCLIP (and the CLIP baselines) on webdataset shards.

One process per device::

    torchrun --nproc_per_node 2 training/main.py --model DiffCLIP-Tiny-64 --train-data 'shards/{00000..00007}.tar' \\
        --batch-size 64 --epochs 10 --lr 1e-3 --warmup 100 --precision fp32 --report-to tensorboard

or ``python training/main.py ...`` for one process; multi-node through torchrun's rendezvous
(``--nnodes N --rdzv-endpoint host:port``) or SLURM (``srun python training/main.py ...``). DDP with NCCL on
CUDA and gloo on CPU. Everything a run writes goes to ``{--logs}/{--name}/``: ``params.txt``, ``out.log``,
``results.jsonl`` (one JSON object per log step and evaluation), ``checkpoints/`` (``--resume latest`` continues
from the newest at the exact step), ``tensorboard/`` and ``final_model/`` (``config.json`` +
``model.safetensors``, loadable with ``diffclip.create_model(name, pretrained=dir)``).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from diffclip.training.checkpoint import find_latest, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from diffclip.training.distributed import DistInfo, barrier, cleanup, init_distributed
from diffclip.training.params import parse_args
from diffclip.training.train import (
    TrainState,
    const_lr,
    cosine_lr,
    dumps,
    evaluate_val,
    get_autocast,
    param_groups,
    train_one_epoch,
    unwrap_model,
)
from tqdm import tqdm

import diffclip
from diffclip.loss import ClipLoss, SigLipLoss

log = logging.getLogger("train")


class CLIError(Exception):
    """Bad input detected before training: reported as one line, exit status 1."""


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints through ``tqdm.write`` so log lines do not break the progress bar."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(info: DistInfo, log_file: Path | None) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s rank{info.rank} %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler()
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if info.is_master else logging.WARNING)
    log.addHandler(console)
    if log_file is not None and info.is_master:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _broadcast(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def default_name(args) -> str:
    date = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    model = args.model.replace("/", "_").replace(":", "_")
    return f"{date}-model_{model}-lr_{args.lr}-b_{args.batch_size}-p_{args.precision}"


def _stats_dict(stats) -> dict:
    if stats is None:
        return {}
    if isinstance(stats, dict):
        d = stats
    elif hasattr(stats, "as_dict"):
        d = stats.as_dict()
    elif hasattr(stats, "__dataclass_fields__"):
        d = {k: getattr(stats, k) for k in stats.__dataclass_fields__}
    else:
        d = dict(vars(stats)) if hasattr(stats, "__dict__") else {"stats": str(stats)}
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _sum_over_ranks(d: dict, info: DistInfo) -> dict:
    if not info.distributed:
        return d
    out: list = [None] * info.world_size
    dist.all_gather_object(out, d)
    total: dict = {}
    for part in out:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def build_data(args, info: DistInfo, preprocess_train, tokenizer):
    """Checks the training shards and returns ``make_loader(epoch, skip_batches) -> DataInfo``."""
    try:
        from diffclip.training.data import expand_urls, get_wds_loader
    except ImportError as e:
        raise CLIError(f"the data module is missing ({e})") from None
    urls, weights = expand_urls(args.train_data, args.train_data_upsampling_factors)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise CLIError(f"--train-data: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")

    def make_loader(epoch: int, skip_batches: int = 0):
        return get_wds_loader(urls, preprocess_train, tokenizer, batch_size=args.batch_size,
                              num_samples=args.train_num_samples, resampled=args.dataset_resampled,
                              upsampling_factors=weights if args.train_data_upsampling_factors else None,
                              is_train=True, epoch=epoch, seed=args.seed, workers=args.workers,
                              world_size=info.world_size, rank=info.rank, skip_batches=skip_batches)

    return make_loader


def build_val(args, preprocess_val, tokenizer):
    from diffclip.training.data import expand_urls, get_wds_loader
    urls, _ = expand_urls(args.val_data)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise CLIError(f"--val-data: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")

    def make_loader():
        return get_wds_loader(urls, preprocess_val, tokenizer, batch_size=args.batch_size,
                              num_samples=args.val_num_samples, is_train=False, epoch=0, seed=args.seed,
                              workers=args.workers, world_size=1, rank=0)

    return make_loader


def run(args) -> int:
    info = init_distributed(args.device, args.dist_backend)
    setup_logging(info, None)
    # ---- checks that fail fast, identical on every rank, before any collective call ----
    try:
        diffclip.get_model_config(args.model)
    except ValueError as e:
        raise CLIError(f"--model: {e}") from None
    if args.resume == "latest" and not args.name:
        raise CLIError("--resume latest needs --name: the run folder to continue")
    name = args.name or _broadcast(default_name(args), info)
    args.name = name
    run_dir = Path(args.logs) / name
    resume_latest = args.resume == "latest"
    if args.resume and not resume_latest and not Path(args.resume).is_file():
        raise CLIError(f"--resume: checkpoint not found: {args.resume}")
    if run_dir.exists() and not args.resume:
        raise CLIError(f"run folder {run_dir} exists: pass --resume latest to continue it, or another --name")
    tokenizer = diffclip.get_tokenizer(args.model)
    seed_everything(args.seed)  # the same initial weights on every rank
    try:
        model, preprocess_train, preprocess_val = diffclip.create_model_and_transforms(args.model,
                                                                                       pretrained=args.pretrained)
    except (FileNotFoundError, ConnectionError, RuntimeError, ValueError) as e:
        raise CLIError(f"--pretrained {args.pretrained}: {e}" if args.pretrained else f"--model: {e}") from None
    try:
        make_loader = build_data(args, info, preprocess_train, tokenizer)
        make_val = build_val(args, preprocess_val, tokenizer) if args.val_data else None
        zs = None
        if args.zeroshot_data:
            from diffclip.training.zero_shot_eval import load_zeroshot_set
            zs = load_zeroshot_set(args.zeroshot_data, preprocess_val)
        data = make_loader(0)  # one loader for the whole run (persistent workers); set_epoch selects the epoch
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    steps_per_epoch = data.num_batches // args.accum_freq
    if steps_per_epoch < 1:
        raise CLIError(f"an epoch has {data.num_batches} batches of {args.batch_size} per process, fewer than "
                       f"--accum-freq {args.accum_freq}: lower --batch-size or give more data")

    # ---- the run folder and logging ----
    barrier(info)
    if info.is_master:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    barrier(info)
    setup_logging(info, run_dir / "out.log")
    if info.is_master:
        with open(run_dir / "params.txt", "w") as f:
            for k, v in sorted(vars(args).items()):
                f.write(f"{k}: {v}\n")
    log.info("run folder %s; %d process(es) on %s; model %s", run_dir, info.world_size, info.device, args.model)

    results_path = run_dir / "results.jsonl"

    def write_result(record: dict) -> None:
        if info.is_master:
            with open(results_path, "a") as f:
                f.write(dumps(record) + "\n")

    tb_writer = None
    if info.is_master and args.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        tb_writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    # ---- model, loss, optimizer ----
    model.train()
    if args.siglip and not args.pretrained:
        with torch.no_grad():
            model.logit_scale.fill_(SigLipLoss.INIT_LOGIT_SCALE)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model = model.to(info.device)
    input_dtype = torch.float32
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
        input_dtype = torch.bfloat16
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s parameters", args.model, f"{n_params:,}")
    if args.siglip:
        loss_fn = SigLipLoss(rank=info.rank, world_size=info.world_size)
        val_loss_fn = SigLipLoss()
        val_loss_fn.logit_bias = loss_fn.logit_bias
    else:
        loss_fn = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=info.rank,
                           world_size=info.world_size)
        val_loss_fn = ClipLoss()
        if not loss_fn.exact:
            log.warning("--local-loss without --gather-with-grad: the gradient misses the other ranks' column "
                        "terms (as in open_clip); add --gather-with-grad for the exact gradient")
    loss_fn = loss_fn.to(info.device)
    optimizer = torch.optim.AdamW(param_groups(model, args.wd, loss_fn), lr=args.lr,
                                  betas=(args.beta1, args.beta2), eps=args.eps)
    scaler = None
    if args.precision == "amp" and info.device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    ddp_model = model
    if info.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device] if info.device.type == "cuda" else None)
    if args.torchcompile:
        log.info("compiling the model with torch.compile")
        ddp_model = torch.compile(ddp_model)

    total_steps = steps_per_epoch * args.epochs
    warmup = min(args.warmup, total_steps)
    schedule = cosine_lr if args.lr_scheduler == "cosine" else const_lr

    def lr_fn(step: int) -> float:
        return schedule(step, args.lr, warmup, total_steps)

    autocast = get_autocast(args.precision, info.device)
    eval_autocast = (lambda: torch.autocast(info.device.type, dtype=torch.bfloat16)) if args.precision == "bf16" \
        else autocast
    state = TrainState(args=args, model=ddp_model, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler, dist=info,
                       autocast=autocast, input_dtype=input_dtype, lr_fn=lr_fn, steps_per_epoch=steps_per_epoch,
                       total_steps=total_steps, results=write_result, tb_writer=tb_writer)

    seed_everything(args.seed + info.rank)  # per-rank streams from here on (restored by a resume)

    # ---- resume ----
    batches_done = 0
    ckpt_dir = run_dir / "checkpoints"
    if args.resume:
        path = find_latest(ckpt_dir, steps_per_epoch) if resume_latest else Path(args.resume)
        if path is None:
            log.info("--resume latest: no checkpoint in %s, starting from scratch", ckpt_dir)
        else:
            batches_done = load_checkpoint(path, state, info)
            if batches_done >= steps_per_epoch * args.accum_freq:
                state.epoch, batches_done = state.epoch + 1, 0
            write_result({"type": "resume", "step": state.step, "epoch": state.epoch, "batches_done": batches_done,
                          "checkpoint": str(path)})

    log.info("training %d epochs of %d steps (global batch %d = %d per process x %d accum x %d processes), "
             "%d warm-up steps, lr %g", args.epochs, steps_per_epoch,
             args.batch_size * args.accum_freq * info.world_size, args.batch_size, args.accum_freq, info.world_size,
             warmup, args.lr)

    saved: list[Path] = sorted(p for p in ckpt_dir.glob("*.pt")) if info.is_master else []

    def save(path: Path, batches: int, epoch: int | None = None) -> None:
        save_checkpoint(path, state, batches, info, epoch=epoch,
                        delete=list(saved) if args.delete_previous_checkpoint else None)
        saved.append(path)

    def will_save_epoch(epoch: int) -> bool:
        done = epoch + 1
        return bool(args.save_frequency) and (done % args.save_frequency == 0 or done == args.epochs)

    def on_step(st: TrainState, batches: int) -> None:
        n = args.save_every_n_steps
        if not n or st.step % n:
            return
        if batches >= steps_per_epoch * args.accum_freq:
            if will_save_epoch(st.epoch):
                return  # the end-of-epoch checkpoint follows
            save(ckpt_dir / f"step_{st.step}.pt", 0, epoch=st.epoch + 1)
        else:
            save(ckpt_dir / f"step_{st.step}.pt", batches)

    t0 = time.time()
    for epoch in range(state.epoch, args.epochs):
        state.epoch = epoch
        data.set_epoch(epoch, batches_done)
        data.stats.reset()
        train_one_epoch(state, data, batches_done, on_step)
        batches_done = 0
        stats = _sum_over_ranks(_stats_dict(data.stats), info)
        if info.is_master:
            log.info("epoch %d done (step %d); data: %s", epoch, state.step,
                     ", ".join(f"{k} {v}" for k, v in stats.items()) or "no skip statistics")
            write_result({"type": "data", "epoch": epoch, "step": state.step, **stats})
            if tb_writer is not None:
                for k, v in stats.items():
                    tb_writer.add_scalar(f"data/{k}", v, state.step)
        done = epoch + 1
        rng_before_eval = rng_state()  # evaluation loaders draw from the global RNGs: keep training's streams
        if info.is_master:
            plain = unwrap_model(ddp_model)
            if zs is not None and args.zeroshot_frequency and (done % args.zeroshot_frequency == 0
                                                               or done == args.epochs):
                from diffclip.training.zero_shot_eval import run_zeroshot
                metrics = run_zeroshot(plain, tokenizer, zs, info.device, eval_autocast,
                                       batch_size=args.batch_size, workers=min(args.workers, 2))
                log.info("epoch %d zero-shot %s: %s", epoch, zs.name,
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                write_result({"type": "zeroshot", "dataset": zs.name, "epoch": epoch, "step": state.step, **metrics})
                if tb_writer is not None:
                    for k, v in metrics.items():
                        tb_writer.add_scalar(f"zeroshot/{k}", v, state.step)
            if make_val is not None and args.val_frequency and (done % args.val_frequency == 0
                                                                or done == args.epochs):
                metrics = evaluate_val(plain, val_loss_fn, make_val(), info.device, eval_autocast, input_dtype)
                log.info("epoch %d validation: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                write_result({"type": "val", "epoch": epoch, "step": state.step, **metrics})
                if tb_writer is not None:
                    for k, v in metrics.items():
                        tb_writer.add_scalar(f"val/{k}", v, state.step)
        set_rng_state(rng_before_eval)
        barrier(info)
        if will_save_epoch(epoch):
            save(ckpt_dir / f"epoch_{done}.pt", 0, epoch=done)
    if state.step < total_steps:
        log.info("nothing left to train (step %d of %d)", state.step, total_steps)

    if info.is_master and not args.no_export:
        out = run_dir / "final_model"
        unwrap_model(ddp_model).save_pretrained(out)
        log.info("final weights: %s (diffclip.create_model(%r, pretrained=%r))", out, args.model, str(out))
    if tb_writer is not None:
        tb_writer.close()
    log.info("done in %.1f min: logs %s, results %s, checkpoints %s%s", (time.time() - t0) / 60, run_dir / "out.log",
             results_path, ckpt_dir, f", TensorBoard {run_dir / 'tensorboard'}" if tb_writer is not None else "")
    barrier(info)
    cleanup(info)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (CLIError, FileNotFoundError, NotADirectoryError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        sys.stderr.write(f"main.py: error: {msg}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("main.py: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
