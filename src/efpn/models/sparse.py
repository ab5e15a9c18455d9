"""Where to compute the extended level at inference: windows around the small RoIs.

P'2 feeds only ``roi_align`` for the RoIs routed to it (unless the RPN runs on it), so at
inference most of the dense stride-2 map is computed and never read. These helpers find
the cells each small RoI reads, group them into few rectangular windows (nearby RoIs
share one window, since every window pays its receptive-field halo), and fall back to
one window over the whole map when the windows would cost most of a dense pass.
:meth:`~efpn.models.backbone.EFPNBackbone.forward_p2x_windows` then computes P'2 on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["plan_windows", "read_pieces", "roi_cells", "window_coverage"]

Window = tuple[int, int, int, int]


def roi_cells(boxes: Tensor, size: tuple[int, int], margin: int = 1) -> Tensor:
    """The stride-2 cells that ``roi_align(aligned=True, spatial_scale=1/2)`` reads for
    each box, as ``(K, 4)`` rows ``y0, y1, x0, x1`` (end exclusive), clipped to ``size``.

    Sampling points lie in ``[x1/2 - 1/2, x2/2 - 1/2]`` and bilinear interpolation reads
    ``floor(x)`` and ``floor(x) + 1``, so cells ``floor(x1/2) - 1 .. floor(x2/2) + 1``;
    ``margin`` adds cells on each side.
    """
    h, w = size
    half = torch.floor(boxes.detach().to(torch.float64) / 2).to(torch.int64)
    lo = -1 - margin
    hi = 2 + margin
    cells = torch.stack([half[:, 1] + lo, half[:, 3] + hi, half[:, 0] + lo, half[:, 2] + hi], dim=1)
    cells[:, :2] = cells[:, :2].clamp(0, h)
    cells[:, 2:] = cells[:, 2:].clamp(0, w)
    return cells


def _components(mask: Tensor) -> Tensor:
    """Label the 8-connected components of a 2-D boolean mask (0 = background)."""
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * mask
    maskf = mask.view(1, 1, h, w).float()
    while True:
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * maskf
        if torch.equal(grown, labels):
            return labels[0, 0].to(torch.int64)
        labels = grown


def _overlap(a: Window, b: Window) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def _merge_overlapping(windows: list[Window]) -> list[Window]:
    windows = list(windows)
    merged = True
    while merged:
        merged = False
        for i in range(len(windows)):
            for j in range(i + 1, len(windows)):
                if _overlap(windows[i], windows[j]):
                    a, b = windows[i], windows.pop(j)
                    windows[i] = (
                        min(a[0], b[0]),
                        max(a[1], b[1]),
                        min(a[2], b[2]),
                        max(a[3], b[3]),
                    )
                    merged = True
                    break
            if merged:
                break
    return windows


def window_coverage(windows: list[Window], size: tuple[int, int], halo: int = 0) -> float:
    """Area of the windows grown by ``halo`` cells (what computing them costs, roughly),
    as a fraction of the map."""
    h, w = size
    area = sum(
        (min(y1 + halo, h) - max(y0 - halo, 0)) * (min(x1 + halo, w) - max(x0 - halo, 0))
        for y0, y1, x0, x1 in windows
    )
    return area / float(h * w)


def plan_windows(
    boxes: Tensor,
    size: tuple[int, int],
    halo: int = 16,
    tile: int = 4,
    max_coverage: float = 0.5,
) -> list[Window]:
    """Windows of the stride-2 grid that hold every cell the RoIs ``boxes`` read.

    Cells are gathered on a grid of ``tile`` x ``tile`` cells; groups of tiles closer than
    about ``2 * halo`` cells become one window (their halos would overlap anyway); the
    bounding boxes of the groups are merged until none overlap. When the windows, grown
    by ``halo``, cover more than ``max_coverage`` of the map, the answer is one window over
    the whole map (the dense computation).

    Args:
        boxes: ``(K, 4)`` RoIs in input pixels (x1, y1, x2, y2).
        size: ``(H, W)`` of the stride-2 map.
        halo: the extension's receptive-field halo in stride-2 cells.
        tile: grid step in cells.
        max_coverage: fraction of the map above which dense is cheaper.

    Returns:
        ``(y0, y1, x0, x1)`` windows, end exclusive; empty when there is no RoI.
    """
    h, w = size
    full = [(0, h, 0, w)]
    if boxes.numel() == 0:
        return []
    if max_coverage <= 0:
        return full
    cells = roi_cells(boxes, size)
    cells = cells[(cells[:, 1] > cells[:, 0]) & (cells[:, 3] > cells[:, 2])]
    if cells.numel() == 0:
        return []
    ht, wt = math.ceil(h / tile), math.ceil(w / tile)
    occupied = torch.zeros((ht, wt), dtype=torch.bool)
    tiles = torch.stack(
        [
            cells[:, 0] // tile,
            (cells[:, 1] + tile - 1) // tile,
            cells[:, 2] // tile,
            (cells[:, 3] + tile - 1) // tile,
        ],
        dim=1,
    )
    for y0, y1, x0, x1 in tiles.tolist():
        occupied[y0:y1, x0:x1] = True
    gap = max(math.ceil(halo / tile), 0)
    grown = occupied
    if gap:
        grown = F.max_pool2d(occupied[None, None].float(), 2 * gap + 1, 1, gap)[0, 0] > 0
    labels = _components(grown)[occupied]
    ys, xs = occupied.nonzero().unbind(1)
    ids, inverse = labels.unique(return_inverse=True)

    def reduce(values: Tensor, how: str) -> list[int]:
        out = torch.zeros(len(ids), dtype=torch.int64)
        return out.scatter_reduce(0, inverse, values, how, include_self=False).tolist()

    windows = [
        (y0 * tile, min((y1 + 1) * tile, h), x0 * tile, min((x1 + 1) * tile, w))
        for y0, y1, x0, x1 in zip(
            reduce(ys, "amin"),
            reduce(ys, "amax"),
            reduce(xs, "amin"),
            reduce(xs, "amax"),
            strict=True,
        )
    ]
    windows = _merge_overlapping(windows)
    if window_coverage(windows, size, halo) > max_coverage:
        return full
    return windows


def read_pieces(
    reads: Tensor, region: Window, gap: int = 0
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The part of ``region`` that the cells ``reads`` cover, as rectangles to compute.

    One row span (from the first to the last row read) and the column spans read in it,
    merged where less than ``gap`` columns apart (a separate piece would recompute about
    that many margin columns).

    Args:
        reads: ``(K, 4)`` cells ``y0, y1, x0, x1``, end exclusive (see :func:`roi_cells`).
        region: ``(y0, y1, x0, x1)``, e.g. one band of a window.
        gap: merge column spans closer than this.

    Returns:
        ``((row0, row1), (col0, col1))`` pieces, end exclusive; empty when nothing in the
        region is read.
    """
    y0, y1, x0, x1 = region
    hit = (reads[:, 0] < y1) & (reads[:, 1] > y0) & (reads[:, 2] < x1) & (reads[:, 3] > x0)
    sel = reads[hit]
    if sel.numel() == 0:
        return []
    rows = (max(y0, int(sel[:, 0].min())), min(y1, int(sel[:, 1].max())))
    spans: list[list[int]] = []
    for a, b in sorted(sel[:, 2:].tolist()):
        a, b = max(a, x0), min(b, x1)
        if spans and a <= spans[-1][1] + gap:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return [(rows, (a, b)) for a, b in spans]
