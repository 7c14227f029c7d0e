"""Does a trained model's text-query relevance find the query's object? Two Twitter emoji are pasted side by side on a
white 64 px canvas (each 32 px, vertically centred), both orders; each emoji's name is asked as a query ("an emoji of
<name>") and the relevance (Chefer et al. 2021, ``diffclip.eval.relevance``) on the query's half of the patch grid
is compared with the other half. Run over every ``<runs>/<model>-seed<k>/final_model`` of a study: per model, the
share of cases the query's half wins, a one-sided binomial test against chance, and the mean relevance masses. The
relevance is the library's rule (``text_query_relevance``: by default Chefer's CLIP notebook, the last block only and
the score ``exp(logit_scale)·cos``; ``--start-layer 0`` propagates through every block), recorded in the JSON.

    python scripts/relevance_pairs.py study_out/emoji_clipart/runs data/sources/emoji-datasource-twitter \
        --output study_out/emoji_clipart/relevance_pairs.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path

import numpy as np
import torch
from diffclip.eval.relevance import text_query_relevance
from PIL import Image
from scipy.stats import binomtest
from tqdm import tqdm

import diffclip
from diffclip.cli import UsageError, run
from diffclip.files import check_writable, write_json

PAIRS = [("tomato", "rocket"), ("cat", "car"), ("dog", "pizza"), ("penguin", "bus"), ("apple", "airplane"),
         ("banana", "umbrella")]
START_LAYER = inspect.signature(text_query_relevance).parameters["start_layer"].default  # the library's default


def _emoji(source: Path, pairs: list[tuple[str, str]]) -> dict[str, Image.Image]:
    if not (source / "emoji.json").is_file():
        raise UsageError(f"{source}: no emoji.json (an emoji-datasource package, scripts/get_demo_data.sh)")
    catalogue = {e["short_name"]: e["image"] for e in json.loads((source / "emoji.json").read_text())}
    out = {}
    for name in {n for pair in pairs for n in pair}:
        if name not in catalogue:
            raise UsageError(f"{source}/emoji.json has no emoji named {name!r}")
        out[name] = Image.open(source / "img" / "twitter" / "64" / catalogue[name]).convert("RGBA").resize(
            (32, 32), Image.BICUBIC)
    return out


def _canvas(left: Image.Image, right: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", (64, 64), (255, 255, 255))
    canvas.paste(left, (0, 16), left)
    canvas.paste(right, (32, 16), right)
    return canvas


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, help="a study's runs/ folder (<model>-seed<k>/final_model)")
    p.add_argument("emoji", type=Path, help="the Twitter emoji package (scripts/get_demo_data.sh)")
    p.add_argument("--pairs", nargs="+", default=[f"{a}:{b}" for a, b in PAIRS],
                   help="emoji short names to pair, as a:b (default: %(default)s)")
    p.add_argument("--start-layer", type=int, default=START_LAYER,
                   help="the first block the relevance is propagated through (Chefer's start_layer): -1 the last "
                        "block only (as Chefer's CLIP notebook), 0 every block (default: %(default)s, the library's)")
    p.add_argument("--output", type=Path, default=None, help="JSON of the per-model counts")
    args = p.parse_args(argv)
    pairs = [tuple(x.split(":", 1)) for x in args.pairs]
    if any(len(x) != 2 or not all(x) for x in pairs):
        raise UsageError(f"--pairs: expected a:b, got {' '.join(args.pairs)}")
    if args.output:
        check_writable(args.output, "--output")
    runs = sorted(r for r in args.runs.glob("*-seed*") if (r / "final_model").is_dir())
    if not runs:
        raise UsageError(f"no <model>-seed<k>/final_model under {args.runs}")
    emoji = _emoji(args.emoji, pairs)
    cases: dict[str, list[tuple[float, float]]] = {}
    torch.set_grad_enabled(False)
    for r in tqdm(runs, desc="runs", unit="run"):
        name = re.sub(r"-seed\d+$", "", r.name)
        model, _, preprocess = diffclip.create_model_and_transforms(name, pretrained=str(r / "final_model"))
        tokenizer = diffclip.get_tokenizer(name)
        half = model.visual.patch_embed.grid_size[1] // 2
        for a, b in pairs:
            for left, right in ((a, b), (b, a)):
                x = preprocess(_canvas(emoji[left], emoji[right]))[None]
                for query, own in ((left, slice(0, half)), (right, slice(half, None))):
                    rel = text_query_relevance(model, x, tokenizer([f"an emoji of {query}"]),
                                               start_layer=args.start_layer)
                    mine = rel[:, own].sum().item()
                    cases.setdefault(name, []).append((mine, rel.sum().item() - mine))
    blocks = "the last block" if args.start_layer == -1 else f"blocks {args.start_layer}+"
    print(f"relevance: Chefer et al. 2021 through {blocks}, score exp(logit_scale)·cos")
    summary = {}
    for name, masses in cases.items():
        wins = sum(o > t for o, t in masses)
        summary[name] = {"wins": wins, "cases": len(masses), "share": wins / len(masses),
                         "p_value": binomtest(wins, len(masses), 0.5, alternative="greater").pvalue,
                         "mean_mass_query": float(np.mean([o for o, _ in masses])),
                         "mean_mass_other": float(np.mean([t for _, t in masses]))}
        s = summary[name]
        print(f"{name}: query's half wins {wins}/{len(masses)} ({100 * s['share']:.0f} %, binomial p = "
              f"{s['p_value']:.2g}); mean relevance {s['mean_mass_query']:.2f} vs {s['mean_mass_other']:.2f}")
    if args.output:
        rule = {"method": "Chefer et al. 2021", "start_layer": args.start_layer,
                "score": "exp(logit_scale) * cosine(image, query)"}
        write_json(args.output, {"pairs": pairs, "runs": [r.name for r in runs], "relevance": rule,
                                 "models": summary})
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
