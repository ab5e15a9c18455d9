"""Run efpn detectors inside SAHI (``pip install 'efpn[sahi]'``).

An efpn model is a torchvision-style detector, so SAHI's own torchvision wrapper runs it
as it is::

    from sahi import AutoDetectionModel
    detection_model = AutoDetectionModel.from_pretrained(
        model_type="torchvision", model=model, category_mapping={"1": "car"}, device="cpu"
    )

:func:`sahi_model` does the same from a checkpoint or an ONNX export, with the class
names that the file records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["bench_sahi", "category_mapping", "sahi_model"]

INSTALL_HINT = "pip install 'efpn[sahi]'"


def category_mapping(classes: list[str]) -> dict[str, str]:
    """SAHI's ``category_mapping``: label (1-based, 0 is the background) to class name."""
    return {str(i + 1): name for i, name in enumerate(classes)}


def sahi_model(
    weights: str | Path | None = None,
    *,
    model: Any = None,
    classes: list[str] | None = None,
    confidence_threshold: float = 0.3,
    device: str = "cpu",
    **kwargs: Any,
):
    """A SAHI ``DetectionModel`` for an efpn detector.

    Args:
        weights: an efpn checkpoint (``.pt``) or ONNX export (``.onnx``, run in
            onnxruntime); its class names become SAHI's category names.
        model: a detector already in memory (instead of ``weights``).
        classes: class names in label order (default: the file's, or ``class1``...).
        confidence_threshold: SAHI drops predictions at or below this score.
        device: where the model runs (``.onnx``: the CPU).
        **kwargs: other ``sahi.models.base.DetectionModel`` arguments.

    Returns:
        A ``sahi.models.torchvision.TorchVisionDetectionModel`` holding the detector,
        for ``sahi.predict.get_sliced_prediction`` and the other SAHI entry points.
    """
    try:
        from sahi.models.torchvision import TorchVisionDetectionModel
    except ImportError as e:
        raise ValueError(f"SAHI is not installed ({e.name} is missing): {INSTALL_HINT}") from None
    if (weights is None) == (model is None):
        raise ValueError("give either weights (a .pt or .onnx file) or a model")
    if weights is not None:
        from .engine.train import detector_from_file

        model, ckpt = detector_from_file(weights, device)
        classes = classes or ckpt["classes"]
    if classes is None:
        predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
        if predictor is None:
            raise ValueError("give classes: the model does not say how many it has")
        classes = [f"class{i}" for i in range(1, predictor.cls_score.out_features)]
    return TorchVisionDetectionModel(
        model=model,
        category_mapping=category_mapping(list(classes)),
        confidence_threshold=confidence_threshold,
        device=device,
        **kwargs,
    )


def bench_sahi(
    weights: str | Path,
    image,
    *,
    slice_size: int = 512,
    overlap: float = 0.25,
    runs: int = 3,
    batch_size: int = 4,
    merge_threshold: float = 0.5,
    device: str = "cpu",
) -> dict[str, Any]:
    """Time SAHI's sliced prediction and efpn's on one image, side by side.

    Each round runs efpn (one tile per pass, then ``batch_size`` tiles per pass) and
    SAHI's ``get_sliced_prediction`` with the same model, tiles and merge (per-class NMS
    at IoU ``merge_threshold``, no full-image pass), interleaved so that drift in the
    machine's speed hits all alike. The first round's detections are compared.

    Args:
        weights: an efpn checkpoint or ONNX export.
        image: an ``(H, W, 3)`` uint8 array.

    Returns:
        ``{"seconds": {row: median}, "rounds", "tiles", "same_windows", "agree"
        (None or what differs), "detections"}``.
    """
    import statistics
    import time

    import numpy as np
    import torch

    from .export import compare_detections
    from .slicing import predict_sliced, slice_windows

    if runs < 1:
        raise ValueError(f"--runs must be 1 or more, got {runs}")
    model = sahi_model(weights, confidence_threshold=0.0, device=device)  # says what to install
    from sahi.predict import get_sliced_prediction
    from sahi.slicing import get_slice_bboxes

    h, w = image.shape[:2]
    ours = [list(win) for win in slice_windows(h, w, slice_size, overlap)]
    theirs = get_slice_bboxes(h, w, slice_size, slice_size, False, overlap, overlap)
    rows = {
        "efpn (1 tile per pass)": lambda: predict_sliced(
            model.model,
            image,
            slice_size,
            overlap,
            merge_threshold=merge_threshold,
            batch_size=1,
            device=device,
        ),
        f"efpn ({batch_size} tiles per pass)": lambda: predict_sliced(
            model.model,
            image,
            slice_size,
            overlap,
            merge_threshold=merge_threshold,
            batch_size=batch_size,
            device=device,
        ),
        "SAHI get_sliced_prediction": lambda: get_sliced_prediction(
            image,
            model,
            slice_height=slice_size,
            slice_width=slice_size,
            overlap_height_ratio=overlap,
            overlap_width_ratio=overlap,
            perform_standard_pred=False,
            postprocess_type="NMS",
            postprocess_match_metric="IOU",
            postprocess_match_threshold=merge_threshold,
            postprocess_class_agnostic=False,
            verbose=0,
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    first: dict[str, Any] = {}
    with torch.no_grad():
        for _ in range(runs):
            for name, run in rows.items():
                start = time.perf_counter()
                out = run()
                times[name].append(time.perf_counter() - start)
                first.setdefault(name, out)
    preds = first["SAHI get_sliced_prediction"].object_prediction_list
    sahi_dets = {
        "boxes": torch.tensor(
            np.array([p.bbox.to_xyxy() for p in preds]), dtype=torch.float64
        ).reshape(-1, 4),
        "scores": torch.tensor([p.score.value for p in preds], dtype=torch.float64),
        "labels": torch.tensor([p.category.id for p in preds], dtype=torch.long),
    }
    efpn_dets = first["efpn (1 tile per pass)"]
    return {
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "rounds": runs,
        "tiles": len(ours),
        "same_windows": ours == [list(b) for b in theirs],
        "agree": compare_detections(efpn_dets, sahi_dets),
        "detections": len(efpn_dets["scores"]),
    }
