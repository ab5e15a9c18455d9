"""SynthSigns: a built-in small-object benchmark that needs no download.

Traffic-sign-like scenes at small scale: cluttered backgrounds (gradients, texture,
distractor shapes, including sign outlines without a valid symbol), 12 sign classes
grouped into families that share outline and colour and differ only in their interior
symbol, so resolution matters; a long-side distribution dominated by objects under
32 px at 512x512, and several objects per image.
"""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..atomic import write_atomic

__all__ = ["SYNTH_CLASSES", "generate", "render_scene"]

RED, WHITE, BLACK, BLUE, YELLOW = (
    (200, 20, 30),
    (245, 245, 245),
    (15, 15, 15),
    (20, 60, 180),
    (240, 200, 20),
)
T = 96  # template resolution

# family: outline/colour; symbol: interior detail (the only difference inside a family)
SYNTH_CLASSES = [
    "ring_bar1",
    "ring_bar2",
    "ring_cross",
    "ring_hbar",  # red ring, white disc
    "disc_hbar",  # red disc, white bar (no entry)
    "blue_up",
    "blue_left",
    "blue_right",  # blue disc, white arrow
    "warn_excl",
    "warn_dots",
    "warn_zigzag",  # yellow triangle, black border
    "octagon",  # red octagon, white band
]


def _ring(d: ImageDraw.ImageDraw) -> None:
    d.ellipse([0, 0, T - 1, T - 1], fill=RED)
    d.ellipse([T * 0.14, T * 0.14, T * 0.86, T * 0.86], fill=WHITE)


def _blue(d: ImageDraw.ImageDraw) -> None:
    d.ellipse([0, 0, T - 1, T - 1], fill=BLUE)


def _triangle(d: ImageDraw.ImageDraw) -> None:
    d.polygon([(T / 2, 0), (T - 1, T - 1), (0, T - 1)], fill=BLACK)
    d.polygon([(T / 2, T * 0.17), (T * 0.88, T * 0.92), (T * 0.12, T * 0.92)], fill=YELLOW)


def _arrow(d: ImageDraw.ImageDraw, direction: str) -> None:
    pts = [
        (0.5, 0.2),
        (0.75, 0.48),
        (0.58, 0.48),
        (0.58, 0.8),
        (0.42, 0.8),
        (0.42, 0.48),
        (0.25, 0.48),
    ]
    rot = {
        "up": lambda x, y: (x, y),
        "left": lambda x, y: (y, x),
        "right": lambda x, y: (1 - y, x),
    }[direction]
    d.polygon([tuple(v * T for v in rot(x, y)) for x, y in pts], fill=WHITE)


def _draw_class(name: str, d: ImageDraw.ImageDraw) -> None:
    w = T * 0.1
    if name.startswith("ring"):
        _ring(d)
        if name == "ring_bar1":
            d.rectangle([T * 0.45, T * 0.28, T * 0.55, T * 0.72], fill=BLACK)
        elif name == "ring_bar2":
            d.rectangle([T * 0.33, T * 0.28, T * 0.43, T * 0.72], fill=BLACK)
            d.rectangle([T * 0.57, T * 0.28, T * 0.67, T * 0.72], fill=BLACK)
        elif name == "ring_cross":
            d.line([T * 0.3, T * 0.3, T * 0.7, T * 0.7], fill=BLACK, width=int(w))
            d.line([T * 0.3, T * 0.7, T * 0.7, T * 0.3], fill=BLACK, width=int(w))
        else:
            d.rectangle([T * 0.28, T * 0.45, T * 0.72, T * 0.55], fill=BLACK)
    elif name == "disc_hbar":
        d.ellipse([0, 0, T - 1, T - 1], fill=RED)
        d.rectangle([T * 0.2, T * 0.42, T * 0.8, T * 0.58], fill=WHITE)
    elif name.startswith("blue"):
        _blue(d)
        _arrow(d, name.split("_")[1])
    elif name.startswith("warn"):
        _triangle(d)
        if name == "warn_excl":
            d.rectangle([T * 0.46, T * 0.38, T * 0.54, T * 0.70], fill=BLACK)
            d.rectangle([T * 0.46, T * 0.75, T * 0.54, T * 0.83], fill=BLACK)
        elif name == "warn_dots":
            d.ellipse([T * 0.32, T * 0.6, T * 0.46, T * 0.74], fill=BLACK)
            d.ellipse([T * 0.54, T * 0.6, T * 0.68, T * 0.74], fill=BLACK)
        else:
            pts = [(0.32, 0.8), (0.42, 0.5), (0.52, 0.8), (0.62, 0.5), (0.68, 0.66)]
            d.line([(x * T, y * T) for x, y in pts], fill=BLACK, width=int(w * 0.8))
    elif name == "octagon":
        c = [(0.29, 0), (0.71, 0), (1, 0.29), (1, 0.71), (0.71, 1), (0.29, 1), (0, 0.71), (0, 0.29)]
        d.polygon([(x * (T - 1), y * (T - 1)) for x, y in c], fill=RED)
        d.rectangle([T * 0.15, T * 0.4, T * 0.85, T * 0.6], fill=WHITE)
    else:
        raise KeyError(name)


@cache
def _template(name: str) -> Image.Image:
    im = Image.new("RGBA", (T, T), (0, 0, 0, 0))
    _draw_class(name, ImageDraw.Draw(im))
    return im


@cache
def _distractor_template(kind: int) -> Image.Image:
    """Sign-like shapes that are not objects: outlines with no or a wrong symbol."""
    im = Image.new("RGBA", (T, T), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    if kind == 0:
        _ring(d)  # empty ring
    elif kind == 1:
        _blue(d)  # blue disc without arrow
    elif kind == 2:
        _triangle(d)  # empty warning triangle
    elif kind == 3:
        _ring(d)
        d.ellipse([T * 0.4, T * 0.4, T * 0.6, T * 0.6], fill=BLACK)  # ring with a dot
    else:
        _blue(d)
        d.ellipse([T * 0.35, T * 0.35, T * 0.65, T * 0.65], fill=WHITE)  # blue disc with a ring
    return im


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sky-to-ground gradient with three octaves of colour noise and pixel grain."""
    low = max(size // 4, 8)
    top, bottom = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    t = np.linspace(0, 1, low, dtype=np.float32)[:, None, None]
    img = (top * (1 - t) + bottom * t + np.zeros((1, low, 1))).astype(np.float32)
    for cells, amp in ((4, 40.0), (16, 20.0), (64, 10.0)):
        noise = rng.standard_normal((cells, cells, 3)).astype(np.float32) * amp
        for c in range(3):
            img[..., c] += np.asarray(
                Image.fromarray(noise[..., c]).resize((low, low), Image.BILINEAR)
            )
    up = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    grain = rng.integers(-5, 6, (size, size, 1), dtype=np.int16)
    return np.clip(np.asarray(up, dtype=np.int16) + grain, 0, 255).astype(np.uint8)


def _sample_long_side(rng: np.random.Generator, size: int) -> float:
    u = rng.random()
    lo, hi = (8, 32) if u < 0.72 else (32, 96) if u < 0.94 else (96, 160)
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) * size / 512


def _overlaps(box, boxes, margin: float = 2.0) -> bool:
    x1, y1, x2, y2 = box
    return any(
        x1 < b[2] + margin and b[0] < x2 + margin and y1 < b[3] + margin and b[1] < y2 + margin
        for b in boxes
    )


def render_scene(
    rng: np.random.Generator, size: int = 512
) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """One scene: an RGB image, ``(K, 4)`` xyxy boxes and ``(K,)`` 0-based labels."""
    canvas = Image.fromarray(_background(rng, size)).convert("RGBA")
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 16))):  # clutter: poles, windows, blobs
        color = tuple(int(c) for c in rng.integers(0, 256, 3)) + (255,)
        x, y = rng.uniform(0, size, 2)
        s = rng.uniform(4, 0.2 * size)
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x, y, x + s * rng.uniform(0.05, 1), y + s], fill=color)
        elif kind == 1:
            draw.line(
                [x, y, x + rng.uniform(-s, s), y + rng.uniform(-s, s)],
                fill=color,
                width=int(rng.integers(1, 5)),
            )
        else:
            draw.ellipse([x, y, x + s, y + s * rng.uniform(0.5, 1.5)], fill=color)
    placed: list[list[float]] = []  # objects and distractors, kept apart
    boxes: list[list[float]] = []
    labels: list[int] = []
    n_obj = int(rng.integers(3, 11))
    n_distract = int(rng.integers(1, 5))
    for k in range(n_obj + n_distract):
        is_obj = k < n_obj
        long_side = _sample_long_side(rng, size)
        aspect = rng.uniform(0.85, 1.15)
        w, h = (long_side, long_side / aspect) if aspect > 1 else (long_side * aspect, long_side)
        w, h = max(int(round(w)), 4), max(int(round(h)), 4)
        for _ in range(20):
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            if not _overlaps((x, y, x + w, y + h), placed):
                break
        else:
            continue
        if is_obj:
            label = int(rng.integers(len(SYNTH_CLASSES)))
            tpl = _template(SYNTH_CLASSES[label])
        else:
            tpl = _distractor_template(int(rng.integers(5)))
        sign = tpl.resize((w, h), Image.LANCZOS)
        gain = rng.uniform(0.6, 1.15)
        rgb = np.asarray(sign, dtype=np.float32)
        rgb[..., :3] = np.clip(rgb[..., :3] * gain + rng.normal(0, 6, 3), 0, 255)
        canvas.alpha_composite(Image.fromarray(rgb.astype(np.uint8), "RGBA"), (x, y))
        placed.append([x, y, x + w, y + h])
        if is_obj:
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
    image = canvas.convert("RGB").filter(ImageFilter.GaussianBlur(0.6))
    return (
        image,
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
    )


def generate(
    out: str | Path, train: int = 200, val: int = 50, size: int = 512, seed: int = 0
) -> dict[str, Path]:
    """Write ``out/<split>/*.png`` and ``out/<split>.json`` (COCO) for train and val.

    The same arguments give the same bytes. Returns the JSON path of each split.
    """
    if train < 0 or val < 0 or train + val < 1:
        raise ValueError(
            f"--train and --val must be 0 or more, together 1 or more; got {train} and {val}"
        )
    if size < 32:
        raise ValueError(
            f"--size must be 32 pixels or more (a sign spans up to a fifth of it), got {size}"
        )
    out = Path(out)
    paths = {}
    for split_idx, (split, count) in enumerate((("train", train), ("val", val))):
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_idx, i])
            image, boxes, labels = render_scene(rng, size)
            name = f"{split}/{i:06d}.png"
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=1)
            write_atomic(out / name, buf.getvalue())
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for (x1, y1, x2, y2), lab in zip(boxes.tolist(), labels.tolist()):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": lab + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
        categories = [
            {"id": k + 1, "name": n, "supercategory": "sign"} for k, n in enumerate(SYNTH_CLASSES)
        ]
        path = out / f"{split}.json"
        text = json.dumps({"images": images, "annotations": annotations, "categories": categories})
        write_atomic(path, text.encode())
        paths[split] = path
    return paths
