"""Training and evaluation transforms (torchvision.transforms.v2) and the TT100K
class-balancing crop sampler."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .dataset import DetectionDataset

__all__ = ["AugmentConfig", "BalancedCropDataset", "build_transforms"]


@dataclass
class AugmentConfig:
    """Augmentation recipe.

    Attributes:
        min_size, max_size: training scale (shorter side, cap on the longer side); 0
            leaves resizing to the detector's own transform.
        hflip: horizontal flip probability (0: off, the default for signs).
        color_jitter: brightness/contrast/saturation strength (0: off).
        hue_jitter: hue shift strength (None: ``color_jitter / 4``; 0: no hue shift,
            which skips the costly RGB-HSV round trip).
        crop: probability of a random IoU crop (boxes kept valid by SanitizeBoundingBoxes).
    """

    min_size: int = 0
    max_size: int = 0
    hflip: float = 0.0
    color_jitter: float = 0.0
    hue_jitter: float | None = None
    crop: float = 0.0


def build_transforms(cfg: AugmentConfig | None = None, train: bool = True) -> v2.Compose:
    """A v2 pipeline on ``(tv_tensors.Image, target)`` that ends in float images and
    sanitized boxes."""
    cfg = cfg or AugmentConfig()
    ops: list = []
    if train and cfg.crop > 0:
        ops.append(v2.RandomApply([v2.RandomIoUCrop()], p=cfg.crop))
    if cfg.min_size:
        ops.append(v2.Resize(cfg.min_size, max_size=cfg.max_size or None, antialias=True))
    if train and cfg.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(cfg.hflip))
    hue = min(cfg.color_jitter / 4, 0.5) if cfg.hue_jitter is None else cfg.hue_jitter
    if train and (cfg.color_jitter > 0 or hue > 0):
        s = cfg.color_jitter
        ops.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=hue))
    ops += [
        v2.ToDtype(torch.float32, scale=True),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ]
    return v2.Compose(ops)


class BalancedCropDataset(Dataset):
    """The TT100K recipe: every image once, plus random crops around instances of rare
    classes until each class has about ``target_per_class`` instances.

    A crop of ``crop_size`` pixels is placed so that the chosen instance lies inside it
    at a random position; boxes cut by the crop are clipped and those left too small are
    removed by ``SanitizeBoundingBoxes``. Its target carries ``"source_size"``, the
    size of the image it was cut from, so that the detector resizes it by that image's
    factor: objects in crops are the size they are at test time.

    Args:
        base: the dataset to balance (its ``transforms`` are applied after the crop).
        target_per_class: instances to reach per class.
        crop_size: side of the square crops.
        seed: the crops are drawn once from this seed, so epochs see the same index.
    """

    def __init__(
        self,
        base: DetectionDataset,
        target_per_class: int = 1000,
        crop_size: int = 512,
        seed: int = 0,
    ) -> None:
        self.base = base
        self.crop_size = crop_size
        rng = np.random.default_rng(seed)
        instances: dict[int, list[tuple[int, int]]] = {}
        for i, r in enumerate(base.data.images):
            for k, lab in enumerate(r.labels.tolist()):
                instances.setdefault(lab, []).append((i, k))
        self.counts = Counter({c: len(v) for c, v in instances.items()})
        self.extra: list[tuple[int, int, float, float]] = []
        for _, items in sorted(instances.items()):
            for _ in range(max(target_per_class - len(items), 0)):
                i, k = items[int(rng.integers(len(items)))]
                self.extra.append((i, k, float(rng.random()), float(rng.random())))

    def __len__(self) -> int:
        return len(self.base) + len(self.extra)

    def crop_window(self, index: int) -> tuple[int, int, int, int, int] | None:
        """``(image_index, top, left, height, width)`` of an extra crop."""
        i, k, u, v = self.extra[index]
        r = self.base.data.images[i]
        x1, y1, x2, y2 = r.boxes[k]
        cw, ch = min(self.crop_size, r.width), min(self.crop_size, r.height)
        left_lo, left_hi = max(0.0, x2 - cw), min(x1, r.width - cw)
        top_lo, top_hi = max(0.0, y2 - ch), min(y1, r.height - ch)
        left = int(left_lo + u * max(left_hi - left_lo, 0))
        top = int(top_lo + v * max(top_hi - top_lo, 0))
        return i, top, left, ch, cw

    def __getitem__(self, index: int):
        if index < len(self.base):
            return self.base[index]
        i, top, left, h, w = self.crop_window(index - len(self.base))
        image, target = self.base.load(i)
        image, target = _crop(image, target, top, left, h, w)
        # the detector resizes the crop by its source image's factor (see
        # efpn.models.transform.ExportableTransform), so objects keep their test size
        r = self.base.data.images[i]
        target["source_size"] = torch.tensor([r.height, r.width])
        if self.base.transforms is not None:
            image, target = self.base.transforms(image, target)
        return image, target


def _crop(image, target, top, left, h, w):
    image = v2.functional.crop(image, top=top, left=left, height=h, width=w)
    boxes = v2.functional.crop(target["boxes"], top=top, left=left, height=h, width=w)
    boxes = v2.functional.clamp_bounding_boxes(boxes)
    target = dict(target, boxes=tv_tensors.wrap(boxes, like=boxes))
    return v2.SanitizeBoundingBoxes(min_size=1.0)(image, target)
