"""Image files to RGB PIL images: the one place that decides which files are images and how transparency and
palettes become RGB."""

from __future__ import annotations

import os
from typing import IO

from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "to_rgb", "decode_image", "load_image", "undecodable", "ToMode"]

#: file extensions read as images (lower case, without the dot; a webdataset sample's image key is one of them),
#: in order of preference when a sample has several
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    """``img`` as an RGB image. Transparent images (an alpha band, or a palette with a transparent index) are
    composited over ``background`` (an RGB triple, e.g. white for drawings and emoji) when it is given;
    otherwise their alpha is dropped, as ``Image.convert("RGB")`` does."""
    if background is not None and (img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(file: IO[bytes], name: str, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Decodes an image from the binary ``file`` in full, as RGB (see :func:`to_rgb`). Raises OSError
    ``image NAME cannot be decoded (...)`` when it is not an image, truncated, or a decompression bomb: every
    decode error names its file (``name``: a path, or a member and its archive)."""
    try:
        img = Image.open(file)
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise OSError(f"image {name} cannot be decoded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                      ) from None
    return to_rgb(img, background)


def load_image(path: str | os.PathLike, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Opens and decodes an image file as RGB (see :func:`to_rgb`). Raises FileNotFoundError when it is missing
    and OSError naming it when it cannot be read or decoded (:func:`decode_image`)."""
    with open(path, "rb") as f:
        return decode_image(f, str(path), background)


def undecodable(paths) -> list[tuple[str, str]]:
    """The files of ``paths`` that do not decode as images, as ``(path, reason)`` (a full decode of each)."""
    bad = []
    for p in paths:
        try:
            load_image(p)
        except OSError as e:
            bad.append((str(p), str(e)))
    return bad


class ToMode:
    """A picklable transform: PIL image -> ``mode`` (``"L"`` for one-channel models, ``"RGB"`` for three)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.mode == "RGB":
            return to_rgb(img)
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"
