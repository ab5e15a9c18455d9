"""COCO box metrics through faster-coco-eval, with small-object size presets."""

from __future__ import annotations

import contextlib
import io
import logging

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

__all__ = ["SIZE_BINS", "coco_metrics", "metric_keys"]

BIG = 1e5**2
# Area ranges (pixels^2). AI-TOD: Wang et al. 2021, "Tiny object detection in aerial images".
SIZE_BINS = {
    "coco": {"small": [0, 32**2], "medium": [32**2, 96**2], "large": [96**2, BIG]},
    "aitod": {
        "very_tiny": [0, 8**2],
        "tiny": [8**2, 16**2],
        "small": [16**2, 32**2],
        "medium": [32**2, BIG],
    },
}


def metric_keys(size_bins: str = "coco", max_dets: int = 100) -> list[str]:
    """The summary keys in faster-coco-eval's order: AP, AP50, AP75, AP per bin,
    AR at 1/10/max_dets, AR per bin."""
    bins = list(SIZE_BINS[size_bins])
    return (
        ["AP", "AP50", "AP75"]
        + [f"AP_{b}" for b in bins]
        + ["AR_1", "AR_10", f"AR_{max_dets}"]
        + [f"AR_{b}" for b in bins]
    )


def coco_metrics(
    gt: dict | str,
    detections: list[dict],
    *,
    size_bins: str = "coco",
    max_dets: int = 100,
    per_class: bool = True,
) -> dict:
    """Box AP/AR of COCO-format detections.

    Args:
        gt: COCO ground-truth dict or JSON path.
        detections: COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).
        size_bins: ``"coco"`` or ``"aitod"``.
        max_dets: the largest maxDets (100 in COCO; more for dense scenes).
        per_class: add ``per_class`` (category name -> AP, -1 where undefined).

    Returns:
        ``{key: float}`` for :func:`metric_keys` (-1 where undefined), plus ``per_class``.
    """
    if size_bins not in SIZE_BINS:
        raise ValueError(f"unknown size bins {size_bins!r}; expected one of {', '.join(SIZE_BINS)}")
    quiet = logging.getLogger("faster_coco_eval")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(gt) if isinstance(gt, dict) else COCO(str(gt))
            coco_dt = coco_gt.loadRes(list(detections)) if detections else COCO()
            if not detections:
                coco_dt.dataset = {
                    "images": coco_gt.dataset["images"],
                    "annotations": [],
                    "categories": coco_gt.dataset["categories"],
                }
                coco_dt.createIndex()
            ev = COCOeval_faster(
                coco_gt,
                coco_dt,
                iouType="bbox",
                ranges=SIZE_BINS[size_bins],
                print_function=lambda *a: None,
            )
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    finally:
        quiet.setLevel(level)
    keys = metric_keys(size_bins, max_dets)
    out = {k: float(v) for k, v in zip(keys, ev.stats[: len(keys)])}
    if per_class:
        precision = ev.eval["precision"]  # [T, R, K, A, M]
        out["per_class"] = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            name = coco_gt.cats[cat_id]["name"]
            out["per_class"][name] = float(np.mean(p)) if p.size else -1.0
    return out
