"""CLIP_benchmark's own command line with diffclip models: registers the model type ``diffclip`` with the installed
``clip_benchmark`` and runs its CLI (``eval`` and ``build``), with ``--model_type diffclip`` the default.

    python -m diffclip.eval.clip_benchmark eval --model DiffCLIP-ViT-B-16 --pretrained cc12m \
        --dataset wds/imagenet1k --dataset_root /data/wds_imagenet1k --output "results/{dataset}_{model}_{task}.json"
    python -m diffclip.eval.clip_benchmark build results/ --output benchmark.csv

``--model``: a diffclip model name (``diffclip.list_models()``) or ``hf-hub:org/repo``; ``--pretrained``: what
``eval/zeroshot.py --pretrained`` takes (a release tag, ``hf-hub:``, a folder, a checkpoint file), ``none`` for
random init. The model is loaded in float32 (``diffclip.eval.common.load_model``); CLIP_benchmark's ``--no_amp``
keeps it there, its default autocasts as for open_clip models. ``--model_cache_dir`` is not used (Hugging Face's
cache is). Every other flag, the datasets and the record are CLIP_benchmark's.

Two defects of clip_benchmark 1.6.2 met on the way, and what this module does about them:

* its dataset modules import ``requests``, which it does not declare: without it ``import clip_benchmark.cli``
  fails. When ``requests`` is not installed, its modules are imported with a stand-in that refuses to be used
  (only the downloaders of ImageNet-V2, XTD, Flickr30k-200 and multilingual MS-COCO call it) naming the fix,
  ``pip install requests``; nothing outside clip_benchmark sees the stand-in.
* its ``zeroshot_classification.accuracy`` calls ``float()`` on a one-element array, a TypeError under
  numpy >= 2.4: it is replaced by :func:`accuracy`, the same top-k fraction.

Running this file as ``python eval/clip_benchmark.py`` puts ``eval/`` first on ``sys.path``, where this file would
stand for the ``clip_benchmark`` package: the module drops that entry before importing it. No other program of
``eval/`` imports ``clip_benchmark``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]  # run as eval/clip_benchmark.py: its folder would shadow the clip_benchmark package

import importlib.util  # noqa: E402
import types  # noqa: E402

from diffclip.cli import run  # noqa: E402
from diffclip.errors import RunError  # noqa: E402

MODEL_TYPE = "diffclip"


def load_diffclip(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                  device: str = "cpu"):
    """CLIP_benchmark's model loader for diffclip models: ``(model, transform, tokenizer)`` in eval mode, float32,
    on ``device``. ``pretrained`` ``none`` or empty: random init. ``cache_dir`` is not used.

    Raises:
        What :func:`diffclip.create_model_and_transforms` raises (an unknown name, weights that do not fit).
    """
    import torch
    from diffclip.eval.common import load_model

    weights = None if (pretrained or "").lower() in ("", "none") else pretrained
    return load_model(model_name, weights, torch.device(device), "fp32")


def accuracy(output, target, topk=(1,)) -> list[float]:
    """Top-k accuracies of logits ``output`` (N, C) for labels ``target`` (N,): per k, the fraction of rows whose
    label is among their k largest logits (as CLIP_benchmark's ``accuracy``, and working under numpy >= 2.4)."""
    top = output.topk(max(topk), dim=1).indices  # (N, kmax)
    hit = top == target.view(-1, 1)
    return [int(hit[:, :k].sum()) / len(target) for k in topk]


def _requests_stand_in() -> types.ModuleType:
    stand_in = types.ModuleType("requests")

    def refuse(name: str):
        raise RunError(f"requests.{name}: clip_benchmark downloads this dataset with requests, which it does not "
                       "declare; pip install requests")
    stand_in.__getattr__ = refuse  # module-level __getattr__ (PEP 562): any use of requests.X
    return stand_in


def register():
    """Imports clip_benchmark's CLI (coping with the two defects of the module docstring), registers the
    ``diffclip`` model type and returns the ``clip_benchmark.cli`` module.

    Raises:
        ImportError: clip_benchmark is not installed (``pip install clip_benchmark``).
    """
    stand_in = "clip_benchmark.cli" not in sys.modules and importlib.util.find_spec("requests") is None
    if stand_in:
        sys.modules["requests"] = _requests_stand_in()
    try:
        import clip_benchmark.cli as cli
        import clip_benchmark.metrics.zeroshot_classification as zeroshot_classification
        import clip_benchmark.models as models
    finally:
        if stand_in:
            del sys.modules["requests"]  # the modules that imported it keep it; nothing else sees it

    zeroshot_classification.accuracy = accuracy
    models.TYPE2FUNC[MODEL_TYPE] = load_diffclip
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the list cli.py's --model_type choices are
    return cli


def main(argv: list[str] | None = None) -> int:
    """Runs CLIP_benchmark's CLI on ``argv`` (``eval ...`` / ``build ...``), ``--model_type diffclip`` unless
    given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"] and not any(a == "--model_type" or a.startswith("--model_type=") for a in argv):
        argv[1:1] = ["--model_type", MODEL_TYPE]
    benchmark = register()
    saved = sys.argv
    sys.argv = ["clip_benchmark", *argv]
    try:
        return benchmark.main() or 0
    finally:
        sys.argv = saved


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
