"""The emoji sets (emoji-datasource-{twitter,google}, installed by scripts/get_demo_data.sh): readers registered in :mod:`diffclip.eval.readers_registry` (:mod:`diffclip.eval.readers` builds them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from diffclip.eval.readers_base import (
    EMOJI_TEMPLATES,
    DatasetNotFoundError,
    ImageListDataset,
    RetrievalDataset,
    exists_or_raise,
)
from diffclip.eval.readers_registry import REGISTRY, register

from diffclip.errors import InputError

# ---------------------------------------------------------------------------------------------------------------
# Emoji sets (emoji-datasource-{twitter,google}@16, installed by scripts/get_demo_data.sh)
# ---------------------------------------------------------------------------------------------------------------

_EMOJI_LAYOUT = ("<root>/emoji-datasource-{set}/{emoji.json,img/{set}/64/*.png} (npm pack emoji-datasource-{set}"
                 "@16.0.0, unpacked; scripts/get_demo_data.sh puts it in data/sources)")
EMOJI_SKIPPED_CATEGORIES = ("Component",)


def _emoji_dir(root: Path, style: str) -> Path:
    for cand in (root / f"emoji-datasource-{style}", root / "sources" / f"emoji-datasource-{style}", root):
        if (cand / "emoji.json").is_file():
            return cand
    raise DatasetNotFoundError(f"dataset 'emoji-{style}': no emoji.json under {root}; expected layout: "
                               f"{_EMOJI_LAYOUT.replace('{set}', style)}")


def _emoji_entries(root: Path, style: str, split: str) -> tuple[Path, list[dict]]:
    base = _emoji_dir(root, style)
    entries = json.loads((base / "emoji.json").read_text(encoding="utf-8"))
    img_dir = base / "img" / style / "64"
    exists_or_raise(img_dir, f"emoji-{style}", _EMOJI_LAYOUT.replace("{set}", style))
    entries = sorted((e for e in entries if e.get("category") not in EMOJI_SKIPPED_CATEGORIES
                      and e.get(f"has_img_{style}", True) and (img_dir / e["image"]).is_file()),
                     key=lambda e: e.get("sort_order", 0))
    if split == "train":
        entries = [e for i, e in enumerate(entries) if i % 5 != 0]
    elif split == "test":
        entries = [e for i, e in enumerate(entries) if i % 5 == 0]
    return img_dir, entries


def _emoji_classname(label: str, field_name: str) -> str:
    return label.lower() if field_name == "category" else label.replace("-", " ").lower()


def _emoji_classification(root, split, transform, style, label="category"):
    if label not in ("category", "subcategory"):
        raise InputError(f"emoji label must be 'category' or 'subcategory', got {label!r}")
    img_dir, entries = _emoji_entries(root, style, split)
    _, all_entries = _emoji_entries(root, style, "all")
    classes = sorted({e[label] for e in all_entries})
    index = {c: i for i, c in enumerate(classes)}
    samples = [(img_dir / e["image"], index[e[label]]) for e in entries]
    return ImageListDataset(samples, [_emoji_classname(c, label) for c in classes], EMOJI_TEMPLATES, transform,
                            background=(255, 255, 255))


def _words(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip().lower()


def emoji_captions(entry: dict) -> list[str]:
    """The captions of one emoji (one image per emoji, the base image without skin-tone variants):

    1. ``"an emoji of <name>"``: the catalogue name, lower case, ``_`` read as a space (the training demo's
       captions on Noto emoji use the same name, e.g. "an emoji of grinning face");
    2. ``"an emoji of <short name>"`` for each short name with ``_`` / ``-`` read as spaces, kept when it has a
       run of 3+ letters, differs from the name and is not a code (``flag-eg``, ``u5272``, ``+1`` are left out).

    Duplicates are dropped, order kept.
    """
    name = _words(entry["name"])
    out = [f"an emoji of {name}"]
    for s in entry.get("short_names") or []:
        alias = _words(s.replace("-", " "))
        if not re.search(r"[a-z]{3}", alias) or alias == name or alias.startswith("flag ") \
                or re.fullmatch(r"u[0-9a-f]{4,5}", alias):
            continue
        cap = f"an emoji of {alias}"
        if cap not in out:
            out.append(cap)
    return out


def _emoji_retrieval(root, split, transform, style):
    img_dir, entries = _emoji_entries(root, style, split)
    return RetrievalDataset([img_dir / e["image"] for e in entries], [emoji_captions(e) for e in entries],
                            transform, background=(255, 255, 255))


for _style in ("twitter", "google"):
    _lay = _EMOJI_LAYOUT.replace("{set}", _style)
    _kw = dict(default_split="all", splits=("all", "train", "test"), default_root="data/sources",
               subdirs=(f"emoji-datasource-{_style}",))
    register(f"emoji-{_style}", "classification", _lay, options={"style": _style}, **_kw)(_emoji_classification)
    register(f"emoji-{_style}-subcategory", "classification", _lay, options={"style": _style, "label": "subcategory"},
              **_kw)(_emoji_classification)
    register(f"emoji-{_style}", "retrieval", _lay, options={"style": _style}, **_kw)(_emoji_retrieval)
REGISTRY[("classification", "emoji-twitter")].description = (
    "Twitter emoji (1,906 base emoji): zero-shot over the 9 categories (Component left out); split all/train/test")
REGISTRY[("classification", "emoji-google")].description = (
    "Google Noto emoji (1,906 base emoji): zero-shot over the 9 categories; split all/train/test")
REGISTRY[("classification", "emoji-twitter-subcategory")].description = "Twitter emoji, subcategories as classes"
REGISTRY[("classification", "emoji-google-subcategory")].description = "Google emoji, subcategories as classes"
REGISTRY[("retrieval", "emoji-twitter")].description = "Twitter emoji, captions from name and short names"
REGISTRY[("retrieval", "emoji-google")].description = "Google emoji, captions from name and short names"
