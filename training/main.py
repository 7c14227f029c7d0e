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

import contextlib
import logging
import pickle
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from diffclip.training.checkpoint import (
    check_optimizer_state,
    find_loadable,
    load_checkpoint,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from diffclip.training.distributed import (
    PREEMPTED_EXIT,
    DistInfo,
    PreemptionSignal,
    barrier,
    cleanup,
    init_distributed,
    preemption_signals_blocked,
    requeue_slurm_job,
)
from diffclip.training.params import parse_args
from diffclip.training.run_folder import RunLock
from diffclip.training.train import (
    MetricsLogger,
    TrainState,
    const_lr,
    cosine_lr,
    evaluate_val,
    param_groups,
    train_one_epoch,
    unwrap_model,
)

import diffclip
from diffclip.cli import UsageError, one_line, run, setup_logging
from diffclip.files import check_writable, stale_temporaries, write_text
from diffclip.hub import check_state_dict
from diffclip.loss import ClipLoss, SigLipLoss
from diffclip.runtime import (
    autocast_dtype,
    cast_model,
    get_autocast,
    get_input_dtype,
    needs_grad_scaler,
    seed_everything,
)

log = logging.getLogger("diffclip.train")


def _logging(info: DistInfo, log_file: Path | None) -> None:
    setup_logging(logging.INFO, log_file if info.is_master else None, rank=info.rank, console=info.is_master)


def _broadcast(obj, info: DistInfo):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_error(error: str | None, info: DistInfo) -> str | None:
    """The first of the errors the ranks hold (None when none does); a collective that every rank calls."""
    return next((e for e in _gather(error, info) if e), None)


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


def _gather(obj, info: DistInfo) -> list:
    """``obj`` of every rank, in rank order (a collective that every rank calls)."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _sum_over_ranks(d: dict, info: DistInfo) -> dict:
    total: dict = {}
    for part in _gather(d, info):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def _probe_remote(url: str, flag: str) -> None:
    """A HEAD request to an ``http(s)://`` shard: a server that is down or a missing shard is one line now, not
    webdataset's curl reprs mid-epoch. Other answers (a server that refuses HEAD) are left to the reader."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise UsageError(f"{flag}: shard not found (HTTP 404): {url}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        what = "connection refused" if isinstance(reason, ConnectionRefusedError) else one_line(
            reason if isinstance(reason, BaseException) else e)
        raise UsageError(f"{flag}: {what}: {url}") from None


def check_shards(urls: list[str], flag: str) -> None:
    """Every local shard exists and is a tar file; the server of ``http(s)://`` shards answers for the first shard of
    each host (``pipe:`` and other stores are taken as they are).

    Raises:
        UsageError: one line naming ``flag``, the count and the first bad shard, or the unreachable URL."""
    import tarfile
    from urllib.parse import urlsplit

    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise UsageError(f"{flag}: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
    not_tar = [u for u in local if not tarfile.is_tarfile(u)]
    if not_tar:
        raise UsageError(f"{flag}: {len(not_tar)} of {len(urls)} files are not tar shards, e.g. {not_tar[0]}")
    hosts: dict[str, str] = {}
    for u in urls:
        if u.startswith(("http://", "https://")):
            hosts.setdefault(urlsplit(u).netloc, u)
    for url in hosts.values():
        _probe_remote(url, flag)
    from diffclip.training.remote import SCHEMES, check_remote

    buckets: dict[str, str] = {}
    for u in urls:
        if u.split("://", 1)[0] in SCHEMES:
            buckets.setdefault(u.split("/")[2], u)
    for url in buckets.values():  # the store answers and the bucket exists
        check_remote(url, flag)


def _count(urls: list[str], given: int | None, flag: str) -> int:
    """Samples of a shard set: ``given`` (the flag's value), else from ``sizes.json``/``__len__``."""
    from diffclip.training.data import get_dataset_size

    if given is not None:
        return given
    try:
        return get_dataset_size(urls)[0]
    except ValueError as e:  # the data module names the training flag
        raise UsageError(one_line(e).replace("--train-num-samples", flag)) from None


def build_data(args, info: DistInfo, preprocess_train, tokenizer):
    """Checks the training shards and returns ``make_loader(epoch, skip_batches) -> DataInfo``."""
    try:
        from diffclip.training.data import expand_urls, get_wds_loader
    except ImportError as e:
        raise UsageError(f"the data module is missing ({e})") from None
    urls, weights = expand_urls(args.train_data, args.train_data_upsampling_factors)
    check_shards(urls, "--train-data")
    num_samples = _count(urls, args.train_num_samples, "--train-num-samples")

    def make_loader(epoch: int, skip_batches: int = 0):
        return get_wds_loader(urls, preprocess_train, tokenizer, batch_size=args.batch_size,
                              num_samples=num_samples, resampled=args.dataset_resampled,
                              upsampling_factors=weights if args.train_data_upsampling_factors else None,
                              is_train=True, epoch=epoch, seed=args.seed, workers=args.workers,
                              world_size=info.world_size, rank=info.rank, skip_batches=skip_batches)

    return make_loader


def build_val(args, preprocess_val, tokenizer):
    """Checks the validation shards (files, sample count) and returns ``make_loader() -> DataInfo``."""
    from diffclip.training.data import expand_urls, get_wds_loader
    urls, _ = expand_urls(args.val_data)
    check_shards(urls, "--val-data")
    num_samples = _count(urls, args.val_num_samples, "--val-num-samples")

    def make_loader(workers: int | None = None):
        return get_wds_loader(urls, preprocess_val, tokenizer, batch_size=args.batch_size,
                              num_samples=num_samples, is_train=False, epoch=0, seed=args.seed,
                              workers=args.workers if workers is None else workers, world_size=1, rank=0)

    return make_loader


def check_val(make_val) -> None:
    """Reads the validation set up to its first batch (in this process): a set without one usable sample stops
    the run before training, not after the first epoch.

    Raises:
        UsageError: naming ``--val-data`` and why nothing was usable."""
    from diffclip.cli import USER_ERRORS

    state = rng_state()  # the loader's shuffling-free pass still draws from the global generators
    try:
        batch = next(iter(make_val(workers=0).dataloader), None)
    except (*USER_ERRORS, ValueError, RuntimeError) as e:
        raise UsageError(f"--val-data: {one_line(e)}") from None
    finally:
        set_rng_state(state)
    if batch is None:
        raise UsageError("--val-data: no usable sample (an image that decodes with a UTF-8 caption)")


def check_resume(ckpt: dict, path: Path, args, info: DistInfo, steps_per_epoch: int) -> None:
    """The data position of a checkpoint against this run: ``batches_done`` inside this run's epoch and a multiple
    of ``--accum-freq``; mid-epoch, the same ``--batch-size`` and number of processes as the checkpoint's run
    (otherwise the next batch would start at another sample). At an epoch boundary a changed batch is logged.

    Raises:
        UsageError: one line naming ``--resume``, the file and the value."""
    done, per_epoch = ckpt["batches_done"], steps_per_epoch * args.accum_freq
    then = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    was_batch, was_world = then.get("batch_size", args.batch_size), ckpt.get("world_size", info.world_size)
    where = f"--resume {path}"
    for key in ("image_mean", "image_std", "aug_cfg"):  # the preprocessing of the run (absent in older checkpoints)
        if key in then and then[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{where}: written with {flag} {then[key]}, this run has {getattr(args, key)}: give the "
                             f"checkpoint's {flag} to continue its run")
    if done > per_epoch or done % args.accum_freq:
        raise UsageError(f"{where}: batches_done {done} is not a data position of this run (epochs of {per_epoch} "
                         f"batches of {args.batch_size}, --accum-freq {args.accum_freq})")
    if (was_batch, was_world) != (args.batch_size, info.world_size):
        change = (f"--batch-size {was_batch} x {was_world} process(es) then, {args.batch_size} x "
                  f"{info.world_size} now")
        if 0 < done < per_epoch:
            raise UsageError(f"{where}: written {done} batches into epoch {ckpt['epoch']} with {change}: the data "
                             f"position would fall on other samples; resume with the same --batch-size and processes,"
                             f" or from an epoch checkpoint")
        log.warning("%s: %s; the run continues at the next epoch with %d steps per epoch", where, change,
                    steps_per_epoch)


def _log_to_file(message: str) -> None:
    """``message`` as an ERROR record in the run's ``out.log`` only (the console gets the program's one line)."""
    record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Removes what a run killed during a write left (under the lock no write of another process is running):
    the atomic writer's hidden ``.NAME.XXXXXXXX.tmp`` files and ``save_pretrained``'s ``.final_model.tmp-*``."""
    import shutil

    stale = [p for d in (run_dir, run_dir / "checkpoints") for p in stale_temporaries(d)]
    for p in stale:
        p.unlink(missing_ok=True)
    folders = [p for p in run_dir.glob(".final_model.tmp-*") if p.is_dir()]
    for p in folders:
        shutil.rmtree(p, ignore_errors=True)
    if stale or folders:
        log.info("removed %d temporary file(s) left by a killed run: %s", len(stale) + len(folders),
                 ", ".join(p.name for p in stale + folders))


def take_run_folder(run_dir: Path, args, info: DistInfo) -> tuple[RunLock | None, Path | None]:
    """Locks the run folder before any slow work (rank 0; the outcome is broadcast). Returns the lock and, when this
    run made the folder (or found it holding nothing but the lock of a run that died before its first step), the
    outermost folder it made: removed if the run stops before its first step.

    Raises:
        UsageError: another run holds the folder (naming its PID), or the folder holds a run and ``--resume`` is
            not given."""
    error, lock, made = None, None, None
    if info.is_master:
        top = run_dir
        while not top.parent.exists() and top.parent != top.parent.parent:
            top = top.parent
        before = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else None
        fresh = before == [".lock"]
        try:
            lock = RunLock(run_dir, "another --name")
            if not (lock.created or fresh or args.resume):
                error = f"run folder {run_dir} exists: pass --resume latest to continue it, or another --name"
                if ".lock" not in before:  # the folder as it was
                    lock.path.unlink(missing_ok=True)
                lock.release()
            elif lock.created or fresh:
                made = top if lock.created else run_dir
        except UsageError as e:
            error = str(e)
    error = _broadcast(error, info)
    if error:
        raise UsageError(error)
    return lock, made


def train(args) -> int:
    """The run; returns 0, or ``PREEMPTED_EXIT`` (75) when a preemption signal stopped it after a checkpoint."""
    preemption = PreemptionSignal()  # before any loader worker is forked: they inherit the recording handler
    try:
        return _locked_train(args, preemption)
    finally:
        preemption.restore()


def _locked_train(args, preemption: PreemptionSignal) -> int:
    try:
        info = init_distributed(args.device, args.dist_backend)
    except ValueError as e:
        raise UsageError(one_line(e) if "--device" in str(e) else f"--device {args.device}: {one_line(e)}") from None
    _logging(info, None)
    # ---- checks that fail fast, identical on every rank, before any collective call ----
    try:
        diffclip.get_model_config(args.model)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from None
    if args.resume in ("latest", "auto") and not args.name:
        raise UsageError(f"--resume {args.resume} needs --name: the run folder to continue")
    name = args.name or _broadcast(default_name(args), info)
    args.name = name
    run_dir = Path(args.logs) / name
    if args.resume and args.resume not in ("latest", "auto") and not Path(args.resume).is_file():
        raise UsageError(f"--resume: checkpoint not found: {args.resume}")
    check_writable(run_dir / "out.log", "--logs")
    remote_run = None
    if args.remote_sync:  # --resume auto on a node without the run folder: its newest checkpoint from the remote
        from diffclip.training.remote import check_remote, fetch_latest

        check_remote(args.remote_sync, "--remote-sync")
        remote_run = f"{args.remote_sync.rstrip('/')}/{name}"
        if args.resume == "auto":  # every node's local rank 0, into its own disk; the others wait (one collective)
            error = None
            if info.local_rank == 0 and not any((run_dir / "checkpoints").glob("*.pt")):
                try:
                    fetch_latest(remote_run, run_dir)
                except Exception as e:  # the store's own errors: one line on every rank, no rank left waiting
                    error = f"--resume auto: fetching from {remote_run} failed: {one_line(e)}"
            error = _first_error(error, info)
            if error:
                raise UsageError(error)
    # ---- the run folder, locked for the run's life before any slow work ----
    lock, made = take_run_folder(run_dir, args, info)
    progress = {"steps": 0}
    try:
        if info.is_master:
            _logging(info, run_dir / "out.log")
            _remove_stale_temporaries(run_dir)
        if remote_run is None or not info.is_master:
            return _train(args, info, run_dir, progress, preemption)
        from diffclip.training.remote import RemoteSync

        syncer = RemoteSync(run_dir, remote_run, args.remote_sync_frequency)  # in the background, never a step
        try:
            return _train(args, info, run_dir, progress, preemption)
        finally:
            syncer.close()  # the last copy: the final weights, or a preemption's checkpoint
    except BaseException as e:
        if info.is_master:
            from diffclip.cli import USER_ERRORS

            _log_to_file("interrupted" if isinstance(e, KeyboardInterrupt) else f"error: {one_line(e)}"
                         if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {one_line(e)} (traceback on stderr)")
            if made is not None and not progress["steps"]:  # nothing trained: a plain retry starts afresh
                import shutil

                _logging(info, None)
                shutil.rmtree(run_dir, ignore_errors=True)
                for parent in run_dir.parents:  # the --logs folders it made, while empty (another run may use them)
                    if not parent.is_relative_to(made):
                        break
                    with contextlib.suppress(OSError):
                        parent.rmdir()
        raise
    finally:
        if lock is not None:
            lock.release()


class Preempted(Exception):
    """Raised by the step hook once the ranks agreed to stop, after the checkpoint of that step was written."""


def _train(args, info: DistInfo, run_dir: Path, progress: dict, preemption: PreemptionSignal) -> int:
    """The run, once its folder is locked; ``progress["steps"]`` counts the optimizer steps taken."""
    resume_latest = args.resume in ("latest", "auto")
    # ---- the checkpoint named by --resume: read and its structure checked before any work ----
    resume_from = (None, None)
    if args.resume and not resume_latest:
        try:
            resume_from = (Path(args.resume), read_checkpoint(args.resume))
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
            raise UsageError(f"--resume {args.resume}: {one_line(e)}") from None
    tokenizer = diffclip.get_tokenizer(args.model)
    seed_everything(args.seed)  # the same initial weights on every rank
    try:
        siglip = dict(init_logit_scale=SigLipLoss.INIT_LOGIT_SCALE, init_logit_bias=SigLipLoss.INIT_LOGIT_BIAS)
        model, preprocess_train, preprocess_val = diffclip.create_model_and_transforms(
            args.model, pretrained=args.pretrained, image_mean=args.image_mean, image_std=args.image_std,
            aug_cfg=args.aug_cfg, **(siglip if args.siglip else {}))
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
        raise UsageError(f"--pretrained {args.pretrained}: {one_line(e)}" if args.pretrained is not None
                         else f"--model: {one_line(e)}") from None
    try:
        make_loader = build_data(args, info, preprocess_train, tokenizer)
        make_val = build_val(args, preprocess_val, tokenizer) if args.val_data else None
        zs = None
        if args.zeroshot_data:
            from diffclip.training.zero_shot_eval import load_zeroshot_set
            zs = load_zeroshot_set(args.zeroshot_data, preprocess_val)
        data = make_loader(0)  # one loader for the whole run (persistent workers); set_epoch selects the epoch
    except (OSError, ValueError) as e:
        raise UsageError(one_line(e)) from None
    if make_val is not None:  # evaluated on rank 0 only: its verdict is broadcast
        error = None
        if info.is_master:
            try:
                check_val(make_val)
            except UsageError as e:
                error = str(e)
        error = _broadcast(error, info)
        if error:
            raise UsageError(error)
    steps_per_epoch = data.num_batches // args.accum_freq
    if steps_per_epoch < 1:
        raise UsageError(f"an epoch has {data.num_batches} batches of {args.batch_size} per process, fewer than "
                       f"--accum-freq {args.accum_freq}: lower --batch-size or give more data")

    # ---- model, loss, optimizer ----
    model.train()
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.force_patch_dropout:
        model.set_patch_dropout(args.force_patch_dropout)
    if args.lock_image:  # before the optimizer: param_groups leaves out what does not train
        model.lock_image_tower(args.lock_image_unlocked_groups, freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.lock_text:
        model.lock_text_tower(args.lock_text_unlocked_layers)
    model = cast_model(model.to(info.device), args.precision)
    input_dtype = get_input_dtype(args.precision) or torch.float32
    optimizer = torch.optim.AdamW(param_groups(model, args.wd), lr=args.lr,
                                  betas=(args.beta1, args.beta2), eps=args.eps)

    # ---- the checkpoint to resume from: checked against the model, optimizer and data before the folder is written --
    if args.resume:
        try:
            if resume_latest:
                resume_from = find_loadable(run_dir / "checkpoints", steps_per_epoch) or (None, None)
            path, ckpt = resume_from
            if ckpt is not None:
                written_for = ckpt.get("model_name")
                check_state_dict(model, ckpt["state_dict"], source=f"checkpoint {path.name}"
                                 + (f" (written for --model {written_for})" if written_for else ""))
                if ckpt.get("model_config"):  # same shapes, another config (lambda_init): refused too
                    model.check_saved_config({**ckpt["model_config"], "model_name": written_for},
                                             source=f"checkpoint {path.name}")
                check_optimizer_state(ckpt["optimizer"], optimizer, f"checkpoint {path.name}")
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
            raise UsageError(f"--resume {args.resume}: {one_line(e)}") from None
        if resume_latest:  # each node found its own copy (no shared disk): every rank continues the same one
            found = _gather(path.name if path is not None else None, info)
            if len(set(found)) > 1:
                raise UsageError(f"--resume {args.resume}: the ranks found different newest checkpoints in their "
                                 f"{run_dir / 'checkpoints'} ({', '.join(f'rank {r}: {n}' for r, n in enumerate(found))})"
                                 f": remove the stale run folders of the other nodes")
        if ckpt is not None:
            check_resume(ckpt, path, args, info, steps_per_epoch)

    # ---- the run folder's files ----
    if info.is_master:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "params.txt", "".join(f"{k}: {v}\n" for k, v in sorted(vars(args).items())))
    barrier(info)
    log.info("run folder %s; %d process(es) on %s; model %s", run_dir, info.world_size, info.device, args.model)

    results_path = run_dir / "results.jsonl"
    metrics_log = None
    if info.is_master:  # records of the steps after the checkpoint (to be trained again) are dropped
        from diffclip.training.tracking import make_trackers
        metrics_log = MetricsLogger(results_path, run_dir / "tensorboard" if "tensorboard" in args.report_to.split(",")
                                    else None, trackers=make_trackers(args, run_dir),
                                    resume_step=resume_from[1]["step"] if resume_from[1] is not None else None)

    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %s parameters (%s trained)", args.model, f"{n_params:,}", f"{n_train:,}")
    if args.siglip:
        loss_fn = SigLipLoss(rank=info.rank, world_size=info.world_size)
        val_loss_fn = SigLipLoss()
    else:
        loss_fn = ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=info.rank,
                           world_size=info.world_size)
        val_loss_fn = ClipLoss()
        if not loss_fn.exact:
            log.warning("--local-loss without --gather-with-grad: the gradient misses the other ranks' column "
                        "terms (as in open_clip); add --gather-with-grad for the exact gradient")
    loss_fn = loss_fn.to(info.device)
    scaler = torch.amp.GradScaler(info.device.type) if needs_grad_scaler(args.precision, info.device.type) else None
    ddp_model = model
    if info.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device] if info.device.type == "cuda" else None,
            static_graph=args.ddp_static_graph)
        log.info("DistributedDataParallel(static_graph=%s)", ddp_model.static_graph)
    if args.torchcompile:
        log.info("compiling the model with torch.compile")
        ddp_model = torch.compile(ddp_model)

    total_steps = steps_per_epoch * args.epochs
    warmup = min(args.warmup, total_steps)
    schedule = cosine_lr if args.lr_scheduler == "cosine" else const_lr

    def lr_fn(step: int) -> float:
        return schedule(step, args.lr, warmup, total_steps)

    autocast = get_autocast(args.precision, info.device.type)
    # with cast weights (bf16/fp16) evaluation runs under autocast of that dtype, for the fp32 ops it mixes in
    eval_autocast = autocast if autocast_dtype(args.precision, info.device.type) or input_dtype == torch.float32 \
        else (lambda: torch.autocast(info.device.type, dtype=input_dtype))
    state = TrainState(args=args, model=ddp_model, loss_fn=loss_fn, optimizer=optimizer, scaler=scaler, dist=info,
                       autocast=autocast, input_dtype=input_dtype, lr_fn=lr_fn, steps_per_epoch=steps_per_epoch,
                       total_steps=total_steps, metrics=metrics_log)

    seed_everything(args.seed, info.rank)  # per-rank streams from here on (restored by a resume)

    # ---- resume ----
    batches_done = 0
    ckpt_dir = run_dir / "checkpoints"
    if args.resume:
        path, ckpt = resume_from
        if path is None:
            log.info("--resume %s: no checkpoint in %s, starting from scratch", args.resume, ckpt_dir)
        else:
            batches_done = load_checkpoint(path, state, info, ckpt)
            if batches_done >= steps_per_epoch * args.accum_freq:
                state.epoch, batches_done = state.epoch + 1, 0
            if metrics_log is not None:
                metrics_log.log("resume", state.step, {}, epoch=state.epoch, batches_done=batches_done,
                                checkpoint=str(path), records_dropped=metrics_log.dropped)

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
        progress["steps"] += 1
        stop = preemption.agreed(info)  # one collective per step: every rank stops after the same step
        n = args.save_every_n_steps
        if stop or (n and not st.step % n):
            if batches >= steps_per_epoch * args.accum_freq:
                if not stop and will_save_epoch(st.epoch):
                    return  # the end-of-epoch checkpoint follows
                save(ckpt_dir / f"step_{st.step}.pt", 0, epoch=st.epoch + 1)
            else:
                save(ckpt_dir / f"step_{st.step}.pt", batches)
        if stop:
            raise Preempted

    def preempted() -> int:
        """After the checkpoint of a preemption: log, requeue (rank 0, ``--requeue-on-preempt``) and leave."""
        got = preemption.received.name if preemption.received is not None else "another rank's signal"
        log.warning("preempted (%s): stopped after step %d with its checkpoint; exit status %d, continue with the "
                    "same command and --resume auto", got, state.step, PREEMPTED_EXIT)
        if metrics_log is not None:
            metrics_log.log("preempted", state.step, {}, epoch=state.epoch, signal=got)
            metrics_log.close()
        if info.is_master and args.requeue_on_preempt:
            requeue_slurm_job()
        cleanup(info)
        return PREEMPTED_EXIT

    t0 = time.time()
    for epoch in range(state.epoch, args.epochs):
        state.epoch = epoch
        data.set_epoch(epoch, batches_done)
        data.stats.reset()
        try:
            train_one_epoch(state, data, batches_done, on_step)
        except Preempted:
            return preempted()
        batches_done = 0
        stats = _sum_over_ranks(_stats_dict(data.stats), info)
        done = epoch + 1
        if info.is_master:
            log.info("epoch %d done (step %d); data: %s", epoch, state.step,
                     ", ".join(f"{k} {v}" for k, v in stats.items()) or "no skip statistics")
            metrics_log.log("data", state.step, stats, epoch=epoch)
        if will_save_epoch(epoch):  # the epoch is kept before any evaluation runs
            save(ckpt_dir / f"epoch_{done}.pt", 0, epoch=done)
        rng_before_eval = rng_state()  # evaluation loaders draw from the global RNGs: keep training's streams
        # evaluation forks loader workers (rank 0): a preemption signal waits, pending, until it is over
        with preemption_signals_blocked() if info.is_master else contextlib.nullcontext():
            if info.is_master:
                plain = unwrap_model(ddp_model)
                if zs is not None and args.zeroshot_frequency and (done % args.zeroshot_frequency == 0
                                                                   or done == args.epochs):
                    from diffclip.training.zero_shot_eval import run_zeroshot
                    metrics = run_zeroshot(plain, tokenizer, zs, info.device, eval_autocast,
                                           batch_size=args.batch_size, workers=min(args.workers, 2))
                    log.info("epoch %d zero-shot %s: %s", epoch, zs.name,
                             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                    metrics_log.log("zeroshot", state.step, metrics, dataset=zs.name, epoch=epoch)
                if make_val is not None and args.val_frequency and (done % args.val_frequency == 0
                                                                    or done == args.epochs):
                    metrics = evaluate_val(plain, val_loss_fn, make_val(), info.device, eval_autocast, input_dtype)
                    log.info("epoch %d validation: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
                    metrics_log.log("val", state.step, metrics, epoch=epoch)
        set_rng_state(rng_before_eval)
        barrier(info)
    if state.step < total_steps:
        log.info("nothing left to train (step %d of %d)", state.step, total_steps)

    if info.is_master and not args.no_export:
        out = run_dir / "final_model"
        from diffclip.card import last_results
        run = {"model": args.model, "training data": f"`{args.train_data}`", "samples per epoch": data.num_samples,
               "epochs": args.epochs, "optimizer steps": state.step,
               "global batch": args.batch_size * args.accum_freq * info.world_size, "precision": args.precision,
               "loss": "SigLIP" if args.siglip else "CLIP", "lr": args.lr, "weight decay": args.wd,
               "warm-up steps": warmup, **last_results(results_path)}
        unwrap_model(ddp_model).save_pretrained(out, model_card_kwargs={"training": run})
        log.info("final weights: %s (diffclip.create_model(%r, pretrained=%r))", out, args.model, str(out))
    if metrics_log is not None:
        metrics_log.close()
    log.info("done in %.1f min: logs %s, results %s, checkpoints %s%s", (time.time() - t0) / 60, run_dir / "out.log",
             results_path, ckpt_dir, f", TensorBoard {run_dir / 'tensorboard'}" if "tensorboard" in args.report_to.split(",") else "")
    barrier(info)
    cleanup(info)
    return 0


def main(argv: list[str] | None = None) -> int:
    return train(parse_args(argv))


def cli() -> None:
    """The ``diffclip-train`` console script: one line and exit status 1 for bad input (argparse: 2)."""
    run(main)


if __name__ == "__main__":
    cli()
