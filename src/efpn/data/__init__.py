"""Datasets: COCO, YOLO, VOC and TT100K readers, SynthSigns, transforms."""

from .formats import (
    FORMATS,
    TT100K_45,
    read_coco,
    read_dataset,
    read_tt100k,
    read_voc,
    read_yolo,
    to_coco_dict,
    write_coco,
    write_yolo,
)
from .image import load_rgb
from .records import DataError, DetectionData, ImageRecord, resolve_inside
from .synthetic import SYNTH_CLASSES, generate

# torch-dependent names load on first use, so the data commands start without torch
_LAZY = {
    "DetectionDataset": ".dataset",
    "collate": ".dataset",
    "AugmentConfig": ".transforms",
    "BalancedCropDataset": ".transforms",
    "build_transforms": ".transforms",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMATS",
    "SYNTH_CLASSES",
    "TT100K_45",
    "AugmentConfig",
    "BalancedCropDataset",
    "DataError",
    "DetectionData",
    "DetectionDataset",
    "ImageRecord",
    "build_transforms",
    "collate",
    "generate",
    "load_rgb",
    "read_coco",
    "read_dataset",
    "read_tt100k",
    "read_voc",
    "read_yolo",
    "resolve_inside",
    "to_coco_dict",
    "write_coco",
    "write_yolo",
]
