"""Evaluation: COCO AP/AR through faster-coco-eval and the TT100K accuracy/recall protocol."""

from .coco import SIZE_BINS, coco_metrics, metric_keys
from .results import coco_gt_to_tt100k, coco_results_to_tt100k, to_coco_results, to_tt100k_results
from .tt100k import TT100K_BINS, accuracy_recall_curve, evaluate_tt100k, evaluate_tt100k_bins

__all__ = [
    "SIZE_BINS",
    "TT100K_BINS",
    "accuracy_recall_curve",
    "coco_gt_to_tt100k",
    "coco_metrics",
    "coco_results_to_tt100k",
    "evaluate_tt100k",
    "evaluate_tt100k_bins",
    "metric_keys",
    "to_coco_results",
    "to_tt100k_results",
]
