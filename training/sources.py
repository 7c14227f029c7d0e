"""The catalogue of image-caption sources that ``training/make_shards.py`` writes as shards: a CSV/TSV/JSONL file
of image paths and captions, the emoji-datasource catalogues (Noto, Twitter; npm packages installed by
``scripts/get_demo_data.sh``) with their caption rules, and Debian's Openclipart with captions from each drawing's
title and keywords. Each reader returns :class:`Record` objects.

The emoji aliases kept in captions follow the same rule as the evaluation captions of
``eval/readers_emoji.py`` (``emoji_captions``); the two programs do not import each other."""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from diffclip.errors import InputError
from diffclip.files import json_lines

__all__ = ["Record", "SourceNotInstalled", "SkipSample", "EMOJI_TEMPLATES", "CLIPART_TEMPLATES", "SKIN_TONES",
           "DEFAULT_INPUTS", "emoji_name", "emoji_caption", "read_csv_source", "read_emoji_source",
           "read_openclipart_source", "read_source", "record_caption"]

GET_DEMO_DATA = "scripts/get_demo_data.sh"


def record_seed(*parts) -> int:
    """The per-record seed of the shard format (caption template, augmentation): BLAKE2b of the parts joined by
    a unit separator. Not ``diffclip.runtime.stable_seed`` (which hashes ``repr(parts)``): this one fixes the
    bytes of every shard written so far, and with them the demo's and the study's documented numbers."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")

DEFAULT_INPUTS = {
    "noto-emoji": "data/sources/emoji-datasource-google",
    "twitter-emoji": "data/sources/emoji-datasource-twitter",
    "openclipart": "/usr/share/openclipart",
}


class SourceNotInstalled(Exception):
    """The source is not there; the message names the command that installs it."""


class SkipSample(Exception):
    """One record cannot be used (missing or undecodable image, empty caption); it is counted and skipped."""


@dataclass(frozen=True)
class Record:
    """One image-caption pair to write. ``caption`` None: built when the record is loaded (openclipart)."""

    path: str
    caption: str | None
    meta: dict = field(default_factory=dict)
    seed: int = 0


# ----------------------------------------------------------------------------------------------- csv / tsv / jsonl
_PATH_COLUMNS = ("filepath", "file_path", "path", "file", "filename", "image", "image_path", "img")
_CAPTION_COLUMNS = ("caption", "text", "title", "txt", "label", "description")


def _pick_column(names: list[str], choices: tuple[str, ...]) -> str | None:
    lowered = {n.strip().lower(): n for n in names}
    return next((lowered[c] for c in choices if c in lowered), None)


def read_csv_source(path: str | os.PathLike) -> list[Record]:
    """Records from a CSV, TSV (``.tsv``/``.tab``) or JSONL (``.jsonl``/``.json``) file of image path and caption.

    A header row that names a path column (``filepath``, ``path``, ``image``, ...) and a caption column
    (``caption``, ``text``, ``title``, ...) is used when present; otherwise the first two columns are the path
    and the caption. Relative paths are taken from the file's folder. Other columns go to the sample's JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceNotInstalled(f"caption file not found: {path} (give --input FILE with filepath,caption rows)")
    base = path.parent
    rows: list[tuple[str, str, dict]] = []
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        for lineno, obj in json_lines(path):
            pcol, ccol = _pick_column(list(obj), _PATH_COLUMNS), _pick_column(list(obj), _CAPTION_COLUMNS)
            if pcol is None or ccol is None:
                raise InputError(f"{path}:{lineno}: needs a path and a caption key (e.g. filepath, caption); "
                                 f"keys found: {', '.join(obj)}")
            rows.append((str(obj[pcol]), str(obj[ccol] or ""), {k: v for k, v in obj.items() if k not in (pcol, ccol)}))
    else:
        delimiter = "\t" if suffix in (".tsv", ".tab") else ","
        with open(path, encoding="utf-8", newline="") as f:
            table = [r for r in csv.reader(f, delimiter=delimiter) if r]
        if not table:
            raise InputError(f"{path}: no rows")
        header = table[0]
        pcol, ccol = _pick_column(header, _PATH_COLUMNS), _pick_column(header, _CAPTION_COLUMNS)
        if pcol is not None and ccol is not None:
            pi, ci, body = header.index(pcol), header.index(ccol), table[1:]
            extra = [(i, h.strip()) for i, h in enumerate(header) if i not in (pi, ci)]
        else:
            pi, ci, body, extra = 0, 1, table, []
        for lineno, r in enumerate(body, 2 if body is not table else 1):
            if len(r) <= max(pi, ci):
                raise InputError(f"{path}:{lineno}: expected a path and a caption, got {len(r)} column(s)")
            rows.append((r[pi], r[ci], {name: r[i] for i, name in extra if i < len(r)}))
    records = []
    for i, (p, caption, extra) in enumerate(rows):
        full = Path(p) if os.path.isabs(p) else base / p
        records.append(Record(str(full), caption.strip(), {"filepath": p, **extra}, record_seed("csv", i)))
    return records


# ---------------------------------------------------------------------------------------------------------- emoji
# The five Fitzpatrick modifiers of Unicode, as the emoji catalogue names them in skin-tone variants.
SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}

# {name}: the emoji's name; {alias}: another short name; {group}: the subcategory. Chosen per emoji, seeded.
EMOJI_TEMPLATES = (
    "an emoji of {name}",
    "{a_name} emoji",
    "{name}",
    "an icon of {name}",
    "a picture of {name}",
    "the {name} emoji",
    "{name}, an emoji from the {group} group",
    "{name} ({alias})",
    "a small drawing of {name}",
)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _clean_words(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip()


def emoji_name(entry: dict, skin: str | None = None) -> str:
    """The lower-case name of an emoji-datasource entry, with its skin tones when ``skin`` is a variant key.

    >>> emoji_name({"name": "THUMBS UP SIGN"}, "1F3FD")
    'thumbs up sign, medium skin tone'
    """
    name = _clean_words(entry["name"]).lower()
    if skin:
        tones = [SKIN_TONES.get(part.upper(), part.lower()) for part in skin.split("-")]
        tones = list(dict.fromkeys(tones))
        if len(tones) == 1:
            name += f", {tones[0]} skin tone"
        else:
            name += f", {' and '.join(tones)} skin tones"
    return name


def emoji_caption(entry: dict, skin: str | None = None, seed: int = 0, templates=EMOJI_TEMPLATES) -> str:
    """A caption for an emoji: one of ``templates`` chosen by ``seed``, filled with its name, an alias and group.

    The alias is a short name that says something the name does not (``+1`` and codes like ``flag-eg`` are left
    out, as are codepoint names like ``u5272``); templates that need an alias are not chosen when there is none.
    """
    name = emoji_name(entry, skin)
    base = _clean_words(entry["name"]).lower()
    aliases = [_clean_words(s.replace("-", " ")).lower() for s in entry.get("short_names") or []]
    aliases = [a for a in aliases if re.search(r"[a-z]{3}", a) and a != base and not a.startswith("flag ")
               and not re.fullmatch(r"u[0-9a-f]{4,5}", a)]
    group = _clean_words((entry.get("subcategory") or "").replace("-", " ")).lower()
    usable = [t for t in templates if ("{alias}" not in t or aliases) and ("{group}" not in t or group)]
    rng = random.Random(seed)
    template = rng.choice(usable or ["{name}"])
    return template.format(name=name, a_name=_article(name), alias=rng.choice(aliases) if aliases else "",
                           group=group)


def _emoji_set(root: Path) -> str:
    sets = sorted(p.parent.name for p in root.glob("img/*/64") if p.is_dir())
    if not sets:
        raise SourceNotInstalled(f"no emoji images in {root}/img/*/64: run `{GET_DEMO_DATA}`")
    if len(sets) > 1 and root.name.startswith("emoji-datasource-") and root.name[17:] in sets:
        return root.name[17:]
    return sets[0]


def read_emoji_source(root: str | os.PathLike, caption_style: str = "varied") -> list[Record]:
    """Records of an ``emoji-datasource-<set>`` npm package folder (``emoji.json`` + ``img/<set>/64/*.png``).

    One record per emoji and per skin-tone variant that has an image of the set. The caption template is
    chosen by a seed from the emoji's code point, so the Google and Twitter sets get the same captions.
    ``caption_style="plain"`` gives the bare name instead.
    """
    root = Path(root)
    catalogue = root / "emoji.json"
    if not catalogue.is_file():
        raise SourceNotInstalled(f"emoji source not installed in {root} (no emoji.json): run `{GET_DEMO_DATA}`")
    image_set = _emoji_set(root)
    entries = json.loads(catalogue.read_text(encoding="utf-8"))
    records = []
    for entry in entries:
        variants = [(None, entry)] + sorted((entry.get("skin_variations") or {}).items())
        for skin, variant in variants:
            if not variant.get(f"has_img_{image_set}", True):
                continue
            image = root / "img" / image_set / "64" / variant["image"]
            seed = record_seed("emoji", variant["unified"])
            caption = emoji_name(entry, skin) if caption_style == "plain" else emoji_caption(entry, skin, seed)
            meta = {"name": emoji_name(entry, skin), "short_names": entry.get("short_names") or [],
                    "category": entry.get("category"), "subcategory": entry.get("subcategory"),
                    "unified": variant["unified"], "skin_tone": skin, "image": variant["image"],
                    "set": image_set, "source": f"emoji-datasource-{image_set}"}
            records.append(Record(str(image), caption, meta, seed))
    return records


# ---------------------------------------------------------------------------------------------------- openclipart
_GENERIC_TITLE = re.compile(r"theme|collection|clipart by|various|untitled|^icons?$|^symbol|^\s*$", re.I)
_GENERIC_KEYWORDS = {"", "hash", "icon", "icons", "symbol", "unsorted", "clip art", "clipart", "theme", "computer"}


def _svg_metadata(svg_path: Path) -> dict:
    """Title, keywords and creator from an Openclipart SVG's RDF metadata (``cc:Work``); {} if none."""
    try:
        text = svg_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    work = re.search(r"<cc:Work\b.*?</cc:Work>", text, re.S)
    if not work:
        return {}
    work = work.group(0)

    def clean(s):
        return _clean_words(html.unescape(re.sub(r"<[^>]+>", " ", s)))

    title = re.search(r"<dc:title>(.*?)</dc:title>", work, re.S)
    creator = re.search(r"<dc:creator>.*?<dc:title>(.*?)</dc:title>", work, re.S)
    subject = re.search(r"<dc:subject>(.*?)</dc:subject>", work, re.S)
    keywords = [clean(k) for k in re.findall(r"<rdf:li>(.*?)</rdf:li>", subject.group(1), re.S)] if subject else []
    return {"title": clean(title.group(1)) if title else "", "creator": clean(creator.group(1)) if creator else "",
            "keywords": keywords}


CLIPART_TEMPLATES = ("a clip art drawing of {title}", "{title}", "an illustration of {title}", "clip art: {title}",
                     "a drawing of {title}")


def _clipart_caption(rec: Record) -> tuple[str, dict]:
    meta = dict(rec.meta)
    svg = meta.get("svg")
    info = _svg_metadata(Path(svg)) if svg and os.path.exists(svg) else {}
    if not info.get("title") and not svg:
        try:
            with Image.open(rec.path) as im:  # openclipart-png keeps the title in a PNG text chunk
                info = {"title": _clean_words(str(im.info.get("Title", ""))),
                        "creator": str(im.info.get("Author", "")), "keywords": []}
        except FileNotFoundError:
            raise SkipSample("missing image") from None
        except Exception as exn:  # as make_shards.encode_image: counted, not fatal
            raise SkipSample(f"undecodable image ({type(exn).__name__})") from None
    stem = re.sub(r"(_?\d+[a-z]?)+$", "", Path(rec.path).stem)
    title = info.get("title", "")
    if _GENERIC_TITLE.search(title):  # icon-set titles ("Lemon SVG theme"): the file name says more
        title = _clean_words(stem.replace("-", " "))
    creator_words = set(info.get("creator", "").lower().split())
    keywords = []
    for k in info.get("keywords", []) + list(meta.get("categories", [])):
        k = _clean_words(k.replace("-", " ")).lower()
        if k in _GENERIC_KEYWORDS or k in title.lower() or (creator_words and set(k.split()) <= creator_words):
            continue
        if k not in keywords:
            keywords.append(k)
    if not title:
        if not keywords:
            raise SkipSample("no title or keywords")
        title = keywords.pop(0)
    rng = random.Random(rec.seed)
    caption = rng.choice(CLIPART_TEMPLATES).format(title=title.lower())
    if keywords:
        caption += ", " + ", ".join(keywords[:3])
    meta.update(title=info.get("title", ""), keywords=info.get("keywords", []), creator=info.get("creator", ""))
    return caption, meta


def read_openclipart_source(root: str | os.PathLike = "/usr/share/openclipart") -> list[Record]:
    """Records of Debian's Openclipart: ``png/`` when installed (``openclipart-png``), else ``svg/`` rendered
    with cairosvg (``openclipart-svg``). Drawings filed in several category folders are taken once, with all
    their categories. Titles and keywords are read when each record is loaded."""
    root = Path(root)
    png_dir, svg_dir = root / "png", root / "svg"
    if png_dir.is_dir():
        image_dir, ext = png_dir, ".png"
    elif svg_dir.is_dir():
        try:
            import cairosvg  # noqa: F401
        except ImportError:
            raise SourceNotInstalled("openclipart-svg needs cairosvg to render: pip install cairosvg "
                                     "(or apt-get install openclipart-png)") from None
        image_dir, ext = svg_dir, ".svg"
    else:
        raise SourceNotInstalled(f"openclipart is not installed in {root}: run `apt-get install openclipart-png "
                                 f"openclipart-svg` (or `{GET_DEMO_DATA}`)")
    by_name: dict[str, tuple[Path, list[str]]] = {}
    for p in sorted(image_dir.rglob("*" + ext)):
        real = p.resolve()
        if not real.is_file():
            continue
        rel = p.relative_to(image_dir)
        categories = [c.replace("_", " ") for c in rel.parts[:-1]]
        key = real.stem
        if key in by_name:
            cats = by_name[key][1]
            cats.extend(c for c in categories if c not in cats)
        else:
            by_name[key] = (p, categories)
    records = []
    for key, (p, categories) in by_name.items():
        rel = p.relative_to(image_dir)
        svg = svg_dir / rel.with_suffix(".svg")
        meta = {"categories": categories, "file": str(rel), "source": "openclipart",
                "svg": str(svg) if svg.exists() else None}
        records.append(Record(str(p), None, meta, record_seed("openclipart", key)))
    return records


def read_source(source: str, input_path: str | None = None, caption_style: str = "varied") -> list[Record]:
    """Records of a named source (``csv``, ``noto-emoji``, ``twitter-emoji``, ``emoji``, ``openclipart``)."""
    if source == "csv":
        if not input_path:
            raise SourceNotInstalled("--source csv needs --input FILE (a CSV/TSV/JSONL of filepath,caption)")
        return read_csv_source(input_path)
    if source in ("noto-emoji", "twitter-emoji", "emoji"):
        path = input_path or DEFAULT_INPUTS.get(source)
        if not path:
            raise SourceNotInstalled("--source emoji needs --input DIR (an emoji-datasource-<set> folder)")
        return read_emoji_source(path, caption_style)
    if source == "openclipart":
        return read_openclipart_source(input_path or DEFAULT_INPUTS["openclipart"])
    raise InputError(f"unknown source {source!r}")


def record_caption(rec: Record) -> tuple[str, dict]:
    """``(caption, metadata)`` of a record; Openclipart records build theirs from the drawing's metadata."""
    return (rec.caption, dict(rec.meta)) if rec.caption is not None else _clipart_caption(rec)
