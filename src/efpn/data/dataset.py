"""torch Dataset over :class:`DetectionData`, yielding tv_tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .image import load_rgb
from .records import DataError, DetectionData

__all__ = ["DetectionDataset", "collate", "load_rgb"]


class DetectionDataset(Dataset):
    """Images and targets for torchvision detection models.

    Each item is ``(image, target)``: a ``tv_tensors.Image`` (uint8, CHW) and a dict
    with ``boxes`` (``tv_tensors.BoundingBoxes``, XYXY), ``labels`` (int64, 1-based;
    0 is background) and ``image_id``.

    Args:
        data: the records.
        transforms: a ``torchvision.transforms.v2`` callable on ``(image, target)``.
    """

    def __init__(self, data: DetectionData, transforms: Callable | None = None) -> None:
        self.data = data
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.data.images)

    def load(self, index: int) -> tuple[tv_tensors.Image, dict]:
        r = self.data.images[index]
        path = self.data.image_path(r)
        arr = load_rgb(path, upright=r.upright)
        if arr.shape[0] != r.height or arr.shape[1] != r.width:
            raise DataError(
                f"{path}: image is {arr.shape[1]}x{arr.shape[0]} but {self.data.source} says {r.width}x{r.height}"
            )
        image = tv_tensors.Image(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.as_tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(r.height, r.width),
            ),
            "labels": torch.as_tensor(r.labels, dtype=torch.int64) + 1,
            "image_id": r.image_id,
        }
        return image, target

    def __getitem__(self, index: int):
        image, target = self.load(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    """Keep images and targets as lists, as torchvision detection models expect."""
    return tuple(zip(*batch))
