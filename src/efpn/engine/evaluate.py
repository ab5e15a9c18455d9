"""Run a detector over a dataset and compute both metric families."""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..console import stamped
from ..data import DetectionDataset, build_transforms, collate, to_coco_dict
from ..data.records import DetectionData
from ..metrics import (
    TT100K_BINS,
    accuracy_recall_curve,
    coco_gt_to_tt100k,
    coco_metrics,
    coco_results_to_tt100k,
    evaluate_tt100k_bins,
    to_coco_results,
)
from . import distributed as dist_utils

__all__ = [
    "best_f1",
    "evaluate_model",
    "predict_dataset",
    "rescale_coco",
    "test_scale_factors",
]


@torch.no_grad()
def predict_dataset(
    model,
    data: DetectionData,
    *,
    device="cpu",
    batch_size: int = 2,
    scale: float = 1.0,
    quiet: bool = False,
    slicing: dict | None = None,
) -> tuple[list[dict], float, list[float]]:
    """COCO results of ``model`` on ``data``, seconds per image, and for each image the
    fraction of the stride-2 map the extension computed (empty for a model without P'2).

    ``scale`` multiplies the detector's test size (the paper's FPN-2x test); boxes are
    mapped back to the original pixels. ``slicing`` (keyword arguments of
    :func:`efpn.slicing.predict_sliced`: ``slice_size``, ``overlap``, ``merge``,
    ``full_image``) detects each full-size image in tiles. Under torchrun each rank
    predicts its share and the results are gathered.
    """
    model.eval()
    transform = model.transform
    sizes = (transform.min_size, transform.max_size)
    if (
        scale != 1.0
    ):  # the detector's own resize does the up-scaling; boxes come back in original pixels
        transform.min_size = tuple(int(round(s * scale)) for s in sizes[0])
        transform.max_size = int(round(sizes[1] * scale))
    try:
        if slicing:
            return _predict_sliced(model, data, device, batch_size, quiet, slicing)
        return _predict(model, data, device, batch_size, quiet)
    finally:
        transform.min_size, transform.max_size = sizes


def _predict(model, data, device, batch_size, quiet):
    ds = DetectionDataset(data, build_transforms(train=False))
    indices = list(range(dist_utils.rank(), len(ds), dist_utils.world_size()))
    loader = DataLoader(
        torch.utils.data.Subset(ds, indices), batch_size=batch_size, collate_fn=collate
    )
    results, seconds, coverage = [], 0.0, []
    for images, targets in tqdm(
        loader,
        desc="eval",
        leave=False,
        disable=quiet or not dist_utils.is_main() or not sys.stderr.isatty(),
    ):
        images = [img.to(device) for img in images]
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = model(images)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        if getattr(model, "extended", False):
            coverage += list(model.last_p2x_coverage)
        results += to_coco_results([t["image_id"] for t in targets], outputs, data.category_ids)
    gathered = dist_utils.gather_objects((results, seconds, len(indices), coverage))
    results = [r for part in gathered for r in part[0]]
    total_time = sum(p[1] for p in gathered)
    count = sum(p[2] for p in gathered)
    return results, total_time / max(count, 1), [c for part in gathered for c in part[3]]


def _predict_sliced(model, data, device, batch_size, quiet, slicing):
    from ..data.scene import open_scene
    from ..slicing import predict_sliced

    records = data.images[dist_utils.rank() :: dist_utils.world_size()]
    results, seconds = [], 0.0
    show = not quiet and dist_utils.is_main() and sys.stderr.isatty()
    lines = not quiet and dist_utils.is_main() and not sys.stderr.isatty()
    for k, r in enumerate(tqdm(records, desc="eval (sliced)", leave=False, disable=not show)):
        with open_scene(data.image_path(r), upright=r.upright) as scene:
            start = time.perf_counter()
            out = predict_sliced(model, scene, batch_size=batch_size, device=device, **slicing)
            seconds += time.perf_counter() - start
        results += to_coco_results([r.image_id], [out], data.category_ids)
        if lines:  # no terminal for a bar: a timestamped line per scene, on stderr
            print(
                stamped(
                    f"eval (sliced) {k + 1}/{len(records)}: {r.file_name}, "
                    f"{len(out['boxes'])} detections in {time.perf_counter() - start:.0f} s"
                ),
                file=sys.stderr,
                flush=True,
            )
    gathered = dist_utils.gather_objects((results, seconds, len(records)))
    results = [x for part in gathered for x in part[0]]
    count = sum(p[2] for p in gathered)
    return results, sum(p[1] for p in gathered) / max(count, 1), []


def test_scale_factors(
    model, data: DetectionData, slice_size: int | None = None
) -> dict[int, float]:
    """Per image id, the factor by which the detector's 1x test resize scales it
    (torchvision's rule: shorter side to ``min_size``, longer side at most ``max_size``)."""
    transform = model.transform

    def factor(h: int, w: int) -> float:
        if slice_size:  # sliced: each tile is what the transform resizes
            h, w = min(h, slice_size), min(w, slice_size)
        if hasattr(transform, "resize_scale"):  # ScaleTransform: one factor for all
            return transform.factor(h, w)
        return min(float(transform.min_size[-1]) / min(h, w), float(transform.max_size) / max(h, w))

    return {r.image_id: factor(r.height, r.width) for r in data.images}


def rescale_coco(gt: dict, results: list[dict], factors: dict) -> tuple[dict, list[dict]]:
    """Ground truth and results with every box (and area) of an image scaled by its
    factor; the image sizes follow."""

    def box(b, f):
        return [v * f for v in b]

    images = [
        {**im, "width": im["width"] * factors[im["id"]], "height": im["height"] * factors[im["id"]]}
        for im in gt["images"]
    ]
    anns = []
    for a in gt["annotations"]:
        f = factors[a["image_id"]]
        anns.append({**a, "bbox": box(a["bbox"], f), "area": a["area"] * f * f})
    res = [{**r, "bbox": box(r["bbox"], factors[r["image_id"]])} for r in results]
    return {**gt, "images": images, "annotations": anns}, res


def only_classes(gt: dict, results: list[dict], names: list[str]) -> tuple[dict, list[dict]]:
    """Ground truth and results restricted to the categories named ``names``."""
    keep = {c["id"] for c in gt["categories"] if c["name"] in set(names)}
    return (
        {
            **gt,
            "categories": [c for c in gt["categories"] if c["id"] in keep],
            "annotations": [a for a in gt["annotations"] if a["category_id"] in keep],
        },
        [r for r in results if r["category_id"] in keep],
    )


def best_f1(gt_tt: dict, res_tt: dict, size_range, classes=None, steps: int = 50) -> dict:
    """The F1 maximum over the accuracy-recall sweep, with its threshold."""
    curve = accuracy_recall_curve(
        gt_tt, res_tt, size_range=size_range, steps=steps, monotone=False, classes=classes
    )
    acc, rec = np.asarray(curve["accuracy"]), np.asarray(curve["recall"])
    f1 = np.where(acc + rec > 0, 2 * acc * rec / np.maximum(acc + rec, 1e-12), 0.0)
    i = int(np.argmax(f1))
    return {
        "f1": float(f1[i]),
        "threshold": float(curve["threshold"][i]),
        "accuracy": float(acc[i]),
        "recall": float(rec[i]),
    }


def evaluate_model(
    model,
    data: DetectionData,
    *,
    device="cpu",
    batch_size: int = 2,
    scale: float = 1.0,
    score_thresh: float = 0.5,
    quiet: bool = False,
    curves: bool = False,
    size_reference: str = "source",
    slicing: dict | None = None,
) -> dict:
    """COCO AP/AR per size and TT100K-style accuracy/recall/F1 per size.

    Returns a dict with the COCO keys, ``per_class``, ``tt100k`` (per bin at
    ``score_thresh``), ``f1_small`` (best over the threshold sweep) and the score
    threshold that reaches it (``f1_small_threshold``),
    ``seconds_per_image``, ``p2x_coverage`` (mean fraction of the stride-2 map that
    the extension computed; ``None`` without P'2) and, with ``curves``, ``curves`` per
    bin. Only rank 0 gets the metrics; other ranks get ``{}``.

    ``slicing`` evaluates sliced prediction on the full-size images (see
    :func:`predict_dataset`); both metric families use the original annotations.

    ``size_reference`` says in which pixels an object's size bin is measured:
    ``"source"``, the image files' (the paper's TT100K protocol), or ``"model"``, the
    pixels the detector sees at its 1x test size (whatever ``scale`` is), for data
    stored at a higher resolution than the model runs at. AP and AR within a bin do not
    depend on it; which objects fall in the bin does.
    """
    if size_reference not in ("source", "model"):
        raise ValueError(f"unknown size_reference {size_reference!r}; expected source or model")
    factors = None
    if size_reference == "model":
        factors = test_scale_factors(model, data, (slicing or {}).get("slice_size"))
    results, spi, coverage = predict_dataset(
        model,
        data,
        device=device,
        batch_size=batch_size,
        scale=scale,
        quiet=quiet,
        slicing=slicing,
    )
    if not dist_utils.is_main():
        return {}
    gt, raw_results = to_coco_dict(data), results
    if factors is not None:
        gt, results = rescale_coco(gt, results, factors)
    if data.eval_classes is not None:  # COCO AP over the evaluated classes only
        gt, results = only_classes(gt, results, data.eval_classes)
    metrics = coco_metrics(gt, results)
    gt_tt, res_tt = coco_gt_to_tt100k(gt), coco_results_to_tt100k(gt, results)
    classes = data.eval_classes
    metrics["tt100k"] = evaluate_tt100k_bins(gt_tt, res_tt, min_score=score_thresh, classes=classes)
    metrics["tt100k_score_thresh"] = score_thresh
    # undefined (COCO's -1) when no ground-truth object is small; the bin's count does
    # not depend on the score threshold
    best_small = (
        best_f1(gt_tt, res_tt, TT100K_BINS["small"], classes)
        if metrics["tt100k"]["small"]["ground_truth"]
        else {"f1": -1.0, "threshold": None}
    )
    metrics["f1_small"] = best_small["f1"]
    metrics["f1_small_threshold"] = best_small["threshold"]
    metrics["seconds_per_image"] = spi
    metrics["p2x_coverage"] = float(np.mean(coverage)) if coverage else None
    if curves:
        metrics["curves"] = {
            name: accuracy_recall_curve(gt_tt, res_tt, size_range=rng, steps=50, classes=classes)
            for name, rng in TT100K_BINS.items()
        }
    metrics["size_reference"] = size_reference
    metrics["_results"] = raw_results  # in the image files' pixels
    return metrics
