"""Zero-shot image-text retrieval (CLIP_benchmark protocol): recall@1/5/10 in both directions, several captions
per image.

    python eval/retrieval.py --model DiffCLIP-ViT-B-16 --pretrained cc3m --dataset mscoco --data-root /data/coco \
        --output results/ret_coco.json

``image_retrieval_recall@k``: each caption retrieves images, a hit when its image is in the top k.
``text_retrieval_recall@k``: each image retrieves captions, a hit when any of its captions is in the top k.
Embeddings are L2-normalised (cosine similarity); ties are broken by index (:mod:`diffclip.metrics`).
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from diffclip.eval import readers
from diffclip.eval.common import (
    encode_texts,
    extract_image_features,
    limit,
    make_loader,
    model_transform,
    result_record,
)
from diffclip.eval.runner import program_parser, run_program

from diffclip.cli import positive_int, run
from diffclip.metrics import retrieval_metrics
from diffclip.runtime import get_autocast

log = logging.getLogger("diffclip.eval")
TASK = "zeroshot_retrieval"


def evaluate(model, tokenizer, dataset, *, device: torch.device, precision: str = "fp32", batch_size: int = 64,
             workers: int = 0, ks=(1, 5, 10), progress: bool = True, ranks: dict | None = None) -> dict:
    """Retrieval metrics of ``model`` on a reader retrieval ``dataset`` (transform already set); ``ranks``, when
    given, receives the per-query ranks (:func:`diffclip.metrics.retrieval_metrics`)."""
    autocast = get_autocast(precision, device.type)
    t0 = time.perf_counter()
    image_emb, index = extract_image_features(model, make_loader(dataset, batch_size, workers, device), device,
                                              autocast, progress, desc="images")
    # the loader yields each image's position in the dataset; keep features in dataset order
    order = torch.argsort(index)
    image_emb = image_emb[order]
    texts, text_to_image = [], []
    for i, caps in enumerate(dataset.captions):
        texts += caps
        text_to_image += [i] * len(caps)
    text_emb = encode_texts(model, tokenizer, texts, device, batch_size=max(batch_size, 256), autocast=autocast,
                            progress=progress)
    log.info("%d images, %d captions embedded in %.1fs", len(image_emb), len(texts), time.perf_counter() - t0)
    return retrieval_metrics(image_emb, text_emb, torch.tensor(text_to_image), ks=ks, ranks=ranks)


def evaluate_dataset(model, preprocess, tokenizer, dataset, *, model_name: str, pretrained: str | None,
                     device: torch.device, precision: str = "fp32", batch_size: int = 64, workers: int = 0,
                     max_samples: int | None = None, ks=(1, 5, 10), progress: bool = True) -> dict:
    """The CLIP_benchmark record of retrieval on a reader retrieval ``dataset`` as built (its transform is set to
    ``preprocess`` here; at most ``max_samples`` evenly spaced images): ``metrics`` (:func:`evaluate`), ``root`` and
    ``per_sample`` (each query's hit at each k, 0/1, for a bootstrap over evaluation samples)."""
    name = dataset.name
    dataset = limit(readers.set_transform(dataset, model_transform(preprocess, precision)), max_samples)
    log.info("retrieval %s: %d images, %d captions, with %s", name, len(dataset),
             sum(len(c) for c in dataset.captions), model_name)
    ranks: dict = {}
    metrics = evaluate(model, tokenizer, dataset, device=device, precision=precision, batch_size=batch_size,
                       workers=workers, ks=tuple(ks), progress=progress, ranks=ranks)
    per_sample = {f"{d}_retrieval_recall@{k}": (ranks[d] < k).int().tolist() for d in ("image", "text") for k in ks}
    return result_record(name, model_name, pretrained, TASK, metrics, root=dataset.root, per_sample=per_sample)


def build_parser() -> argparse.ArgumentParser:
    p = program_parser(__doc__, "datasets: " + ", ".join(readers.list_datasets("retrieval")))
    p.add_argument("--dataset", required=True, help="mscoco, flickr30k, flickr8k, wds, img2dataset, csv, jsonl, "
                                                    "emoji-twitter, emoji-google")
    p.add_argument("--data-root", default=None, help="dataset folder (csv/jsonl: the file; img2dataset: its "
                                                     "--output_folder)")
    p.add_argument("--split", default=None, help="split (default: test; 'all' for csv/jsonl/emoji)")
    p.add_argument("--annotations", default=None, help="Karpathy split JSON (default: <root>/dataset_<name>.json)")
    p.add_argument("--recall-k", type=positive_int, nargs="+", default=[1, 5, 10])
    p.add_argument("--output", default=None, help="result JSON (CLIP_benchmark format), written atomically")
    return p


def _inputs(args: argparse.Namespace):
    options = {"annotations": args.annotations} if args.annotations else {}
    return readers.build_retrieval_dataset(args.dataset, args.data_root, args.split, None, **options)


def _evaluate(model, preprocess, tokenizer, dataset, args: argparse.Namespace, device: torch.device) -> dict:
    return evaluate_dataset(model, preprocess, tokenizer, dataset, model_name=args.model, pretrained=args.pretrained,
                            device=device, precision=args.precision, batch_size=args.batch_size, workers=args.workers,
                            max_samples=args.max_samples, ks=args.recall_k, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    return run_program(build_parser(), argv, inputs=_inputs, evaluate=_evaluate)


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
