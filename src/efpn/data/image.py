"""Reading images without torch (the data commands start without importing it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .records import DataError

__all__ = ["load_rgb", "max_pixels"]

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


def load_rgb(path: str | Path, sliced: bool = False) -> np.ndarray:
    """Load any image as ``(H, W, 3)`` uint8 RGB: grayscale is repeated, alpha dropped,
    16-bit and float images scaled to 0..255 by their type's range. An image over
    :func:`max_pixels` is refused from its header, before it is decoded."""
    try:
        with Image.open(path) as im:
            check_size(path, *im.size, sliced=sliced)
            im.load()
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
