"""Writers from model outputs to the COCO and TT100K results formats."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "check_coco_results",
    "coco_gt_to_tt100k",
    "coco_results_to_tt100k",
    "to_coco_results",
    "to_tt100k_results",
]


def _list(x) -> list:
    # tensors (without importing torch here) or anything numpy reads
    if hasattr(x, "detach"):
        return x.detach().cpu().tolist()
    return np.asarray(x).tolist()


def _rows(output: dict):
    return zip(_list(output["boxes"]), _list(output["scores"]), _list(output["labels"]))


def to_coco_results(
    image_ids: Sequence[int], outputs: Sequence[dict], category_ids: Sequence[int]
) -> list[dict]:
    """COCO results list; model label ``k`` (1-based) maps to ``category_ids[k - 1]``."""
    res = []
    for image_id, out in zip(image_ids, outputs):
        for (x1, y1, x2, y2), s, lab in _rows(out):
            res.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category_ids[lab - 1]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(s),
                }
            )
    return res


def to_tt100k_results(
    image_keys: Sequence, outputs: Sequence[dict], class_names: Sequence[str]
) -> dict:
    """TT100K results layout. Every image is listed, with an empty object list where
    nothing was found: the official protocol skips the ground truth of absent images."""
    imgs = {}
    for key, out in zip(image_keys, outputs):
        imgs[str(key)] = {
            "objects": [
                {
                    "category": class_names[lab - 1],
                    "score": float(s),
                    "bbox": {"xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3]},
                }
                for b, s, lab in _rows(out)
            ]
        }
    return {"imgs": imgs}


def coco_gt_to_tt100k(gt: dict) -> dict:
    """COCO ground truth in the TT100K layout (keys are image ids as strings)."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    imgs = {str(im["id"]): {"objects": []} for im in gt["images"]}
    for a in gt.get("annotations", []):
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = a["bbox"]
        imgs[str(a["image_id"])]["objects"].append(
            {
                "category": names[a["category_id"]],
                "bbox": {"xmin": x, "ymin": y, "xmax": x + w, "ymax": y + h},
            }
        )
    return {"imgs": imgs}


def coco_results_to_tt100k(gt: dict, results: list[dict]) -> dict:
    """COCO results in the TT100K layout, listing every ground-truth image."""
    names = {c["id"]: c["name"] for c in gt["categories"]}
    imgs = {str(im["id"]): {"objects": []} for im in gt["images"]}
    for r in results:
        x, y, w, h = r["bbox"]
        imgs.setdefault(str(r["image_id"]), {"objects": []})["objects"].append(
            {
                "category": names[r["category_id"]],
                "score": r["score"],
                "bbox": {"xmin": x, "ymin": y, "xmax": x + w, "ymax": y + h},
            }
        )
    return {"imgs": imgs}


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_coco_results(dets, gt: dict, source: str) -> list[dict]:
    """COCO results checked against their ground truth; the first problem is a
    one-line error naming the file and the entry."""
    from ..data.records import DataError

    if not isinstance(dets, list):
        raise DataError(f"{source}: COCO results must be a list of detections")
    images = {im["id"] for im in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    names = {c["name"] for c in gt["categories"]}
    for i, d in enumerate(dets):
        where = f"{source}: detection {i}"
        if not isinstance(d, dict):
            raise DataError(f"{where}: expected an object, got {type(d).__name__}")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in d:
                raise DataError(f"{where}: no {key!r}")
        if d["image_id"] not in images:
            raise DataError(f"{where}: image_id {d['image_id']!r} is not in the ground truth")
        if d["category_id"] not in cats:
            hint = (
                " (a category name; results use category ids)" if d["category_id"] in names else ""
            )
            raise DataError(
                f"{where}: category_id {d['category_id']!r} is not in the ground truth{hint}"
            )
        b = d["bbox"]
        if not (isinstance(b, list) and len(b) == 4 and all(_finite_number(v) for v in b)):
            raise DataError(f"{where}: bbox must be 4 finite numbers [x, y, w, h], got {b!r}")
        if b[2] < 0 or b[3] < 0:
            raise DataError(f"{where}: bbox has a negative width or height: {b!r}")
        if not _finite_number(d["score"]):
            raise DataError(f"{where}: score must be a finite number, got {d['score']!r}")
    return dets
