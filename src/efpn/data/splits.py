"""Train/val splits for data that has none: in memory (``data.val_fraction``) or
written in the dataset's own format (``efpn data split``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from .records import DetectionData

__all__ = ["holdout", "holdout_names", "write_split"]


def holdout_names(names: list[str], fraction: float, seed: int = 0) -> set[str]:
    """The names held out for val: ``round(fraction * n)`` (at least 1 when ``fraction``
    > 0 and n > 1), chosen from the sorted names by a permutation drawn with ``seed``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"val fraction must be in [0, 1), got {fraction}")
    ordered = sorted(names)
    n_val = int(round(fraction * len(ordered)))
    if fraction > 0 and len(ordered) > 1:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[i] for i in order[:n_val]}


def holdout(
    data: DetectionData, fraction: float, seed: int = 0
) -> tuple[DetectionData, DetectionData]:
    """``(train, val)`` of one dataset, with the same class list (so a label never shifts)."""
    held = holdout_names([r.file_name for r in data.images], fraction, seed)

    def part(keep_val: bool, tag: str) -> DetectionData:
        return DetectionData(
            data.root,
            list(data.classes),
            [copy.copy(r) for r in data.images if (r.file_name in held) == keep_val],
            source=f"{data.source} ({tag}: {fraction:.0%} held out, seed {seed})",
            category_ids=list(data.category_ids),
            eval_classes=data.eval_classes,
        )

    return part(False, "train"), part(True, "val")


def write_split(
    path: str | Path, fmt: str, data: DetectionData, fraction: float, seed: int = 0
) -> list[Path]:
    """Write a train/val split in the dataset's own format; returns the files written.

    YOLO: ``splits.json`` (image names under ``images/``); VOC:
    ``ImageSets/Main/{train,val}.txt``; COCO: ``<name>_train.json`` and
    ``<name>_val.json`` beside the file.
    """
    path = Path(path)
    held = holdout_names([r.file_name for r in data.images], fraction, seed)
    train = [r for r in data.images if r.file_name not in held]
    val = [r for r in data.images if r.file_name in held]
    if fmt == "yolo":

        def name(r):
            return Path(r.file_name).relative_to("images").as_posix()

        out = path / "splits.json"
        out.write_text(
            json.dumps({"train": [name(r) for r in train], "val": [name(r) for r in val]}, indent=1)
        )
        return [out]
    if fmt == "voc":
        folder = path / "ImageSets" / "Main"
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for split, recs in (("train", train), ("val", val)):
            f = folder / f"{split}.txt"
            f.write_text("".join(f"{Path(r.file_name).stem}\n" for r in recs))
            written.append(f)
        return written
    if fmt == "coco":
        d = json.loads(path.read_text())
        written = []
        for split, recs in (("train", train), ("val", val)):
            ids = {r.image_id for r in recs}
            part = {
                **d,
                "images": [im for im in d["images"] if im["id"] in ids],
                "annotations": [a for a in d.get("annotations", []) if a["image_id"] in ids],
            }
            f = path.with_name(f"{path.stem}_{split}.json")
            f.write_text(json.dumps(part))
            written.append(f)
        return written
    raise ValueError(f"{path}: efpn data split writes yolo, voc or coco splits, not {fmt}")
