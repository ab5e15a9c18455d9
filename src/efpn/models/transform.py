"""The detector's input transform with a fixed-factor resize for aerial imagery."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

__all__ = ["ScaleTransform"]


class ScaleTransform(GeneralizedRCNNTransform):
    """``GeneralizedRCNNTransform`` that resizes every image by one factor.

    torchvision resizes each image so its shorter side is ``min_size``; images of
    different sizes then end up at different ground sample distances. Here every image
    is scaled by ``resize_scale`` (0.5: half the native resolution), so an object keeps
    its size in pixels whatever the image it is in. ``min_size`` keeps its role in
    multi-scale training and scaled tests: a drawn (or scaled) size ``s`` multiplies the
    factor by ``s / reference_size``. The longer side never exceeds ``max_size``, which
    bounds what one image costs.

    Args:
        resize_scale: the factor at the test size.
        reference_size: the test size that ``resize_scale`` refers to (the recipe's
            ``model.min_size``).
        *args, **kwargs: ``GeneralizedRCNNTransform`` arguments.
    """

    def __init__(self, *args, resize_scale: float, reference_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not resize_scale > 0:
            raise ValueError(f"resize_scale must be positive, got {resize_scale}")
        self.resize_scale = float(resize_scale)
        self.reference_size = float(reference_size)

    def factor(self, height: int, width: int, size: float | None = None) -> float:
        """The factor for an image of ``height x width`` at size ``size`` (default: the
        current test size)."""
        size = float(self.min_size[-1] if size is None else size)
        return min(
            self.resize_scale * size / self.reference_size,
            float(self.max_size) / max(height, width),
        )

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        h, w = image.shape[-2:]
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        f = self.factor(h, w, size)
        out_h, out_w = max(int(round(h * f)), 1), max(int(round(w * f)), 1)
        if (out_h, out_w) != (h, w):
            image = F.interpolate(
                image[None], size=(out_h, out_w), mode="bilinear", align_corners=False
            )[0]
        if target is not None and "boxes" in target:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), (out_h, out_w))
        return image, target

    def __repr__(self) -> str:
        return super().__repr__()[:-2] + f"\n    Resize(scale={self.resize_scale})\n)"


def install_scale_transform(model: torch.nn.Module, resize_scale: float, reference_size: int):
    """Replace ``model.transform`` by a :class:`ScaleTransform` with its settings."""
    t = model.transform
    model.transform = ScaleTransform(
        t.min_size,
        t.max_size,
        t.image_mean,
        t.image_std,
        size_divisible=t.size_divisible,
        fixed_size=t.fixed_size,
        resize_scale=resize_scale,
        reference_size=reference_size,
    )
    return model
