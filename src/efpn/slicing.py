"""Sliced inference for huge images: overlapping tiles, batched, merged back.

Tiny objects usually live in huge scenes (aerial and satellite images of 4000-20000 px,
4K drone video). Resizing such a scene to the detector's scale makes them vanish;
running it whole exhausts memory. :func:`predict_sliced` cuts the image into
overlapping tiles, detects them in batches (each tile goes through the model's own
transform, nothing else resizes it), maps the boxes back to the image and merges the
detections that tiles share: NMS, or NMM (non-maximum merging by intersection over the
smaller box) for objects a tile border cuts in two. Peak memory follows the batch of
tiles, not the scene: the image stays uint8 and only the tiles of one batch are float.
A :class:`efpn.data.scene.Scene` (a tiled or striped TIFF) is not even decoded whole:
each batch reads its own windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_area
from torchvision.transforms.v2 import functional as tvf
from tqdm import tqdm

from .data.scene import ArrayScene, Scene
from .data.tiles import slice_windows

__all__ = ["MERGES", "merge_detections", "nmm", "predict_sliced", "slice_windows"]

MERGES = ("nms", "nmm")


def nmm(boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float = 0.5) -> dict[str, Tensor]:
    """Greedy non-maximum merging per class.

    In score order, each box not yet merged absorbs every lower-scored box of its class
    whose intersection over the smaller of the two is at least ``threshold``; the merged
    box encloses them all and keeps the highest score. Two halves of an object cut by
    a tile border become one box.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    n = boxes.shape[0]
    if n == 0:
        return {"boxes": boxes, "scores": scores, "labels": labels}
    lt = torch.max(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = box_area(boxes)
    ios = inter / torch.min(area[:, None], area[None, :]).clamp(min=1e-9)
    match = (ios >= threshold) & (labels[:, None] == labels[None, :])
    taken = torch.zeros(n, dtype=torch.bool)
    out_boxes, keep = [], []
    for i in range(n):
        if taken[i]:
            continue
        group = match[i] & ~taken
        group[i] = True
        taken |= group
        members = boxes[group]
        out_boxes.append(torch.cat([members[:, :2].min(0).values, members[:, 2:].max(0).values]))
        keep.append(i)
    keep_t = torch.tensor(keep, dtype=torch.long)
    return {"boxes": torch.stack(out_boxes), "scores": scores[keep_t], "labels": labels[keep_t]}


def merge_detections(
    parts: Sequence[dict[str, Tensor]], merge: str = "nms", threshold: float = 0.5
) -> dict[str, Tensor]:
    """Detections of several tiles (already in image coordinates) as one set."""
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    boxes = torch.cat([p["boxes"].reshape(-1, 4) for p in parts]) if parts else torch.zeros(0, 4)
    scores = torch.cat([p["scores"] for p in parts]) if parts else torch.zeros(0)
    labels = torch.cat([p["labels"] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    if merge == "nmm":
        return nmm(boxes, scores, labels, threshold)
    keep = batched_nms(boxes, scores, labels, threshold)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def _as_chw(image) -> Tensor:
    """``(3, H, W)``: a ``(H, W, 3)`` uint8 array is viewed channels-first; a tensor
    (uint8, or float in [0, 1]) is returned as it is."""
    if isinstance(image, np.ndarray):  # as load_rgb returns
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return image


def _full_image_pass(model, chw: Tensor | Scene, as_float) -> dict[str, Tensor]:
    """The whole image once, shrunk in uint8 to the size the model's transform would
    give it (so the scene never exists as floats at full size; a windowed scene is
    first averaged down by whole blocks, band by band); boxes scaled back."""
    scene = chw if isinstance(chw, Scene) else None
    h, w = (scene.height, scene.width) if scene is not None else chw.shape[1:]
    t = model.transform
    if hasattr(t, "factor"):
        f = t.factor(h, w)
    else:
        f = min(float(t.min_size[-1]) / min(h, w), float(t.max_size) / max(h, w))
    size = (max(int(round(h * f)), 1), max(int(round(w * f)), 1))
    if f >= 1:  # the model's transform enlarges it
        small = _as_chw(scene.window(0, 0, w, h)) if scene is not None else chw
    else:
        if scene is not None:  # whole blocks averaged band by band, then as an array
            chw = _as_chw(scene.reduced(max(1, int(1 / f))))
        small = (
            chw if tuple(chw.shape[-2:]) == size else tvf.resize(chw, list(size), antialias=True)
        )
    out = model([as_float(small)])[0]
    sx, sy = w / small.shape[-1], h / small.shape[-2]
    scale = torch.tensor([sx, sy, sx, sy], dtype=out["boxes"].dtype, device=out["boxes"].device)
    return {k: (v * scale if k == "boxes" else v).cpu() for k, v in out.items()}


@torch.no_grad()
def predict_sliced(
    model: torch.nn.Module,
    image,
    slice_size: int = 1024,
    overlap: float = 0.2,
    *,
    merge: str = "nms",
    merge_threshold: float = 0.5,
    full_image: bool = False,
    batch_size: int = 4,
    device="cpu",
    progress: bool = False,
    desc: str = "tiles",
    on_batch=None,
) -> dict[str, Tensor]:
    """Detect objects in a huge image tile by tile.

    Args:
        model: a detector in eval mode (EFPN or FPN; any torchvision-style detector).
        image: ``(H, W, 3)`` uint8 array, ``(3, H, W)`` uint8 tensor, ``(3, H, W)``
            float tensor in [0, 1], or a :class:`efpn.data.scene.Scene`
            (:func:`efpn.data.scene.open_scene`). A uint8 image stays uint8: only the
            tiles of one batch are converted, so memory follows ``batch_size``, not the
            scene; a windowed scene reads only the windows of one batch.
        slice_size: tile side in image pixels; pick it near the size the model was
            trained to see (its transform still resizes each tile as it resizes any
            image).
        overlap: fraction of a tile shared with its neighbour (0.2: 20%).
        merge: ``"nms"`` or ``"nmm"`` across tiles (see :func:`merge_detections`).
        merge_threshold: IoU (NMS) or intersection over the smaller box (NMM).
        full_image: also run the whole image once (the model's transform shrinks it)
            and merge its boxes, for objects larger than a tile.
        batch_size: tiles per forward pass.
        device: where the model runs.
        progress: show a progress bar over the tiles.
        desc: the progress bar's label.
        on_batch: called as ``on_batch(tiles_done, tiles_total)`` after each batch (for
            progress lines where there is no terminal for a bar).

    Returns:
        ``{"boxes" (xyxy in image pixels), "scores", "labels"}`` on the CPU.
    """
    if isinstance(image, ArrayScene):
        image = image.array
    chw = image if isinstance(image, Scene) else _as_chw(image)
    height, width = (chw.height, chw.width) if isinstance(chw, Scene) else chw.shape[1:]

    def tile(x0: int, y0: int, x1: int, y1: int) -> Tensor:
        if isinstance(chw, Scene):
            return _as_chw(chw.window(x0, y0, x1, y1))
        return chw[:, y0:y1, x0:x1]

    windows = slice_windows(height, width, slice_size, overlap)
    if batch_size < 1:
        raise ValueError(f"batch size must be 1 or more, got {batch_size}")

    def as_float(t: Tensor) -> Tensor:
        t = t.to(device)
        return t.float().div_(255) if t.dtype == torch.uint8 else t.float()

    parts = []
    bar = tqdm(total=len(windows), desc=desc, leave=False, disable=not progress)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        tiles = [as_float(tile(*win)) for win in chunk]
        for (x0, y0, _, _), out in zip(chunk, model(tiles)):
            shift = torch.tensor(
                [x0, y0, x0, y0], dtype=out["boxes"].dtype, device=out["boxes"].device
            )
            parts.append({k: (v + shift if k == "boxes" else v).cpu() for k, v in out.items()})
        del tiles
        bar.update(len(chunk))
        if on_batch is not None:
            on_batch(start + len(chunk), len(windows))
    bar.close()
    if full_image and len(windows) > 1:
        parts.append(_full_image_pass(model, chw, as_float))
    if len(parts) == 1:
        return parts[0]
    return merge_detections(parts, merge, merge_threshold)
