"""Tiles of huge images: the windows sliced inference runs on, and ``efpn data slice``,
which cuts a dataset into tiles and a COCO JSON for training."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..geo import georeference, write_world_file
from .formats import to_coco_dict
from .image import load_rgb
from .records import DetectionData, ImageRecord
from .scene import open_scene

__all__ = ["mosaic_dataset", "slice_dataset", "slice_windows"]

log = logging.getLogger("efpn.data")


def slice_windows(
    height: int, width: int, slice_size: int, overlap: float = 0.2
) -> list[tuple[int, int, int, int]]:
    """Tiles ``(x0, y0, x1, y1)`` of at most ``slice_size`` px covering the image.

    Neighbours overlap by at least ``overlap`` of a tile; the last row and column are
    aligned with the bottom and right edges, so no pixel is left out and no tile is
    smaller than ``slice_size`` unless the image is.
    """
    if slice_size < 1:
        raise ValueError(f"slice size must be 1 or more, got {slice_size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")

    def starts(length: int) -> list[int]:
        if length <= slice_size:
            return [0]
        step = max(int(slice_size * (1 - overlap)), 1)
        n = math.ceil((length - slice_size) / step) + 1
        return [min(i * step, length - slice_size) for i in range(n)]

    return [
        (x, y, min(x + slice_size, width), min(y + slice_size, height))
        for y in starts(height)
        for x in starts(width)
    ]


def _tile_record(r: ImageRecord, win, min_visible: float) -> tuple[ImageRecord, int]:
    """The record of one tile: boxes clipped to it, kept when at least ``min_visible``
    of their area is inside, else ignore regions. Returns it and the count of boxes
    turned into ignore regions."""
    x0, y0, x1, y1 = win
    b = np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = b.copy()
    c[:, [0, 2]] = c[:, [0, 2]].clip(x0, x1)
    c[:, [1, 3]] = c[:, [1, 3]].clip(y0, y1)
    inside = (c[:, 2] - c[:, 0]).clip(min=0) * (c[:, 3] - c[:, 1]).clip(min=0)
    touching = inside > 0
    keep = touching & (inside >= min_visible * np.maximum(area, 1e-12))
    cut = touching & ~keep
    shift = np.array([x0, y0, x0, y0], dtype=np.float64)
    ig = np.asarray(r.ignore, dtype=np.float64).reshape(-1, 4).copy()
    ig[:, [0, 2]] = ig[:, [0, 2]].clip(x0, x1)
    ig[:, [1, 3]] = ig[:, [1, 3]].clip(y0, y1)
    ig_keep = (ig[:, 2] > ig[:, 0]) & (ig[:, 3] > ig[:, 1])
    labels = np.asarray(r.labels, dtype=np.int64)
    rec = ImageRecord(
        "",
        x1 - x0,
        y1 - y0,
        c[keep] - shift,
        labels[keep],
        ignore=np.concatenate([c[cut], ig[ig_keep]]) - shift,
        ignore_labels=np.concatenate([labels[cut], np.asarray(r.ignore_labels)[ig_keep]]),
    )
    return rec, int(cut.sum())


def _fresh_out(out: str | Path, overwrite: bool) -> Path:
    """``out`` with an empty ``images/`` folder; a non-empty ``out`` only with
    ``overwrite`` (then replaced)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out}: exists and is not empty; pass --overwrite or another --out")
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    return out


def slice_dataset(
    data: DetectionData,
    out: str | Path,
    *,
    size: int = 1024,
    overlap: float = 0.2,
    min_visible: float = 0.6,
    empty_ratio: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    on_image=None,
) -> dict:
    """Cut every image of ``data`` into tiles; write ``out/images/*.png`` and
    ``out/annotations.json`` (COCO, with ignore regions as crowd annotations).

    A box cut by a tile edge is clipped; it stays an object when at least
    ``min_visible`` of its area is inside the tile and becomes an ignore region
    otherwise. Tiles without objects are kept with probability ``empty_ratio``
    (drawn with ``seed``, so the same call gives the same tiles).

    Huge TIFF scenes are read window by window (:func:`efpn.data.scene.open_scene`).
    ``on_image(file_name, tiles_written)``, when given, is called after each image.

    Returns counts: ``images``, ``tiles``, ``kept_empty``, ``dropped_empty``,
    ``boxes``, ``cut_to_ignore``.
    """
    if not 0 <= min_visible <= 1:
        raise ValueError(f"--min-visible must be in [0, 1], got {min_visible}")
    if not 0 <= empty_ratio <= 1:
        raise ValueError(f"--empty-ratio must be in [0, 1], got {empty_ratio}")
    out = _fresh_out(out, overwrite)
    rng = np.random.default_rng(seed)
    tiles: list[ImageRecord] = []
    counts = dict(images=0, tiles=0, kept_empty=0, dropped_empty=0, boxes=0, cut_to_ignore=0)
    for r in data.images:
        path = data.image_path(r)
        before = counts["tiles"]
        with open_scene(path, upright=r.upright) as scene:
            if (scene.width, scene.height) != (r.width, r.height):
                raise ValueError(
                    f"{data.source}: image {r.file_name} is {scene.width}x{scene.height} but "
                    f"declared {r.width}x{r.height}"
                )
            counts["images"] += 1
            ref = georeference(path) if r.upright else None
            stem = Path(r.file_name).with_suffix("").as_posix().replace("/", "__")
            for win in slice_windows(scene.height, scene.width, size, overlap):
                rec, cut = _tile_record(r, win, min_visible)
                if len(rec.boxes) == 0:
                    if rng.random() >= empty_ratio:
                        counts["dropped_empty"] += 1
                        continue
                    counts["kept_empty"] += 1
                x0, y0, x1, y1 = win
                rec.file_name = f"images/{stem}_{x0}_{y0}.png"
                rec.image_id = len(tiles) + 1
                Image.fromarray(scene.window(x0, y0, x1, y1)).save(
                    out / rec.file_name, compress_level=1
                )
                if ref is not None:  # the tile stays where it is on the map
                    write_world_file(out / rec.file_name, ref.shifted(x0, y0))
                tiles.append(rec)
                counts["tiles"] += 1
                counts["boxes"] += len(rec.boxes)
                counts["cut_to_ignore"] += cut
        if on_image is not None:
            on_image(r.file_name, counts["tiles"] - before)
    sliced = DetectionData(
        out, list(data.classes), tiles, source=str(out), category_ids=list(data.category_ids)
    )
    (out / "annotations.json").write_text(json.dumps(to_coco_dict(sliced)))
    return counts


def mosaic_dataset(
    data: DetectionData,
    out: str | Path,
    *,
    rows: int = 4,
    cols: int = 4,
    overwrite: bool = False,
) -> dict:
    """Paste the images of ``data``, ``rows x cols`` at a time, into large scenes; write
    ``out/images/*.png`` and ``out/annotations.json`` (COCO).

    Each image keeps its pixels and its boxes (shifted); a grid cell is as wide as the
    widest image of its column and as high as the highest of its row, and the rest of a
    cell stays black. The last scene holds the images left over. A test bed for sliced
    prediction: objects keep their size in pixels while the scene grows.

    Returns counts: ``images``, ``scenes``, ``boxes`` and the largest scene's
    ``max_width`` and ``max_height``.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"--grid: rows and columns must be 1 or more, got {rows}x{cols}")
    out = _fresh_out(out, overwrite)
    per = rows * cols
    scenes: list[ImageRecord] = []
    counts = dict(images=0, scenes=0, boxes=0, max_width=0, max_height=0)
    for start in range(0, len(data.images), per):
        group = data.images[start : start + per]
        grid = [group[i : i + cols] for i in range(0, len(group), cols)]
        heights = [max(r.height for r in row) for row in grid]
        widths = [max(row[c].width for row in grid if c < len(row)) for c in range(len(grid[0]))]
        canvas = np.zeros((sum(heights), sum(widths), 3), dtype=np.uint8)
        boxes, labels, ignore, ignore_labels = [], [], [], []
        y = 0
        for row, h in zip(grid, heights):
            x = 0
            for c, r in enumerate(row):
                image = load_rgb(data.image_path(r), sliced=True, upright=r.upright)
                ih, iw = image.shape[:2]
                if (iw, ih) != (r.width, r.height):
                    raise ValueError(
                        f"{data.source}: image {r.file_name} is {iw}x{ih} but declared "
                        f"{r.width}x{r.height}"
                    )
                canvas[y : y + ih, x : x + iw] = image
                shift = np.array([x, y, x, y], dtype=np.float64)
                boxes.append(np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4) + shift)
                labels.append(np.asarray(r.labels, dtype=np.int64))
                ignore.append(np.asarray(r.ignore, dtype=np.float64).reshape(-1, 4) + shift)
                ignore_labels.append(np.asarray(r.ignore_labels, dtype=np.int64))
                x += widths[c]
            y += h
        rec = ImageRecord(
            f"images/scene_{len(scenes) + 1:04d}.png",
            canvas.shape[1],
            canvas.shape[0],
            np.concatenate(boxes),
            np.concatenate(labels),
            ignore=np.concatenate(ignore),
            ignore_labels=np.concatenate(ignore_labels),
        )
        rec.image_id = len(scenes) + 1
        Image.fromarray(canvas).save(out / rec.file_name, compress_level=1)
        scenes.append(rec)
        counts["images"] += len(group)
        counts["scenes"] += 1
        counts["boxes"] += len(rec.boxes)
        counts["max_width"] = max(counts["max_width"], rec.width)
        counts["max_height"] = max(counts["max_height"], rec.height)
    mosaic = DetectionData(
        out, list(data.classes), scenes, source=str(out), category_ids=list(data.category_ids)
    )
    (out / "annotations.json").write_text(json.dumps(to_coco_dict(mosaic)))
    return counts
