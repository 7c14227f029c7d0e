"""MMVP-VLM (Tong et al. 2024, "Eyes Wide Shut?", github.com/tsb0601/MMVP, ``scripts/evaluate_vlm.py``): pairs of
images that CLIP-like models confuse, in 9 visual patterns, and the paper's radar chart (DiffCLIP's Figure 4).

    python eval/mmvp.py --models CLIP-ViT-B-16@runs/clip/final_model DiffCLIP-ViT-B-16@cc12m \\
        --labels CLIP DiffCLIP --data-root /data/MMVP_VLM --output-dir results/mmvp

The benchmark's own layout: ``Questions.csv`` (a header, then rows of question id, pattern type, statement; two
consecutive rows form a pair) and the images ``MLLM_VLM Images/<type>/<id>.jpg``. Each statement is prompted as
``"a photo of " + statement`` and scored against both images of its pair; it picks the first image when its
similarity to that image is the higher (the official softmax over the two images > 0.5); the first statement's
image is the one with the odd id, the second's the even one; a pair counts only when both statements pick their
own image. The pattern of a pair is its rows' type (the official script names it by position, 15 pairs per
pattern, which is the same on the released file). Accuracy per pattern and their average, as fractions.

Writes ``mmvp_<label>.json`` (a CLIP_benchmark-form record per model, with every pair's scores),
``mmvp.json`` (all models) and ``mmvp_radar.png`` (one polygon per model) into ``--output-dir``.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffclip.eval.common import load_model, result_record

from diffclip.cli import ArgumentParser, UsageError, positive_int, run, setup_logging
from diffclip.errors import InputError
from diffclip.factory import parse_model_spec
from diffclip.files import check_writable, save_figure, write_json
from diffclip.images import load_image
from diffclip.runtime import PRECISION_HELP, PRECISIONS, get_autocast, get_input_dtype, resolve_device

log = logging.getLogger("diffclip.eval")
TASK = "mmvp"
PATTERNS = ("Orientation and Direction", "Presence of Specific Features", "State and Condition", "Quantity and Count",
            "Positional and Relational Context", "Color and Appearance", "Structural Characteristics", "Texts",
            "Viewpoint and Perspective")
IMAGE_DIR = "MLLM_VLM Images"


def read_pairs(root: str | Path) -> list[dict]:
    """The pairs of an MMVP-VLM folder: ``{"qids", "pattern", "statements", "images"}`` each.

    Raises:
        FileNotFoundError: no ``Questions.csv`` or a missing image (named). ValueError: a malformed row (file and
        line named), an odd number of rows, or a pair whose rows disagree on the type.
    """
    root = Path(root)
    csv_path = root / "Questions.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"MMVP-VLM: {csv_path} not found; expected layout: <root>/Questions.csv and "
                                f"<root>/{IMAGE_DIR}/<type>/<id>.jpg")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    parsed = []
    for line, row in enumerate(rows, 2):
        if len(row) < 3 or not row[0].strip().isdigit():
            raise InputError(f"{csv_path}:{line}: expected 'question id, type, statement', got {row!r}")
        parsed.append((int(row[0]), row[1].strip(), row[2].strip()))
    if len(parsed) % 2:
        raise InputError(f"{csv_path}: {len(parsed)} statements; pairs need an even number")
    pairs = []
    for i in range(0, len(parsed), 2):
        (q1, t1, s1), (q2, t2, s2) = parsed[i], parsed[i + 1]
        if t1 != t2:
            raise InputError(f"{csv_path}:{i + 2}-{i + 3}: a pair with two types ({t1!r}, {t2!r})")
        images = [root / IMAGE_DIR / t1 / f"{q}.jpg" for q in (q1, q2)]  # the official script: both in t1's folder
        for p in images:
            if not p.is_file():
                raise FileNotFoundError(f"MMVP-VLM: image {p} not found")
        pairs.append({"qids": [q1, q2], "pattern": t1, "statements": [s1, s2], "images": [str(p) for p in images]})
    return pairs


@torch.no_grad()
def pair_scores(model, preprocess, tokenizer, pairs: list[dict], device, precision: str = "fp32",
                progress: bool = True) -> list[dict]:
    """Each pair with ``sims`` (2 statements x 2 images, cosine similarity), ``picks`` and ``correct``."""
    from tqdm import tqdm

    autocast, in_dtype = get_autocast(precision, device.type), get_input_dtype(precision)
    out = []
    for pair in tqdm(pairs, desc="MMVP-VLM", unit="pair", disable=not progress):
        images = torch.stack([preprocess(load_image(p)) for p in pair["images"]]).to(device, in_dtype or torch.float32)
        texts = tokenizer(["a photo of " + s for s in pair["statements"]]).to(device)
        with autocast():
            img = F.normalize(model.encode_image(images).float(), dim=-1)
            txt = F.normalize(model.encode_text(texts).float(), dim=-1)
        sims = (txt @ img.T).cpu()  # (statement, image)
        picks = [0 if sims[k, 0] > sims[k, 1] else 1 for k in range(2)]
        truth = [0 if pair["qids"][0] % 2 == 1 else 1, 0 if pair["qids"][1] % 2 == 1 else 1]
        out.append({**pair, "sims": sims.tolist(), "picks": picks, "truth": truth, "correct": picks == truth})
    return out


def summarize(scored: list[dict]) -> dict:
    """``{pattern: pair accuracy}`` in :data:`PATTERNS` order (others after), plus ``average`` (mean over the
    patterns present)."""
    patterns = [p for p in PATTERNS if any(s["pattern"] == p for s in scored)]
    patterns += sorted({s["pattern"] for s in scored} - set(patterns))
    acc = {p: sum(s["correct"] for s in scored if s["pattern"] == p) / sum(s["pattern"] == p for s in scored)
           for p in patterns}
    return {**acc, "average": sum(acc.values()) / len(acc)}


def evaluate(model, preprocess, tokenizer, pairs: list[dict], *, model_name: str, pretrained: str | None, root,
             device, precision: str = "fp32", progress: bool = True) -> tuple[dict, list[dict]]:
    """The CLIP_benchmark record of MMVP-VLM (``metrics``: :func:`summarize`; ``root``; ``pairs``: their count) for
    the ``pairs`` of :func:`read_pairs`, and the scored pairs (:func:`pair_scores`)."""
    scored = pair_scores(model, preprocess, tokenizer, pairs, device, precision, progress=progress)
    return result_record("mmvp_vlm", model_name, pretrained, TASK, summarize(scored), root=str(root),
                         pairs=len(scored)), scored


def radar_chart(results: dict[str, dict], path: str | Path, title: str) -> None:
    """One polygon per model (``results``: label -> per-pattern accuracy as from :func:`summarize`), in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    patterns = [p for p in next(iter(results.values())) if p != "average"]
    angles = np.linspace(0, 2 * np.pi, len(patterns), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(7, 7), subplot_kw={"polar": True})
    for label, acc in results.items():
        vals = [100 * acc[p] for p in patterns]
        ax.plot(angles + angles[:1], vals + vals[:1], linewidth=2, label=f"{label} (avg {100 * acc['average']:.1f})")
        ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.15)
    ax.set_xticks(angles)
    ax.set_xticklabels([p.replace(" and ", " &\n") for p in patterns], fontsize=8)
    ax.set_ylim(0, 100)
    import textwrap

    ax.set_title(textwrap.fill(title, 70), fontsize=10, pad=24)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), fontsize=8, ncol=2)
    save_figure(fig, path)
    plt.close(fig)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="NAME[@PRETRAINED] per model (diffclip.list_models())")
    p.add_argument("--model", default=None, help="one model (with --pretrained and --output: one record, no chart)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--output", default=None, help="with --model: the record's JSON file")
    p.add_argument("--labels", nargs="+", default=None, help="a label per model (default: the specs)")
    p.add_argument("--data-root", required=True, help="the MMVP_VLM folder (Questions.csv, 'MLLM_VLM Images/')")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--output-dir", default=None, help="folder for the JSON records and the radar chart")
    p.add_argument("--title", default=None, help="radar chart title")
    p.add_argument("--max-pairs", type=positive_int, default=None, help="only the first N pairs (quick runs)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.model:  # one model, one record (how training/study.py calls every evaluation program)
        if args.models or not args.output:
            raise UsageError("--model goes with --output (one record); several models: --models and --output-dir")
        check_writable(args.output, "--output")
        pairs = read_pairs(args.data_root)[: args.max_pairs]
        device = resolve_device(args.device)
        model, preprocess, tokenizer = load_model(args.model, args.pretrained, device, args.precision)
        record, _ = evaluate(model, preprocess, tokenizer, pairs, model_name=args.model, pretrained=args.pretrained,
                             root=args.data_root, device=device, precision=args.precision,
                             progress=not args.no_progress)
        write_json(args.output, record)
        print(json.dumps(record["metrics"]))
        return 0
    if not args.models or not args.output_dir:
        raise UsageError("give --models and --output-dir (or --model and --output for one model)")
    labels = args.labels or args.models
    if len(labels) != len(args.models) or len(set(labels)) != len(labels):
        raise UsageError(f"--labels: {len(args.models)} distinct labels expected, one per --models entry")
    out = Path(args.output_dir)
    check_writable(out / "mmvp.json", "--output-dir")
    pairs = read_pairs(args.data_root)[: args.max_pairs]
    device = resolve_device(args.device)
    results, summary = {}, {}
    for spec, label in zip(args.models, labels):
        name, pretrained = parse_model_spec(spec)
        model, preprocess, tokenizer = load_model(name, pretrained, device, args.precision)
        record, scored = evaluate(model, preprocess, tokenizer, pairs, model_name=name, pretrained=pretrained,
                                  root=args.data_root, device=device, precision=args.precision,
                                  progress=not args.no_progress)
        acc = results[label] = record["metrics"]
        record.update(label=label, details=[{k: s[k] for k in ("qids", "pattern", "sims", "picks", "correct")}
                                            for s in scored])
        write_json(out / f"mmvp_{label.replace('/', '_')}.json", record)
        summary[label] = {"model": name, "pretrained": pretrained, "metrics": acc}
        log.info("%s: MMVP-VLM average %.1f%% over %d pairs", label, 100 * acc["average"], len(scored))
    write_json(out / "mmvp.json", {"dataset": "mmvp_vlm", "root": str(args.data_root), "models": summary})
    title = args.title or f"MMVP-VLM ({len(pairs)} pairs): " + " vs ".join(labels)
    radar_chart(results, out / "mmvp_radar.png", title)
    print(json.dumps({k: v["metrics"]["average"] for k, v in summary.items()}))
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
