"""Dataset statistics: boxes per class and size histograms."""

from __future__ import annotations

import numpy as np

from .records import DetectionData

__all__ = ["dataset_stats", "format_stats"]

COCO_AREA_BINS = {"small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, float("inf"))}
LONG_SIDE_BINS = {
    "small": (0, 32),
    "medium": (32, 96),
    "large": (96, 400),
    ">=400": (400, float("inf")),
}


def dataset_stats(data: DetectionData) -> dict:
    """Image count, boxes per class, COCO area bins and TT100K long-side bins."""
    boxes = np.concatenate([r.boxes for r in data.images]) if data.images else np.zeros((0, 4))
    labels = np.concatenate([r.labels for r in data.images]) if data.images else np.zeros((0,), int)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area, long_side = w * h, np.maximum(w, h)
    return {
        "images": len(data.images),
        "boxes": int(len(boxes)),
        "ignore_regions": int(sum(len(r.ignore) for r in data.images)),
        "per_class": {c: int((labels == i).sum()) for i, c in enumerate(data.classes)},
        "coco_area": {
            k: int(((area >= lo) & (area < hi)).sum()) for k, (lo, hi) in COCO_AREA_BINS.items()
        },
        "long_side": {
            k: int(((long_side >= lo) & (long_side < hi)).sum())
            for k, (lo, hi) in LONG_SIDE_BINS.items()
        },
        "median_long_side": float(np.median(long_side)) if len(boxes) else 0.0,
    }


def format_stats(stats: dict, source: str = "") -> str:
    total = max(stats["boxes"], 1)
    lines = [
        f"{source}: {stats['images']} images, {stats['boxes']} boxes, median long side {stats['median_long_side']:.1f} px"
        + (f", {stats['ignore_regions']} ignore regions" if stats.get("ignore_regions") else "")
    ]
    lines.append("boxes per class:")
    width = max((len(c) for c in stats["per_class"]), default=5)
    lines += [f"  {c:<{width}} {n:>7}" for c, n in stats["per_class"].items()]
    for title, key in (("COCO area bins", "coco_area"), ("TT100K long-side bins", "long_side")):
        lines.append(f"{title}:")
        lines += [f"  {k:<8} {n:>7}  {100 * n / total:5.1f}%" for k, n in stats[key].items()]
    return "\n".join(lines)
