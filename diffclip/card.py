"""The model card (``README.md``) that ``DiffCLIP.save_pretrained`` / ``push_to_hub`` and the trainer's
``final_model/`` carry: a YAML header the hub reads (``library_name: diffclip``, ``pipeline_tag:
zero-shot-image-classification``, license, tags with the paper's ``arxiv:2503.06626``, the model name), the
architecture, for trainer exports the training run (data, steps, batch, precision, last validation and zero-shot
numbers), a usage snippet that runs as it is, and the citation. Built with huggingface_hub's ``ModelCard`` /
``ModelCardData``.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

__all__ = ["PAPER", "model_card", "last_results"]

PAPER = "https://arxiv.org/abs/2503.06626"
_CITATION = """@article{hammoud2025diffclip,
  title   = {DiffCLIP: Differential Attention Meets CLIP},
  author  = {Hammoud, Hasan Abed Al Kader and Ghanem, Bernard},
  journal = {arXiv preprint arXiv:2503.06626},
  year    = {2025}
}"""
_ATTENTION = {"diff": "differential", "standard": "standard (softmax)"}


def _tower_row(what: str, cfg: dict) -> str:
    attn = _ATTENTION.get(cfg.get("attn_type"), str(cfg.get("attn_type")))
    if cfg.get("attn_type") == "diff":
        lam = cfg.get("lambda_init", 0.8)
        attn += " (λ_init " + ("0.8 − 0.6·exp(−0.3·layer)" if lam == "schedule" else f"{lam}") + ")"
    size = (f"{cfg['image_size']} px, patch {cfg['patch_size']}" if "image_size" in cfg
            else f"context {cfg.get('context_length', 77)}, vocab {cfg.get('vocab_size', 49408)}")
    return (f"| {what} | {cfg['width']} | {cfg['layers']} | {cfg['heads']} | {attn} | {cfg.get('act', 'gelu')} "
            f"| {size} |")


def _number(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _training_section(training: dict) -> list[str]:
    """Rows of the run's facts, then the last validation and zero-shot records."""
    lines = ["## Training", "", "| | |", "|---|---|"]
    results = {k: training[k] for k in ("val", "zeroshot") if training.get(k)}
    lines += [f"| {k} | {_number(v)} |" for k, v in training.items() if k not in ("val", "zeroshot")]
    for kind, title in (("val", "Validation"), ("zeroshot", "Zero-shot")):
        rec = results.get(kind)
        if not rec:
            continue
        where = f"step {rec.get('step')}" + (f", epoch {rec['epoch'] + 1}" if isinstance(rec.get("epoch"), int) else "")
        name = f" on {rec['dataset']}" if rec.get("dataset") else ""
        lines += ["", f"### {title}{name} (last evaluation of the run, {where})", "", "| metric | value |",
                  "|---|---|"]
        lines += [f"| {k} | {_number(v)} |" for k, v in rec.items()
                  if k not in ("type", "step", "epoch", "dataset", "time") and isinstance(v, (int, float))]
    return lines + [""]


def model_card(model_name: str | None, config: dict, *, n_params: int | None = None, location: str | None = None,
               repo_id: str | None = None, training: dict | None = None, license: str = "mit") -> ModelCard:
    """A model card for a diffclip model.

    Args:
        model_name: the config's name (``DiffCLIP-ViT-B-16``), or None for an unnamed config.
        config: the model's config (``DiffCLIP.model_config``).
        n_params: the parameter count, shown when given.
        location: where the model is saved (a folder): the usage snippet loads it from there unless ``repo_id``.
        repo_id: the hub repo (``org/name``): the snippet loads ``hf-hub:<repo_id>``.
        training: for trainer exports, an ordered dict of facts shown as a table (data, steps, global batch,
            precision...), with ``"val"`` / ``"zeroshot"``: the run's last records of those kinds
            (:func:`last_results`).
        license: the card's ``license`` field (an SPDX-style hub identifier).

    Returns:
        A ``huggingface_hub.ModelCard``; ``card.save(path)`` writes it, ``ModelCard.load`` reads it back.
    """
    name = model_name or "diffclip model"
    tags = ["diffclip", "clip", "zero-shot-image-classification", "arxiv:2503.06626"]
    if "diff" in (config["vision_cfg"].get("attn_type"), config["text_cfg"].get("attn_type")):
        tags.insert(2, "differential-attention")
    data = ModelCardData(library_name="diffclip", pipeline_tag="zero-shot-image-classification", license=license,
                         tags=tags, model_name=model_name)
    source = f"hf-hub:{repo_id}" if repo_id else (location or "path/to/this/folder")
    both_diff = all(c.get("attn_type") == "diff" for c in (config["vision_cfg"], config["text_cfg"]))
    kind = ("a CLIP dual encoder with differential attention in both towers (DiffCLIP)" if both_diff else
            "a CLIP dual encoder with differential attention in the image tower" if
            config["vision_cfg"].get("attn_type") == "diff" else "a CLIP dual encoder with standard attention "
            "(the baseline of DiffCLIP)")
    p = config.get("preprocess_cfg") or {}
    body = [f"# {name}", "",
            f"{name} is {kind}, built with the `diffclip` package. DiffCLIP: Hammoud and Ghanem, "
            f"\"DiffCLIP: Differential Attention Meets CLIP\", [arXiv 2503.06626]({PAPER}).", "",
            "## Architecture", "",
            f"Joint embedding {config['embed_dim']}"
            + (f"; {n_params:,} parameters" if n_params is not None else "") + ".", "",
            "| tower | width | layers | heads | attention | activation | input |", "|---|---|---|---|---|---|---|",
            _tower_row("image (ViT)", config["vision_cfg"]), _tower_row("text (causal)", config["text_cfg"]), "",
            f"Images: resize the shorter side to {config['vision_cfg'].get('image_size', 224)} px "
            f"({p.get('interpolation', 'bicubic')}), centre crop, normalise with mean {list(p.get('mean', []))} and "
            f"std {list(p.get('std', []))}. Texts: CLIP's BPE tokenizer, {config['text_cfg'].get('context_length', 77)}"
            " tokens.", ""]
    if training:
        body += _training_section(training)
    body += ["## Usage", "", "```python", "import torch", "from PIL import Image", "", "import diffclip", "",
             f"model, _, preprocess = diffclip.create_model_and_transforms({json.dumps(source)})",
             f"tokenizer = diffclip.get_tokenizer({json.dumps(source)})",
             "labels = [\"a photo of a cat\", \"a photo of a dog\", \"a diagram\"]",
             "image = preprocess(Image.open(\"photo.jpg\")).unsqueeze(0)", "with torch.no_grad():",
             "    image_features = model.encode_image(image, normalize=True)",
             "    text_features = model.encode_text(tokenizer(labels), normalize=True)",
             "    probs = (model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)",
             "print(dict(zip(labels, probs[0].tolist())))", "```", "",
             "## Citation", "", "```bibtex", _CITATION, "```", ""]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body))


def last_results(results_path: str | Path, kinds: tuple[str, ...] = ("val", "zeroshot")) -> dict[str, dict]:
    """The last record of each kind in a run's ``results.jsonl`` (one JSON object a line with a ``type``), for
    :func:`model_card`'s ``training``; kinds without a record are absent, unreadable lines are skipped."""
    out: dict[str, dict] = {}
    path = Path(results_path)
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("type") in kinds:
            out[rec["type"]] = rec
    return out
