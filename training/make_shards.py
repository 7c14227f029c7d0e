"""Writes image-caption shards in the img2dataset layout, the layout ``training/data.py`` reads.

Output::

    OUT/00000.tar, OUT/00001.tar, ...   samples KEY.jpg (or .png/.webp) + KEY.txt (caption) + KEY.json (metadata)
    OUT/sizes.json                      shard basename -> number of samples
    OUT/val/...                         the same for the held-out samples (--val-fraction)
    OUT/make_shards.json                what was written and what was skipped, and why

Sources:

* ``csv``: a CSV, TSV or JSONL file of ``filepath, caption`` (paths relative to that file; a header names the
  columns, ``filepath``/``caption`` or their usual aliases; extra columns go to the JSON).
* ``noto-emoji`` / ``twitter-emoji`` (or ``emoji`` for any ``emoji-datasource-*`` folder): the emoji catalogue
  installed by ``scripts/get_demo_data.sh``; captions from ``name`` and ``short_names`` through a few templates,
  skin-tone variants included; category and subcategory go to the JSON.
* ``openclipart``: Debian's ``openclipart-png`` (or ``openclipart-svg``, rendered with cairosvg); captions from
  the SVG's ``<dc:title>`` and keywords (the artist's name removed) and the category folders.

Images are converted to RGB (transparent pixels composited on white, so transparent emoji and clip art stay on
white after JPEG encoding), then resized to ``--image-size`` by ``--resize-mode``: ``pad`` (default: the longer
side to the size, keeping the aspect ratio, centred on a white square; nothing is cropped away, the train-time
RandomResizedCrop does the cropping), ``shorter`` (the shorter side to the size, as img2dataset's default) or
``crop`` (shorter side, then a centre crop to a square). Without ``--image-size`` the size is kept.

Records are shuffled with ``--seed`` before they are split into val and train and cut to ``--max-samples``, so
shards mix categories; for the same input and seed the shards are byte-identical. Each shard is written to
``NNNNN.tar.tmp`` and renamed when complete; ``sizes.json`` is written to a temporary name and renamed too.

Usage::

    python training/make_shards.py --source noto-emoji --output data/shards/noto --image-size 64 --val-fraction 0.1
    python training/make_shards.py --source csv --input captions.tsv --output shards/ --samples-per-shard 5000
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import html
import io
import json
import logging
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

__all__ = ["Record", "SourceNotInstalled", "SkipSample", "EMOJI_TEMPLATES", "SKIN_TONES", "emoji_name",
           "emoji_caption", "read_csv_source", "read_emoji_source", "read_openclipart_source", "read_source",
           "encode_image", "write_shards", "main"]

log = logging.getLogger("make_shards")

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
RESIZE_MODES = ("pad", "shorter", "crop")
GET_DEMO_DATA = "scripts/get_demo_data.sh"
DEFAULT_INPUTS = {
    "noto-emoji": "data/sources/emoji-datasource-google",
    "twitter-emoji": "data/sources/emoji-datasource-twitter",
    "openclipart": "/usr/share/openclipart",
}


class SourceNotInstalled(Exception):
    """The source is not there; the message names the command that installs it (exit code 2)."""


class SkipSample(Exception):
    """One record cannot be used (missing or undecodable image, empty caption); it is counted and skipped."""


@dataclass(frozen=True)
class Record:
    """One image-caption pair to write. ``caption`` None: built when the record is loaded (openclipart)."""

    path: str
    caption: str | None
    meta: dict = field(default_factory=dict)
    seed: int = 0


def _stable_seed(*parts) -> int:
    """A seed from strings/ints that does not depend on Python's hash randomisation."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


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
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exn:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({exn.msg})") from None
                pcol, ccol = _pick_column(list(obj), _PATH_COLUMNS), _pick_column(list(obj), _CAPTION_COLUMNS)
                if pcol is None or ccol is None:
                    raise ValueError(f"{path}:{lineno}: needs a path and a caption key (e.g. filepath, caption); "
                                     f"keys found: {', '.join(obj)}")
                rows.append((str(obj[pcol]), str(obj[ccol] or ""), {k: v for k, v in obj.items() if k not in (pcol, ccol)}))
    else:
        delimiter = "\t" if suffix in (".tsv", ".tab") else ","
        with open(path, encoding="utf-8", newline="") as f:
            table = [r for r in csv.reader(f, delimiter=delimiter) if r]
        if not table:
            raise ValueError(f"{path}: no rows")
        header = table[0]
        pcol, ccol = _pick_column(header, _PATH_COLUMNS), _pick_column(header, _CAPTION_COLUMNS)
        if pcol is not None and ccol is not None:
            pi, ci, body = header.index(pcol), header.index(ccol), table[1:]
            extra = [(i, h.strip()) for i, h in enumerate(header) if i not in (pi, ci)]
        else:
            pi, ci, body, extra = 0, 1, table, []
        for lineno, r in enumerate(body, 2 if body is not table else 1):
            if len(r) <= max(pi, ci):
                raise ValueError(f"{path}:{lineno}: expected a path and a caption, got {len(r)} column(s)")
            rows.append((r[pi], r[ci], {name: r[i] for i, name in extra if i < len(r)}))
    records = []
    for i, (p, caption, extra) in enumerate(rows):
        full = Path(p) if os.path.isabs(p) else base / p
        records.append(Record(str(full), caption.strip(), {"filepath": p, **extra}, _stable_seed("csv", i)))
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
            seed = _stable_seed("emoji", variant["unified"])
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
        with Image.open(rec.path) as im:  # openclipart-png keeps the title in a PNG text chunk
            info = {"title": _clean_words(str(im.info.get("Title", ""))), "creator": str(im.info.get("Author", "")),
                    "keywords": []}
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
        records.append(Record(str(p), None, meta, _stable_seed("openclipart", key)))
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
    raise ValueError(f"unknown source {source!r}")


# ---------------------------------------------------------------------------------------------------------- images
def _to_rgb_on_white(im: Image.Image) -> Image.Image:
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def _resize(im: Image.Image, size: int | None, mode: str) -> Image.Image:
    if not size:
        return im
    w, h = im.size
    if mode == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        if (nw, nh) == (size, size):
            return im
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
        return canvas
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    if mode == "crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return im


def encode_image(path: str, image_size: int | None = None, resize_mode: str = "pad", fmt: str = "jpg",
                 quality: int = 95) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Loads an image file (raster, or SVG through cairosvg), makes it RGB on white, resizes and encodes it.

    Returns ``(encoded bytes, original (w, h), written (w, h))``. Raises :class:`SkipSample` when the file is
    missing or cannot be decoded.
    """
    try:
        if path.lower().endswith(".svg"):
            import cairosvg

            png = cairosvg.svg2png(url=path, output_width=(image_size or 256) * 2 if image_size else None)
            im = Image.open(io.BytesIO(png))
        else:
            im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise SkipSample("missing image") from None
    except Exception as exn:  # undecodable image: PIL, cairosvg and XML errors alike
        raise SkipSample(f"undecodable image ({type(exn).__name__})") from None
    original = im.size
    im = _resize(_to_rgb_on_white(im), image_size, resize_mode)
    out = io.BytesIO()
    if fmt == "jpg":
        im.save(out, format="JPEG", quality=quality)
    elif fmt == "webp":
        im.save(out, format="WEBP", quality=quality)
    else:
        im.save(out, format="PNG")
    return out.getvalue(), original, im.size


@dataclass(frozen=True)
class _Options:
    image_size: int | None
    resize_mode: str
    fmt: str
    quality: int


def _load(job: tuple[Record, _Options]):
    """Worker function: ``(image bytes, caption, meta)`` or ``(None, reason, None)`` for a skipped record."""
    rec, opts = job
    try:
        caption, meta = (rec.caption, dict(rec.meta)) if rec.caption is not None else _clipart_caption(rec)
        if not caption or not caption.strip():
            raise SkipSample("empty caption")
        data, original, size = encode_image(rec.path, opts.image_size, opts.resize_mode, opts.fmt, opts.quality)
    except SkipSample as exn:
        return None, str(exn), None
    meta.pop("svg", None)
    meta.update(caption=caption, original_width=original[0], original_height=original[1], width=size[0],
                height=size[1])
    return data, caption, meta


# ---------------------------------------------------------------------------------------------------------- writer
def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class _SplitWriter:
    """One split (train or val): a webdataset ShardWriter whose shards are written as ``.tar.tmp`` and renamed."""

    def __init__(self, directory: Path, samples_per_shard: int, fmt: str):
        import webdataset as wds

        self.directory, self.fmt, self.sizes = directory, fmt, {}
        directory.mkdir(parents=True, exist_ok=True)
        self.writer = wds.ShardWriter(str(directory / "%05d.tar.tmp"), maxcount=samples_per_shard, verbose=0,
                                      post=self._finished, encoder=False, mtime=0)
        self.count = 0

    def _finished(self, fname: str) -> None:
        count = self.writer.count
        if count == 0:
            os.remove(fname)
            return
        final = fname[: -len(".tmp")]
        os.replace(fname, final)
        self.sizes[os.path.basename(final)] = count

    def write(self, data: bytes, caption: str, meta: dict) -> None:
        key = f"{self.count:09d}"
        meta = {"key": key, **meta}
        self.writer.write({"__key__": key, self.fmt: data, "txt": caption.encode("utf-8"),
                           "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")})
        self.count += 1

    def close(self) -> dict:
        self.writer.close()
        if self.sizes:
            _atomic_write_json(self.directory / "sizes.json", self.sizes)
        return {"shards": len(self.sizes), "samples": sum(self.sizes.values())}


def _clear_output(out: Path, overwrite: bool) -> None:
    existing = [p for d in (out, out / "val") if d.is_dir()
                for p in list(d.glob("*.tar")) + list(d.glob("*.tar.tmp")) + list(d.glob("sizes.json"))]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({len(existing)} files); pass --overwrite to replace them")
    for p in existing:
        p.unlink()


def write_shards(records: list[Record], output: str | os.PathLike, *, samples_per_shard: int = 1000,
                 image_size: int | None = None, resize_mode: str = "pad", fmt: str = "jpg", quality: int = 95,
                 max_samples: int | None = None, seed: int = 0, val_fraction: float = 0.0, workers: int = 1,
                 overwrite: bool = False, progress: bool = True, source: str = "") -> dict:
    """Writes ``records`` as shards to ``output`` (and ``output/val``); returns the summary it also saves as
    ``output/make_shards.json``: shards and samples per split, skipped records and why.

    Raises:
        FileExistsError: ``output`` already holds shards and ``overwrite`` is False.
        ValueError: bad options, or no record could be written.
    """
    from tqdm import tqdm

    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown --format {fmt!r}; choose from {', '.join(IMAGE_FORMATS)}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown --resize-mode {resize_mode!r}; choose from {', '.join(RESIZE_MODES)}")
    if samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("--val-fraction must be in [0, 1)")
    out = Path(output)
    _clear_output(out, overwrite)
    records = list(records)
    random.Random(seed).shuffle(records)
    if max_samples is not None:
        records = records[:max_samples]
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) > 1:
        n_val = min(max(n_val, 1), len(records) - 1)
    opts = _Options(image_size or None, resize_mode, fmt, quality)
    writers = {"train": _SplitWriter(out, samples_per_shard, fmt)}
    if n_val:
        writers["val"] = _SplitWriter(out / "val", samples_per_shard, fmt)
    skipped: collections.Counter = collections.Counter()
    jobs = [(r, opts) for r in records]
    pool = None
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        pool = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers)
        results = pool.imap(_load, jobs, chunksize=16)
    else:
        results = map(_load, jobs)
    try:
        bar = tqdm(results, total=len(jobs), desc=f"shards -> {out}", unit="img", disable=not progress)
        for i, (data, caption, meta) in enumerate(bar):
            if data is None:
                skipped[caption] += 1
                log.debug("skipped %s: %s", records[i].path, caption)
                continue
            writers["val" if i < n_val else "train"].write(data, caption, meta)
    finally:
        if pool is not None:
            pool.terminate()
        summary_splits = {name: w.close() for name, w in writers.items()}
    summary = {"output": str(out), "source": source, "records": len(records), **summary_splits,
               "skipped": sum(skipped.values()), "skipped_reasons": dict(skipped),
               "options": {"samples_per_shard": samples_per_shard, "image_size": image_size,
                           "resize_mode": resize_mode, "format": fmt, "seed": seed, "val_fraction": val_fraction,
                           "max_samples": max_samples}}
    if not any(s["samples"] for s in summary_splits.values()):
        raise ValueError(f"no sample could be written from {len(records)} record(s); skipped: {dict(skipped)}")
    _atomic_write_json(out / "make_shards.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", required=True, choices=["csv", "noto-emoji", "twitter-emoji", "emoji", "openclipart"])
    p.add_argument("--input", default=None, help="CSV/TSV/JSONL file (csv), emoji-datasource folder (emoji) or "
                   "Openclipart root; defaults: " + ", ".join(f"{k}: {v}" for k, v in DEFAULT_INPUTS.items()))
    p.add_argument("--output", required=True, help="folder for the shards (val/ inside it for --val-fraction)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=None, help="target size in pixels (none: keep the size)")
    p.add_argument("--resize-mode", choices=RESIZE_MODES, default="pad",
                   help="pad: longer side to the size, centred on white; shorter: shorter side to the size; "
                        "crop: shorter side, then centre crop")
    p.add_argument("--format", choices=list(IMAGE_FORMATS), default="jpg")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    p.add_argument("--max-samples", type=int, default=None, help="write at most this many records (random subset)")
    p.add_argument("--seed", type=int, default=0, help="shuffling of records and the val split")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of records held out in OUTPUT/val/")
    p.add_argument("--caption-style", choices=["varied", "plain"], default="varied",
                   help="emoji: captions from templates (varied) or the bare name (plain)")
    p.add_argument("--workers", type=int, default=1, help="processes that load and encode images")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        records = read_source(args.source, args.input, args.caption_style)
        log.info("%s: %d records", args.source, len(records))
        summary = write_shards(records, args.output, samples_per_shard=args.samples_per_shard,
                               image_size=args.image_size, resize_mode=args.resize_mode, fmt=args.format,
                               quality=args.quality, max_samples=args.max_samples, seed=args.seed,
                               val_fraction=args.val_fraction, workers=args.workers, overwrite=args.overwrite,
                               progress=not args.no_progress, source=args.source)
    except (SourceNotInstalled, FileExistsError, ValueError) as exn:
        print(f"make_shards: error: {exn}", file=sys.stderr)
        return 2
    val = summary.get("val", {"shards": 0, "samples": 0})
    print(f"make_shards: wrote {summary['train']['samples']} samples in {summary['train']['shards']} shard(s) to "
          f"{summary['output']}, {val['samples']} in {val['shards']} val shard(s); skipped {summary['skipped']}"
          + (f" ({', '.join(f'{k}: {v}' for k, v in summary['skipped_reasons'].items())})" if summary["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
