"""Reading images without torch (the data commands start without importing it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .records import DataError

__all__ = ["load_rgb"]


def load_rgb(path: str | Path) -> np.ndarray:
    """Load any image as ``(H, W, 3)`` uint8 RGB: grayscale is repeated, alpha dropped,
    16-bit and float images scaled to 0..255 by their type's range."""
    try:
        with Image.open(path) as im:
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
