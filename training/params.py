"""Command-line flags of ``training/main.py``, named as open_clip's trainer (``open_clip_train/params.py``) names
them."""

from __future__ import annotations

import argparse
import ast

from diffclip.cli import ArgumentParser, nonneg_float, nonneg_int, positive_float, positive_int, unit_interval
from diffclip.runtime import PRECISION_HELP, PRECISIONS

__all__ = ["parse_args", "build_parser", "ParseKwargs"]


class ParseKwargs(argparse.Action):
    """open_clip's ``--aug-cfg KEY=VALUE ...``: a dict, each value read as a Python literal (``(0.8,1.0)``,
    ``0.5``, ``True``) or else kept as a string."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = {}
        for item in values:
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {item!r}")
            try:
                kw[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kw[key] = value
        setattr(namespace, self.dest, kw)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="main.py", description="Contrastive (CLIP / SigLIP) training of DiffCLIP and "
                       "CLIP baselines on webdataset shards; one process per device under torchrun.")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="DiffCLIP-Tiny-64", help="model config name (diffclip.list_models()) or "
                   "hf-hub:org/repo")
    g.add_argument("--pretrained", default=None, help="initial weights: a release tag, hf-hub:..., a directory "
                   "written by save_pretrained or a checkpoint file")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--torchcompile", action="store_true", help="torch.compile the model")
    g.add_argument("--siglip", action="store_true", help="sigmoid loss (SigLIP) instead of the softmax CLIP loss")
    g.add_argument("--force-patch-dropout", type=unit_interval, default=0.0, help="FLIP: drop this fraction of the "
                   "image patch tokens in training (all kept at evaluation), e.g. 0.5")
    g.add_argument("--lock-image", action="store_true", help="LiT: freeze the image tower and image_projection")
    g.add_argument("--lock-image-unlocked-groups", type=nonneg_int, default=0, help="with --lock-image: leave the "
                   "last n layer groups trainable (open_clip's groups)")
    g.add_argument("--lock-image-freeze-bn-stats", action="store_true", help="open_clip's flag; a ViT has no "
                   "BatchNorm, so it changes nothing here")
    g.add_argument("--lock-text", action="store_true", help="LiT: freeze the text tower and text_projection")
    g.add_argument("--lock-text-unlocked-layers", type=nonneg_int, default=0, help="with --lock-text: leave the "
                   "last n layer groups trainable (open_clip's groups)")
    g.add_argument("--ddp-static-graph", action="store_true", help="DistributedDataParallel(static_graph=True)")
    g.add_argument("--image-mean", type=float, nargs="+", default=None, metavar="MEAN", help="normalisation mean "
                   "(3 floats, or 1 for all channels) instead of the model config's, in the train and val transforms")
    g.add_argument("--image-std", type=float, nargs="+", default=None, metavar="STD", help="normalisation std, "
                   "as --image-mean")
    g.add_argument("--aug-cfg", nargs="*", default={}, action=ParseKwargs, metavar="KEY=VALUE", help="training "
                   "augmentation: fields of open_clip's AugmentationCfg over the config's, e.g. scale='(0.8,1.0)' "
                   "color_jitter='(0.4,0.4,0.4,0.1)' color_jitter_prob=0.8 gray_scale_prob=0.2, or use_timm=True "
                   "re_prob=0.25 (timm's create_transform)")

    g = p.add_argument_group("data")
    g.add_argument("--train-data", default=None, help="training shards: brace expansion, '::' joins sources, "
                   "e.g. 'cc3m/{00000..00331}.tar::cc12m/{00000..01242}.tar'")
    g.add_argument("--train-data-upsampling-factors", default=None, help="'::'-separated sampling weights, one "
                   "per source of --train-data (needs --dataset-resampled)")
    g.add_argument("--train-num-samples", type=positive_int, default=None, help="samples per epoch (default: "
                   "from sizes.json, img2dataset's NNNNN_stats.json or __len__ beside the shards)")
    g.add_argument("--dataset-resampled", action="store_true", help="sample shards with replacement")
    g.add_argument("--val-data", default=None, help="validation shards (contrastive loss and retrieval recall)")
    g.add_argument("--val-num-samples", type=positive_int, default=None, help="validation samples, for shards "
                   "without sizes.json, img2dataset's NNNNN_stats.json or __len__")
    g.add_argument("--workers", type=nonneg_int, default=1, help="data loader workers per process")
    g.add_argument("--zeroshot-data", default=None, help="zero-shot set: an image folder with one sub-folder per "
                   "class, optional classnames.txt (one name per sub-folder, sorted order) and templates.txt "
                   "(one prompt with '{}' per line)")
    g.add_argument("--zeroshot-frequency", type=nonneg_int, default=1, help="zero-shot evaluation every n epochs "
                   "(0: never)")
    g.add_argument("--val-frequency", type=nonneg_int, default=1, help="validation every n epochs (0: never)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=positive_int, default=64, help="batch size per process (per micro-batch "
                   "with --accum-freq)")
    g.add_argument("--epochs", type=positive_int, default=32)
    g.add_argument("--lr", type=positive_float, default=5e-4)
    g.add_argument("--wd", type=nonneg_float, default=0.2, help="AdamW weight decay (not on gains, biases, 1-D "
                   "parameters, positional/class embeddings, lambda vectors, logit scale/bias)")
    g.add_argument("--beta1", type=unit_interval, default=0.9)
    g.add_argument("--beta2", type=unit_interval, default=0.98)
    g.add_argument("--eps", type=positive_float, default=1e-6)
    g.add_argument("--warmup", type=nonneg_int, default=10000, help="linear warm-up steps before the cosine decay")
    g.add_argument("--lr-scheduler", choices=("cosine", "const"), default="cosine")
    g.add_argument("--precision", choices=PRECISIONS, default="amp", help=PRECISION_HELP + "; a gradient scaler "
                   "where the autocast dtype is fp16")
    g.add_argument("--accum-freq", type=positive_int, default=1, help="micro-batches per optimizer step, with "
                   "the gradient of the whole batch (features cached, then recomputed per micro-batch)")
    g.add_argument("--local-loss", action="store_true", help="each rank computes only its rows of the logits")
    g.add_argument("--gather-with-grad", action="store_true", help="autograd all-gather of the features")
    g.add_argument("--grad-clip-norm", type=positive_float, default=None)
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("run, checkpoints and logging")
    g.add_argument("--logs", "--logs-dir", dest="logs", default="./logs", help="root of the run folders (under "
                   "torchrun write --logs-dir: torchrun's parser takes --logs for an abbreviation of its --logs-specs)")
    g.add_argument("--name", default=None, help="run folder name under --logs (default: date, model, lr, batch)")
    g.add_argument("--resume", default=None, help="a checkpoint file, or 'latest' / 'auto' (the newest loadable "
                   "checkpoint of the run folder, a fresh start when there is none: one command for the first start "
                   "and every restart)")
    g.add_argument("--requeue-on-preempt", action="store_true", help="after the checkpoint a preemption signal "
                   "(SIGTERM, SIGUSR1, SIGUSR2) triggers, requeue the SLURM job (scontrol requeue $SLURM_JOB_ID)")
    g.add_argument("--save-frequency", type=nonneg_int, default=1, help="checkpoint every n epochs (0: never)")
    g.add_argument("--save-every-n-steps", type=nonneg_int, default=0, help="also checkpoint every n steps, "
                   "mid-epoch included (0: never)")
    g.add_argument("--delete-previous-checkpoint", action="store_true", help="keep only the newest checkpoint")
    g.add_argument("--log-every-n-steps", type=positive_int, default=100, help="log (and write results.jsonl) "
                   "every n steps")
    g.add_argument("--report-to", default="", help="'tensorboard', 'wandb' or both ('wandb,tensorboard'): the "
                   "metrics under open_clip's tags")
    g.add_argument("--wandb-project-name", default="open-clip", help="wandb project (--report-to wandb)")
    g.add_argument("--remote-sync", default=None, help="copy the run folder to this remote folder (s3://bucket/runs: "
                   "<remote>/<name>) in the background, and at the end; --resume auto fetches the newest checkpoint "
                   "from there when the local run folder has none")
    g.add_argument("--remote-sync-frequency", type=positive_int, default=300, help="seconds between copies")
    g.add_argument("--device", default="auto", help="auto (cuda when available, else mps, else cpu), cpu, cuda "
                   "(one device per process, the local rank's), cuda:N or mps")
    g.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--no-export", action="store_true", help="do not write the final weights with save_pretrained")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and cross-checks the flags; on error prints one line and exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_data is None:
        parser.error("--train-data is required")
    if args.train_data_upsampling_factors and not args.dataset_resampled:
        parser.error("--train-data-upsampling-factors needs --dataset-resampled")
    unknown = set(args.report_to.split(",")) - {"", "none", "tensorboard", "wandb"}
    if unknown:
        parser.error(f"--report-to: expected 'tensorboard', 'wandb' or both ('wandb,tensorboard'), got "
                     f"{args.report_to!r}")
    if args.remote_sync is not None and "://" not in args.remote_sync:
        parser.error(f"--remote-sync: expected a remote folder such as s3://bucket/runs, got {args.remote_sync!r}")
    if args.siglip and (args.local_loss or args.gather_with_grad):
        parser.error("--siglip always gathers the texts with gradients; drop --local-loss / --gather-with-grad")
    if args.pretrained is not None and not args.pretrained.strip():
        parser.error("--pretrained: expected a release tag, hf-hub:org/repo, a directory or a file, got ''")
    if args.lock_image_unlocked_groups and not args.lock_image:
        parser.error("--lock-image-unlocked-groups needs --lock-image")
    if args.lock_text_unlocked_layers and not args.lock_text:
        parser.error("--lock-text-unlocked-layers needs --lock-text")
    try:  # the transform of these flags builds and runs on an image (unknown --aug-cfg keys, wrong lengths or types)
        from PIL import Image

        from diffclip.factory import image_transform

        transform = image_transform({}, 32, True, args.image_mean, args.image_std, args.aug_cfg)
        transform(Image.new("RGB", (48, 40)))
    except ValueError as e:
        message = str(e)
        for key in ("image_mean", "image_std", "aug_cfg"):
            if message.startswith(key):
                message = "--" + key.replace("_", "-") + message[len(key):]
        parser.error(" ".join(message.split()))
    except (TypeError, AssertionError) as e:  # a value torchvision/timm take but cannot apply (scale='abc')
        parser.error(f"--aug-cfg {args.aug_cfg}: {' '.join(str(e).split()) or type(e).__name__}")
    if args.name is not None and ("/" in args.name or args.name in ("", ".", "..")):
        parser.error(f"--name must be a plain folder name, got {args.name!r}")
    return args
