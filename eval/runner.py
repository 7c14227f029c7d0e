"""The one skeleton of the single-model evaluation programs (``zeroshot.py``, ``retrieval.py``, ``robustness.py``,
``linear_probe.py``), as CLIP_benchmark's one command line over per-task ``evaluate()`` functions.

:func:`run_program` runs the steps in one order for every program:

1. parse the flags (bad flags: one line, exit status 2);
2. logging (``--verbose``: debug), then the seed (:func:`diffclip.runtime.seed_everything`; a random-init model
   depends on it);
3. the device (``--device``), then every output file checked writable (nothing is written yet);
4. the program's ``inputs(args)``: its datasets and files read and checked, before the slow part;
5. the model (:func:`diffclip.eval.common.load_model`);
6. the program's ``evaluate(model, preprocess, tokenizer, inputs, args, device)``: it turns its flags into keywords
   of its library-level ``evaluate_dataset`` / ``evaluate`` (which ``run_suite.py`` calls too);
7. the program's ``write(args, result)``: the CLIP_benchmark records to ``--output`` (atomically) and stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from typing import Any

from diffclip.eval.common import add_model_args, load_model

from diffclip.cli import ArgumentParser, setup_logging
from diffclip.files import check_writable, write_json
from diffclip.runtime import resolve_device, seed_everything

log = logging.getLogger("diffclip.eval")


def program_parser(doc: str, epilog: str | None = None, seed: bool = True) -> ArgumentParser:
    """A program's parser: the first paragraph of its docstring ``doc`` as the description, ``epilog`` below the
    flags, and :func:`diffclip.eval.common.add_model_args`'s flags (``seed=False``: the program has its own)."""
    p = ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                       epilog=epilog)
    add_model_args(p, seed)
    return p


def write_record(path: str | None, record: dict) -> None:
    """Writes one CLIP_benchmark record to ``path`` (JSON, atomically) when given, and prints it as one line."""
    if path:
        write_json(path, record)
        log.info("wrote %s", path)
    print(json.dumps(record))


def _outputs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    return [("--output", args.output)]


def run_program(parser: argparse.ArgumentParser, argv: list[str] | None, *,
                inputs: Callable[[argparse.Namespace], Any],
                evaluate: Callable[..., Any],
                write: Callable[[argparse.Namespace, Any], None] | None = None,
                outputs: Callable[[argparse.Namespace], list[tuple[str, str | None]]] = _outputs,
                seed: Callable[[argparse.Namespace], int] = lambda args: args.seed) -> int:
    """Runs one evaluation program (the steps of the module docstring) and returns its exit status (0).

    Args:
        parser: the program's flags (with :func:`diffclip.eval.common.add_model_args`'s).
        argv: the command line (None: ``sys.argv[1:]``).
        inputs: ``inputs(args)`` reads and checks everything the evaluation needs except the model (raises on a
            missing or bad input); its result goes to ``evaluate``.
        evaluate: ``evaluate(model, preprocess, tokenizer, inputs, args, device)`` -> the program's result.
        write: ``write(args, result)``; default: the result is one record, :func:`write_record` to ``--output``.
        outputs: ``outputs(args)`` -> ``[(flag, path or None)]``, each path checked writable before any work;
            default ``--output``.
        seed: the seed of the run from the flags; default ``--seed``.

    Raises:
        What each step raises: :class:`diffclip.cli.UsageError` / :class:`diffclip.errors.DiffclipError` /
        ``OSError`` for bad flags and inputs (one line through :func:`diffclip.cli.run`).
    """
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    seed_everything(seed(args))
    device = resolve_device(args.device)
    for flag, path in outputs(args):
        if path:
            check_writable(path, flag)
    data = inputs(args)
    model, preprocess, tokenizer = load_model(args.model, args.pretrained, device, args.precision)
    result = evaluate(model, preprocess, tokenizer, data, args, device)
    if write is None:
        write_record(args.output, result)
    else:
        write(args, result)
    return 0
