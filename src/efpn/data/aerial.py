"""Readers for the aerial and drone formats: DOTA ``labelTxt`` and VisDrone-DET.

Both keep the boxes a benchmark does not score as ignore regions
(:attr:`~efpn.data.records.ImageRecord.ignore`): DOTA's ``difficult=1`` objects, and
VisDrone's ``ignored regions`` (category 0), ``others`` (11) and boxes of score 0.
Training does not see them; COCO evaluation treats them as crowd regions, so a
detection there is neither a true nor a false positive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .formats import IMAGE_SUFFIXES, _finish, _image_size, files_in
from .records import DataError, DetectionData, ImageRecord, read_text

__all__ = ["DOTA_CLASSES", "VISDRONE_CLASSES", "read_dota", "read_visdrone"]

#: DOTA v1.5 categories (v1.0 lacks ``container-crane``)
DOTA_CLASSES = [
    "plane",
    "ship",
    "storage-tank",
    "baseball-diamond",
    "tennis-court",
    "basketball-court",
    "ground-track-field",
    "harbor",
    "bridge",
    "large-vehicle",
    "small-vehicle",
    "helicopter",
    "roundabout",
    "soccer-ball-field",
    "swimming-pool",
    "container-crane",
]
#: VisDrone-DET categories 1..10 (0 "ignored regions" and 11 "others" become ignore)
VISDRONE_CLASSES = [
    "pedestrian",
    "people",
    "bicycle",
    "car",
    "van",
    "truck",
    "tricycle",
    "awning-tricycle",
    "bus",
    "motor",
]


def _split_root(root: Path, split: str | None, need: str) -> Path:
    """``root/split`` when it holds the layout, else ``root`` (one split per folder)."""
    if split and (root / split / need).is_dir():
        return root / split
    if (root / need).is_dir():
        return root
    where = f"{root / split} or {root}" if split else str(root)
    raise DataError(f"{where}: no {need}/ folder")


def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in files_in(folder, suffixes=IMAGE_SUFFIXES)}


def _record(rel, w, h, boxes, labels, ignore, ignore_labels, image_id, attributes=None):
    return ImageRecord(
        rel,
        w,
        h,
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        image_id,
        ignore=np.asarray(ignore, dtype=np.float64).reshape(-1, 4),
        ignore_labels=np.asarray(ignore_labels, dtype=np.int64),
        attributes={k: np.asarray(v) for k, v in (attributes or {}).items()},
    )


def read_dota(
    root: str | Path, split: str | None = None, classes: list[str] | None = None
) -> DetectionData:
    """Read DOTA v1.0/v1.5: ``images/`` and ``labelTxt/`` (under ``root/<split>`` when
    that exists).

    Each label line is ``x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]``; the oriented
    quadrilateral becomes its axis-aligned box, ``difficult=1`` an ignore region. The
    header lines (``imagesource:``, ``gsd:``) are optional. ``classes`` defaults to
    the DOTA v1.5 list.
    """
    root = Path(root)
    base = _split_root(root, split, "labelTxt")
    classes = list(classes or DOTA_CLASSES)
    index = {c: i for i, c in enumerate(classes)}
    images = _images_by_stem(base / "images")
    records = []
    orphans = 0
    for label_path in files_in(base / "labelTxt", "*.txt"):
        image = images.get(label_path.stem)
        if image is None:
            orphans += 1
            continue
        w, h = _image_size(image, str(label_path))
        boxes, labels, ignore, ignore_labels = [], [], [], []
        for ln, line in enumerate(read_text(label_path).splitlines(), 1):
            parts = line.split()
            if not parts or ":" in parts[0]:
                continue  # blank, or a header (imagesource:..., gsd:..., "gsd: 0.15")
            if len(parts) not in (9, 10):
                raise DataError(
                    f"{label_path}:{ln}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]', got {line.strip()!r}"
                )
            try:
                xy = np.asarray([float(v) for v in parts[:8]]).reshape(4, 2)
                difficult = int(parts[9]) if len(parts) == 10 else 0
            except ValueError:
                raise DataError(
                    f"{label_path}:{ln}: coordinates and difficult must be numbers, got {line.strip()!r}"
                ) from None
            if not np.isfinite(xy).all():
                raise DataError(f"{label_path}:{ln}: non-finite coordinate in {line.strip()!r}")
            if parts[8] not in index:
                raise DataError(
                    f"{label_path}:{ln}: category {parts[8]!r} is not one of the {len(classes)} classes"
                )
            box = [*xy.min(0).tolist(), *xy.max(0).tolist()]
            if difficult:
                ignore.append(box)
                ignore_labels.append(index[parts[8]])
            else:
                boxes.append(box)
                labels.append(index[parts[8]])
        rel = image.relative_to(root).as_posix()
        records.append(_record(rel, w, h, boxes, labels, ignore, ignore_labels, len(records) + 1))
    unlabelled = len(
        set(images) - {r.file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0] for r in records}
    )
    _report(base, orphans, unlabelled, "labelTxt")
    return _finish(DetectionData(root, classes, records, str(base)))


def read_visdrone(root: str | Path, split: str | None = None) -> DetectionData:
    """Read VisDrone-DET: ``images/`` and ``annotations/`` (under ``root/<split>`` when
    that exists; e.g. ``VisDrone2019-DET-train``).

    Each line is ``left,top,width,height,score,category,truncation,occlusion``.
    Categories 1-10 are the classes; category 0 (ignored regions) and 11 (others) and
    any box of score 0 become ignore regions (class-agnostic for 0 and 11).
    ``truncation`` and ``occlusion`` are kept in ``ImageRecord.attributes``.
    """
    root = Path(root)
    base = _split_root(root, split, "annotations")
    images = _images_by_stem(base / "images")
    records = []
    orphans = 0
    for ann_path in files_in(base / "annotations", "*.txt"):
        image = images.get(ann_path.stem)
        if image is None:
            orphans += 1
            continue
        w, h = _image_size(image, str(ann_path))
        boxes, labels, ignore, ignore_labels = [], [], [], []
        trunc, occl = [], []
        for ln, line in enumerate(read_text(ann_path).splitlines(), 1):
            line = line.strip().rstrip(",")
            if not line:
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 8:
                raise DataError(
                    f"{ann_path}:{ln}: expected 8 comma-separated fields (left,top,width,height,score,category,truncation,occlusion), got {len(parts)}"
                )
            try:
                x, y, bw, bh = (float(v) for v in parts[:4])
                score, cat, tr, oc = (int(v) for v in parts[4:])
            except ValueError:
                raise DataError(f"{ann_path}:{ln}: expected numbers, got {line!r}") from None
            if not all(np.isfinite([x, y, bw, bh])):
                raise DataError(f"{ann_path}:{ln}: non-finite box in {line!r}")
            if not 0 <= cat <= 11:
                raise DataError(f"{ann_path}:{ln}: category {cat} is not in 0..11")
            box = [x, y, x + bw, y + bh]
            if cat in (0, 11):
                ignore.append(box)
                ignore_labels.append(-1)
            elif score == 0:
                ignore.append(box)
                ignore_labels.append(cat - 1)
            else:
                boxes.append(box)
                labels.append(cat - 1)
                trunc.append(tr)
                occl.append(oc)
        rel = image.relative_to(root).as_posix()
        records.append(
            _record(
                rel,
                w,
                h,
                boxes,
                labels,
                ignore,
                ignore_labels,
                len(records) + 1,
                {
                    "truncation": np.asarray(trunc, dtype=np.int64),
                    "occlusion": np.asarray(occl, dtype=np.int64),
                },
            )
        )
    unlabelled = len(set(images) - {Path(r.file_name).stem for r in records})
    _report(base, orphans, unlabelled, "annotations")
    return _finish(DetectionData(root, list(VISDRONE_CLASSES), records, str(base)))


def _report(base: Path, orphans: int, unlabelled: int, folder: str) -> None:
    import logging

    log = logging.getLogger("efpn.data")
    if orphans:
        log.warning(f"{base}: skipped {orphans} {folder} file(s) without an image")
    if unlabelled:
        log.warning(f"{base}: skipped {unlabelled} image(s) without a {folder} file")
