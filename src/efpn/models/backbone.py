"""ResNet/ResNeXt backbone with FPN P2-P6 and the extended level P'2 (Sec. III-A, Table I)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from .ftt import build_sr_module, conv_radius, crop_to
from .sparse import read_pieces

__all__ = [
    "BACKBONES",
    "EFPNBackbone",
    "ExtendedLevel",
    "FeaturePyramidNetworkWithInner",
    "LEVEL_STRIDES",
    "resnet_efpn_backbone",
]

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext50_32x4d", "resnext101_32x8d")
LEVEL_STRIDES = OrderedDict([("p2x", 2), ("0", 4), ("1", 8), ("2", 16), ("3", 32), ("pool", 64)])


class FeaturePyramidNetworkWithInner(FeaturePyramidNetwork):
    """torchvision's FPN that can also return its inner maps (lateral + top-down, before
    the 3x3 output conv), which the authors' code feeds to FTT. Same parameters and keys."""

    def forward_with_inner(
        self, x: dict[str, Tensor]
    ) -> tuple[OrderedDict[str, Tensor], list[Tensor]]:
        names = list(x.keys())
        feats = list(x.values())
        last_inner = self.get_result_from_inner_blocks(feats[-1], -1)
        inners = [last_inner]
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.get_result_from_inner_blocks(feats[idx], idx)
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            inners.insert(0, last_inner)
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict(zip(names, results, strict=False)), inners


def _init_conv(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ExtendedLevel(nn.Module):
    """The bottom extension of EFPN: SR module, then Eq. (1) with a 3x3 output conv.

    ``P'3 = SR(P2, P3)`` and ``P'2 = conv3x3(nearest_up2(P'3) + lateral_1x1(C'2))``.

    Args:
        c2_channels: channels of C'2 (layer1 output: 256 for ResNet-50, 64 for ResNet-18).
        channels: pyramid channels.
        sr_module: ``"ftt"``, ``"espcn"`` or ``"nearest"``.
        sr_kwargs: keyword arguments of the SR module (for FTT: width, block counts).
        out_width: channels of the 3x3 output conv's hidden map; ``None`` keeps the
            single conv of the paper, a smaller value makes P'2 cheaper (1x1 down,
            3x3, 1x1 up).
    """

    def __init__(
        self,
        c2_channels: int,
        channels: int = 256,
        sr_module: str = "ftt",
        sr_kwargs: dict[str, Any] | None = None,
        out_width: int | None = None,
    ) -> None:
        super().__init__()
        self.sr = build_sr_module(sr_module, channels, **(sr_kwargs or {}))
        self.lateral = nn.Conv2d(c2_channels, channels, 1)
        if out_width is None or out_width >= channels:
            self.output = nn.Conv2d(channels, channels, 3, padding=1)
        else:
            self.output = nn.Sequential(
                nn.Conv2d(channels, out_width, 1),
                nn.Conv2d(out_width, out_width, 3, padding=1),
                nn.Conv2d(out_width, channels, 1),
            )
        _init_conv(self.lateral)
        _init_conv(self.output)

    def forward(self, c2x: Tensor, p2: Tensor, p3: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(P'2, P'3)``."""
        p3x = self.sr(p2, p3)
        lateral = self.lateral(c2x)
        top_down = crop_to(F.interpolate(p3x, scale_factor=2.0, mode="nearest"), lateral.shape[-2:])
        return self.output(lateral + top_down), p3x

    def window_tiles(
        self,
        layer1: nn.Module,
        stem: Tensor,
        p2: Tensor,
        p3: Tensor,
        window: tuple[int, int, int, int],
        band_rows: int | None = None,
        reads: Tensor | None = None,
        sr_per_piece: bool | None = None,
    ) -> Iterator[tuple[int, int, Tensor]]:
        """P'2 on one window ``(y0, y1, x0, x1)`` of its grid, in pieces: yields
        ``(row, col, tile)``, each tile equal to the same cells of the dense P'2.

        Each level is cropped with the receptive-field radius of what reads it, so the
        values that reach a tile never see a crop edge; at the map's own border the crop
        stops there and zero padding acts exactly as in the dense pass. Needs the stem,
        P2 and P3 sizes in the exact 2:1 ratios that a batch padded to a multiple of 32
        has.

        The stride-2 part (C'2, the lateral, the sum, the output conv), whose maps are
        the large ones, runs piece by piece: horizontal bands of at most ``band_rows``
        rows, and, when ``reads`` is given, in each band only the rows and column spans
        that those cells need. A piece recomputes just the few cells that ``layer1`` and
        the output conv read around it. The SR module (at strides 4 and 8) runs once for
        the whole window, or once per piece when the pieces are sparse enough that
        recomputing its wider halo costs less.

        Args:
            layer1: the backbone's ``layer1`` (C'2 = layer1(stem)).
            stem, p2, p3: ``(1, C, H, W)`` maps at strides 2, 4 and 8.
            window: rows ``y0:y1`` and columns ``x0:x1`` of the stride-2 grid.
            band_rows: rows per band (``None``: the whole window).
            reads: ``(K, 4)`` cells ``y0, y1, x0, x1`` (end exclusive) that will be read,
                e.g. :func:`~efpn.models.sparse.roi_cells` of the RoIs; cells of the
                window outside them are not computed.
            sr_per_piece: compute the SR module for each piece (with its own halo)
                instead of once for the window; ``None`` picks the one with fewer
                multiply-adds.
        """
        ro, r1 = conv_radius(self.output), conv_radius(layer1)
        rt, rc = self.sr.texture_radius, self.sr.content_radius
        (y0, y1, x0, x1), (ny, nx) = window, (_sizes(stem, p2, p3, d) for d in (-2, -1))

        def spans(lo, hi, n2, n4, n8):
            s = (max(lo - ro, 0), min(hi + ro, n2))  # the sum map the 3x3 output conv reads
            q = (s[0] // 2, (s[1] - 1) // 2 + 1)  # P'3 cells up-sampled into it
            k = (max(q[0] - rt, 0), min(q[1] + rt, n4))  # P2 and content for the texture part
            m = (max(k[0] // 2 - rc, 0), min((k[1] - 1) // 2 + 1 + rc, n8))  # P3 for content
            r = (max(s[0] - r1, 0), min(s[1] + r1, n2))  # stem for C'2
            return s, q, k, m, r

        def sr_on(ys, xs):  # P'3 on the cells a stride-2 span reads, with their spans
            _, qy, ky, my, _ = spans(*ys, *ny)
            _, qx, kx, mx, _ = spans(*xs, *nx)
            content = self.sr.content(p3[..., my[0] : my[1], mx[0] : mx[1]])
            content = content[
                ..., ky[0] - 2 * my[0] : ky[1] - 2 * my[0], kx[0] - 2 * mx[0] : kx[1] - 2 * mx[0]
            ]
            p3x = self.sr.texture(p2[..., ky[0] : ky[1], kx[0] : kx[1]], content)
            return p3x[..., qy[0] - ky[0] : qy[1] - ky[0], qx[0] - kx[0] : qx[1] - kx[0]], qy, qx

        def sr_cost(ys, xs, content, texture):
            (_, _, ky, my, _), (_, _, kx, mx, _) = spans(*ys, *ny), spans(*xs, *nx)
            return content * (my[1] - my[0]) * (mx[1] - mx[0]) + texture * (ky[1] - ky[0]) * (
                kx[1] - kx[0]
            )

        step = band_rows or (y1 - y0)
        pieces = []
        for b0 in range(y0, y1, step):
            b1 = min(b0 + step, y1)
            if reads is None:
                pieces.append(((b0, b1), (x0, x1)))
            else:  # column spans closer than the recomputed margins are merged
                pieces += read_pieces(reads, (b0, b1, x0, x1), gap=2 * (ro + r1))
        if sr_per_piece is None:  # per piece recomputes the SR halo, once per window the rest
            costs = self.sr.cell_costs()
            sr_per_piece = sum(sr_cost(*p, *costs) for p in pieces) < sr_cost(
                (y0, y1), (x0, x1), *costs
            )
        if not sr_per_piece and pieces:
            shared = sr_on((y0, y1), (x0, x1))
        for (t0, t1), (c0, c1) in pieces:
            p3x, qy, qx = sr_on((t0, t1), (c0, c1)) if sr_per_piece else shared
            sy, qb, _, _, ry = spans(t0, t1, *ny)
            sx, qc, _, _, rx = spans(c0, c1, *nx)
            top_down = F.interpolate(
                p3x[..., qb[0] - qy[0] : qb[1] - qy[0], qc[0] - qx[0] : qc[1] - qx[0]],
                scale_factor=2.0,
                mode="nearest",
            )
            top_down = top_down[
                ..., sy[0] - 2 * qb[0] : sy[1] - 2 * qb[0], sx[0] - 2 * qc[0] : sx[1] - 2 * qc[0]
            ]
            c2x = layer1(stem[..., ry[0] : ry[1], rx[0] : rx[1]])
            lateral = self.lateral(
                c2x[..., sy[0] - ry[0] : sy[1] - ry[0], sx[0] - rx[0] : sx[1] - rx[0]]
            )
            out = self.output(lateral + top_down)
            yield t0, c0, out[..., t0 - sy[0] : t1 - sy[0], c0 - sx[0] : c1 - sx[0]]


def _sizes(stem: Tensor, p2: Tensor, p3: Tensor, dim: int) -> tuple[int, int, int]:
    n2, n4, n8 = stem.shape[dim], p2.shape[dim], p3.shape[dim]
    if n2 != 2 * n4 or n4 != 2 * n8:
        raise ValueError(
            f"windowed P'2 needs maps in 4:2:1 ratio, got {n2}, {n4}, {n8}; pad the batch to a multiple of 32"
        )
    return n2, n4, n8


class EFPNBackbone(nn.Module):
    """ResNet body + FPN (P2..P6) + the extended stride-2 level P'2.

    C'2 is ``layer1`` applied a second time to the stem output before the max-pool:
    the same module, so the parameters are shared (Table I).

    The forward returns an ``OrderedDict`` in torchvision's convention, highest
    resolution first: ``"p2x"`` (stride 2, only when extended), ``"0"`` (4), ``"1"``
    (8), ``"2"`` (16), ``"3"`` (32), ``"pool"`` (64).

    Args:
        body: a torchvision ResNet/ResNeXt (its ``fc`` and ``avgpool`` are dropped).
        in_channels_list: channels of layer1..layer4.
        out_channels: pyramid channels.
        extended: build the extension; ``False`` gives the plain FPN backbone.
        sr_module, sr_kwargs, ext_out_width: see :class:`ExtendedLevel`.
        ftt_input: ``"output"`` feeds the SR module the P outputs (paper),
            ``"inner"`` the FPN inner maps (authors' code).
    """

    def __init__(
        self,
        body: nn.Module,
        in_channels_list: list[int],
        out_channels: int = 256,
        extended: bool = True,
        sr_module: str = "ftt",
        sr_kwargs: dict[str, Any] | None = None,
        ftt_input: str = "output",
        ext_out_width: int | None = None,
    ) -> None:
        super().__init__()
        if ftt_input not in ("output", "inner"):
            raise ValueError(f"ftt_input must be 'output' or 'inner', got {ftt_input!r}")
        return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        self.body = IntermediateLayerGetter(body, return_layers=return_layers)
        self.fpn = FeaturePyramidNetworkWithInner(
            in_channels_list, out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        self.extended = extended
        self.ftt_input = ftt_input
        self.extension = (
            ExtendedLevel(in_channels_list[0], out_channels, sr_module, sr_kwargs, ext_out_width)
            if extended
            else None
        )

    def stem(self, x: Tensor) -> Tensor:
        """Stage 1 (7x7 conv, BN, ReLU) at stride 2, before the max-pool."""
        return self.body.relu(self.body.bn1(self.body.conv1(x)))

    def forward_pyramid(self, x: Tensor) -> tuple[OrderedDict[str, Tensor], Tensor, list[Tensor]]:
        """Top-4 FPN levels plus "pool" (the teacher network), the stem output and the
        FPN inner maps."""
        stem = self.stem(x)
        c = self.body.maxpool(stem)
        feats = OrderedDict()
        for layer, name in (("layer1", "0"), ("layer2", "1"), ("layer3", "2"), ("layer4", "3")):
            c = getattr(self.body, layer)(c)
            feats[name] = c
        pyramid, inners = self.fpn.forward_with_inner(feats)
        return pyramid, stem, inners

    def extension_inputs(
        self, pyramid: dict[str, Tensor], inners: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """The (P2, P3) pair the SR module reads."""
        if self.ftt_input == "inner":
            return inners[0], inners[1]
        return pyramid["0"], pyramid["1"]

    def forward_all(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Like :meth:`forward`, with the SR output P'3 added under ``"p3x"`` (stride 4)."""
        pyramid, stem, inners = self.forward_pyramid(x)
        if self.extension is None:
            return pyramid
        p2, p3 = self.extension_inputs(pyramid, inners)
        p2x, p3x = self.extension(self.body.layer1(stem), p2, p3)
        out = OrderedDict([("p2x", p2x)])
        out.update(pyramid)
        out["p3x"] = p3x
        return out

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out = self.forward_all(x)
        out.pop("p3x", None)
        return out

    @property
    def p2x_halo(self) -> int:
        """How far, in stride-2 cells, the extension's work reaches around a window."""
        ext = self.extension
        return max(
            2 * (ext.sr.texture_radius + conv_radius(ext.output)),
            conv_radius(self.body.layer1) + conv_radius(ext.output),
        )

    def forward_p2x_windows(
        self,
        pyramid: dict[str, Tensor],
        stem: Tensor,
        inners: list[Tensor],
        windows: list[list[tuple[int, int, int, int]]],
        band_rows: int | None = None,
        reads: list[Tensor] | None = None,
    ) -> Tensor:
        """P'2 computed only on ``windows`` (per image, in stride-2 cells), zero elsewhere.

        Inside the windows the values equal the dense :meth:`forward`'s P'2; a window that
        spans the whole map is the dense computation. ``last_computed`` then holds, per
        image, the fraction of the stride-2 map whose P'2 was computed.

        Args:
            band_rows: when set, windows taller than this are computed as horizontal
                bands of at most ``band_rows`` rows. The values are the same; the peak
                memory holds the output and one band's intermediate maps instead of all
                of the full-size intermediates (C'2, lateral, FTT output, their sum), at
                the cost of recomputing each band's receptive-field margin.
            reads: per image, ``(K, 4)`` cells that will be read (see
                :meth:`ExtendedLevel.window_tiles`): the SR module still runs on the
                windows, the stride-2 part only where these cells need it, and P'2 equals
                the dense one on these cells only.
        """
        p2, p3 = self.extension_inputs(pyramid, inners)
        n, _, h, w = stem.shape
        if band_rows is not None and band_rows < 1:
            raise ValueError(f"band_rows must be positive, got {band_rows}")
        dense = all(ws == [(0, h, 0, w)] for ws in windows)
        if dense and (band_rows is None or band_rows >= h) and reads is None:
            self.last_computed = [1.0] * n  # one dense pass, no copy
            return self.extension(self.body.layer1(stem), p2, p3)[0]
        canvas = p2.new_zeros((n, self.out_channels, h, w))
        self.last_computed = []
        for i, image_windows in enumerate(windows):
            cells = 0
            for window in image_windows:
                for r, c, tile in self.extension.window_tiles(
                    self.body.layer1,
                    stem[i : i + 1],
                    p2[i : i + 1],
                    p3[i : i + 1],
                    window,
                    band_rows,
                    None if reads is None else reads[i],
                ):
                    th, tw = tile.shape[-2:]
                    canvas[i, :, r : r + th, c : c + tw] = tile[0]
                    cells += th * tw
            self.last_computed.append(cells / float(h * w))
        return canvas


def _load_backbone_file(body: nn.Module, path: str | Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    unexpected = [
        k for k in unexpected if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    ]
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a {type(body).__name__} state dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def resnet_efpn_backbone(
    backbone_name: str = "resnet50",
    *,
    weights: Any = None,
    trainable_layers: int = 3,
    out_channels: int = 256,
    extended: bool = True,
    sr_module: str = "ftt",
    sr_kwargs: dict[str, Any] | None = None,
    ftt_input: str = "output",
    ext_out_width: int | None = None,
    norm_layer: str = "frozen",
) -> EFPNBackbone:
    """Build an :class:`EFPNBackbone` on a torchvision ResNet/ResNeXt.

    Args:
        backbone_name: one of :data:`BACKBONES`.
        weights: ``None``, a torchvision weights enum or its name (for example
            ``"ResNet50_Weights.IMAGENET1K_V1"``; torchvision downloads it only then) or the
            path of a local ImageNet state dict.
        trainable_layers: as torchvision: 0..5 stages from layer4 down to conv1.
        norm_layer: ``"frozen"`` (FrozenBatchNorm2d, torchvision's detection default) or
            ``"batchnorm"`` (trainable BN, for training a baseline from scratch). The
            extended backbone needs frozen BN: layer1 runs twice per step, and trainable
            BN would update its statistics twice. Both share state-dict keys, so a
            batchnorm baseline loads into the extended model with its statistics frozen.
    """
    if norm_layer not in ("frozen", "batchnorm"):
        raise ValueError(f"norm_layer must be 'frozen' or 'batchnorm', got {norm_layer!r}")
    if norm_layer == "batchnorm" and extended:
        raise ValueError(
            "the extended backbone runs layer1 twice per step: use norm_layer='frozen'"
        )
    if backbone_name not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone_name!r}; choose from {', '.join(BACKBONES)}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    if isinstance(weights, str) and not Path(weights).exists() and "_Weights." in weights:
        from torchvision.models import get_weight  # a registry lookup, nothing is evaluated

        weights = get_weight(weights)
    local = isinstance(weights, (str, Path))
    body = getattr(resnet, backbone_name)(
        weights=None if local else weights,
        norm_layer=FrozenBatchNorm2d if norm_layer == "frozen" else nn.BatchNorm2d,
    )
    if local:
        _load_backbone_file(body, weights)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in body.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    c2 = body.inplanes // 8  # layer4 has 8x the channels of layer1
    in_channels_list = [c2, c2 * 2, c2 * 4, c2 * 8]
    return EFPNBackbone(
        body,
        in_channels_list,
        out_channels,
        extended=extended,
        sr_module=sr_module,
        sr_kwargs=sr_kwargs,
        ftt_input=ftt_input,
        ext_out_width=ext_out_width,
    )
