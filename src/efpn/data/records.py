"""The one internal record type every reader produces and every writer consumes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DataError",
    "DetectionData",
    "ImageRecord",
    "read_text",
    "resolve_inside",
    "sanitize_boxes",
]

log = logging.getLogger("efpn.data")


class DataError(ValueError):
    """Bad input data; the message names the file and the entry."""


def read_text(path: str | Path) -> str:
    """A text file's content (UTF-8, or UTF-16 with its byte-order mark, as Windows
    editors save "Unicode"), with a one-line error naming the file when it is absent or
    not text."""
    try:
        raw = Path(path).read_bytes()
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


@dataclass
class ImageRecord:
    """One image and its boxes.

    Attributes:
        file_name: path relative to the dataset root, with forward slashes.
        width, height: image size in pixels.
        boxes: ``(K, 4)`` float64 ``xyxy`` boxes in pixels.
        labels: ``(K,)`` int64 indices into :attr:`DetectionData.classes` (0-based).
        image_id: integer id, unique within the dataset.
        ignore: ``(M, 4)`` xyxy regions to ignore (COCO crowd, DOTA difficult,
            VisDrone ignored regions): not trained on; at evaluation a detection there
            is neither a true nor a false positive.
        ignore_labels: ``(M,)`` class index of each region, -1 for any class.
        attributes: per-box arrays kept from the source (VisDrone ``truncation``,
            ``occlusion``), each of length K.
        upright: read the image turned by its EXIF orientation (what viewers show);
            ``False`` where the annotations declare the stored, unturned size.
    """

    file_name: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    image_id: int = 0
    ignore: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    ignore_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    attributes: dict = field(default_factory=dict)
    upright: bool = True


@dataclass
class DetectionData:
    """A detection dataset: a root folder, class names and image records.

    Attributes:
        root: folder that image ``file_name`` paths are relative to.
        classes: class names; label ``i`` is ``classes[i]``.
        images: the records.
        source: the file or folder it was read from, for messages.
        category_ids: COCO category id of each class (1..K when not from COCO).
        eval_classes: the classes that evaluation counts (all when ``None``).
    """

    root: Path
    classes: list[str]
    images: list[ImageRecord]
    source: str = ""
    category_ids: list[int] | None = None
    eval_classes: list[str] | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if self.category_ids is None:
            self.category_ids = list(range(1, len(self.classes) + 1))

    def image_path(self, record: ImageRecord) -> Path:
        return resolve_inside(self.root, record.file_name, self.source)

    def num_boxes(self) -> int:
        return sum(len(r.labels) for r in self.images)


def resolve_inside(root: Path, relative: str, source: str = "") -> Path:
    """``root / relative`` resolved, refusing paths that leave ``root`` (``..``, absolute
    paths, symlinks out)."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise DataError(
            f"{source or root}: image path {relative!r} escapes the dataset root {root}"
        )
    return path


@dataclass
class SanitizeCounts:
    clipped: int = 0
    dropped: int = 0

    def report(self, source: str) -> str | None:
        if not (self.clipped or self.dropped):
            return None
        return (
            f"{source}: clipped {self.clipped} box(es) to the image, "
            f"dropped {self.dropped} box(es) with zero or negative area"
        )


def _clip_ignore(r: ImageRecord) -> None:
    ig = np.asarray(r.ignore, dtype=np.float64).reshape(-1, 4).copy()
    ig[:, [0, 2]] = ig[:, [0, 2]].clip(0, r.width)
    ig[:, [1, 3]] = ig[:, [1, 3]].clip(0, r.height)
    keep = (ig[:, 2] > ig[:, 0]) & (ig[:, 3] > ig[:, 1])
    r.ignore = ig[keep]
    r.ignore_labels = np.asarray(r.ignore_labels, dtype=np.int64).reshape(-1)[keep]


def sanitize_boxes(images: list[ImageRecord], source: str) -> SanitizeCounts:
    """Clip boxes to their image and drop zero/negative-area ones, in place; logs and
    returns one summary of what was changed."""
    counts = SanitizeCounts()
    for r in images:
        _clip_ignore(r)
        if len(r.boxes) == 0:
            r.boxes = np.zeros((0, 4), dtype=np.float64)
            r.labels = np.zeros((0,), dtype=np.int64)
            continue
        b = np.asarray(r.boxes, dtype=np.float64).reshape(-1, 4)
        clipped = b.copy()
        clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, r.width)
        clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, r.height)
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        # rounding (an edge at 1.00000000005 of the width) is not worth a warning
        changed = np.any(np.abs(clipped - b) > 1e-3, axis=1) & keep
        counts.clipped += int(changed.sum())
        counts.dropped += int((~keep).sum())
        r.boxes = clipped[keep]
        r.labels = np.asarray(r.labels, dtype=np.int64)[keep]
        r.attributes = {k: np.asarray(v)[keep] for k, v in r.attributes.items()}
    msg = counts.report(source)
    if msg:
        log.warning(msg)
    return counts
