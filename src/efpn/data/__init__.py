"""Datasets: COCO, YOLO, VOC and TT100K readers, SynthSigns, transforms."""

from .dataset import DetectionDataset, collate, load_rgb
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
from .records import DataError, DetectionData, ImageRecord, resolve_inside
from .synthetic import SYNTH_CLASSES, generate
from .transforms import AugmentConfig, BalancedCropDataset, build_transforms

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
