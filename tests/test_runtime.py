"""diffclip.runtime: each precision name means what open_clip means by it, once, on a real tiny DiffCLIP."""

import contextlib

import pytest
import torch

import diffclip
from diffclip.runtime import (
    PRECISIONS,
    autocast_dtype,
    cast_model,
    get_autocast,
    get_input_dtype,
    needs_grad_scaler,
    resolve_device,
)

# name: (weights of a Linear, weights of a LayerNorm, autocast dtype on cpu / cuda, input dtype, scaler on cuda)
MEANING = {
    "fp32": (torch.float32, torch.float32, None, None, None, False),
    "amp": (torch.float32, torch.float32, torch.bfloat16, torch.float16, None, True),
    "amp_bf16": (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, None, False),
    "amp_fp16": (torch.float32, torch.float32, torch.float16, torch.float16, None, True),
    "bf16": (torch.bfloat16, torch.float32, None, None, torch.bfloat16, False),
    "fp16": (torch.float16, torch.float32, None, None, torch.float16, False),
    "pure_bf16": (torch.bfloat16, torch.bfloat16, None, None, torch.bfloat16, False),
    "pure_fp16": (torch.float16, torch.float16, None, None, torch.float16, False),
}


def test_the_vocabulary_is_open_clips():
    assert set(PRECISIONS) == set(MEANING)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_means_what_open_clip_means(precision):
    linear, norm, ac_cpu, ac_cuda, inp, scaler_cuda = MEANING[precision]
    model = cast_model(diffclip.create_model("DiffCLIP-Tiny-64"), precision)
    assert model.visual.blocks[0].mlp.fc1.weight.dtype == linear
    assert model.visual.blocks[0].norm1.weight.dtype == norm
    assert autocast_dtype(precision, "cpu") == ac_cpu and autocast_dtype(precision, "cuda") == ac_cuda
    assert get_input_dtype(precision) == inp
    assert needs_grad_scaler(precision, "cuda") == scaler_cuda  # fp16 autocast: loss scaling
    assert needs_grad_scaler(precision, "cpu") == (ac_cpu == torch.float16)
    ctx = get_autocast(precision, "cpu")()
    assert isinstance(ctx, contextlib.nullcontext) == (ac_cpu is None)
    if precision in ("fp32", "amp", "amp_bf16", "bf16", "pure_bf16"):  # a forward runs on the CPU
        images = torch.randn(2, 3, 64, 64, dtype=inp or torch.float32)
        text = diffclip.get_tokenizer("DiffCLIP-Tiny-64")(["a cat", "a dog"])
        with torch.no_grad(), get_autocast(precision, "cpu")():
            out = model(images, text)
        expected = ac_cpu or inp or torch.float32
        assert out["image_embed"].dtype == expected, out["image_embed"].dtype


def test_unknown_precision_and_missing_device_are_one_line_errors():
    with pytest.raises(ValueError, match="precision 'fp8' is not one of fp32, amp"):
        get_autocast("fp8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_the_trainer_resolves_devices_as_the_eval_programs_do():
    from diffclip.training.distributed import init_distributed
    from diffclip.training.params import build_parser, parse_args

    from diffclip.runtime import PRECISION_HELP

    args = parse_args(["--train-data", "shards/{00000..00001}.tar"])
    assert args.device == "auto"
    assert parse_args(["--train-data", "x.tar", "--device", "auto"]).device == "auto"
    precision = next(a for a in build_parser()._actions if "--precision" in a.option_strings)
    assert precision.help.startswith(PRECISION_HELP)
    info = init_distributed(args.device)  # one plain process: no process group
    assert info.device == resolve_device("auto") and not info.distributed
    assert init_distributed("cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'gpu0': expected auto, cpu, cuda"):
        init_distributed("gpu0")


def test_stable_seed_is_fixed_across_processes():
    import subprocess
    import sys

    from diffclip.runtime import stable_seed

    here = [stable_seed("emoji", "1F600"), stable_seed(0, 3, "samples", 1, "train")]
    code = "from diffclip.runtime import stable_seed; print(stable_seed('emoji', '1F600'), stable_seed(0, 3, 'samples', 1, 'train'))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.split()
    assert [int(s) for s in there] == here and all(0 <= s < 2**63 for s in here)
    assert stable_seed("emoji", "1F600") != stable_seed("emoji", "1F601")
