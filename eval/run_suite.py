"""Runs an evaluation suite for one or more models and writes one side-by-side table (Markdown + JSON).

    python eval/run_suite.py --model DiffCLIP-ViT-B-16 --pretrained cc12m \
        --model CLIP-ViT-B-16 --pretrained runs/clip_cc12m/model.safetensors --suite paper --data-root /data

Suites:
  local       what installs on a plain machine: Fashion-MNIST (Debian idx files) zero-shot and linear probe, the
              Twitter and Google emoji sets zero-shot (categories; Twitter also subcategories), emoji retrieval,
              Twitter emoji linear probe
  retrieval   Flickr30k, Flickr8k (Karpathy 1k test), MS-COCO (Karpathy 5k test): image and text R@1/5/10
  robustness  ImageNet-1k val and ImageNet-V2/-A/-R/-Sketch zero-shot: top-1, average over shifts, gap
  paper       exactly the paper's set, with its protocols: ImageNet zero-shot, the 3 retrieval sets, the 9
              linear-probe / few-shot sets (linear_probe.py --protocol paper), ImageNet-V2/-A/-R/-Sketch, MMVP-VLM
              (folder MMVP_VLM); with two or more models it also writes the paper's Table 1/2, Figures 1/3/5
              (eval/report.py) and the MMVP radar chart into --output-dir

``--pretrained`` values pair with ``--model`` values in order (``none`` = random init); with two models the table
has a column Δ = first − second (put DiffCLIP first and its CLIP twin second for the paper's sign). Each dataset is looked up
under ``--data-root`` by its usual folder name (``--root NAME=PATH`` overrides one); Fashion-MNIST and the emoji
sets default to /usr/share/datasets/fashion-mnist and data/sources. Missing datasets are skipped (shown as
"missing") unless ``--strict``. Each model's text classifier for ImageNet is built once and shared by the
ImageNet variants.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from diffclip.eval import linear_probe, mmvp, readers, report, retrieval, zeroshot
from diffclip.eval.common import add_run_args, load_model, parse_roots
from diffclip.eval.robustness import SHIFTS
from diffclip.eval.runner import write_results

from diffclip.cli import ArgumentParser, positive_int, run, setup_logging
from diffclip.errors import InputError
from diffclip.files import check_writable, write_text
from diffclip.runtime import resolve_device, seed_everything

log = logging.getLogger("diffclip.eval")
RETRIEVAL = ("flickr30k", "flickr8k", "mscoco")
SUITES: dict[str, list[tuple[str, str]]] = {
    "local": [("zeroshot", "fashion-mnist"), ("zeroshot", "emoji-twitter"), ("zeroshot", "emoji-google"),
              ("zeroshot", "emoji-twitter-subcategory"), ("retrieval", "emoji-twitter"),
              ("retrieval", "emoji-google"), ("linear_probe", "fashion-mnist"), ("linear_probe", "emoji-twitter")],
    "retrieval": [("retrieval", d) for d in RETRIEVAL],
    "robustness": [("zeroshot", "imagenet1k")] + [("robustness", d) for d in SHIFTS],
    "paper": ([("zeroshot", "imagenet1k")] + [("retrieval", d) for d in RETRIEVAL]
              + [("linear_probe", d) for d in linear_probe.PAPER_LINEAR_PROBE_DATASETS]
              + [("robustness", d) for d in SHIFTS] + [("mmvp", "mmvp-vlm")]),
}
#: (metric key, label) shown in the table per task; the JSON keeps every metric
TABLE_METRICS = {
    "zeroshot": [("acc1", "top-1")],
    "robustness": [("acc1", "top-1")],
    "retrieval": [("image_retrieval_recall@1", "image R@1"), ("image_retrieval_recall@5", "image R@5"),
                  ("text_retrieval_recall@1", "text R@1"), ("text_retrieval_recall@5", "text R@5")],
    "linear_probe": [("lp_acc1", "top-1")],
    "fewshot": [("lp_acc1", "top-1")],
    "mmvp": [("average", "pair accuracy")],
}
TASK_TITLES = {"zeroshot": "zero-shot", "robustness": "robustness (zero-shot)", "retrieval": "retrieval",
               "linear_probe": "linear probe", "fewshot": "few-shot probe", "mmvp": "MMVP-VLM"}


def suite_tasks(suite: str, fewshot_k: int | None = None) -> list[tuple[str, str]]:
    tasks = list(SUITES[suite])
    if fewshot_k:
        tasks += [("fewshot", d) for t, d in SUITES[suite] if t == "linear_probe"]
    return tasks


def run_task(task: str, name: str, model, preprocess, tokenizer, *, model_name: str, pretrained: str | None,
             root, args, device, classifiers: dict) -> dict:
    """One CLIP_benchmark record for ``task`` on dataset ``name``: the dataset read, then the task program's own
    ``evaluate_dataset`` / ``evaluate`` (``classifiers`` caches zero-shot heads across datasets)."""
    options = dict(model_name=model_name, pretrained=pretrained, device=device, precision=args.precision,
                   progress=not args.no_progress)
    loading = dict(batch_size=args.batch_size, workers=args.workers, max_samples=args.max_samples)
    if task in ("zeroshot", "robustness"):
        return zeroshot.evaluate_dataset(model, preprocess, tokenizer, readers.build_dataset(name, root),
                                         classifiers=classifiers, **loading, **options)[0]
    if task == "retrieval":
        return retrieval.evaluate_dataset(model, preprocess, tokenizer, readers.build_retrieval_dataset(name, root),
                                          **loading, **options)
    if task == "mmvp":
        folder = Path(root or ".") / "MMVP_VLM" if not (Path(root or ".") / "Questions.csv").is_file() else Path(root)
        return mmvp.evaluate(model, preprocess, tokenizer, mmvp.read_pairs(folder), root=folder, **options)[0]
    if task in ("linear_probe", "fewshot"):
        paper = task == "linear_probe" and args.suite == "paper"
        return linear_probe.evaluate_dataset(
            model, preprocess, name, root, fewshot_k=args.fewshot_k if task == "fewshot" else None,
            protocol="paper" if paper else "clip_benchmark", seeds=[args.seed] if task == "linear_probe" else None,
            cache_dir=None if args.no_cache else args.feature_cache, **loading, **options)
    raise InputError(f"unknown task {task!r}")


def model_labels(models: list[tuple[str, str | None]]) -> list[str]:
    labels = []
    for m, p in models:
        label = f"{m} ({p})" if p else m
        while label in labels:
            label += "'"
        labels.append(label)
    return labels


def build_rows(tasks, results: dict) -> list[dict]:
    """Table rows ``{"task", "dataset", "metric", "key", "values": {label: value | None}}``, grouped by task, each
    group followed by its average over datasets (a value only when no dataset is missing) and, for robustness,
    the gap between ImageNet top-1 and that average.

    ``results[(task, dataset)][label]`` is a record, or None when the dataset was missing.
    """
    labels = list(dict.fromkeys(lab for per in results.values() for lab in per))
    rows: list[dict] = []
    for task in dict.fromkeys(t for t, _ in tasks):
        names = [n for t, n in tasks if t == task]
        for key, metric in TABLE_METRICS[task]:
            group = []
            for name in names:
                values = {}
                for lab in labels:
                    rec = results.get((task, name), {}).get(lab)
                    values[lab] = rec["metrics"].get(key) if rec else None
                group.append({"task": task, "dataset": readers.canonical_name(name), "metric": metric, "key": key,
                              "values": values})
            rows += group
            if len(group) < 2:
                continue
            avg = {}
            for lab in labels:
                vals = [r["values"][lab] for r in group]
                avg[lab] = sum(vals) / len(vals) if all(v is not None for v in vals) else None
            rows.append({"task": task, "dataset": "average", "metric": metric, "key": key, "values": avg})
            id_row = next((r for r in rows if r["task"] == "zeroshot" and r["dataset"] == "imagenet1k"
                           and r["key"] == "acc1"), None)
            if task == "robustness" and id_row is not None:
                gap = {lab: (id_row["values"][lab] - avg[lab]) if id_row["values"][lab] is not None
                       and avg[lab] is not None else None for lab in labels}
                rows.append({"task": task, "dataset": "gap (ImageNet − average)", "metric": metric, "key": "gap",
                             "values": gap})
    return rows


def markdown(rows: list[dict], labels: list[str], suite: str) -> str:
    def pct(v):
        return "missing" if v is None else f"{100 * v:.2f}"
    head = ["task", "dataset", "metric", *labels]
    if len(labels) == 2:
        head.append(f"Δ ({labels[0]} − {labels[1]})")
    lines = [f"## Suite `{suite}`", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        vals = [r["values"].get(lab) for lab in labels]
        cells = [TASK_TITLES[r["task"]], r["dataset"], r["metric"], *[pct(v) for v in vals]]
        if len(labels) == 2:
            cells.append(f"{100 * (vals[0] - vals[1]):+.2f}" if None not in vals else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nValues in percent.\n"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--model", action="append", required=True, help="model config name (repeat for several)")
    p.add_argument("--pretrained", action="append", default=[],
                   help="weights of the model at the same position ('none' = random init)")
    p.add_argument("--suite", required=True, choices=sorted(SUITES))
    p.add_argument("--data-root", default=None, help="root holding each dataset in its usual folder")
    p.add_argument("--root", action="append", default=[], metavar="NAME=PATH", help="folder of one dataset")
    p.add_argument("--output-dir", default="results", help="writes suite_<suite>.md and suite_<suite>.json")
    add_run_args(p)
    p.add_argument("--fewshot-k", type=positive_int, default=None, help="add k-shot probes of the linear-probe sets")
    p.add_argument("--feature-cache", default="~/.cache/diffclip/features")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--strict", action="store_true", help="fail on a missing dataset instead of skipping it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if args.pretrained and len(args.pretrained) != len(args.model):
        raise InputError(f"{len(args.model)} --model but {len(args.pretrained)} --pretrained values; give one "
                         f"--pretrained per --model (or none at all), 'none' for random init")
    pretrained = [None if (p or "").lower() in ("", "none") else p for p in args.pretrained] or [None] * len(args.model)
    models = list(zip(args.model, pretrained))
    labels = model_labels(models)
    roots = parse_roots(args.root)
    tasks = suite_tasks(args.suite, args.fewshot_k)
    device = resolve_device(args.device)
    check_writable(Path(args.output_dir) / f"suite_{args.suite}.json", "--output-dir")
    results: dict[tuple[str, str], dict[str, dict | None]] = {}
    records, missing = [], set()
    for (model_name, weights), label in zip(models, labels):
        seed_everything(args.seed)
        log.info("== %s", label)
        model, preprocess, tokenizer = load_model(model_name, weights, device, args.precision)
        classifiers: dict = {}
        for task, name in tasks:
            cname = readers.canonical_name(name)
            root = roots.get(cname, roots.get(cname.removesuffix("-subcategory"), args.data_root))
            try:
                rec = run_task(task, name, model, preprocess, tokenizer, model_name=model_name, pretrained=weights,
                               root=root, args=args, device=device, classifiers=classifiers)
            except FileNotFoundError as e:
                if args.strict:
                    raise
                log.warning("%s %s: missing (%s)", task, name, str(e).splitlines()[0])
                missing.add(name)
                rec = None
            if rec is not None:
                rec["suite_task"] = task
                records.append(rec)
            results.setdefault((task, name), {})[label] = rec
        del model, classifiers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not records:
        raise FileNotFoundError(f"no dataset of suite {args.suite!r} was found (missing: {', '.join(sorted(missing))})")
    rows = build_rows(tasks, results)
    out_dir = Path(args.output_dir)
    table = markdown(rows, labels, args.suite)
    write_text(out_dir / f"suite_{args.suite}.md", table)
    write_results(out_dir / f"suite_{args.suite}.json", {
        "suite": args.suite, "models": [{"model": m, "pretrained": p or "", "label": lab}
                                        for (m, p), lab in zip(models, labels)],
        "rows": rows, "missing": sorted(missing), "results": records})
    if args.suite == "paper" and len(labels) > 1:
        per_label = {lab: [(0, r) for (task, name), recs in results.items() for lab2, r in recs.items()
                           if lab2 == lab and r is not None] for lab in labels}
        report.write_report(per_label, out_dir)
        mm = {lab: r["metrics"] for lab, recs in [(lab, results.get(("mmvp", "mmvp-vlm"), {})) for lab in labels]
              for r in [recs.get(lab)] if r is not None}
        if len(mm) > 1:
            mmvp.radar_chart(mm, out_dir / "mmvp_radar.png", "MMVP-VLM: " + " vs ".join(mm))
    print(table)
    log.info("wrote %s and %s", out_dir / f"suite_{args.suite}.md", out_dir / f"suite_{args.suite}.json")
    print(json.dumps({"suite": args.suite, "n_results": len(records), "missing": sorted(missing)}))
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
