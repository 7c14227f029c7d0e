"""Linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited") between every
layer of two ViTs — e.g. a DiffViT and its standard-ViT twin — on the images of a dataset.

Example::

    python eval/cka.py --model-a runs/fmnist/DiffViT/seed0/best.pt --model-b runs/fmnist/ViT/seed0/best.pt \\
        --dataset fashion-mnist --data-root /usr/share/datasets/fashion-mnist --num-images 1000 \\
        --output docs/images/cka_fmnist.png

A layer's representation of an image is the token sequence it outputs (``--tokens all``, flattened), or only the
class token or the token mean. With n images, each layer gives a linear Gram matrix K = X Xᵀ (n x n), and
``CKA(K, L) = <HKH, HLH> / (||HKH|| ||HLH||)`` with H the centring matrix. Layers are the embedding (the input
of block 0) and the output of every block. Writes a heat-map PNG and a JSON with the matrix.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffclip.cli import ArgumentParser, UsageError, positive_int, run
from diffclip.errors import InputError, UnknownNameError, one_line
from diffclip.files import check_writable, save_figure, write_json

__all__ = ["gram", "centre", "cka_from_grams", "layer_grams", "cka_matrix", "plot_matrix", "main"]


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear-kernel Gram matrix of (n, p) features, in float64."""
    x = x.reshape(x.size(0), -1).double()
    return x @ x.T


def centre(k: torch.Tensor) -> torch.Tensor:
    """H K H with H = I − 11ᵀ/n."""
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Linear CKA of two (n, n) Gram matrices (uncentred in, centred here)."""
    kc, lc = centre(k), centre(l)
    denom = kc.norm() * lc.norm()
    return float((kc * lc).sum() / denom) if denom > 0 else float("nan")


@torch.no_grad()
def layer_grams(model: nn.Module, loader, tokens: str = "all", device: str = "cpu") -> tuple[list[str], list[torch.Tensor]]:
    """Gram matrices of the embedding and of every block output of a timm ViT over the loader's images.

    Returns:
        ``(layer names, grams)`` — one (n, n) float64 matrix per layer.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise InputError("the model has no .blocks (not a timm VisionTransformer)")
    feats: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]

    def pool(t: torch.Tensor) -> torch.Tensor:
        if tokens == "cls":
            return t[:, 0]
        if tokens == "mean":
            return t.mean(dim=1)
        return t.flatten(1)

    hooks = [blocks[0].register_forward_pre_hook(lambda m, inp: feats[0].append(pool(inp[0]).float().cpu()))]
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_hook(lambda m, inp, out, i=i: feats[i + 1].append(pool(out).float().cpu())))
    try:
        model.eval().to(device)
        for x, _ in loader:
            model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    names = ["embed"] + [f"block {i}" for i in range(len(blocks))]
    return names, [gram(torch.cat(f)) for f in feats]


def cka_matrix(grams_a: list[torch.Tensor], grams_b: list[torch.Tensor]) -> list[list[float]]:
    """CKA of every layer of A (rows) with every layer of B (columns)."""
    return [[cka_from_grams(ka, kb) for kb in grams_b] for ka in grams_a]


def plot_matrix(matrix: list[list[float]], names_a: list[str], names_b: list[str], label_a: str, label_b: str,
                title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.7 * len(names_b)), max(4.0, 1.2 + 0.55 * len(names_a))))
    im = ax.imshow(matrix, cmap="magma", vmin=0, vmax=1, origin="lower")
    ax.set_xticks(range(len(names_b)), names_b, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names_a)), names_a, fontsize=8)
    ax.set_xlabel(label_b, fontsize=9)
    ax.set_ylabel(label_a, fontsize=9)
    if len(names_a) * len(names_b) <= 400:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="linear CKA")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description="Linear CKA between all layers of two ViTs on a dataset.")
    p.add_argument("--model-a", required=True, help="a checkpoint of training/finetune.py or a diffclip name[@pretrained]")
    p.add_argument("--model-b", required=True, help="the second model (the same spec forms)")
    p.add_argument("--dataset", required=True, help="a dataset of eval.readers")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=positive_int, default=1000, help="the first N images of the split")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--tokens", choices=("all", "cls", "mean"), default="all", help="what a layer's representation is")
    p.add_argument("--output", required=True, help="PNG path (a JSON is written beside it)")
    args = p.parse_args(argv)
    check_writable(args.output, "--output")
    from diffclip.eval.readers import build_dataset

    from diffclip.classifier import eval_transform, load_vit

    if args.num_images < 2:
        raise InputError(f"--num-images must be >= 2, got {args.num_images}")
    models = []
    for flag, spec in (("--model-a", args.model_a), ("--model-b", args.model_b)):
        try:
            models.append(load_vit(spec))
        except (InputError, UnknownNameError) as e:
            raise UsageError(f"{flag}: {one_line(e)}") from None
    grams, names = [], []
    for model, data_cfg, _ in models:
        try:
            ds = build_dataset(args.dataset, args.data_root, args.split, eval_transform(data_cfg))
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"dataset {args.dataset!r}: {e}") from None
        ds = torch.utils.data.Subset(ds, range(min(args.num_images, len(ds))))
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size)
        n, g = layer_grams(model, loader, args.tokens)
        names.append(n)
        grams.append(g)
    matrix = cka_matrix(grams[0], grams[1])
    (la, lb) = (models[0][2], models[1][2])
    title = f"linear CKA per layer\n{args.dataset} {args.split}, {len(ds)} images, tokens={args.tokens}"
    plot_matrix(matrix, names[0], names[1], la, lb, title, args.output)
    diag = [matrix[i][i] for i in range(min(len(matrix), len(matrix[0])))]
    record = {"model_a": args.model_a, "model_b": args.model_b, "label_a": la, "label_b": lb, "dataset": args.dataset,
              "split": args.split, "num_images": len(ds), "tokens": args.tokens, "layers_a": names[0],
              "layers_b": names[1], "cka": matrix, "diagonal": diag}
    write_json(Path(args.output).with_suffix(".json"), record)
    print(f"wrote {args.output}; diagonal CKA: {', '.join(f'{v:.3f}' for v in diag)}")
    return 0


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
