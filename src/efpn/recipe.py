"""A recipe from a dataset: what ``efpn train --data DATA`` trains.

DATA is a dataset folder in any supported format (detected), a COCO JSON, or a dataset
YAML in the Ultralytics convention (``path``, ``train``, ``val``, ``names``). The recipe
starts from the shipped CPU-sized defaults (ResNet-18 from scratch) or the paper's
widths (ResNet-50 / ResNeXt-101), and takes from the data what depends on it: the split
(the data's own, else 20% held out), the anchors and the P'2 routing size from the
box-size histogram at the training scale, and ``max_size`` from the image shapes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, apply_overrides, config_from_dict
from .data.records import DataError

__all__ = ["MODELS", "recipe_from_data"]

#: widths and training of each ``--model`` (from scratch; see the README for ImageNet)
MODELS: dict[str, dict[str, Any]] = {
    "resnet18": {"fpn_channels": 64, "representation_size": 256, "sr_width": 64},
    "resnet50": {"fpn_channels": 256, "representation_size": 1024},
    "resnext101_32x8d": {"fpn_channels": 256, "representation_size": 1024},
}


def _data_section(data: str | Path) -> dict[str, Any]:
    """Where the data is and how it is split, for any DATA argument."""
    from .data.formats import dataset_yaml_of, detect_format, read_dataset_yaml

    path = Path(data)
    yaml_file = dataset_yaml_of(path)
    if yaml_file is not None:
        return read_dataset_yaml(yaml_file)
    if not path.exists():
        raise DataError(f"{path}: no such dataset folder or file")
    fmt = detect_format(path)
    # absolute, so that the run's recipe (and `efpn val` on its checkpoints) works from
    # any folder
    where = str(path.resolve())
    section: dict[str, Any] = {"format": fmt, "train": where, "val": where}
    has = {
        "yolo": _yolo_has_split(path),
        "voc": (path / "ImageSets" / "Main" / "train.txt").exists()
        and (path / "ImageSets" / "Main" / "val.txt").exists(),
        "dota": (path / "train").is_dir() and (path / "val").is_dir(),
        "visdrone": (path / "train").is_dir() and (path / "val").is_dir(),
        "geojson": (path / "train").is_dir() and (path / "val").is_dir(),
    }.get(fmt, False)
    if has:
        section.update(train_split="train", val_split="val")
    else:
        section.update(train_split=None, val_split=None, val_fraction=0.2)
    return section


def _yolo_has_split(path: Path) -> bool:
    if (path / "splits.json").exists():
        from .data.formats import load_json

        splits = load_json(path / "splits.json")
        return isinstance(splits, dict) and "train" in splits and "val" in splits
    return (path / "images" / "train").is_dir() and (path / "images" / "val").is_dir()


def _name(data: str | Path) -> str:
    stem = Path(data).stem if Path(data).is_file() else Path(data).resolve().name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("._-") or "data"


def derive(boxes_wh: np.ndarray, image_wh: np.ndarray, imgsz: int) -> dict[str, Any]:
    """Anchors, P'2 routing size and ``max_size`` from the training boxes.

    Sizes are measured at the training scale (each image's shorter side at ``imgsz``).
    The smallest anchor is the power of two nearest the 5th percentile of the boxes'
    sqrt(area) (8 to 64 px), doubling over the five levels P2-P6; RoIs under 32 px (COCO
    small at that scale) go to P'2; ``max_size`` lets the longest image reach 2x ``imgsz``
    in multi-scale stage-1 training.
    """
    aspect = float((image_wh.max(axis=1) / image_wh.min(axis=1)).max()) if len(image_wh) else 1.0
    out: dict[str, Any] = {"small_roi_size": 32.0}
    if len(boxes_wh):
        s = np.sqrt(boxes_wh[:, 0] * boxes_wh[:, 1]) * boxes_wh[:, 2]
        p5, median = float(np.percentile(s, 5)), float(np.median(s))
        a0 = int(min(max(2 ** round(math.log2(max(p5, 1.0))), 8), 64))
        out["anchor_sizes"] = [a0 * 2**i for i in range(5)]
        out["_sizes"] = {"p5": p5, "median": median, "small": float((s < 32).mean())}
    else:
        out["anchor_sizes"] = [16, 32, 64, 128, 256]
    out["max_size"] = int(math.ceil(2 * imgsz * min(aspect, 4.0) / 32) * 32)
    return out


def recipe_from_data(
    data: str | Path,
    *,
    model: str = "resnet18",
    imgsz: int = 640,
    epochs: int = 12,
    device: str = "auto",
    batch: int = 4,
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[Config, list[str]]:
    """A recipe for DATA and the lines that say what was derived from it.

    Stage 1 trains ``epochs`` epochs multi-scale over ``imgsz``..2x``imgsz`` (so the
    premise check and the stage-2 teacher work at 2x); stages 2 and 3 get a third of
    that each (at least one), the ratio of the shipped recipes. ``overrides`` (dotted
    keys) win over everything derived; a ``data.val`` other than DATA is the val set, in
    place of the held-out fraction.
    """
    from .engine.train import load_data

    if model not in MODELS:
        raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if imgsz < 32:
        raise ValueError(f"--imgsz must be 32 or more, got {imgsz}")
    section = _data_section(data)
    later = max(1, round(epochs / 3))
    values: dict[str, Any] = {
        "name": name or _name(data),
        "device": device,
        "data": {**section, "hflip": 0.5, "color_jitter": 0.1},
        "model": {
            "backbone": model,
            **MODELS[model],
            "min_size": imgsz,
            "norm_layer": "batchnorm",
            "trainable_backbone_layers": 5,
        },
        "distill": {"teacher_mode": "upsample_teacher"},
        "stage1": {
            "optim": {
                "optimizer": "sgd",
                "lr": 0.02,
                "epochs": epochs,
                "batch_size": batch,
                "warmup_iters": 50,
                "schedule": "cosine",
            }
        },
        "stage2": {
            "optim": {
                "optimizer": "adamw",
                "lr": 0.001,
                "weight_decay": 0.0,
                "epochs": later,
                "batch_size": batch,
                "warmup_iters": 10,
                "schedule": "cosine",
            }
        },
        "stage3": {
            "ohem": True,
            "unfreeze_extension": True,
            "optim": {
                "optimizer": "sgd",
                "lr": 0.01,
                "epochs": later,
                "batch_size": batch,
                "warmup_iters": 5,
                "schedule": "cosine",
            },
        },
        "checkpoint_every": 100,
    }
    overrides = dict(overrides or {})
    for key in ("data.train", "data.val", "data.image_root"):
        if isinstance(overrides.get(key), str) and overrides[key]:
            overrides[key] = str(Path(overrides[key]).resolve())
    if overrides.get("data.val") not in (None, section["train"]):
        overrides.setdefault("data.val_fraction", 0.0)  # a named val set, not a holdout
    cfg = apply_overrides(config_from_dict(values, f"--data {data}"), overrides, "overrides")
    values = cfg.to_dict()
    train, val = load_data(cfg)
    wh = np.asarray([[r.width, r.height] for r in train.images], dtype=float).reshape(-1, 2)
    boxes = [
        np.column_stack(
            [
                r.boxes[:, 2] - r.boxes[:, 0],
                r.boxes[:, 3] - r.boxes[:, 1],
                np.full(len(r.boxes), imgsz / max(min(r.width, r.height), 1)),
            ]
        )
        for r in train.images
        if len(r.boxes)
    ]
    derived = derive(np.concatenate(boxes) if boxes else np.zeros((0, 3)), wh, imgsz)
    sizes = derived.pop("_sizes", None)
    values["model"].update(derived)
    values["data"]["scale_jitter"] = sorted(
        {int(round(imgsz * f / 32) * 32) for f in (1.0, 1.25, 1.5, 1.75, 2.0)}
    )
    cfg = apply_overrides(config_from_dict(values, f"--data {data}"), overrides, "overrides")
    d = cfg.data
    if d.val_fraction > 0:
        split = f"{d.val_fraction:.0%} of the images held out as val (seed {d.split_seed})"
    elif d.val not in (None, d.train):
        split = f"val from {d.val}" + (f" ({d.val_split})" if d.val_split else "")
    elif d.val_split and d.val_split != d.train_split:
        split = f"its own split ({d.train_split}/{d.val_split})"
    else:
        split = "no held-out val: val is the training data (data.val_fraction=0)"
    lines = [
        f"data: {data} ({section['format']}), {len(train.classes)} classes, "
        f"{len(train.images)} train / {len(val.images)} val images, {split}",
    ]
    if sizes:
        lines.append(
            f"boxes at {imgsz} px: sqrt(area) 5th percentile {sizes['p5']:.1f} px, median "
            f"{sizes['median']:.1f} px, {sizes['small']:.0%} under 32 px"
        )
    shrink = _shrink_warning(wh, boxes, imgsz)
    if shrink:
        lines.append(shrink)
    m = cfg.model
    lines.append(
        f"derived: anchor_sizes {m.anchor_sizes}, small_roi_size {m.small_roi_size:g}, "
        f"min_size {m.min_size}, max_size {m.max_size}, stage-1 scale_jitter {cfg.data.scale_jitter}"
    )
    lines.append(
        f"model {model} from scratch; epochs {epochs}/{later}/{later} (stages 1/2/3); "
        f"batch {batch}; device {device}"
    )
    return cfg, lines


#: a box under this many pixels (sqrt of area) at the test size is below what even the
#: stride-2 level P'2 resolves well
TINY_PX = 8.0


def _shrink_warning(image_wh: np.ndarray, boxes: list[np.ndarray], imgsz: int) -> str | None:
    """A warning when resizing the images to ``imgsz`` shrinks their objects away: the
    images' shorter side is at least twice ``imgsz`` (huge scenes, tiles wanted)."""
    if not len(image_wh):
        return None
    short = float(np.median(image_wh.min(axis=1)))
    factor = short / imgsz
    if factor < 2.0:
        return None
    tiny = ""
    if boxes:
        b = np.concatenate(boxes)
        at_s = np.sqrt(b[:, 0] * b[:, 1]) * b[:, 2]
        tiny = f": {float((at_s < TINY_PX).mean()):.0%} of the boxes are under {TINY_PX:g} px there"
    return (
        f"warning: the images' shorter side (median {short:.0f} px) is {factor:.1f}x --imgsz, so "
        f"every object shrinks {factor:.1f}x at {imgsz} px{tiny}. For large scenes cut tiles at "
        f"native resolution (efpn data slice DATA --size {imgsz} --out TILES), train on them and "
        f"predict with --slice {imgsz} (README, 'Huge images'), or raise --imgsz"
    )
