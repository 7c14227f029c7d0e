"""Helpers of the evaluation tests: real handwritten digits (scikit-learn) as images, and a small emoji package in
the emoji-datasource layout built from them."""

import gzip
import json
import struct

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

DIGITS = load_digits()


def digit(i: int, size: int = 16, mode: str = "RGB") -> Image.Image:
    """A real handwritten digit (scikit-learn's 8x8 set), upscaled."""
    a = (DIGITS.images[i] * (255 / 16)).astype(np.uint8)
    return Image.fromarray(a, mode="L").resize((size, size), Image.NEAREST).convert(mode)


def save(img: Image.Image, path, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def write_emoji_set(root, style: str = "twitter"):
    """A small emoji-datasource package: emoji.json + 64px RGBA PNGs in img/<style>/64/."""
    base = root / f"emoji-datasource-{style}"
    entries = []
    specs = [("GRINNING FACE", ["grinning"], "Smileys & Emotion", "face-smiling"),
             ("DOG FACE", ["dog"], "Animals & Nature", "animal-mammal"),
             ("CAT FACE", ["cat"], "Animals & Nature", "animal-mammal"),
             ("EMOJI MODIFIER FITZPATRICK TYPE-1-2", ["skin-tone-2"], "Component", "skin-tone"),
             ("FLAG IN HOLE", ["golf"], "Activities", "sport"),
             ("HOT BEVERAGE", ["coffee"], "Food & Drink", "drink"),
             ("THUMBS UP SIGN", ["+1", "thumbsup"], "People & Body", "hand-fingers-closed")]
    for i, (name, shorts, cat, sub) in enumerate(specs):
        fname = f"{0x1f600 + i:x}.png"
        rgba = digit(i, 64, "RGBA")
        alpha = Image.fromarray(np.where(np.asarray(digit(i, 64, "L")) > 0, 255, 0).astype(np.uint8))
        rgba.putalpha(alpha)
        save(rgba, base / "img" / style / "64" / fname)
        entries.append({"name": name, "unified": f"{0x1f600 + i:X}", "image": fname, "short_name": shorts[0],
                        "short_names": shorts, "category": cat, "subcategory": sub, "sort_order": 10 - i,
                        f"has_img_{style}": True})
    (base / "emoji.json").write_text(json.dumps(entries))
    return base


def write_idx_digits(root):
    """Fashion-MNIST's idx layout (``train-*`` / ``t10k-*`` images and labels, 28x28) holding scikit-learn's
    digits: the first 1000 as the training split, the rest as the test split."""
    root.mkdir(parents=True, exist_ok=True)
    imgs = np.stack([np.asarray(digit(i, 28, "L")) for i in range(len(DIGITS.images))])
    for prefix, part in (("train", slice(0, 1000)), ("t10k", slice(1000, None))):
        for kind, arr in (("images-idx3", imgs[part]), ("labels-idx1", DIGITS.target[part])):
            header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.astype(np.uint8).tobytes())
    return root
