"""Writers from model outputs to the COCO and TT100K results formats."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["coco_gt_to_tt100k", "coco_results_to_tt100k", "to_coco_results", "to_tt100k_results"]


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
