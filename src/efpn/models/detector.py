"""The EFPN Faster R-CNN detector and its torchvision-style builders."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from ..config import P2X_MODES
from .backbone import EFPNBackbone, resnet_efpn_backbone
from .heads import EFPNRoIHeads, small_roi_mask
from .sparse import plan_windows, roi_cells
from .transform import install_transform

__all__ = [
    "EFPNFasterRCNN",
    "NEW_MODULE_PREFIXES",
    "efpn_resnet18_fpn",
    "efpn_resnet50_fpn",
    "efpn_resnext101_32x8d_fpn",
    "efpn_fpn",
    "load_baseline_state_dict",
    "new_module_keys",
]

# Modules EFPN adds on top of Faster R-CNN + FPN; everything else loads from a baseline.
NEW_MODULE_PREFIXES = (
    "backbone.extension.",
    "roi_heads.small_box_head.",
    "roi_heads.small_box_predictor.",
)


class EFPNFasterRCNN(FasterRCNN):
    """Faster R-CNN on an extended feature pyramid (Deng et al., TMM 2021).

    A torchvision :class:`~torchvision.models.detection.FasterRCNN` whose backbone
    returns ``"p2x"`` (stride 2) before P2..P6 and whose RoI heads route small RoIs to
    P'2 and a second box head. With a backbone built with ``extended=False`` it is the
    plain Faster R-CNN + FPN baseline and behaves exactly like torchvision's.

    Args:
        backbone: an :class:`EFPNBackbone`.
        num_classes: classes including background.
        small_roi_size: RoIs with ``sqrt(wh)`` below this (on the resized input) go to P'2.
        merge: ``"exclusive"`` or ``"duplicate"``, see :class:`EFPNRoIHeads`.
        rpn_on_p2x: also run the RPN on P'2, with ``p2x_anchor_size`` anchors.
        ohem, ohem_batch_size_per_image, ohem_positive_fraction: OHEM for the small head.
        representation_size: width of the two-MLP box heads (torchvision: 1024).
        p2x_mode: how P'2 is computed at inference, always with the same detections:
            ``"sparse"`` only where the small RoIs read it (the least work; on the CPU
            the fastest), ``"banded"`` the whole map band by band (a lower memory peak
            at about the dense speed on a GPU, where the sparse pieces' many small
            kernels cost more than they save), ``"dense"`` the whole map in one pass,
            ``"auto"`` sparse on the CPU and banded elsewhere. Training and
            ``rpn_on_p2x`` always use the dense map.
        sparse_max_coverage: sparse mode computes FTT on the whole map when the windows
            around the RoIs, with their receptive-field halo, would cover more than this
            fraction of it.
        p2x_band_rows: height of the bands, in stride-2 rows; ``None`` picks 32 on the
            CPU and 128 elsewhere, ``0`` computes each window in one pass.
        resize_scale: resize every image by this factor (at the test size ``min_size``;
            see :class:`~efpn.models.transform.ScaleTransform`) instead of to a shorter
            side of ``min_size``: one ground sample distance for aerial imagery.
        **kwargs: torchvision ``FasterRCNN`` arguments (min_size, max_size, box_*, rpn_*...).
    """

    def __init__(
        self,
        backbone: EFPNBackbone,
        num_classes: int | None = None,
        *,
        small_roi_size: float = 56.0,
        merge: str = "exclusive",
        rpn_on_p2x: bool = False,
        p2x_anchor_size: int = 16,
        anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        ohem: bool = False,
        ohem_batch_size_per_image: int = 128,
        ohem_positive_fraction: float = 0.25,
        representation_size: int = 1024,
        p2x_mode: str = "auto",
        sparse_max_coverage: float = 0.5,
        p2x_band_rows: int | None = None,
        resize_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        if p2x_mode not in P2X_MODES:
            raise ValueError(f"p2x_mode must be one of {P2X_MODES}, got {p2x_mode!r}")
        extended = backbone.extension is not None
        if representation_size != 1024 and "box_head" not in kwargs:
            # torchvision builds the 1024-wide TwoMLPHead only when it is given no head.
            resolution = 7
            kwargs["box_head"] = TwoMLPHead(
                backbone.out_channels * resolution**2, representation_size
            )
            kwargs["box_predictor"] = FastRCNNPredictor(representation_size, num_classes)
            num_classes = None
        self.rpn_on_p2x = rpn_on_p2x and extended
        if "rpn_anchor_generator" not in kwargs:
            sizes = ((p2x_anchor_size,),) if self.rpn_on_p2x else ()
            sizes += tuple((s,) for s in anchor_sizes)
            kwargs["rpn_anchor_generator"] = AnchorGenerator(
                sizes, (tuple(aspect_ratios),) * len(sizes)
            )
        super().__init__(backbone, num_classes, **kwargs)
        install_transform(self, resize_scale, self.transform.min_size[-1])
        self.p2x_mode = p2x_mode
        self.sparse_max_coverage = sparse_max_coverage
        self.p2x_band_rows = p2x_band_rows
        #: fraction of the stride-2 map whose P'2 the last forward computed, per image
        self.last_p2x_coverage: list[float] = []
        rh = self.roi_heads
        small_head = (
            EFPNRoIHeads.make_small_head(rh.box_head, rh.box_predictor)
            if extended
            else (None, None)
        )
        self.roi_heads = EFPNRoIHeads(
            rh.box_roi_pool,
            rh.box_head,
            rh.box_predictor,
            rh.proposal_matcher.high_threshold,
            rh.proposal_matcher.low_threshold,
            rh.fg_bg_sampler.batch_size_per_image,
            rh.fg_bg_sampler.positive_fraction,
            rh.box_coder.weights,
            rh.score_thresh,
            rh.nms_thresh,
            rh.detections_per_img,
            small_box_head=small_head[0],
            small_box_predictor=small_head[1],
            small_roi_size=small_roi_size,
            merge=merge,
            ohem=ohem,
            ohem_batch_size_per_image=ohem_batch_size_per_image,
            ohem_positive_fraction=ohem_positive_fraction,
        )

    @property
    def extended(self) -> bool:
        return self.backbone.extension is not None

    def rpn_features(self, features: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        """The maps the RPN sees: P2..P6, plus P'2 first when ``rpn_on_p2x``."""
        return OrderedDict((k, v) for k, v in features.items() if k != "p2x" or self.rpn_on_p2x)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """As torchvision's ``GeneralizedRCNN.forward``: losses in training, detections
        in eval mode."""
        if self.training and targets is None:
            raise ValueError("targets should not be None in training mode")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        images, targets = self.transform(images, targets)
        if targets is not None:
            for i, t in enumerate(targets):
                bad = t["boxes"][:, 2:] <= t["boxes"][:, :2]
                if bad.any():
                    box = t["boxes"][bad.any(dim=1)][0].tolist()
                    raise ValueError(
                        f"target {i} has a box with non-positive width or height: {box}"
                    )
        mode, band_rows = self.p2x_plan(images.tensors.device)
        if self.training or mode == "dense" or self.rpn_on_p2x or not self.extended:
            features = self.backbone(images.tensors)
            proposals, proposal_losses = self.rpn(images, self.rpn_features(features), targets)
            self.last_p2x_coverage = [1.0] * len(images.image_sizes) if self.extended else []
        else:
            features, proposals, proposal_losses = self._pieced_features(
                images, targets, mode, band_rows
            )
        detections, detector_losses = self.roi_heads(
            features, proposals, images.image_sizes, targets
        )
        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)

    def p2x_plan(self, device: torch.device) -> tuple[str, int | None]:
        """The P'2 mode and band height (``None``: one pass) used for images on
        ``device``."""
        mode = self.p2x_mode
        if mode == "auto":
            mode = "sparse" if device.type == "cpu" else "banded"
        rows = self.p2x_band_rows
        if rows is None:
            rows = 32 if device.type == "cpu" else 128
        return mode, rows or None

    def _pieced_features(self, images, targets, mode, band_rows):
        """The pyramid, the RPN on it, then P'2 in bands (``"banded"``) or only where the
        small proposals read it (``"sparse"``)."""
        pyramid, stem, inners = self.backbone.forward_pyramid(images.tensors)
        proposals, proposal_losses = self.rpn(images, pyramid, targets)
        size = tuple(stem.shape[-2:])
        if mode == "banded":
            windows, reads = [[(0, size[0], 0, size[1])] for _ in proposals], None
        else:
            small = [p[small_roi_mask(p, self.roi_heads.small_roi_size)] for p in proposals]
            halo = self.backbone.p2x_halo
            windows = [
                plan_windows(b, size, halo=halo, max_coverage=self.sparse_max_coverage)
                for b in small
            ]
            reads = [roi_cells(b, size) for b in small]
        p2x = self.backbone.forward_p2x_windows(
            pyramid, stem, inners, windows, band_rows=band_rows, reads=reads
        )
        self.last_p2x_coverage = list(self.backbone.last_computed)
        features = OrderedDict([("p2x", p2x)])
        features.update(pyramid)
        return features, proposals, proposal_losses


def new_module_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the modules EFPN adds to Faster R-CNN + FPN."""
    return {k for k in model.state_dict() if k.startswith(NEW_MODULE_PREFIXES)}


def load_baseline_state_dict(
    model: EFPNFasterRCNN, state_dict: dict[str, Tensor], source: str = "state dict"
) -> None:
    """Load a Faster R-CNN + FPN (stage-1 or torchvision) state dict into an EFPN model.

    Strict except the new modules: the keys missing from ``state_dict`` must be exactly
    the EFPN additions, and nothing may be left over. The small-object head then starts
    as a copy of the original head.

    Raises:
        ValueError: naming the source when the keys do not match.
    """
    # A baseline trained with batchnorm carries counters that frozen BN has no use for.
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    expected = new_module_keys(model)
    if set(missing) != expected or unexpected:
        extra_missing = sorted(set(missing) - expected)[:5]
        not_loaded_new = sorted(expected - set(missing))[:5]
        raise ValueError(
            f"{source}: not a baseline of this model (missing {extra_missing}, "
            f"unexpected {sorted(unexpected)[:5]}, new modules present {not_loaded_new})"
        )
    if model.extended:
        model.roi_heads.init_small_head_from_original()


def efpn_fpn(
    backbone_name: str = "resnet50",
    *,
    num_classes: int = 91,
    extended: bool = True,
    sr_module: str = "ftt",
    sr_kwargs: dict[str, Any] | None = None,
    ftt_input: str = "output",
    ext_out_width: int | None = None,
    out_channels: int = 256,
    small_roi_size: float = 56.0,
    weights_backbone: Any = None,
    trainable_backbone_layers: int = 3,
    norm_layer: str = "frozen",
    **kwargs: Any,
) -> EFPNFasterRCNN:
    """Build an EFPN (or, with ``extended=False``, FPN) Faster R-CNN on any backbone of
    :data:`~efpn.models.backbone.BACKBONES`.

    Args:
        backbone_name: torchvision ResNet/ResNeXt name.
        num_classes: classes including background.
        extended: add P'2, FTT and the small-object head.
        sr_module: ``"ftt"``, ``"espcn"`` or ``"nearest"``.
        sr_kwargs: FTT options (``width``, ``content_blocks``, ``texture_blocks``,
            ``negative_slope``).
        ftt_input: ``"output"`` (paper) or ``"inner"`` (authors' code).
        ext_out_width: hidden width of a cheaper P'2 output conv (``None``: paper).
        out_channels: pyramid channels (256 in the paper; fewer for CPU-sized models).
        small_roi_size: P'2 routing threshold in pixels.
        weights_backbone: ``None``, a torchvision weights enum (downloaded by torchvision
            only then) or a local ImageNet state-dict file.
        trainable_backbone_layers: 0..5, as torchvision.
        norm_layer: ``"frozen"`` or ``"batchnorm"`` (baseline only), see
            :func:`~efpn.models.backbone.resnet_efpn_backbone`.
        **kwargs: :class:`EFPNFasterRCNN` and torchvision ``FasterRCNN`` arguments.
    """
    backbone = resnet_efpn_backbone(
        backbone_name,
        weights=weights_backbone,
        trainable_layers=trainable_backbone_layers,
        extended=extended,
        sr_module=sr_module,
        sr_kwargs=sr_kwargs,
        ftt_input=ftt_input,
        ext_out_width=ext_out_width,
        out_channels=out_channels,
        norm_layer=norm_layer,
    )
    return EFPNFasterRCNN(backbone, num_classes, small_roi_size=small_roi_size, **kwargs)


def efpn_resnet50_fpn(**kwargs: Any) -> EFPNFasterRCNN:
    """EFPN Faster R-CNN with a ResNet-50 backbone (the paper's Table VIII/IX row)."""
    return efpn_fpn("resnet50", **kwargs)


def efpn_resnext101_32x8d_fpn(**kwargs: Any) -> EFPNFasterRCNN:
    """EFPN Faster R-CNN with a ResNeXt-101 32x8d backbone (the paper's main model)."""
    return efpn_fpn("resnext101_32x8d", **kwargs)


def efpn_resnet18_fpn(**kwargs: Any) -> EFPNFasterRCNN:
    """EFPN Faster R-CNN with a ResNet-18 backbone, sized for CPU experiments."""
    return efpn_fpn("resnet18", **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, images: list[Tensor]) -> int:
    """Total FLOPs of one eval-mode forward, by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(images)
    model.train(was_training)
    return counter.get_total_flops()
