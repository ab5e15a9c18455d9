"""The detector's input transforms: torchvision's, exportable to the last pixel, and a
fixed-factor resize for aerial imagery."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

__all__ = ["ExportableTransform", "ScaleTransform", "install_transform"]


class ExportableTransform(GeneralizedRCNNTransform):
    """torchvision's ``GeneralizedRCNNTransform`` with two additions.

    - Crops keep their source's scale: in training, a target with ``"source_size"``
      (``(height, width)`` of the image a crop was cut from) is resized by the factor of
      that image, not its own, so an object is the size it will be at test time.
    - Its traced (ONNX) resize gives the eager output size exactly. Eagerly, torchvision
      computes the size as ``floor(side * scale)`` in double precision; its traced graph
      does it in float32, so a side whose product lands next to an integer (61 px to a
      shorter side of 128) comes out one pixel smaller, and so do the detections. Here
      the graph computes in float64, as Python does, and resizes to that size.
    """

    def factor(self, height: int, width: int, size: float | None = None) -> float:
        """The resize factor of a ``height x width`` image at size ``size`` (default:
        the test size): torchvision's rule, shorter side to ``size``, longer side at
        most ``max_size``."""
        size = float(self.min_size[-1] if size is None else size)
        return min(size / min(height, width), float(self.max_size) / max(height, width))

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if self.training and target is not None and "source_size" in target:
            return self.resize_by_source(image, target)
        if not torchvision._is_tracing() or self.training or self.fixed_size is not None:
            return super().resize(image, target)
        hw = torch._shape_as_tensor(image)[-2:].to(torch.float64)
        scale = torch.minimum(_f64(self.min_size[-1]) / _min(hw), _f64(self.max_size) / _max(hw))
        return _resize_to(image, torch.floor(hw * scale)), target

    def resize_by_source(
        self, image: Tensor, target: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Resize a crop by the factor its source image gets at a drawn training size."""
        src_h, src_w = (int(v) for v in target["source_size"])
        f = self.factor(src_h, src_w, self.torch_choice(self.min_size))
        h, w = image.shape[-2:]
        out = (max(int(round(h * f)), 1), max(int(round(w * f)), 1))
        image = F.interpolate(image[None], size=out, mode="bilinear", align_corners=False)[0]
        if "boxes" in target:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), out)
        return image, target


def _f64(value: float) -> Tensor:
    # One-element float64 tensors throughout: the exporter computes with 0-dim tensors
    # (and Python floats) in float32, and float32 sizes miss the eager ones by a pixel.
    return torch.tensor([float(value)], dtype=torch.float64)


def _min(hw: Tensor) -> Tensor:
    return torch.amin(hw, dim=0, keepdim=True)


def _max(hw: Tensor) -> Tensor:
    return torch.amax(hw, dim=0, keepdim=True)


def _resize_to(image: Tensor, size: Tensor) -> Tensor:
    out = torch.clamp(size, min=1).to(torch.int64)
    return F.interpolate(image[None], size=(out[0], out[1]), mode="bilinear", align_corners=False)[
        0
    ]


class ScaleTransform(ExportableTransform):
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
        if self.training and target is not None and "source_size" in target:
            return self.resize_by_source(image, target)
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        if torchvision._is_tracing():
            return self._traced_resize(image, size), target
        h, w = image.shape[-2:]
        f = self.factor(h, w, size)
        out_h, out_w = max(int(round(h * f)), 1), max(int(round(w * f)), 1)
        if (out_h, out_w) != (h, w):
            image = F.interpolate(
                image[None], size=(out_h, out_w), mode="bilinear", align_corners=False
            )[0]
        if target is not None and "boxes" in target:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), (out_h, out_w))
        return image, target

    def _traced_resize(self, image: Tensor, size: float) -> Tensor:
        # the eager arithmetic in float64 (torch.round, like Python's, rounds halves to even)
        hw = torch._shape_as_tensor(image)[-2:].to(torch.float64)
        f = torch.minimum(
            _f64(self.max_size) / _max(hw), _f64(self.resize_scale * size / self.reference_size)
        )
        return _resize_to(image, torch.round(hw * f))

    def __repr__(self) -> str:
        return super().__repr__()[:-2] + f"\n    Resize(scale={self.resize_scale})\n)"


def install_transform(
    model: torch.nn.Module, resize_scale: float | None = None, reference_size: int | None = None
):
    """Replace ``model.transform`` by an :class:`ExportableTransform`, or with
    ``resize_scale`` a :class:`ScaleTransform`, with the same settings."""
    t = model.transform
    kwargs = {}
    cls = ExportableTransform
    if resize_scale is not None:
        cls = ScaleTransform
        kwargs = {"resize_scale": resize_scale, "reference_size": reference_size}
    model.transform = cls(
        t.min_size,
        t.max_size,
        t.image_mean,
        t.image_std,
        size_divisible=t.size_divisible,
        fixed_size=t.fixed_size,
        **kwargs,
    )
    return model
