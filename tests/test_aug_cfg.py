"""open_clip's preprocessing flags of the trainer: ``--image-mean``/``--image-std`` (train and val transforms) and
``--aug-cfg KEY=VALUE ...`` (open_clip's ``AugmentationCfg``, train transform only), through
``create_model_and_transforms``; kept by ``--resume`` (issue 20 item 5)."""

import json
import random

import pytest
import torch
from diffclip.training.params import parse_args
from open_clip.transform import AugmentationCfg
from open_clip.transform import image_transform as open_clip_image_transform
from train_helpers import MODEL, _write_sources, main_in_process

from diffclip import create_model_and_transforms


def _seeded(transform, image):
    random.seed(0)
    torch.manual_seed(0)
    return transform(image)


@pytest.mark.parametrize("aug, cfg", [
    (["scale=(0.7,1.0)", "color_jitter=(0.4,0.4,0.4,0.1)", "color_jitter_prob=1.0", "gray_scale_prob=0.5"],
     AugmentationCfg(scale=(0.7, 1.0), color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_prob=1.0, gray_scale_prob=0.5)),
    (["use_timm=True", "scale=(0.6,1.0)", "re_prob=1.0", "color_jitter=0.4"],  # timm's create_transform
     AugmentationCfg(scale=(0.6, 1.0), use_timm=True, re_prob=1.0, color_jitter=0.4)),
])
def test_transforms_of_the_flags_equal_open_clips(photo, aug, cfg):
    args = parse_args(["--train-data", "x", "--image-mean", "0.5", "--image-std", "0.25", "0.5", "0.75",
                       "--aug-cfg", *aug])
    assert args.image_mean == [0.5] and AugmentationCfg(**args.aug_cfg) == cfg
    _, train, val = create_model_and_transforms(MODEL, image_mean=args.image_mean, image_std=args.image_std,
                                                aug_cfg=args.aug_cfg)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 0.75)
    want_train = open_clip_image_transform(64, is_train=True, mean=mean, std=std, aug_cfg=cfg)
    got = _seeded(train, photo)
    assert got.shape == (3, 64, 64) and torch.equal(got, _seeded(want_train, photo))
    assert not torch.equal(got, _seeded(create_model_and_transforms(MODEL, image_mean=args.image_mean,
                                                                    image_std=args.image_std)[1], photo))
    want_val = open_clip_image_transform(64, is_train=False, mean=mean, std=std)
    assert torch.equal(val(photo), want_val(photo))  # mean/std in the val transform; no augmentation there


def test_bad_aug_cfg_key_or_mean_length_is_one_line_exit_2():
    for flags, want in ((["--aug-cfg", "scale=(0.8,1.0)", "colour_jitter=0.4"], "--aug-cfg: unknown key "
                         "'colour_jitter'; open_clip's AugmentationCfg has scale, ratio, color_jitter"),
                        (["--image-mean", "0.5", "0.5"], "--image-mean: expected 3 values (R, G, B) or 1"),
                        (["--aug-cfg", "scale"], "expected KEY=VALUE, got 'scale'")):
        code, err = main_in_process("--train-data", "x", *flags)
        assert code == 2 and len(err.strip().splitlines()) == 1 and want in err, err


def test_a_changed_mean_reaches_the_model_and_resume_keeps_it(tmp_path):
    shards, _ = _write_sources(tmp_path)
    logs = tmp_path / "logs"

    def train(name, *extra):
        code, err = main_in_process(
            "--model", MODEL, "--train-data", str(shards), "--train-num-samples", "16", "--batch-size", "8",
            "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--workers", "0", "--seed", "3",
            "--logs", str(logs), "--name", name, "--log-every-n-steps", "1", "--no-export", "--device", "cpu", *extra)
        return code, err

    def first_loss(name):
        records = map(json.loads, (logs / name / "results.jsonl").read_text().splitlines())
        return next(r["loss"] for r in records if r["type"] == "train")

    flags = ("--image-mean", "0.2", "--image-std", "0.5", "--aug-cfg", "scale=(0.9,1.0)")
    for name, extra in (("plain", ("--aug-cfg", "scale=(0.9,1.0)")), ("mean", flags)):
        code, err = train(name, *extra)
        assert code == 0, err[-2000:]
    assert first_loss("plain") != first_loss("mean")  # the same samples and crops, normalised otherwise
    params = (logs / "mean" / "params.txt").read_text()
    assert "image_mean: [0.2]\n" in params and "aug_cfg: {'scale': (0.9, 1.0)}\n" in params
    code, err = train("mean", "--resume", "latest", "--aug-cfg", "scale=(0.9,1.0)")  # --image-mean forgotten
    last = err.strip().splitlines()[-1]
    assert code == 1 and "written with --image-mean [0.2], this run has None" in last, err[-2000:]
    code, err = train("mean", "--resume", "latest", *flags)
    assert code == 0 and "resumed from" in err, err[-2000:]
