"""Feature super-resolution modules that produce the intermediate map P'3.

``FeatureTextureTransfer`` is the paper's FTT (Sec. III-B, Eq. 3-4). ``ESPCN`` and
``NearestUpsample`` are the single-image SR and "w/o FTT" variants of Tables II and III.
All three map ``(P2, P3)`` to a stride-4 map with the pyramid's channel count, in two
parts: ``content(P3)`` (the stride-8 work, up-sampled to stride 4) and
``texture(P2, content)`` (the stride-4 work). ``content_radius`` and ``texture_radius``
are their receptive-field radii in cells of their input, which is what computing the
extension on windows (:mod:`efpn.models.sparse`) needs to stay exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ESPCN",
    "FeatureTextureTransfer",
    "NearestUpsample",
    "ResidualBlock",
    "SRModule",
    "SubPixelUpsample",
    "build_sr_module",
    "conv_radius",
    "pixel_shuffle_eq4",
]


def conv_radius(module: nn.Module) -> int:
    """Receptive-field radius, in input cells, of a chain of stride-1 convolutions (the
    sum of their half-kernels; exact for sequential and residual stacks)."""
    r = 0
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride != (1, 1):
                raise ValueError(f"conv_radius needs stride-1 convolutions, got {m}")
            r += max(
                m.dilation[0] * (m.kernel_size[0] - 1) // 2,
                m.dilation[1] * (m.kernel_size[1] - 1) // 2,
            )
    return r


def pixel_shuffle_eq4(x: Tensor, r: int = 2) -> Tensor:
    """Pixel shuffle with the channel order of the paper's Eq. (4).

    ``PS(F)[x, y, c] = F[x // r, y // r, C*r*(y mod r) + C*(x mod r) + c]``: the output
    channel ``c`` varies fastest in the input channel index, whereas ``nn.PixelShuffle``
    lets it vary slowest. The channels are regrouped, then torch's kernel does the rest.

    Args:
        x: tensor of shape ``(N, C*r*r, H, W)``.
        r: the upscaling factor.

    Returns:
        Tensor of shape ``(N, C, r*H, r*W)``.
    """
    n, cr2, h, w = x.shape
    c = cr2 // (r * r)
    # input channel index = (j*r + i)*C + c with i = x mod r (rows), j = y mod r (columns)
    x = x.view(n, r, r, c, h, w).permute(0, 3, 2, 1, 4, 5)
    return F.pixel_shuffle(x.reshape(n, cr2, h, w), r)


class SubPixelUpsample(nn.Module):
    """Sub-pixel convolution (Shi et al.): a 3x3 conv to ``r*r*out`` channels, then Eq. (4)."""

    def __init__(self, in_channels: int, out_channels: int, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(in_channels, out_channels * scale * scale, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return pixel_shuffle_eq4(self.conv(x), self.scale)


class ResidualBlock(nn.Module):
    """EDSR-style residual block: conv3x3, activation, conv3x3, identity shortcut."""

    def __init__(self, channels: int, negative_slope: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = (
            nn.LeakyReLU(negative_slope, inplace=True)
            if negative_slope > 0
            else nn.ReLU(inplace=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


def _extractor(
    in_channels: int, width: int, num_blocks: int, negative_slope: float
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
    layers += [ResidualBlock(width, negative_slope) for _ in range(num_blocks)]
    return nn.Sequential(*layers)


def crop_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Crop the bottom/right of ``x`` to ``size``; a 2x up-sampled map of an odd-sized
    input is one cell larger than the finer level it must meet."""
    return x[..., : size[0], : size[1]]


def _weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Conv2d))


class SRModule(nn.Module):
    """Base of the modules that make P'3: ``texture(P2, crop(content(P3)))``.

    Subclasses define :meth:`content` and, when they read P2, :meth:`texture` with the
    receptive-field radii of both parts.
    """

    content_radius = 0
    texture_radius = 0

    def content(self, p3: Tensor) -> Tensor:
        raise NotImplementedError

    def texture(self, p2: Tensor, content: Tensor) -> Tensor:
        return content

    def cell_costs(self) -> tuple[int, int]:
        """Multiply-adds per input cell of :meth:`content` (stride 8) and of
        :meth:`texture` (stride 4), for weighing where to compute them."""
        return _weights(self), 0

    def forward(self, p2: Tensor, p3: Tensor) -> Tensor:
        return self.texture(p2, crop_to(self.content(p3), p2.shape[-2:]))


class FeatureTextureTransfer(SRModule):
    """FTT, Eq. (3): ``P'3 = Et(P2 || up2(Ec(P3))) + up2(Ec(P3))``.

    Args:
        channels: channels of the pyramid maps (input and output).
        width: inner width of both extractors (the authors' code uses 512; default =
            ``channels``). Lower widths trade accuracy for speed.
        content_blocks: residual blocks in the content extractor Ec.
        texture_blocks: residual blocks in the texture extractor Et.
        negative_slope: 0 for ReLU, 0.1 for the authors' LeakyReLU.
    """

    def __init__(
        self,
        channels: int = 256,
        width: int | None = None,
        content_blocks: int = 2,
        texture_blocks: int = 2,
        negative_slope: float = 0.0,
    ) -> None:
        super().__init__()
        width = width or channels
        self.content_extractor = _extractor(channels, width, content_blocks, negative_slope)
        self.upsample = SubPixelUpsample(width, channels, 2)
        self.texture_extractor = _extractor(2 * channels, width, texture_blocks, negative_slope)
        self.texture_out = nn.Conv2d(width, channels, 3, padding=1)

    @property
    def content_radius(self) -> int:
        return conv_radius(self.content_extractor) + conv_radius(self.upsample)

    @property
    def texture_radius(self) -> int:
        return conv_radius(self.texture_extractor) + conv_radius(self.texture_out)

    def cell_costs(self) -> tuple[int, int]:
        return (
            _weights(self.content_extractor) + _weights(self.upsample),
            _weights(self.texture_extractor) + _weights(self.texture_out),
        )

    def content(self, p3: Tensor) -> Tensor:
        """``up2(Ec(P3))``, stride 4."""
        return self.upsample(self.content_extractor(p3))

    def texture(self, p2: Tensor, content: Tensor) -> Tensor:
        """``Et(P2 || content) + content``."""
        return self.texture_out(self.texture_extractor(torch.cat([p2, content], dim=1))) + content


class ESPCN(SRModule):
    """Three-layer single-image SR on P3 alone (Shi et al. 2016), the SISR row of Table II."""

    def __init__(self, channels: int = 256, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2),
            nn.Tanh(),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.Tanh(),
        )
        self.upsample = SubPixelUpsample(width // 2, channels, 2)

    @property
    def content_radius(self) -> int:
        return conv_radius(self.body) + conv_radius(self.upsample)

    def content(self, p3: Tensor) -> Tensor:
        return self.upsample(self.body(p3))


class NearestUpsample(SRModule):
    """No SR: ``P'3 = nearest_up2(P3)`` ("EFPN w/o FTT" in Table III)."""

    def content(self, p3: Tensor) -> Tensor:
        return F.interpolate(p3, scale_factor=2.0, mode="nearest")


def build_sr_module(name: str, channels: int, **kwargs) -> nn.Module:
    """Build the SR module of the extension by name: ``ftt``, ``espcn`` or ``nearest``."""
    if name == "ftt":
        return FeatureTextureTransfer(channels, **kwargs)
    if name == "espcn":
        return ESPCN(channels, **{k: v for k, v in kwargs.items() if k == "width" and v})
    if name == "nearest":
        return NearestUpsample()
    raise ValueError(f"unknown sr_module {name!r}; expected 'ftt', 'espcn' or 'nearest'")
