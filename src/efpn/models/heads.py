"""RoI heads that route small RoIs to the extended level P'2 and their own box head."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import roi_align

__all__ = ["MERGES", "EFPNRoIHeads", "ohem_select", "roi_level", "small_roi_mask"]


def roi_level(
    boxes: Tensor,
    canonical_scale: int = 224,
    canonical_level: int = 4,
    k_min: int = 1,
    k_max: int = 5,
) -> Tensor:
    """Eq. (2): ``floor(l0 + log2(sqrt(wh) / 224))`` clamped to ``[k_min, k_max]``.

    torchvision's LevelMapper uses the same rule with ``k_min = 2``; EFPN extends it to
    level 1 (P'2). Returned levels are absolute (1 = P'2, 2 = P2, ...).
    """
    scale = torch.sqrt(
        (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    )
    level = torch.floor(canonical_level + torch.log2(scale / canonical_scale + 1e-6))
    return level.clamp(k_min, k_max).to(torch.int64)


def small_roi_mask(boxes: Tensor, small_roi_size: float) -> Tensor:
    """RoIs pooled from P'2: ``sqrt(wh) < small_roi_size`` (56 px gives level 1 of Eq. 2)."""
    wh = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return wh < small_roi_size * small_roi_size


def ohem_select(
    cls_loss: Tensor, box_loss: Tensor, labels: Tensor, batch_size: int, positive_fraction: float
) -> Tensor:
    """Online hard example mining as in the authors' code.

    Up to ``positive_fraction * batch_size`` positives ranked by classification + box
    loss, then negatives ranked by classification loss to fill the batch. Ignored RoIs
    (label -1) are never chosen. No NMS among the selected RoIs.

    Returns:
        Indices of the selected RoIs.
    """
    pos = torch.where(labels > 0)[0]
    neg = torch.where(labels == 0)[0]
    num_pos = min(int(batch_size * positive_fraction), pos.numel())
    num_neg = min(batch_size - num_pos, neg.numel())
    pos_order = torch.argsort(cls_loss[pos] + box_loss[pos], descending=True, stable=True)
    neg_order = torch.argsort(cls_loss[neg], descending=True, stable=True)
    return torch.cat([pos[pos_order[:num_pos]], neg[neg_order[:num_neg]]])


#: how detections of small RoIs are merged at inference
MERGES = ("exclusive", "duplicate", "gated", "fused")


class EFPNRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with a second box head for small RoIs on ``"p2x"``.

    RoIs with ``sqrt(wh) < small_roi_size`` (measured on the resized input) are pooled
    from P'2 with ``roi_align(aligned=True)`` and classified by ``small_box_head`` /
    ``small_box_predictor``; the rest go through the original pooler and head on P2..P5.
    Without a ``"p2x"`` feature map, or with ``extended=False``, it is torchvision's
    ``RoIHeads``.

    Args:
        small_box_head, small_box_predictor: the head for P'2 (usually copies of the
            original, see :meth:`init_small_head_from_original`).
        small_roi_size: routing threshold in pixels (56 for TT100K at 1400, 112 for COCO).
        merge: ``"exclusive"`` (paper: small RoIs only through the new head),
            ``"duplicate"`` (authors' COCO code: small RoIs through both heads, union to
            NMS) or ``"gated"`` (small RoIs through both heads; the P'2 head's
            detections are kept where the detected box is small, the original head's
            where it is not, so an object just above the routing size whose proposal is
            just below it is still judged by the head trained on its size) or
            ``"fused"`` (small RoIs through both heads; per small RoI and class, the mean
            of both heads' probabilities and box deltas where that box is small, the
            original head's detection where it is not: the small objects' scores stay on
            the scale of the original head's and rank with them).
        ohem: train the small head with OHEM on all small RoIs instead of the sampler.
        ohem_batch_size_per_image, ohem_positive_fraction: OHEM's batch.
        sampling_ratio: roi_align sampling ratio for P'2.
        **kwargs: ``RoIHeads`` arguments.
    """

    def __init__(
        self,
        *args,
        small_box_head: nn.Module | None = None,
        small_box_predictor: nn.Module | None = None,
        small_roi_size: float = 56.0,
        merge: str = "exclusive",
        ohem: bool = False,
        ohem_batch_size_per_image: int = 128,
        ohem_positive_fraction: float = 0.25,
        sampling_ratio: int = 2,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        self.small_box_head = small_box_head
        self.small_box_predictor = small_box_predictor
        self.small_roi_size = float(small_roi_size)
        self.merge = merge
        self.ohem = ohem
        self.ohem_batch_size_per_image = ohem_batch_size_per_image
        self.ohem_positive_fraction = ohem_positive_fraction
        self.sampling_ratio = sampling_ratio
        self.output_size = self.box_roi_pool.output_size
        #: train the original head on every sampled RoI, small ones included (joint
        #: training with a merge that scores small RoIs through both heads)
        self.original_on_small = False

    @property
    def extended(self) -> bool:
        return self.small_box_head is not None

    def init_small_head_from_original(self) -> None:
        """Copy the original head's weights into the small-object head (stage 3 init)."""
        self.small_box_head.load_state_dict(self.box_head.state_dict())
        self.small_box_predictor.load_state_dict(self.box_predictor.state_dict())

    @staticmethod
    def make_small_head(
        box_head: nn.Module, box_predictor: nn.Module
    ) -> tuple[nn.Module, nn.Module]:
        """Fresh copies of the original head and predictor, same shapes and initial weights."""
        return copy.deepcopy(box_head), copy.deepcopy(box_predictor)

    # ---------------------------------------------------------------- pooling
    def pool_small(
        self, p2x: Tensor, boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        """roi_align on P'2 with ``aligned=True``; the scale comes from the map and the
        padded batch size and must be exactly 1/2."""
        scale = p2x.shape[-2] / self._padded_height(image_shapes, p2x)
        return roi_align(
            p2x,
            boxes,
            output_size=self.output_size,
            spatial_scale=scale,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
        )

    def _padded_height(self, image_shapes: list[tuple[int, int]], p2x: Tensor) -> float:
        # P'2 has stride 2 by construction; a rounded log2 of the size ratio (what
        # MultiScaleRoIAlign infers) is wrong for some small padded inputs.
        max_h = max(h for h, _ in image_shapes)
        if p2x.shape[-2] * 2 < max_h:
            raise ValueError(
                f"'p2x' of {tuple(p2x.shape[-2:])} does not cover images up to {max_h} px high at stride 2"
            )
        return float(p2x.shape[-2] * 2)

    def small_predict(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes
    ) -> tuple[Tensor, Tensor]:
        x = self.small_box_head(self.pool_small(features["p2x"], boxes, image_shapes))
        return self.small_box_predictor(x)

    def original_predict(
        self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes
    ) -> tuple[Tensor, Tensor]:
        x = self.box_head(self.box_roi_pool(features, boxes, image_shapes))
        return self.box_predictor(x)

    # ---------------------------------------------------------------- forward
    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.extended or "p2x" not in features:
            return super().forward(features, proposals, image_shapes, targets)
        if self.training:
            return [], self._training_losses(features, proposals, image_shapes, targets)
        return self._inference(features, proposals, image_shapes), {}

    def _gate(
        self,
        logits: Tensor,
        deltas: Tensor,
        boxes: list[Tensor],
        source: Tensor,
        partner: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Logits whose softmax drops, per class, the detections a head is not for.

        ``source`` per RoI: 1 = a small RoI through the P'2 head (kept where the decoded
        box is small), 2 = a small RoI through the original head (kept where it is not),
        0 = a large RoI (kept). With ``partner`` (for each row, the row of the same RoI
        through the original head; itself for the others), the P'2 head's rows take
        the mean of both heads' probabilities and box deltas first, and that fused box
        decides for both rows of its RoI, so exactly one of them stays. The dropped
        probability goes to the background, so the other classes' scores are unchanged
        and ``postprocess_detections`` does the rest. Returns ``(logits, deltas)``.
        """
        probs = F.softmax(logits, -1)
        p2_rows = (source == 1)[:, None]
        if partner is not None:
            # where, not index assignment: the exported graph keeps the rows dynamic
            probs = torch.where(p2_rows, 0.5 * (probs + probs[partner]), probs)
            deltas = torch.where(p2_rows, 0.5 * (deltas + deltas[partner]), deltas)
        decoded = self.box_coder.decode(deltas, boxes)  # (N, C, 4)
        wh = (decoded[..., 2:] - decoded[..., :2]).clamp(min=0)
        small_box = wh[..., 0] * wh[..., 1] < self.small_roi_size**2
        if partner is not None:
            # the fused box decides for both rows of its RoI: exactly one of them stays
            fused_rows = torch.nonzero(source == 1).flatten()
            small_box = small_box.index_copy(0, partner[fused_rows], small_box[fused_rows])
        drop = (p2_rows & ~small_box) | ((source == 2)[:, None] & small_box)
        drop[:, 0] = False
        removed = probs * drop
        probs = probs - removed
        probs[:, 0] = probs[:, 0] + removed.sum(1)
        return torch.log(probs.clamp(min=1e-30)), deltas

    def _training_losses(self, features, proposals, image_shapes, targets) -> dict[str, Tensor]:
        if self.ohem:
            # OHEM replaces the sampler for the small head, so label every small RoI first.
            ohem_boxes, ohem_labels, ohem_targets = self._label_all_small(proposals, targets)
        sampled, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        small = [small_roi_mask(b, self.small_roi_size) for b in sampled]

        def part(items: list[Tensor], want_small: bool) -> list[Tensor]:
            return [x[m] if want_small else x[~m] for x, m in zip(items, small, strict=False)]

        losses: dict[str, Tensor] = {}
        if self.original_on_small:  # it scores small RoIs at inference too
            rois, roi_labels, roi_targets = sampled, labels, regression_targets
        else:
            rois, roi_labels = part(sampled, False), part(labels, False)
            roi_targets = part(regression_targets, False)
        logits, deltas = self.original_predict(features, rois, image_shapes)
        losses["loss_classifier"], losses["loss_box_reg"] = _branch_loss(
            logits, deltas, roi_labels, roi_targets
        )
        if not self.ohem:
            logits, deltas = self.small_predict(features, part(sampled, True), image_shapes)
            losses["loss_classifier_small"], losses["loss_box_reg_small"] = _branch_loss(
                logits, deltas, part(labels, True), part(regression_targets, True)
            )
            return losses

        # OHEM's read-only pass (Shrivastava et al. 2016): rank every small RoI without
        # autograd, then forward and backward only the selected ones. The loss and its
        # gradient are those of one pass over all RoIs (the others get zero gradient),
        # without a roi_align backward over thousands of RoIs on the stride-2 map.
        with torch.no_grad():
            logits, deltas = self.small_predict(features, ohem_boxes, image_shapes)
            cls_loss, box_loss = _per_roi_losses(
                logits, deltas, torch.cat(ohem_labels), torch.cat(ohem_targets)
            )
        counts = [lab.numel() for lab in ohem_labels]
        keep_boxes, keep_labels, keep_targets = [], [], []
        for boxes, lab, tgt, cls, box in zip(
            ohem_boxes,
            ohem_labels,
            ohem_targets,
            cls_loss.split(counts),
            box_loss.split(counts),
            strict=True,
        ):
            sel = ohem_select(
                cls, box, lab, self.ohem_batch_size_per_image, self.ohem_positive_fraction
            )
            keep_boxes.append(boxes[sel])
            keep_labels.append(lab[sel])
            keep_targets.append(tgt[sel])
        logits, deltas = self.small_predict(features, keep_boxes, image_shapes)
        cls_loss, box_loss = _per_roi_losses(
            logits, deltas, torch.cat(keep_labels), torch.cat(keep_targets)
        )
        denom = max(cls_loss.numel(), 1)
        losses["loss_classifier_small"] = cls_loss.sum() / denom
        losses["loss_box_reg_small"] = box_loss.sum() / denom
        return losses

    def _label_all_small(self, proposals, targets):
        """Every small proposal (ground truth added), labelled as the sampler labels
        them but not sampled; ignored RoIs keep label -1."""
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        props = self.add_gt_proposals(proposals, gt_boxes)
        props = [p[small_roi_mask(p, self.small_roi_size)] for p in props]
        labels, matched = [], []
        for p, g, t in zip(props, gt_boxes, targets, strict=False):
            if p.numel() == 0:  # no small RoI in this image (its objects are all large)
                labels.append(torch.zeros(0, dtype=torch.int64, device=p.device))
                matched.append(p)
                continue
            idx, lab = self.assign_targets_to_proposals([p], [g], [t["labels"]])
            labels.append(lab[0])
            # an image without objects has only negatives; their box target is unused
            matched.append(g[idx[0]] if g.numel() else p)
        return props, labels, self.box_coder.encode(matched, props)

    def _inference(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        small = [small_roi_mask(b, self.small_roi_size) for b in proposals]
        small_boxes = [b[m] for b, m in zip(proposals, small, strict=False)]
        if self.merge == "exclusive":
            large_boxes = [b[~m] for b, m in zip(proposals, small, strict=False)]
        else:
            large_boxes = proposals
        lg_logits, lg_deltas = self.original_predict(features, large_boxes, image_shapes)
        sm_logits, sm_deltas = self.small_predict(features, small_boxes, image_shapes)
        # Interleave per image so one postprocess (softmax, decode, per-class NMS) merges both.
        boxes_all, logits_all, deltas_all = [], [], []
        lg_split = [b.shape[0] for b in large_boxes]
        sm_split = [b.shape[0] for b in small_boxes]
        for lb, sb, ll, sl, ld, sd in zip(
            large_boxes,
            small_boxes,
            lg_logits.split(lg_split),
            sm_logits.split(sm_split),
            lg_deltas.split(lg_split),
            sm_deltas.split(sm_split),
            strict=False,
        ):
            boxes_all.append(torch.cat([lb, sb]))
            logits_all.append(torch.cat([ll, sl]))
            deltas_all.append(torch.cat([ld, sd]))
        logits = torch.cat(logits_all)
        deltas = torch.cat(deltas_all)
        if self.merge in ("gated", "fused"):
            # which head each RoI went through, and whether its RoI was small
            # (ones_like, not ones(count): an exported graph keeps the count dynamic)
            source = [
                torch.cat([torch.where(m, 2, 0), torch.ones_like(sb[:, 0], dtype=torch.long)])
                for m, sb in zip(small, small_boxes, strict=False)
            ]
            partner = None
            if self.merge == "fused":
                # per merged row: the same RoI's row through the original head (each
                # image's rows are its proposals, then its small RoIs again)
                rows, offset = [], 0
                for lb, sb, m in zip(large_boxes, small_boxes, small, strict=False):
                    own = torch.arange(lb.shape[0], device=lb.device) + offset
                    rows += [own, torch.nonzero(m).flatten() + offset]
                    offset = offset + lb.shape[0] + sb.shape[0]
                partner = torch.cat(rows)
            logits, deltas = self._gate(logits, deltas, boxes_all, torch.cat(source), partner)
        boxes, scores, labels = self.postprocess_detections(logits, deltas, boxes_all, image_shapes)
        return [
            {"boxes": b, "labels": lab, "scores": s}
            for b, s, lab in zip(boxes, scores, labels, strict=False)
        ]


def _branch_loss(
    logits: Tensor, deltas: Tensor, labels: list[Tensor], targets: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """torchvision's Fast R-CNN loss, or zero (kept in the graph) when the branch got no RoI."""
    if logits.shape[0] == 0:
        zero = logits.sum() * 0.0 + deltas.sum() * 0.0
        return zero, zero
    return fastrcnn_loss(logits, deltas, labels, targets)


def _per_roi_losses(
    logits: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-RoI classification and smooth-L1 box losses (reduction='none'); ignored RoIs
    (label -1) get zero loss."""
    valid = labels >= 0
    cls = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * valid
    n = logits.shape[0]
    deltas = deltas.reshape(n, logits.shape[1], 4)
    pos = labels > 0
    idx = torch.arange(n, device=logits.device)
    picked = deltas[idx, labels.clamp(min=0)]
    targets = torch.where(pos[:, None], targets, torch.zeros_like(targets))
    box = F.smooth_l1_loss(picked, targets, beta=1 / 9, reduction="none").sum(dim=1)
    # where, not a product: a negative's target may be non-finite, and inf * 0 is NaN
    box = torch.where(pos, box, torch.zeros_like(box))
    return cls, box
