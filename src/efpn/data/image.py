"""Reading images without torch (the data commands start without importing it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .records import DataError

__all__ = ["file_sizes", "load_rgb", "max_pixels"]

_ORIENTATION = 0x0112  # the EXIF tag; 5-8 turn the image by 90 degrees

# efpn checks sizes itself (below), with a message that says what to do
Image.MAX_IMAGE_PIXELS = None


def max_pixels(sliced: bool = False) -> int:
    """The largest image efpn reads, in pixels: ``EFPN_MAX_PIXELS`` (default 100 million,
    a 10000x10000 scene, whose float copy alone is 1.2 GB) for whole-image paths, and
    ``EFPN_MAX_SLICED_PIXELS`` (default 1 billion) for sliced prediction, which keeps the
    scene as uint8 and converts one batch of tiles at a time."""
    import os

    name, default = ("EFPN_MAX_SLICED_PIXELS", 10**9) if sliced else ("EFPN_MAX_PIXELS", 10**8)
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise DataError(f"{name}={os.environ[name]!r}: expected a whole number of pixels") from None


def check_size(path, width: int, height: int, sliced: bool = False) -> None:
    limit = max_pixels(sliced)
    if width * height > limit:
        hint = (
            "raise EFPN_MAX_SLICED_PIXELS to read it"
            if sliced
            else "detect such scenes with --slice, or raise EFPN_MAX_PIXELS"
        )
        raise DataError(
            f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the limit "
            f"of {limit / 1e6:.0f}; {hint}"
        )


def exif_orientation(im: Image.Image) -> int:
    """The image's EXIF orientation (1, upright as stored, when absent or unreadable)."""
    try:
        value = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block is not worth refusing the image for
        return 1
    return value if 1 <= value <= 8 else 1


def file_sizes(im: Image.Image) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(stored, upright)``: the image's ``(width, height)`` as its pixels are stored,
    and as viewers show it after its EXIF orientation (swapped for orientations 5-8)."""
    w, h = im.size
    return (w, h), ((h, w) if exif_orientation(im) >= 5 else (w, h))


def load_rgb(path: str | Path, sliced: bool = False, upright: bool = True) -> np.ndarray:
    """Load any image as ``(H, W, 3)`` uint8 RGB: grayscale is repeated, alpha dropped,
    16-bit and float images scaled to 0..255 by their type's range. An image over
    :func:`max_pixels` is refused from its header, before it is decoded.

    Args:
        path: the image file.
        sliced: check the size against the (larger) limit of sliced prediction.
        upright: turn the image as its EXIF orientation says, as image viewers,
            annotation tools and Ultralytics show it (phone photos store most images
            sideways); ``False`` keeps the stored pixel order.
    """
    try:
        with Image.open(path) as im:
            check_size(path, *im.size, sliced=sliced)
            im.load()
            if upright and exif_orientation(im) != 1:
                im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
                if mode == "F":
                    top = max(float(arr.max()), 1.0)
                arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(arr[..., None], 3, axis=2)
            if mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot decode image: {e}") from None
