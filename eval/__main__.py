"""``diffclip-eval <program> [args]`` (or ``python -m diffclip.eval <program> [args]``): the evaluation programs of
an installed diffclip, one sub-command each; ``python eval/<program>.py`` does the same from a checkout.

    diffclip-eval zeroshot --model DiffCLIP-ViT-B-16 --pretrained cc12m --dataset imagenet1k --data-root ...
    diffclip-eval --help        # lists the programs
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from diffclip.cli import run

#: sub-command -> module of diffclip.eval; every module has ``main(argv) -> int``
PROGRAMS = {
    "zeroshot": "zero-shot classification (CLIP_benchmark protocol)",
    "retrieval": "image-text retrieval recall@k",
    "robustness": "zero-shot under distribution shift (ImageNet-V2/A/R/Sketch)",
    "linear_probe": "linear probe and few-shot",
    "mmvp": "MMVP-VLM pairs and the radar chart",
    "run_suite": "a whole suite of tasks over one or more models, with tables",
    "report": "the paper's tables and figures from result files",
    "visualize": "attention maps",
    "cka": "layer-wise CKA similarity of two models",
    "clip_benchmark": "CLIP_benchmark's own command line with diffclip models (model type 'diffclip')",
}


def _available() -> dict[str, str]:
    return {k: v for k, v in PROGRAMS.items() if importlib.util.find_spec(f"diffclip.eval.{k}") is not None}


def usage() -> str:
    progs = _available()
    width = max(map(len, progs))
    lines = ["usage: diffclip-eval <program> [args]   (diffclip-eval <program> --help for its options)", "",
             "programs:"]
    lines += [f"  {k:<{width}}  {v}" for k, v in progs.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Dispatches to ``diffclip.eval.<program>.main``; an unknown program is a one-line error, exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        sys.exit(0 if argv else 2)
    name = argv[0].replace("-", "_")
    if name not in _available():
        sys.stderr.write(f"diffclip-eval: error: unknown program {argv[0]!r}; expected one of "
                         f"{', '.join(_available())}\n")
        sys.exit(2)
    module = importlib.import_module(f"diffclip.eval.{name}")
    sys.argv[0] = f"diffclip-eval {name}"
    run(module.main, argv[1:])


if __name__ == "__main__":
    main()
