"""Cross-resolution distillation (Sec. III-C, Eq. 5-8).

The teacher is the student's own backbone and top-4 FPN (shared weights, no_grad) run
at twice the student's resolution. Teacher P3 supervises the SR output P'3 and teacher
P2 supervises P'2, each through the foreground-background-balanced loss L_fbb.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TEACHER_MODES",
    "box_mask",
    "distillation_loss",
    "fbb_loss",
    "fbb_terms",
    "freeze_all_but_new_modules",
    "pad_to_multiple",
    "source_teacher_batch",
    "teacher_student_pair",
]

TEACHER_MODES = ("upsample_teacher", "downsample_student")


def box_mask(
    boxes: Sequence[Tensor] | Tensor, size: tuple[int, int], stride: float, device=None
) -> Tensor:
    """Boolean ``(N, H, W)`` mask of the feature cells covered by ground-truth boxes.

    A box ``(x1, y1, x2, y2)`` in image pixels covers cells ``floor(x1/s) .. ceil(x2/s)-1``
    (rounded outward to whole cells), clipped to the map.
    """
    if isinstance(boxes, Tensor):
        boxes = [boxes] if boxes.dim() == 2 else list(boxes)
    h, w = size
    mask = torch.zeros((len(boxes), h, w), dtype=torch.bool, device=device)
    for i, b in enumerate(boxes):
        for x1, y1, x2, y2 in b.detach().cpu().tolist():
            c0 = max(int(math.floor(x1 / stride)), 0)
            r0 = max(int(math.floor(y1 / stride)), 0)
            c1 = min(int(math.ceil(x2 / stride)), w)
            r1 = min(int(math.ceil(y2 / stride)), h)
            if c1 > c0 and r1 > r0:
                mask[i, r0:r1, c0:c1] = True
    return mask


def fbb_terms(
    student: Tensor, target: Tensor, boxes: Sequence[Tensor] | Tensor, stride: float
) -> tuple[Tensor, Tensor]:
    """The two parts of L_fbb: ``(L_glob, L_pos)`` (Eq. 6 and 7).

    ``L_glob`` is the mean absolute difference over all elements; ``L_pos`` is the sum of
    absolute differences over the elements of in-box cells divided by their count (0 when
    no box covers any cell).
    """
    if student.shape != target.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and target {tuple(target.shape)} differ in shape"
        )
    diff = (target - student).abs()
    glob = diff.mean()
    mask = box_mask(boxes, tuple(student.shape[-2:]), stride, device=student.device)
    count = mask.sum() * student.shape[1]
    if count == 0:
        return glob, diff.sum() * 0.0
    pos = (diff * mask.unsqueeze(1)).sum() / count
    return glob, pos


def fbb_loss(
    student: Tensor,
    target: Tensor,
    boxes: Sequence[Tensor] | Tensor,
    stride: float,
    lam: float = 1.0,
) -> Tensor:
    """Foreground-background-balanced loss, Eq. (8): ``L_glob + lam * L_pos``.

    Args:
        student: generated feature map ``(N, C, H, W)``.
        target: teacher feature map of the same shape.
        boxes: ground-truth boxes per image, ``(K, 4)`` xyxy in the student's input pixels.
        stride: stride of the map relative to the student's input.
        lam: weight of the positive-patch loss (paper: 1).
    """
    glob, pos = fbb_terms(student, target, boxes, stride)
    return glob + lam * pos


def pad_to_multiple(x: Tensor, multiple: int = 64) -> Tensor:
    """Zero-pad a batch on the bottom/right so H and W are multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph = (multiple - h % multiple) % multiple
    pw = (multiple - w % multiple) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def source_teacher_batch(
    sources: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    padded_shape: Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """The teacher's input of ``"upsample_teacher"`` built from the source pixels.

    Each source image (``(3, h0, w0)``, values in [0, 1], before the detector's resize)
    is resized straight to twice the size the student saw (``2h x 2w`` for an
    ``image_sizes`` entry ``(h, w)``), normalised like the student and placed in a
    zero-padded batch twice the student's padded size. A source larger than 2S is
    downsampled (antialiased), one smaller is upsampled, as the paper's 2800-px teacher
    from TT100K's 2048-px images: the teacher sees every pixel the source holds at 2S,
    not an upsampled copy of the student's batch.

    Args:
        sources: the images as the data loader gave them.
        image_sizes: the student's per-image ``(h, w)`` after the detector's resize.
        padded_shape: the student batch's shape ``(N, C, H, W)``.
        mean, std: the detector transform's normalisation.
    """
    n, c, h, w = padded_shape
    ref = sources[0]
    out = ref.new_zeros((n, c, 2 * h, 2 * w))
    mean_t = torch.as_tensor(mean, dtype=ref.dtype, device=ref.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=ref.dtype, device=ref.device)[:, None, None]
    for i, (src, (sh, sw)) in enumerate(zip(sources, image_sizes)):
        th, tw = 2 * int(sh), 2 * int(sw)
        down = th < src.shape[-2] or tw < src.shape[-1]
        img = F.interpolate(
            src[None].float(), size=(th, tw), mode="bilinear", align_corners=False, antialias=down
        )[0]
        out[i, :, :th, :tw] = (img - mean_t) / std_t
    return out


def teacher_student_pair(
    images: Tensor,
    boxes: Sequence[Tensor],
    mode: str = "upsample_teacher",
    teacher_images: Tensor | None = None,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Inputs of teacher and student for one normalised, padded batch.

    ``"upsample_teacher"`` (paper): the student sees the batch, the teacher
    ``teacher_images`` (the source pixels at 2x, :func:`source_teacher_batch`) or, when
    not given, a bilinear 2x copy of the batch. ``"downsample_student"`` (authors' code): the teacher sees the batch (padded to
    a multiple of 64), the student a 2x2 average-pooled copy, so the teacher sees real
    detail; boxes are halved for the student.

    Returns:
        ``(teacher_input, student_input, student_boxes)``.
    """
    if mode == "upsample_teacher":
        student = pad_to_multiple(images, 32)
        if teacher_images is None:
            teacher = F.interpolate(student, scale_factor=2.0, mode="bilinear", align_corners=False)
        else:
            th, tw = teacher_images.shape[-2:]
            teacher = F.pad(
                teacher_images, (0, 2 * student.shape[-1] - tw, 0, 2 * student.shape[-2] - th)
            )
        return teacher, student, list(boxes)
    if mode == "downsample_student":
        teacher = pad_to_multiple(images, 64)
        student = F.avg_pool2d(teacher, 2)
        return teacher, student, [b / 2 for b in boxes]
    raise ValueError(f"unknown teacher mode {mode!r}; expected one of {TEACHER_MODES}")


def distillation_loss(
    backbone: nn.Module,
    images: Tensor,
    boxes: Sequence[Tensor],
    *,
    mode: str = "upsample_teacher",
    lam: float = 1.0,
    ftt_loss: bool = True,
    teacher_images: Tensor | None = None,
) -> dict[str, Tensor]:
    """Eq. (5): ``L_fbb(P'3, P3_2x) + L_fbb(P'2, P2_2x)`` for an EFPN backbone.

    Args:
        backbone: an :class:`~efpn.models.EFPNBackbone` with the extension.
        images: normalised, padded batch ``(N, 3, H, W)`` (the detector transform's output).
        boxes: ground-truth boxes per image in ``images`` pixels.
        mode: one of :data:`TEACHER_MODES`.
        lam: lambda of Eq. (8); 0 leaves only the global loss.
        ftt_loss: also supervise the SR output P'3 (Table IV, third row).
        teacher_images: the teacher's input in ``"upsample_teacher"`` mode, built from
            the source pixels (:func:`source_teacher_batch`); ``None`` upsamples ``images``.

    Returns:
        The four terms ``glob_p3``, ``pos_p3``, ``glob_p2``, ``pos_p2`` and their
        weighted sum ``loss_distill``.
    """
    teacher_in, student_in, student_boxes = teacher_student_pair(
        images, boxes, mode, teacher_images=teacher_images
    )
    with torch.no_grad():
        teacher, _, _ = backbone.forward_pyramid(teacher_in)
    student = backbone.forward_all(student_in)
    glob_p2, pos_p2 = fbb_terms(student["p2x"], teacher["0"], student_boxes, stride=2)
    terms = {"glob_p2": glob_p2, "pos_p2": pos_p2}
    glob_p3, pos_p3 = fbb_terms(student["p3x"], teacher["1"], student_boxes, stride=4)
    terms.update(glob_p3=glob_p3, pos_p3=pos_p3)
    total = glob_p2 + lam * pos_p2
    if ftt_loss:
        total = total + glob_p3 + lam * pos_p3
    return {"loss_distill": total, **terms}


def freeze_all_but_new_modules(
    model: nn.Module, trainable_prefixes: Iterable[str] = ("backbone.extension.",)
) -> list[str]:
    """Freeze every parameter except those under ``trainable_prefixes`` (the stage-2
    setting: FTT, C'2 lateral and P'2 output conv). Returns the trainable names."""
    prefixes = tuple(trainable_prefixes)
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        if p.requires_grad:
            trainable.append(name)
    return trainable
