"""The premise check: does a 2x view help the stage-1 FPN on small objects?

EFPN's extended level learns, by distillation, the stride-4 features that the same FPN
computes on a 2x view of the image (Sec. III-C). That can only help where the 2x view
holds detail that the 1x view loses and the FPN uses it: the FPN must be better on small
objects at 2S than at S. After stage 1 the trainer evaluates that FPN at both scales and
says whether the premise holds, before any compute goes into stages 2-3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .evaluate import evaluate_model

__all__ = ["ROW_KEYS", "check_premise", "premise_message"]

#: the metrics a comparison row keeps (eval JSON names)
ROW_KEYS = ["AP_small", "AR_small", "AP_medium", "AP_large", "AP", "f1_small", "seconds_per_image"]

ADVICE = (
    "EFPN is unlikely to help on this data at this scale. Try: a test scale below the "
    "images' native resolution (model.min_size), so the source holds detail the model "
    "does not see at 1x; stage-1 multi-scale training over S..2S (data.scale_jitter) with "
    "model.max_size large enough for 2S; a longer stage 1 or pretrained weights "
    "(model.weights_backbone)"
)


def premise_message(
    fpn_1x: dict, fpn_2x: dict, size: int, resize_scale: float | None = None
) -> tuple[str, bool]:
    """One line with AP_small at S and 2S and their difference; ``True`` when 2S is
    better on small objects. ``resize_scale`` names the scales as factors of the native
    resolution (a fixed-factor model) instead of shorter sides."""
    a1, a2 = fpn_1x["AP_small"], fpn_2x["AP_small"]
    holds = a2 > a1
    if resize_scale:
        at1, at2 = f"{resize_scale:g}x native", f"{2 * resize_scale:g}x native"
    else:
        at1, at2 = f"{size} px", f"{2 * size} px"
    if a1 < 0:  # COCO's -1: no small object in val at 1x
        return (
            f"premise: cannot be checked at {at1}: val holds no small object (under 32x32 px), "
            f"so AP_small is undefined; EFPN's extra level is for small objects",
            False,
        )
    line = (
        f"premise: FPN AP_small {a1:.3f} at {at1} (1x), {a2:.3f} at {at2} (2x), "
        f"{100 * (a2 - a1):+.1f} points: " + ("holds" if holds else "does NOT hold")
    )
    return line, holds


def check_premise(
    model,
    val,
    *,
    out: str | Path,
    device="cpu",
    score_thresh: float = 0.5,
    size_reference: str = "source",
    quiet: bool = False,
    curves: bool = False,
) -> dict:
    """Evaluate a stage-1 FPN on ``val`` at 1x and 2x; write ``out/premise.json``.

    Returns ``{"fpn_1x": metrics, "fpn_2x": metrics, "holds": bool, ...}`` with the full
    metrics (and curves with ``curves``); the file keeps :data:`ROW_KEYS` of each.
    """
    runs = {
        name: evaluate_model(
            model,
            val,
            device=device,
            scale=scale,
            score_thresh=score_thresh,
            size_reference=size_reference,
            quiet=quiet,
            curves=curves,
        )
        for name, scale in (("fpn_1x", 1.0), ("fpn_2x", 2.0))
    }
    for m in runs.values():
        m.pop("_results", None)
    size = int(model.transform.min_size[-1])
    scale = getattr(model.transform, "resize_scale", None)
    line, holds = premise_message(runs["fpn_1x"], runs["fpn_2x"], size, scale)
    record = {
        "holds": holds,
        "test_size": size,
        "delta_AP_small": runs["fpn_2x"]["AP_small"] - runs["fpn_1x"]["AP_small"],
        "size_reference": size_reference,
        "fpn_1x": {k: runs["fpn_1x"][k] for k in ROW_KEYS},
        "fpn_2x": {k: runs["fpn_2x"][k] for k in ROW_KEYS},
        "message": line,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "premise.json").write_text(json.dumps(record, indent=1))
    print(line, flush=True)
    if not holds and runs["fpn_1x"]["AP_small"] >= 0:
        print(f"warning: {ADVICE}", file=sys.stderr, flush=True)
    return {**runs, "holds": holds, "message": line}
