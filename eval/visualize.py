"""Attention maps of a differential ViT: the class token's attention over the patches, A1, A2 and the
differential map A1 − λ·A2, per chosen layer and head, upsampled over the image; a standard ViT's map for
contrast; λ per layer.

Examples::

    # a Fashion-MNIST test image, a DiffViT trained by training/finetune.py and its standard-ViT twin
    python eval/visualize.py --checkpoint runs/fmnist/DiffViT/seed0/best.pt \\
        --contrast runs/fmnist/ViT/seed0/best.pt --dataset fashion-mnist \\
        --data-root /usr/share/datasets/fashion-mnist --index 0 --output docs/images/attention_fmnist.png

    # any image through a DiffCLIP checkpoint's vision tower
    python eval/visualize.py --checkpoint DiffCLIP-Tiny-64@path/to/saved_model --image cat.png --output maps.png

The maps come from the exact attention path: every attention layer is switched to ``path="exact"``, ``keep_maps=True`` for one
forward pass, which materialises A1 and A2 (fp32 softmax) and stores them with λ (:mod:`diffclip.attention`).
Writes the PNG and a JSON beside it (λ per layer, prediction, the chosen layers and heads).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffclip.eval.relevance import attention_layers
from torch import nn

from diffclip.cli import ArgumentParser, UsageError, nonneg_int, run
from diffclip.errors import InputError
from diffclip.files import check_writable, save_figure, write_json
from diffclip.hub import torch_load

__all__ = ["attention_layers", "attention_maps", "class_token_maps", "lambdas", "plot", "main"]


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """One forward pass through the exact attention path, keeping every layer's maps.

    Args:
        model: a timm VisionTransformer with diffclip attention.
        x: (B, C, H, W) images, already transformed.

    Returns:
        ``(output, maps)`` with ``maps[l]`` = {"a1", "a2", "diff", "lambda"} (differential layer; a1/a2/diff of
        shape (B, h, N, N), h = differential heads) or {"a"} (standard layer, (B, h, N, N)).
    """
    layers = attention_layers(model)
    saved = [(a.keep_maps, a.path) for a in layers]
    try:
        for a in layers:
            a.keep_maps, a.path = True, "exact"
            a.attn_maps = None
        out = model(x)
        maps = [{k: v for k, v in a.attn_maps.items() if k != "live"} for a in layers]
    finally:
        for a, (k, path) in zip(layers, saved):
            a.keep_maps, a.path = k, path
            a.attn_maps = None
    return out, maps


def lambdas(model: nn.Module) -> list[float | None]:
    """λ of every layer (None for standard attention)."""
    return [float(a.lambda_full().detach()) if hasattr(a, "lambda_full") else None for a in attention_layers(model)]


def class_token_maps(m: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """The class token's row over the patch keys: (B, h, N, N) -> (B, h, gh, gw)."""
    row = m[:, :, 0, prefix:]
    return row.reshape(m.size(0), m.size(1), *grid)


def _upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def _pick(requested: list[int] | None, n: int, what: str) -> list[int]:
    if requested is None:
        return sorted({0, n // 2, n - 1}) if n > 2 else list(range(n))
    idx = [i if i >= 0 else n + i for i in requested]
    bad = [r for r, i in zip(requested, idx) if not 0 <= i < n]
    if bad:
        raise InputError(f"{what} {bad} out of range: the model has {n}")
    return idx


def plot(image, rows: list[dict], lams: list[float | None], title: str, path: str,
         contrast_lams: list[float | None] | None = None) -> None:
    """Draws the grid: one row per (model, layer, head) with input | A1 | A2 | A1 − λ·A2 (or input | A for a
    standard ViT), the maps upsampled and laid over the image, and λ per layer underneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    img = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else image
    size = img.shape[:2]
    n = len(rows)
    height = 2.4 * n + 2.2
    fig = plt.figure(figsize=(10, height))
    gs = fig.add_gridspec(n + 1, 4, height_ratios=[1] * n + [0.8], hspace=0.45, wspace=0.4,
                          top=1 - 0.6 / height, bottom=0.4 / height)
    for r, row in enumerate(rows):
        ax = fig.add_subplot(gs[r, 0])
        ax.imshow(img)
        ax.set_ylabel(row["name"], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title("input", fontsize=9)
        panels = [("A1", row["a1"]), ("A2", row["a2"]), (f"A1 − λ·A2 (λ={row['lambda']:.3f})", row["diff"])] \
            if "diff" in row else [("A (standard attention)", row["a"])]
        for c, (label, m) in enumerate(panels, start=1):
            ax = fig.add_subplot(gs[r, c])
            up = _upsample(m, size).numpy()
            ax.imshow(img, alpha=1.0)
            if label.startswith("A1 −"):
                lim = float(np.abs(up).max()) or 1.0
                im = ax.imshow(up, cmap="coolwarm", vmin=-lim, vmax=lim, alpha=0.6)
            else:
                im = ax.imshow(up, cmap="inferno", vmin=0, alpha=0.6)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    ax = fig.add_subplot(gs[n, :])
    xs = list(range(len(lams)))
    ax.plot(xs, [v if v is not None else float("nan") for v in lams], "o-", label="λ (differential ViT)")
    if contrast_lams and any(v is not None for v in contrast_lams):
        ax.plot(range(len(contrast_lams)), contrast_lams, "s--", label="λ (contrast model)")
    ax.set_xlabel("layer")
    ax.set_ylabel("λ")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / height)
    save_figure(fig, path)
    plt.close(fig)


def _rows_for(model, maps, label: str, layers: list[int] | None, heads: list[int] | None) -> tuple[list[dict], list, list]:
    grid = tuple(model.patch_embed.grid_size)
    prefix = getattr(model, "num_prefix_tokens", 1)
    if getattr(model, "cls_token", None) is None:
        raise InputError(f"{label}: the model has no class token")
    lidx = _pick(layers, len(maps), "layers")
    rows = []
    for li in lidx:
        m = maps[li]
        nh = (m["a1"] if "a1" in m else m["a"]).size(1)
        for hi in _pick(heads, nh, "heads") if heads is not None else [0]:
            if hi >= nh:
                continue
            row = {"name": f"{label}\nlayer {li} head {hi}", "layer": li, "head": hi}
            if "a1" in m:
                for k in ("a1", "a2", "diff"):
                    row[k] = class_token_maps(m[k], grid, prefix)[0, hi]
                row["lambda"] = float(m["lambda"])
            else:
                row["a"] = class_token_maps(m["a"], grid, prefix)[0, hi]
            rows.append(row)
    return rows, lidx, grid


def _load_image(args, data_cfg):
    from diffclip.images import load_image

    if args.image:
        if not Path(args.image).is_file():
            raise InputError(f"--image {args.image} does not exist")
        return load_image(args.image), None, args.image  # decoded in full: an error names the file
    from diffclip.eval.readers import build_dataset

    try:
        ds = build_dataset(args.dataset, args.data_root, args.split, None)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"dataset {args.dataset!r}: {e}") from None
    if not 0 <= args.index < len(ds):
        raise InputError(f"--index {args.index} out of range: {args.dataset} {args.split} has {len(ds)} images")
    img, label = ds[args.index]
    return img, ds.classnames[label], f"{args.dataset} {args.split or ''} #{args.index}"


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description="Draw A1, A2 and A1 − λ·A2 of a differential ViT for one image.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint of training/finetune.py, or a diffclip model name[@pretrained] (its vision tower)")
    p.add_argument("--contrast", default=None, help="a second model (e.g. the standard-ViT twin) drawn below")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="an image file")
    src.add_argument("--dataset", help="a dataset of eval.readers (with --data-root, --split, --index)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--index", type=nonneg_int, default=0)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices (default first, middle, last)")
    p.add_argument("--heads", type=int, nargs="+", default=None, help="head indices (default 0)")
    p.add_argument("--query", action="append", default=None,
                   help="a text query (repeat it): draw, per query and model, where a CLIP model looks when the "
                        "image is matched against it (Chefer et al. 2021 relevance; --checkpoint and --contrast "
                        "are then diffclip CLIP models NAME[@PRETRAINED])")
    p.add_argument("--start-layer", type=int, default=-1,
                   help="--query: the first block the relevance is propagated through (Chefer's start_layer): -1 "
                        "the last block only (default, as Chefer's CLIP notebook), 0 every block")
    p.add_argument("--output", required=True, help="PNG path (a JSON is written beside it)")
    args = p.parse_args(argv)
    check_writable(args.output, "--output")
    if args.query:
        return _query_maps(args)
    from diffclip.classifier import eval_transform, load_vit

    model, data_cfg, label = load_vit(args.checkpoint)
    image, true_label, source = _load_image(args, data_cfg)
    tf = eval_transform(data_cfg)
    x = tf(image)[None]
    out, maps = attention_maps(model, x)
    if not any("a1" in m for m in maps):
        print("visualize.py: note: the model uses standard attention; only A is drawn", file=sys.stderr)
    rows, lidx, grid = _rows_for(model, maps, label.split(" (")[0], args.layers, args.heads)
    lams = lambdas(model)
    record = {"checkpoint": args.checkpoint, "source": source, "true_label": true_label, "layers": lidx,
              "heads": args.heads or [0], "grid": list(grid), "lambda_per_layer": lams}
    ckpt_classes = None
    if Path(args.checkpoint).is_file():
        ckpt_classes = torch_load(args.checkpoint).get("classnames")
    if out.dim() == 2 and ckpt_classes:
        record["predicted"] = ckpt_classes[int(out.argmax(1))]
    contrast_lams = None
    if args.contrast:
        cmodel, ccfg, clabel = load_vit(args.contrast)
        _, cmaps = attention_maps(cmodel, eval_transform(ccfg)(image)[None])
        crows, _, _ = _rows_for(cmodel, cmaps, clabel.split(" (")[0], args.layers, args.heads)
        rows += crows
        contrast_lams = lambdas(cmodel)
        record["contrast"] = args.contrast
    disp = image.resize((data_cfg["img_size"],) * 2) if hasattr(image, "resize") else image
    title = f"{label}: {source}" + (f" (label: {true_label}" if true_label else "") + \
        (f", predicted: {record['predicted']})" if "predicted" in record else (")" if true_label else ""))
    plot(disp, rows, lams, title, args.output, contrast_lams)
    write_json(Path(args.output).with_suffix(".json"), record)
    print(f"wrote {args.output}; λ per layer: {', '.join('-' if v is None else f'{v:.3f}' for v in lams)}")
    return 0


def _query_maps(args) -> int:
    """``--query``: relevance maps of each text query for the image, one row per model."""
    from diffclip.eval.relevance import plot_queries, text_query_relevance

    import diffclip

    specs = [args.checkpoint] + ([args.contrast] if args.contrast else [])
    loaded = []
    for spec in specs:
        name, pretrained = diffclip.factory.parse_model_spec(spec)
        if name not in diffclip.list_models():
            raise UsageError(f"--query needs diffclip CLIP models NAME[@PRETRAINED]; {spec!r} is not one "
                             f"({', '.join(diffclip.list_models())})")
        model, _, preprocess = diffclip.create_model_and_transforms(name, pretrained=pretrained)
        loaded.append((spec, name, model.eval(), preprocess, diffclip.get_tokenizer(name)))
    image, _, source = _load_image(args, None)
    results, record = [], {"source": source, "queries": args.query, "method": "Chefer et al. 2021",
                           "start_layer": args.start_layer, "models": {}}
    for spec, name, model, preprocess, tok in loaded:
        x = preprocess(image)[None]
        maps = [text_query_relevance(model, x, tok([q]), start_layer=args.start_layer) for q in args.query]
        results.append((spec if len(spec) <= 40 else name, maps))
        record["models"][spec] = {q: m.tolist() for q, m in zip(args.query, maps)}
    blocks = "last block" if args.start_layer == -1 else f"blocks {args.start_layer}+"
    title = f"relevance of each text query (Chefer et al. 2021, {blocks}): {source}"
    size = loaded[0][2].visual.patch_embed.img_size
    plot_queries(image.resize(tuple(size)), results, args.query, title, args.output)
    write_json(Path(args.output).with_suffix(".json"), record)
    print(f"wrote {args.output}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
