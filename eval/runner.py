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

A result file holds CLIP_benchmark's record exactly (:data:`RECORD_KEYS`, what ``clip_benchmark eval`` writes and
``clip_benchmark build`` turns into one CSV row); what our programs know beyond it (``root``, the per-sample outcomes
``per_sample`` of a bootstrap, a probe's ``protocol`` / ``splits`` / ``probe``...) goes to a sidecar beside it,
:func:`details_path` (``zs.json`` -> ``zs.details.json.gz``: a name that ``clip_benchmark build <folder>`` and
``report.py``'s folder search skip). :func:`write_record` / :func:`write_records` write both, :func:`read_records`
reads a result file back as the programs returned it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffclip.eval.common import add_model_args, load_model

from diffclip.cli import ArgumentParser, setup_logging
from diffclip.errors import InputError
from diffclip.files import check_writable, write_bytes, write_json, write_text
from diffclip.runtime import resolve_device, seed_everything

log = logging.getLogger("diffclip.eval")
#: the keys of a CLIP_benchmark record, in its order (clip_benchmark/cli.py ``run``)
RECORD_KEYS = ("dataset", "model", "pretrained", "task", "metrics", "language")


def program_parser(doc: str, epilog: str | None = None, seed: bool = True) -> ArgumentParser:
    """A program's parser: the first paragraph of its docstring ``doc`` as the description, ``epilog`` below the
    flags, and :func:`diffclip.eval.common.add_model_args`'s flags (``seed=False``: the program has its own)."""
    p = ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                       epilog=epilog)
    add_model_args(p, seed)
    return p


def split_record(record: dict) -> tuple[dict, dict]:
    """``(CLIP_benchmark's record: the RECORD_KEYS of record, the other keys)``.

    Raises:
        KeyError: a key of :data:`RECORD_KEYS` missing (a bug of the caller, not a user error).
    """
    return {k: record[k] for k in RECORD_KEYS}, {k: v for k, v in record.items() if k not in RECORD_KEYS}


def details_path(path: str | os.PathLike) -> Path:
    """The sidecar of the result file ``path``: ``<name without .json/.jsonl>.details.json.gz`` beside it."""
    p = Path(path)
    stem = p.name.removesuffix(".jsonl") if p.name.endswith(".jsonl") else p.name.removesuffix(".json")
    return p.with_name(stem + ".details.json.gz")


def write_details(path: str | os.PathLike, details: list[dict]) -> None:
    """Writes the sidecar of the result file ``path`` (atomically): ``details``, one dict per record of the file in
    its order, as gzip-compressed JSON (a COCO-sized ``per_sample`` is 270 kB of JSON, 16 kB compressed)."""
    write_bytes(details_path(path), gzip.compress(json.dumps(details).encode(), mtime=0))


def read_details(path: str | os.PathLike) -> list[dict] | None:
    """The sidecar of the result file ``path`` (see :func:`write_details`); None when there is none.

    Raises:
        InputError: a sidecar that is not gzip-compressed JSON holding a list of objects."""
    side = details_path(path)
    if not side.is_file():
        return None
    try:
        details = json.loads(gzip.decompress(side.read_bytes()))
    except (OSError, EOFError, ValueError) as e:  # BadGzipFile is an OSError, JSONDecodeError a ValueError
        raise InputError(f"{side}: not gzip-compressed JSON ({e})") from None
    if not isinstance(details, list) or not all(isinstance(d, dict) for d in details):
        raise InputError(f"{side}: expected a JSON list of objects (one per record of {Path(path).name})")
    return details


def write_record(path: str | None, record: dict) -> None:
    """Writes one record: CLIP_benchmark's keys to ``path`` (JSON, atomically) and the rest to its sidecar
    (:func:`details_path`) when ``path`` is given, and prints CLIP_benchmark's record as one line."""
    cb, details = split_record(record)
    if path:
        write_details(path, [details])  # first: the record is what marks a finished evaluation (study.py)
        write_json(path, cb)
        log.info("wrote %s and %s", path, details_path(path).name)
    print(json.dumps(cb))


def write_records(path: str | None, records: list[dict]) -> None:
    """Writes several records to one JSONL file ``path`` (one CLIP_benchmark record per line) and their sidecar, as
    :func:`write_record` does for one."""
    split = [split_record(r) for r in records]
    if path:
        write_details(path, [d for _, d in split])
        write_text(path, "".join(json.dumps(cb) + "\n" for cb, _ in split))
        log.info("wrote %s and %s", path, details_path(path).name)
    for cb, _ in split:
        print(json.dumps(cb))


def write_results(path: str | os.PathLike, obj: dict) -> None:
    """Writes ``obj``, whose ``results`` is a list of records (``robustness.py``, ``run_suite.py``), to ``path``
    (JSON, atomically): each record in CLIP_benchmark's shape, the rest of each in the sidecar."""
    split = [split_record(r) for r in obj["results"]]
    write_details(path, [d for _, d in split])
    write_json(path, {**obj, "results": [cb for cb, _ in split]})


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a result file, each updated with its details from the sidecar when there is one: a record as
    the program returned it. The records of a file: ``.jsonl``, one per line; ``.json``, the items of a list, of
    the ``results`` list of an object that has one (``robustness.py``, ``run_suite.py``), else the object. Values
    that are not records (no ``metrics``) come back as they are.

    Raises:
        FileNotFoundError: no such file. InputError: a file that is not JSON (file and line named), a sidecar that
        is not readable or does not hold one object per record.
    """
    path = Path(path)
    lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
    values: list = []
    for i, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i if path.suffix == '.jsonl' else e.lineno}: not JSON ({e.msg})") from None
        if isinstance(value, dict) and isinstance(value.get("results"), list) and "metrics" not in value:
            value = value["results"]
        values += value if isinstance(value, list) and path.suffix != ".jsonl" else [value]
    details = read_details(path)
    if details is not None:
        if len(details) != len(values):
            raise InputError(f"{details_path(path)}: {len(details)} entries for the {len(values)} records of {path}")
        values = [{**v, **d} if isinstance(v, dict) else v for v, d in zip(values, details)]
    return values


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
