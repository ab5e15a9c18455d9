"""``make demo``: SynthSigns end to end, FPN vs FPN-2x vs EFPN (a Table VIII-style comparison).

Any recipe runs the same way (``efpn demo --config configs/aerial_cars.yaml``)."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from .config import load_config
from .data.dataset import load_rgb
from .engine.evaluate import evaluate_model
from .engine.train import Trainer, load_data, model_from_checkpoint
from .viz import draw_comparison, plot_accuracy_recall, plot_size_ap

__all__ = ["run_demo"]

ROWS = [
    ("fpn_1x", "FPN (1x)"),
    ("fpn_2x", "FPN-2x (same model, 2x input)"),
    ("efpn_1x", "EFPN (1x)"),
    ("efpn_fused_1x", "EFPN (1x, model.merge=fused)"),
]
KEYS = ["AP_small", "AR_small", "AP_medium", "AP_large", "AP", "f1_small", "seconds_per_image"]


def default_config() -> Path:
    return Path(str(resources.files("efpn") / "configs" / "demo.yaml"))


def default_test() -> Path:
    """The packaged demo recipe's held-out test set (128 SynthSigns scenes)."""
    return Path(str(resources.files("efpn") / "configs" / "demo_test.yaml"))


def format_table(summary: dict) -> str:
    head = f"| {'model':<30} | AP_S  | AR_S  | AP_M  | AP_L  | AP    | F1_S  | s/img |"
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    keys = ("AP_small", "AR_small", "AP_medium", "AP_large", "AP", "f1_small", "seconds_per_image")
    for key, label in ROWS:
        if key not in summary:
            continue
        # COCO reports -1 for a size with no ground truth: print n/a, not a score.
        cells = [f"{v:.3f}" if (v := summary[key][k]) >= 0 else "n/a" for k in keys]
        lines.append(f"| {label:<30} | " + " | ".join(f"{c:<5}" for c in cells) + " |")
    return "\n".join(lines)


def run_demo(
    config: str | Path | None = None,
    out: str | Path = "runs/demo",
    quiet: bool = False,
    eval_only: bool = False,
    overrides: dict | None = None,
    test: str | Path | None = None,
) -> dict:
    """Generate SynthSigns, train FPN and EFPN (stages 1-3), compare on the val split
    and, with ``test``, on a held-out test set.

    Writes ``summary.json`` (keys ``fpn_1x``, ``fpn_2x``, ``efpn_1x`` and, unless the
    recipe's merge is already ``fused``, ``efpn_fused_1x``: the same EFPN with both heads
    averaged on small RoIs), ``summary.md``,
    plots and a Fig. 8-style image into ``out``. With ``eval_only``, the comparison
    runs on the checkpoints already in ``out``.

    Each stage keeps the epoch that scores best on val, so val flatters every row. A
    ``test`` recipe's val split is a set that nothing trained or selected on (its
    classes must be the recipe's, and none of its images may be in train or val): the
    same rows are evaluated there into ``summary_test.json`` / ``summary_test.md``, and
    the plots and the Fig. 8-style image show that set.
    """
    start = time.perf_counter()
    cfg = load_config(config or default_config(), overrides)
    out = Path(out)
    premise = None
    if eval_only:
        for stage in (1, 3):
            if not (out / f"stage{stage}" / "best.pt").exists():
                raise FileNotFoundError(f"{out / f'stage{stage}' / 'best.pt'}: train first")
        train, val = load_data(cfg, out.parent if cfg.data.format == "synth" else None)
    else:
        print(
            f"[1/3] {cfg.data.format} data + training ({cfg.model.backbone}, stages 1-3) into {out}",
            flush=True,
        )
        trainer = Trainer(cfg, out, quiet=quiet)
        trainer.run([1, 2, 3])
        train, val = trainer.train_data, trainer.val_data
        premise = trainer.premise
    test_data = None
    if test is not None:
        test_data = _load_test(test, train, val, out)
    print(
        "[2/3] evaluating FPN 1x, FPN 2x and EFPN 1x on the validation split"
        + (" and the test set" if test_data is not None else ""),
        flush=True,
    )
    fpn, _ = model_from_checkpoint(out / "stage1" / "best.pt")
    efpn, _ = model_from_checkpoint(out / "stage3" / "best.pt")
    fused = None
    if cfg.model.merge != "fused":
        fused, _ = model_from_checkpoint(out / "stage3" / "best.pt", merge="fused")
    kw = dict(
        score_thresh=cfg.eval_score_thresh,
        size_reference=cfg.eval_size_reference,
        quiet=quiet,
        curves=True,
    )
    if premise is None:  # the trainer's premise check already evaluated FPN at 1x and 2x
        premise = {
            "fpn_1x": evaluate_model(fpn, val, scale=1.0, **kw),
            "fpn_2x": evaluate_model(fpn, val, scale=2.0, **kw),
        }
    runs = {
        "fpn_1x": premise["fpn_1x"],
        "fpn_2x": premise["fpn_2x"],
        **_efpn_rows(efpn, fused, val, kw),
    }
    summary = _write_summary(runs, out, "summary")
    tables = [(_title(cfg, val, "val", "each stage's best epoch was selected here"), summary)]
    shown, shown_runs = val, runs
    if test_data is not None:
        test_runs = {
            "fpn_1x": evaluate_model(fpn, test_data, scale=1.0, **kw),
            "fpn_2x": evaluate_model(fpn, test_data, scale=2.0, **kw),
            **_efpn_rows(efpn, fused, test_data, kw),
        }
        name = Path(test).name if Path(test) == default_test() else test
        source = f"test set {name}, held out: nothing trained or selected on it"
        tables.append(
            (_title(cfg, test_data, "test", source), _write_summary(test_runs, out, "summary_test"))
        )
        shown, shown_runs = test_data, test_runs
    print("[3/3] plots and a Fig. 8-style comparison", flush=True)
    plot_size_ap(
        {label: shown_runs[k] for k, label in ROWS if k in shown_runs},
        out / "ap_by_size_comparison.png",
    )
    plot_accuracy_recall(
        {label: shown_runs[k]["curves"] for k, label in ROWS if k in shown_runs},
        out / "accuracy_recall_comparison.png",
    )
    record = max(
        shown.images, key=lambda r: int(((r.boxes[:, 2:] - r.boxes[:, :2]).max(1) < 32).sum())
    )
    rgb = load_rgb(shown.image_path(record), upright=record.upright)
    image = Image.fromarray(rgb)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        preds = {"FPN": fpn([tensor])[0], "EFPN": efpn([tensor])[0]}
    gt = {"boxes": torch.as_tensor(record.boxes), "labels": torch.as_tensor(record.labels) + 1}
    # Each model at the threshold of its best F1_S, the operating point the table reports.
    thresholds = {
        "FPN": shown_runs["fpn_1x"]["f1_small_threshold"],
        "EFPN": shown_runs["efpn_1x"]["f1_small_threshold"],
    }
    draw_comparison(
        image,
        preds,
        gt,
        out / "fig8_comparison.png",
        score_thresh=thresholds,
        class_names=list(shown.classes),
    )
    for title, rows in tables:
        print()
        print(title)
        print(format_table(rows))
        print(_gain_line(rows))
    print(
        f"\nrun folder: {out} (summary.json{', summary_test.json' if test_data is not None else ''}, "
        f"eval.json, plots); total {time.perf_counter() - start:.0f} s"
    )
    return summary


def _efpn_rows(efpn, fused, data, kw) -> dict:
    rows = {"efpn_1x": evaluate_model(efpn, data, scale=1.0, **kw)}
    if fused is not None:
        rows["efpn_fused_1x"] = evaluate_model(fused, data, scale=1.0, **kw)
    return rows


def _write_summary(runs: dict, out: Path, stem: str) -> dict:
    summary = {k: {key: m[key] for key in KEYS} for k, m in runs.items()}
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    (out / f"{stem}.md").write_text(format_table(summary) + "\n")
    return summary


def _title(cfg, data, split: str, note: str) -> str:
    return (
        f"{cfg.name} {split} ({len(data.images)} images, {data.num_boxes()} objects; {note}), "
        f"{cfg.model.backbone}, F1_S at its best threshold:"
    )


def _gain_line(summary: dict) -> str:
    """AP_S of each EFPN row minus FPN 1x, in points."""
    base = summary["fpn_1x"]["AP_small"]
    parts = [
        f"{label} {100 * (summary[key]['AP_small'] - base):+.1f}"
        for key, label in (("efpn_1x", "EFPN"), ("efpn_fused_1x", "EFPN fused"))
        if key in summary and base >= 0
    ]
    return "AP_S minus FPN (1x), points: " + ", ".join(parts) if parts else ""


def _load_test(test: str | Path, train, val, out: Path):
    """The val split of the recipe ``test``, refused unless it is held out from the
    recipe's ``train`` and ``val``."""
    from .study import load_test, shared_images

    data = load_test(test, train, out.parent)
    data.eval_classes = val.eval_classes
    shared = shared_images(data, train) + shared_images(data, val)
    if shared:
        raise ValueError(
            f"{test}: {shared} of its {len(data.images)} images are in the recipe's train "
            "or val split; a test set must be held out"
        )
    return data
