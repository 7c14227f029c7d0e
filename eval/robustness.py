"""Zero-shot robustness to distribution shift: one model over a list of shift sets, with a summary table.

    python eval/robustness.py --model DiffCLIP-ViT-B-16 --pretrained cc12m --data-root /data \
        --output results/robustness.json --markdown results/robustness.md

Default shift sets: ImageNet-V2, -A, -R, -Sketch (each looked up under ``--data-root`` by its usual folder name,
or given as ``--root NAME=PATH``); in-distribution reference: ImageNet-1k val (``--in-distribution``, or a known
top-1 with ``--id-acc1``). The 1000-class ImageNet classifier is built once and shared; ImageNet-A/-R use its
200 columns of their classes (``class_index``). Sets with other classes (ObjectNet, any folder) get their own.
Summary: top-1 per set, the average over the shift sets, and each set's gap to in-distribution top-1
(``id - shift``, positive = a drop).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from diffclip.eval import readers, zeroshot
from diffclip.eval.common import dataset_name, parse_roots
from diffclip.eval.runner import program_parser, run_program, write_results

from diffclip.cli import run
from diffclip.errors import InputError
from diffclip.files import write_text
from diffclip.zero_shot import format_prompts

log = logging.getLogger("diffclip.eval")
#: the shift sets of the robustness evaluation (this program's default, run_suite.py's robustness rows)
SHIFTS = ("imagenet-v2", "imagenet-a", "imagenet-r", "imagenet-sketch")


def summarize(id_acc1: float | None, shift_acc1: dict[str, float]) -> dict:
    """``{"in_distribution", "shifts": {name: {"acc1", "gap"}}, "average", "average_gap"}``."""
    shifts = {n: {"acc1": a, "gap": (id_acc1 - a) if id_acc1 is not None else None} for n, a in shift_acc1.items()}
    avg = sum(shift_acc1.values()) / len(shift_acc1) if shift_acc1 else None
    return {"in_distribution": id_acc1, "shifts": shifts, "average": avg,
            "average_gap": (id_acc1 - avg) if id_acc1 is not None and avg is not None else None}


def markdown_table(summary: dict, title: str = "") -> str:
    """The summary as a Markdown table (percent, one decimal)."""
    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"
    lines = [f"### {title}", ""] if title else []
    lines += ["| set | top-1 | gap to in-distribution |", "|---|---:|---:|"]
    if summary["in_distribution"] is not None:
        lines.append(f"| in-distribution | {pct(summary['in_distribution'])} | |")
    for name, s in summary["shifts"].items():
        lines.append(f"| {name} | {pct(s['acc1'])} | {pct(s['gap'])} |")
    lines.append(f"| **average (shifts)** | {pct(summary['average'])} | {pct(summary['average_gap'])} |")
    return "\n".join(lines) + "\n"


def evaluate(model, preprocess, tokenizer, datasets: list[str], *, data_root=None, roots: dict | None = None,
             in_distribution: str | None = "imagenet1k", id_acc1: float | None = None, device, precision="fp32",
             batch_size=64, workers=0, max_samples=None, skip_missing=False, progress=True,
             model_name: str = "", pretrained: str | None = None,
             templates: list[str] | None = None) -> tuple[list[dict], dict]:
    """Zero-shot records of every set and the summary (see the module docstring); ``templates`` replaces every
    set's prompt templates."""
    roots = roots or {}
    shared: dict[tuple[str, ...], torch.Tensor] = {}  # classifier per (classnames, templates)
    records, acc = [], {}
    names = ([in_distribution] if in_distribution and id_acc1 is None else []) + list(datasets)
    for name in names:
        try:
            ds = readers.build_dataset(name, roots.get(name, data_root), None, None)
        except FileNotFoundError as e:
            if skip_missing:
                log.warning("skipping %s: %s", name, e)
                continue
            raise
        if templates is not None:
            ds.templates = list(templates)
        record, _ = zeroshot.evaluate_dataset(model, preprocess, tokenizer, ds, model_name=model_name,
                                              pretrained=pretrained, device=device, precision=precision,
                                              batch_size=batch_size, workers=workers, max_samples=max_samples,
                                              classifiers=shared, progress=progress)
        records.append(record)
        acc[record["dataset"]] = record["metrics"]["acc1"]
        log.info("%s: acc1 %.4f", record["dataset"], record["metrics"]["acc1"])
    if id_acc1 is None and in_distribution:
        id_acc1 = acc.pop(readers.dataset_spec(in_distribution).name, None)
    return records, summarize(id_acc1, acc)


def _reference_name(text: str) -> str:
    return "none" if text.strip().lower() == "none" else dataset_name()(text)


def build_parser() -> argparse.ArgumentParser:
    p = program_parser(__doc__)
    p.add_argument("--datasets", nargs="+", type=dataset_name(), default=list(SHIFTS),
                   help="shift sets (default: %(default)s)")
    p.add_argument("--data-root", default=None, help="root holding each set in its usual folder")
    p.add_argument("--root", action="append", default=[], metavar="NAME=PATH", help="folder of one set")
    p.add_argument("--in-distribution", type=_reference_name, default="imagenet1k",
                   help="reference set ('none' to skip)")
    p.add_argument("--id-acc1", type=float, default=None, help="known in-distribution top-1 (skips evaluating it)")
    p.add_argument("--templates", default=None, help="file of prompt templates (one per line, with {}) used for "
                                                     "every set instead of the 80 OpenAI ImageNet templates")
    p.add_argument("--skip-missing", action="store_true", help="leave out sets whose folder is missing")
    p.add_argument("--output", default=None, help="JSON: {'results': [records], 'summary': {...}}")
    p.add_argument("--markdown", default=None, help="write the summary table as Markdown")
    return p


def _id_name(args: argparse.Namespace) -> str | None:
    """The in-distribution set to evaluate (None: 'none', or its top-1 given with --id-acc1)."""
    return None if args.in_distribution == "none" or args.id_acc1 is not None else args.in_distribution


def _inputs(args: argparse.Namespace) -> dict:
    roots = parse_roots(args.root)
    templates = None
    if args.templates:
        templates = readers.read_lines(args.templates)
        format_prompts(["x"], templates)  # checks: not empty, every template has {}
    if not args.skip_missing:  # fail fast on a missing folder
        for n in ([_id_name(args)] if _id_name(args) else []) + args.datasets:
            readers.build_dataset(n, roots.get(n, args.data_root), None, None)
    return {"roots": roots, "templates": templates}


def _evaluate(model, preprocess, tokenizer, inputs: dict, args: argparse.Namespace, device) -> dict:
    id_name = None if args.in_distribution == "none" else args.in_distribution
    records, summary = evaluate(model, preprocess, tokenizer, args.datasets, data_root=args.data_root,
                                roots=inputs["roots"], in_distribution=id_name, id_acc1=args.id_acc1, device=device,
                                precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                                max_samples=args.max_samples, skip_missing=args.skip_missing,
                                progress=not args.no_progress, model_name=args.model, pretrained=args.pretrained,
                                templates=inputs["templates"])
    if not summary["shifts"]:
        raise InputError("no shift set was evaluated")
    return {"model": args.model, "pretrained": args.pretrained or "", "results": records, "summary": summary}


def _write(args: argparse.Namespace, out: dict) -> None:
    table = markdown_table(out["summary"], f"{args.model} {args.pretrained or ''}".strip())
    if args.output:
        write_results(args.output, out)
    if args.markdown:
        write_text(args.markdown, table)
    print(table)
    print(json.dumps(out["summary"]))


def main(argv: list[str] | None = None) -> int:
    return run_program(build_parser(), argv, inputs=_inputs, evaluate=_evaluate, write=_write,
                       outputs=lambda args: [("--output", args.output), ("--markdown", args.markdown)])


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
