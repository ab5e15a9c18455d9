"""Plots and drawings: loss curves, AP by size, accuracy-recall curves (Fig. 7),
true/false positive drawings (Fig. 8) and feature maps (Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

__all__ = [
    "draw_comparison",
    "draw_detections",
    "plot_accuracy_recall",
    "plot_losses",
    "plot_paired",
    "plot_size_ap",
]

GREEN, BLUE, RED = (0, 200, 0), (40, 90, 255), (230, 20, 20)


def plot_losses(rows: list[dict], path: str | Path, title: str = "") -> Path:
    train = [r for r in rows if r.get("split") == "train"]
    keys = [
        k
        for k in (
            "loss",
            "loss_classifier",
            "loss_box_reg",
            "loss_classifier_small",
            "loss_box_reg_small",
            "loss_objectness",
            "glob_p2",
            "pos_p2",
            "glob_p3",
            "pos_p3",
        )
        if any(k in r and r[k] != "" for r in train)
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        pts = [(int(r["step"]), float(r[k])) for r in train if k in r and r[k] != ""]
        if pts:
            ax.plot(*zip(*pts), label=k, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training losses")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_size_ap(entries: dict[str, dict], path: str | Path) -> Path:
    """Grouped bars of AP_small/medium/large/AP per model."""
    keys = ["AP_small", "AP_medium", "AP_large", "AP"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(entries), 1)
    for i, (name, m) in enumerate(entries.items()):
        vals = [max(m.get(k, 0.0), 0.0) for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(keys)) + width * (len(entries) - 1) / 2, keys)
    ax.set_ylabel("AP")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_accuracy_recall(curves: dict[str, dict], path: str | Path) -> Path:
    """Accuracy-recall curves per size bin (Fig. 7), one line per model."""
    bins = ["small", "medium", "large", "overall"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, b in zip(axes, bins):
        for name, c in curves.items():
            if b in c:
                ax.plot(c[b]["recall"], c[b]["accuracy"], label=name)
        ax.set_title(b)
        ax.set_xlabel("recall")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _classify(pred: dict, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, iou: float = 0.5):
    """Greedy same-class matching: (tp mask over predictions, matched mask over gt)."""
    pb, pl = torch.as_tensor(pred["boxes"]).float(), torch.as_tensor(pred["labels"])
    tp = torch.zeros(len(pb), dtype=torch.bool)
    matched = torch.zeros(len(gt_boxes), dtype=torch.bool)
    if len(pb) and len(gt_boxes):
        ious = box_iou(pb, gt_boxes.float())
        ious[pl[:, None] != gt_labels[None, :]] = 0
        for i in torch.argsort(torch.as_tensor(pred["scores"]), descending=True).tolist():
            j = int(torch.argmax(ious[i]))
            if ious[i, j] > iou and not matched[j]:
                tp[i], matched[j] = True, True
    return tp, matched


def _font(height: int):
    from PIL import ImageFont

    size = max(10, int(height / 45))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def _label(d: ImageDraw.ImageDraw, xy, text: str, color, font) -> None:
    x, y = xy
    left, top, right, bottom = d.textbbox((0, 0), text, font=font)
    y = max(y - (bottom - top) - 2, 0)
    d.rectangle([x, y, x + right - left + 2, y + bottom - top + 2], fill=color)
    d.text((x + 1, y - top + 1), text, fill=(255, 255, 255), font=font)


def draw_detections(
    image: Image.Image,
    pred: dict,
    class_names=None,
    gt: dict | None = None,
    score_thresh: float = 0.5,
    max_boxes: int | None = None,
) -> Image.Image:
    """Draw predictions with class and score; with ``gt``, true positives green, false
    positives blue and missed objects red (the paper's Fig. 8). Line width and text
    follow the image size; ``max_boxes`` keeps the highest-scoring ones."""
    image = image.convert("RGB").copy()
    d = ImageDraw.Draw(image)
    width = max(2, round(max(image.size) / 400))
    font = _font(max(image.size))
    scores = torch.as_tensor(pred["scores"])
    keep = torch.where(scores >= score_thresh)[0]
    keep = keep[torch.argsort(scores[keep], descending=True)][:max_boxes]
    pred = {k: torch.as_tensor(v)[keep] for k, v in pred.items()}
    if gt is None:
        tp = torch.ones(len(pred["boxes"]), dtype=torch.bool)
    else:
        tp, matched = _classify(pred, torch.as_tensor(gt["boxes"]), torch.as_tensor(gt["labels"]))
        for b, ok in zip(torch.as_tensor(gt["boxes"]).tolist(), matched.tolist()):
            if not ok:
                d.rectangle(b, outline=RED, width=width)
    for b, lab, sc, ok in zip(
        pred["boxes"].tolist(), pred["labels"].tolist(), pred["scores"].tolist(), tp.tolist()
    ):
        color = GREEN if ok else BLUE
        d.rectangle(b, outline=color, width=width)
        name = class_names[lab - 1] if class_names and 0 < lab <= len(class_names) else str(lab)
        _label(d, (b[0], b[1]), f"{name} {sc:.2f}", color, font)
    return image


def draw_comparison(
    image: Image.Image,
    preds: dict[str, dict],
    gt: dict,
    path: str | Path,
    score_thresh: float | dict[str, float] = 0.5,
    class_names=None,
) -> Path:
    """Side-by-side Fig. 8-style panels, one per model, with a legend; ``score_thresh``
    may give each model its own threshold (by name), printed above its panel. At most
    twice as many boxes as there are objects are drawn per panel (the top-scoring)."""
    thresholds = (
        score_thresh if isinstance(score_thresh, dict) else dict.fromkeys(preds, score_thresh)
    )
    cap = max(2 * len(torch.as_tensor(gt["boxes"])), 10)
    panels = [
        draw_detections(image, p, class_names, gt=gt, score_thresh=thresholds[name], max_boxes=cap)
        for name, p in preds.items()
    ]
    w, h = panels[0].size
    font = _font(max(w, h))
    line = d_h = max(16, int(max(w, h) / 30))
    canvas = Image.new("RGB", (w * len(panels), h + 2 * line), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for i, (name, panel) in enumerate(zip(preds, panels)):
        canvas.paste(panel, (i * w, line))
        shown = int((torch.as_tensor(preds[name]["scores"]) >= thresholds[name]).sum())
        label = f"{name}: score >= {thresholds[name]:.2f}" + (
            f", top {cap} of {shown}" if shown > cap else ""
        )
        d.text((i * w + 4, 2), label, fill=(0, 0, 0), font=font)
    x = 4
    for text, color in (("true positive", GREEN), ("false positive", BLUE), ("missed", RED)):
        d.rectangle([x, h + line + 4, x + d_h - 8, h + 2 * line - 4], outline=color, width=3)
        d.text((x + d_h, h + line + 2), text, fill=(0, 0, 0), font=font)
        x += d_h + int(d.textlength(text, font=font)) + 20
    canvas.save(path)
    return Path(path)


def plot_paired(
    summary: dict, path: str | Path, metrics=("AP_small", "AR_small", "f1_small", "AP")
) -> Path:
    """Per-run paired differences to FPN 1x (dots) with the mean and its 95% interval,
    one panel per metric and one column of dots per arm (``efpn study``); with arms that
    start from a baseline arm's FPN, a second row pairs them with that FPN."""
    rows = [("FPN 1x", summary["paired"])]
    if summary.get("paired_start"):
        rows.append(("its start FPN", summary["paired_start"]))
    fig, axes = plt.subplots(
        len(rows), len(metrics), figsize=(3.2 * len(metrics), 3.4 * len(rows)), squeeze=False
    )
    for (base, pairs), row in zip(rows, axes):
        for ax, m in zip(row, metrics):
            _paired_panel(ax, pairs, m)
            ax.set_title(f"{m} - {base} (points)", fontsize=9)
    fig.suptitle(
        f"paired differences over {len(summary['runs'])} run(s); square: mean, 95% t-interval",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _paired_panel(ax, pairs: dict, metric: str) -> None:
    arms = list(pairs)
    for i, arm in enumerate(arms):
        s = pairs[arm][metric]
        if s["values"] is None:
            continue
        vals = 100 * np.asarray(s["values"])
        jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
        ax.scatter(i + jitter, vals, s=18, color="tab:blue", alpha=0.8, zorder=3)
        if s["ci95"]:
            lo, hi = 100 * np.asarray(s["ci95"])
            ax.errorbar(
                i + 0.3,
                100 * s["mean"],
                yerr=[[100 * s["mean"] - lo], [hi - 100 * s["mean"]]],
                fmt="s",
                color="black",
                capsize=4,
                zorder=4,
            )
        else:
            ax.scatter(i + 0.3, 100 * s["mean"], marker="s", color="black", zorder=4)
    ax.axhline(0, color="gray", lw=1)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
