"""The TT100K accuracy/recall protocol (Zhu et al. 2016) as the official evaluator runs it.

See ``shared/specs/tt100k_protocol.md``: images are those in the results; class and
score filters; same-class greedy matching by IoU (> threshold, highest first, stable);
size bins on the long side applied after matching; micro-averaged counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "TT100K_BINS",
    "accuracy_recall_curve",
    "evaluate_tt100k",
    "evaluate_tt100k_bins",
]

# Long-side bins, half-open [lo, hi); objects with long side >= 400 are dropped everywhere.
TT100K_BINS = {"overall": (0, 400), "small": (0, 32), "medium": (32, 96), "large": (96, 400)}

IGNORED, FREE = -2, -1


def _box(obj: dict) -> tuple[float, float, float, float]:
    b = obj["bbox"]
    return float(b["xmin"]), float(b["ymin"]), float(b["xmax"]), float(b["ymax"])


def _iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _long_side(box) -> float:
    return max(box[2] - box[0], box[3] - box[1])


@dataclass
class TT100KResult:
    """Counts and the right/wrong/miss object lists of one evaluation."""

    tp: int = 0
    detections: int = 0
    ground_truth: int = 0
    right: dict = field(default_factory=dict)
    wrong: dict = field(default_factory=dict)
    miss: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.tp / self.detections if self.detections else 1.0

    @property
    def recall(self) -> float:
        return self.tp / self.ground_truth if self.ground_truth else 1.0

    @property
    def f1(self) -> float:
        p, r = self.accuracy, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    def summary(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "recall": self.recall,
            "f1": self.f1,
            "tp": self.tp,
            "detections": self.detections,
            "ground_truth": self.ground_truth,
        }


def evaluate_tt100k(
    gt: dict,
    results: dict,
    *,
    iou: float = 0.5,
    classes: Iterable[str] | None = None,
    min_score: float = 40.0,
    size_range: tuple[float, float] = (0, 400),
    keep_lists: bool = True,
) -> TT100KResult:
    """Evaluate TT100K-layout results against ground truth, exactly as the official code.

    Args:
        gt: ``{"imgs": {id: {"objects": [...]}}}`` ground truth.
        results: detections in the same layout, objects with a ``score``.
        iou: pairs need IoU strictly above this.
        classes: evaluated classes (None: all).
        min_score: detections scoring below are ignored (those without a score are kept).
        size_range: ``[lo, hi)`` on the long side.
        keep_lists: fill ``right``/``wrong``/``miss`` like the official output.
    """
    types = set(classes) if classes is not None else None
    lo, hi = size_range
    out = TT100KResult()
    for img_id, det_entry in results["imgs"].items():
        if img_id not in gt["imgs"]:
            raise KeyError(f"results image {img_id!r} is not in the ground truth")
        objs_g = gt["imgs"][img_id].get("objects", [])
        objs_r = det_entry.get("objects", [])
        bg = [_box(o) for o in objs_g]
        br = [_box(o) for o in objs_r]
        match_g = [FREE] * len(bg)
        match_r = [FREE] * len(br)
        if types is not None:
            for i, o in enumerate(objs_g):
                if o["category"] not in types:
                    match_g[i] = IGNORED
            for j, o in enumerate(objs_r):
                if o["category"] not in types:
                    match_r[j] = IGNORED
        for j, o in enumerate(objs_r):
            if "score" in o and o["score"] < min_score:
                match_r[j] = IGNORED
        pairs = []
        for i, a in enumerate(bg):
            if match_g[i] == IGNORED:
                continue
            for j, b in enumerate(br):
                if match_r[j] == IGNORED or objs_g[i]["category"] != objs_r[j]["category"]:
                    continue
                v = _iou(a, b)
                if v > iou:
                    pairs.append((v, i, j))
        pairs.sort(key=lambda p: p[0], reverse=True)  # stable: ties keep gt-first order
        for _, i, j in pairs:
            if match_g[i] == FREE and match_r[j] == FREE:
                match_g[i], match_r[j] = j, i
        for i, a in enumerate(bg):
            if not lo <= _long_side(a) < hi:
                if match_g[i] >= 0:
                    match_r[match_g[i]] = IGNORED
                match_g[i] = IGNORED
        for j, b in enumerate(br):
            if match_r[j] == FREE and not lo <= _long_side(b) < hi:
                match_r[j] = IGNORED
        out.detections += sum(m != IGNORED for m in match_r)
        out.tp += sum(m >= 0 for m in match_r)
        out.ground_truth += sum(m != IGNORED for m in match_g)
        if keep_lists:
            out.right[img_id] = {"objects": [objs_r[j] for j, m in enumerate(match_r) if m >= 0]}
            out.wrong[img_id] = {"objects": [objs_r[j] for j, m in enumerate(match_r) if m == FREE]}
            out.miss[img_id] = {"objects": [objs_g[i] for i, m in enumerate(match_g) if m == FREE]}
    return out


def evaluate_tt100k_bins(
    gt: dict, results: dict, bins: dict | None = None, **kwargs
) -> dict[str, dict]:
    """:func:`evaluate_tt100k` per size bin; ``{bin: summary}``."""
    bins = bins or TT100K_BINS
    return {
        name: evaluate_tt100k(gt, results, size_range=rng, keep_lists=False, **kwargs).summary()
        for name, rng in bins.items()
    }


def accuracy_recall_curve(
    gt: dict,
    results: dict,
    *,
    size_range=(0, 400),
    steps: int = 100,
    monotone: bool = True,
    **kwargs,
) -> dict[str, list[float]]:
    """Accuracy and recall over ``steps`` score thresholds from 0 to the maximum score
    (the paper's Fig. 7). With ``monotone``, accuracy is forced non-decreasing along the
    sweep, as the official curves are."""
    scores = [
        o["score"] for v in results["imgs"].values() for o in v.get("objects", []) if "score" in o
    ]
    top = max(scores) if scores else 1.0
    thresholds = np.linspace(0.0, top, steps).tolist()
    acc, rec = [], []
    for t in thresholds:
        r = evaluate_tt100k(
            gt, results, min_score=t, size_range=size_range, keep_lists=False, **kwargs
        )
        acc.append(r.accuracy)
        rec.append(r.recall)
    if monotone:
        acc = np.maximum.accumulate(np.asarray(acc)).tolist()
    return {"threshold": thresholds, "accuracy": acc, "recall": rec}


def table_cells(summary: dict) -> tuple[str, str, str]:
    """Accuracy, recall and F1 of a :meth:`TT100KResult.summary` for a printed table:
    ``n/a`` where undefined (accuracy without detections, recall and F1 without ground
    truth) instead of the 1.0 that the curves use at their end."""
    dets, gt = summary["detections"], summary["ground_truth"]
    acc = f"{summary['accuracy']:.4f}" if dets else "n/a"
    rec = f"{summary['recall']:.4f}" if gt else "n/a"
    f1 = "n/a" if not gt else f"{summary['f1'] if dets else 0.0:.4f}"
    return acc, rec, f1


def check_tt100k_results(results: dict, source: str) -> None:
    """TT100K results checked for what the protocol reads: a one-line error naming the
    file, the image and the object."""
    from ..data.records import DataError

    for img_id, entry in results["imgs"].items():
        objs = entry.get("objects", []) if isinstance(entry, dict) else None
        if not isinstance(objs, list):
            raise DataError(f"{source}: image {img_id}: expected {{'objects': [...]}}")
        for k, o in enumerate(objs):
            where = f"{source}: image {img_id} object {k}"
            if not isinstance(o, dict) or not isinstance(o.get("bbox"), dict):
                raise DataError(f"{where}: needs a 'bbox' object")
            try:
                vals = [float(o["bbox"][c]) for c in ("xmin", "ymin", "xmax", "ymax")]
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where}: bbox needs numeric xmin, ymin, xmax, ymax") from None
            if not all(math.isfinite(v) for v in vals):
                raise DataError(f"{where}: non-finite bbox")
            if "score" in o:
                try:
                    score = float(o["score"])
                except (TypeError, ValueError):
                    raise DataError(f"{where}: score must be a number") from None
                if not math.isfinite(score):
                    raise DataError(f"{where}: score must be finite, got {o['score']!r}")
