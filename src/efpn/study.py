"""``efpn study``: paired FPN-vs-EFPN experiments over seeds and folds.

Each run (a seed, or a seed and a fold) trains stage 1 once and checks the premise
(its FPN at S and 2S). Every arm then trains stages 2-3 from that same stage-1
checkpoint, so each arm's difference to FPN 1x is paired: the same data, the same
baseline, only the extension differs. The arm ``fpn_longer`` instead trains the FPN on
from that checkpoint for as many epochs as stages 2-3 take, so that EFPN's extra
training can be told apart from what the extension adds, and ``efpn_longer`` (or any arm
with ``start=fpn_longer``) trains stages 2-3 on that longer-trained FPN, so that its
paired difference to ``fpn_longer`` is what the extension adds to the same FPN. The
summary gives mean and standard deviation per row, and per arm the paired difference to
FPN 1x with a 95% t-interval.

Layout of ``out``::

    study.json              the settings (config, seeds, folds, arms); a resume must match
    summary.json, summary.md, paired.png
    <run>/                  seed0, seed1, ... or seed0_fold0, ...
        stage1/, premise.json                    FPN, and its rows fpn_1x and fpn_2x
        <arm>/stage2/, <arm>/stage3/, <arm>/metrics.json
        fpn_longer/stage1/, fpn_longer/metrics.json   the baseline with EFPN's budget
        fpn_longer/metrics_2x.json                   its FPN at 2x input (a teacher?)
        efpn_longer/stage2/, .../stage3/             stages 2-3 from fpn_longer's FPN
        test.json           with ``--test``: every row on the held-out test set

Each stage keeps its epoch with the best val AP_small, so val takes part in selection;
``--test RECIPE`` evaluates every row also on that recipe's val split, a held-out set
that no run trained or selected on, and the summary gains a ``test`` section.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomic
from .config import (
    Config,
    OptimConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    original_head_on_small_rois,
    parse_override,
)
from .console import stamped
from .data.records import DetectionData

__all__ = [
    "BASELINE_PRESETS",
    "PRESETS",
    "PRESET_GROUPS",
    "START_PRESETS",
    "Arm",
    "epochs_after_stage1",
    "fold_data",
    "paired_stats",
    "parse_arms",
    "run_study",
    "summarize",
    "t_quantile",
]

#: the metrics of every row (eval JSON names)
METRICS = ["AP_small", "AR_small", "AP_medium", "AP_large", "AP", "f1_small", "seconds_per_image"]
SHORT = {
    "AP_small": "AP_S",
    "AR_small": "AR_S",
    "AP_medium": "AP_M",
    "AP_large": "AP_L",
    "AP": "AP",
    "f1_small": "F1_S",
    "seconds_per_image": "s/img",
}
RESERVED = ("fpn_1x", "fpn_2x")
#: the suffix of a baseline arm's row at 2x input (``fpn_longer@2x``): whether that FPN is
#: still a teacher for the arms that start from it
AT_2X = "@2x"


def _cheap_widths(cfg: Config) -> dict[str, Any]:
    # a quarter of the pyramid's width: 64 at the paper's 256 channels
    width = max(cfg.model.fpn_channels // 4, 8)
    return {"model.sr_width": width, "model.ext_out_width": width}


#: named arms: the paper's ablations as config overrides (a callable computes them from
#: the recipe)
PRESETS: dict[str, Any] = {
    "efpn": {},
    # Table II: the extended level alone (nearest upsampling, detection loss only),
    # ESPCN with distillation, FTT with distillation
    "ext_only": {"model.sr_module": "nearest", "distill.enabled": False},
    "espcn": {"model.sr_module": "espcn"},
    "ftt": {"model.sr_module": "ftt"},
    # Table IV: no foreground term (lambda 0), no loss on the FTT output P'3
    "lambda0": {"distill.lam": 0.0},
    "no_ftt_loss": {"distill.ftt_loss": False},
    # the cheap widths of `efpn bench --sr-width 64 --ext-out-width 64`
    "cheap_widths": _cheap_widths,
    # how small RoIs' detections are merged (inference only: reuses efpn's checkpoint)
    "duplicate": {"model.merge": "duplicate"},
    "gated": {"model.merge": "gated"},
    "fused": {"model.merge": "fused"},
    # not in the paper: stage 3 trains the whole detector on every loss, so that the FPN
    # keeps learning for the epochs the extension trains (against `fpn_longer`)
    "joint": {"stage3.train_all": True},
    "joint_fused": {"stage3.train_all": True, "model.merge": "fused"},
}


def _fpn_longer(cfg: Config, factor: int = 1, multiscale: bool = False) -> dict[str, Any]:
    # stage 1 again from its best checkpoint, with stage 3's optimiser for ``factor``
    # times as many epochs as stages 2 and 3 take together, at the test scale as they
    # train: FPN with EFPN's training budget (x2: with efpn_longer's). ``multiscale``
    # keeps stage 1's scale jitter: trained on at S only, the FPN loses its 2x view and
    # with it its use as stage 2's teacher.
    optim = {
        f"stage1.optim.{f.name}": getattr(cfg.stage3.optim, f.name) for f in fields(OptimConfig)
    }
    optim["stage1.optim.epochs"] = factor * (cfg.stage2.optim.epochs + cfg.stage3.optim.epochs)
    return optim if multiscale else {**optim, "data.scale_jitter": []}


def _fpn_longer_x2(cfg: Config) -> dict[str, Any]:
    return _fpn_longer(cfg, factor=2)


def _fpn_longer_ms(cfg: Config) -> dict[str, Any]:
    return _fpn_longer(cfg, multiscale=True)


#: arms that train the FPN baseline on (stage 1 from the stage-1 checkpoint) instead of
#: stages 2-3: controls for EFPN's extra training (``fpn_longer_x2``: for as many epochs
#: as ``efpn_longer`` trains after stage 1; ``fpn_longer_ms``: over the recipe's scale
#: jitter, so that it stays a teacher at 2S)
BASELINE_PRESETS: dict[str, Any] = {
    "fpn_longer": _fpn_longer,
    "fpn_longer_x2": _fpn_longer_x2,
    "fpn_longer_ms": _fpn_longer_ms,
}
#: arms that train stages 2-3 from a baseline arm's FPN: (that arm, the preset applied)
START_PRESETS: dict[str, tuple[str, str]] = {
    "efpn_longer": ("fpn_longer", "efpn"),
    "fused_longer": ("fpn_longer", "fused"),
    "efpn_longer_ms": ("fpn_longer_ms", "efpn"),
    "fused_longer_ms": ("fpn_longer_ms", "fused"),
}
#: the pseudo-key of ``--arm NAME start=ARM key=value ...``
START_KEY = "start"
PRESET_GROUPS = {
    "table2": ["ext_only", "espcn", "ftt"],
    "table4": ["lambda0", "no_ftt_loss"],
    "cheap": ["cheap_widths"],
    "merge": ["duplicate", "gated", "fused"],
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Arm:
    """One configuration of stages 2-3: a name and its config overrides."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    #: train stage 1 on from the run's FPN instead of stages 2-3 (:data:`BASELINE_PRESETS`)
    baseline: bool = False
    #: the baseline arm whose FPN stages 2-3 start from; ``None``: the run's stage 1
    start: str | None = None

    @property
    def stage(self) -> int:
        """The stage whose ``best.pt`` is this arm's model."""
        return 1 if self.baseline else 3


def parse_arms(specs: list[list[str]] | None, cfg: Config) -> list[Arm]:
    """Arms from ``--arm NAME [key=value ...]`` specs.

    A NAME alone is a preset (:data:`PRESETS`, :data:`BASELINE_PRESETS`,
    :data:`START_PRESETS`) or a group of them (:data:`PRESET_GROUPS`); with
    ``key=value`` pairs it names a custom arm, and ``start=ARM`` among them makes its
    stages 2-3 start from the FPN of the baseline arm ARM, given before it. No spec gives
    the one arm ``efpn`` (the recipe as it is).
    """
    arms: list[Arm] = []
    for spec in specs or [["efpn"]]:
        name, *pairs = spec
        if not pairs and name in PRESET_GROUPS:
            arms += [Arm(n, _preset(n, cfg)) for n in PRESET_GROUPS[name]]
            continue
        if not _NAME.match(name) or name in RESERVED:
            raise ValueError(
                f"--arm {name!r}: a name of letters, digits, '_', '.', '-' other than {RESERVED}"
            )
        if not pairs:
            if name in BASELINE_PRESETS:
                arms.append(Arm(name, dict(BASELINE_PRESETS[name](cfg)), baseline=True))
                continue
            if name in START_PRESETS:
                start, preset = START_PRESETS[name]
                arms.append(Arm(name, _preset(preset, cfg), start=start))
                continue
            if name not in PRESETS:
                names = ", ".join([*PRESETS, *BASELINE_PRESETS, *START_PRESETS, *PRESET_GROUPS])
                raise ValueError(
                    f"--arm {name!r}: not a preset ({names}); give key=value overrides to define it"
                )
            arms.append(Arm(name, _preset(name, cfg)))
        elif name in BASELINE_PRESETS or name in START_PRESETS:
            raise ValueError(f"--arm {name!r}: a preset that takes no key=value overrides")
        else:
            overrides = dict(parse_override(p) for p in pairs)
            start = overrides.pop(START_KEY, None)
            arms.append(Arm(name, overrides, start=None if start is None else str(start)))
    seen: dict[str, Arm] = {}
    for arm in arms:
        if arm.name in seen:
            raise ValueError(f"--arm {arm.name!r} given twice")
        if arm.start is not None and not (arm.start in seen and seen[arm.start].baseline):
            raise ValueError(
                f"--arm {arm.name!r}: start={arm.start} needs the baseline arm --arm "
                f"{arm.start} before it (baseline presets: {', '.join(BASELINE_PRESETS)})"
            )
        seen[arm.name] = arm
        apply_overrides(cfg, arm.overrides, f"--arm {arm.name}")  # validates the keys
    return arms


def _preset(name: str, cfg: Config) -> dict[str, Any]:
    value = PRESETS[name]
    return dict(value(cfg) if callable(value) else value)


# ----------------------------------------------------------------------------- folds
def fold_data(
    train: DetectionData, val: DetectionData, fold: int, folds: int, seed: int = 0
) -> tuple[DetectionData, DetectionData]:
    """Fold ``fold`` of ``folds`` over train+val: that fold is val, the rest train.

    The images are ordered by file name and shuffled with ``seed``, so the folds depend
    only on the data. Image ids are renumbered 1..N.
    """
    if train.classes != val.classes:
        raise ValueError(
            f"{val.source}: its classes {val.classes} differ from {train.source}'s {train.classes}"
        )
    if not 0 <= fold < folds or folds < 2:
        raise ValueError(f"fold {fold} of {folds}: need 2 or more folds and 0 <= fold < folds")
    root = Path(os.path.commonpath([train.root.resolve(), val.root.resolve()]))
    records = {}
    for data in (train, val):
        for r in data.images:
            rel = (data.root.resolve() / r.file_name).relative_to(root).as_posix()
            records.setdefault(rel, copy.copy(r))
    if len(records) < folds:
        raise ValueError(f"{len(records)} images cannot make {folds} folds")
    names = sorted(records)
    order = np.random.default_rng(seed).permutation(len(names))
    held = {names[i] for i in order[fold::folds]}
    parts: dict[bool, list] = {True: [], False: []}
    for i, name in enumerate(names):
        r = records[name]
        r.file_name, r.image_id = name, i + 1
        parts[name in held].append(r)

    def make(images, tag):
        return DetectionData(
            root,
            list(train.classes),
            images,
            source=f"{train.source} fold {fold}/{folds} {tag}",
            category_ids=list(train.category_ids),
            eval_classes=train.eval_classes,
        )

    return make(parts[False], "train"), make(parts[True], "val")


# ----------------------------------------------------------------------------- statistics
def _t_cdf(t: float, df: int) -> float:
    """Student's t CDF by Simpson integration of the density over [0, |t|]."""
    n = 2000
    x = np.linspace(0.0, abs(t), n + 1)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    f = np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))
    h = abs(t) / n
    area = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(area, t)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``p`` > 0.5)."""
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def _defined(values: list[float | None]) -> bool:
    # COCO reports -1 for a size bin without ground truth
    return bool(values) and all(v is not None and v >= 0 for v in values)


def row_stats(values: list[float]) -> dict:
    """``{"mean", "std", "values"}`` (sample std; ``None`` where undefined)."""
    if not _defined(values):
        return {"mean": None, "std": None, "values": values}
    a = np.asarray(values, dtype=float)
    std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(a.mean()), "std": std, "values": values}


def paired_stats(arm: list[float], base: list[float]) -> dict:
    """Paired differences ``arm - base``: ``{"mean", "ci95": [low, high], "values"}``,
    the interval from Student's t with n-1 degrees of freedom (``None`` for n < 2)."""
    if not (_defined(arm) and _defined(base)) or len(arm) != len(base):
        return {"mean": None, "ci95": None, "values": None}
    d = np.asarray(arm, dtype=float) - np.asarray(base, dtype=float)
    mean = float(d.mean())
    ci = None
    if len(d) > 1:
        half = t_quantile(0.975, len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci95": ci, "values": [float(v) for v in d]}


def summarize(
    results: dict[str, dict[str, dict]],
    runs: list[str],
    arms: list[str],
    starts: dict[str, str] | None = None,
    baselines: list[str] | None = None,
    epochs: dict[str, int] | None = None,
) -> dict:
    """The study summary from per-run rows ``results[run][row][metric]``.

    Args:
        results: ``results[run][row][metric]``.
        runs: the run names, in order.
        arms: the arm names (rows besides ``fpn_1x`` and ``fpn_2x``).
        starts: an arm -> the baseline arm whose FPN it started from (``paired_start``).
        baselines: the baseline arms (FPNs trained on): every other arm that does not
            start from one is also paired with each (``paired_baselines``), the control
            for extra training.
        epochs: an arm -> the epochs it trained after stage 1 (``epochs_after_stage1``),
            to tell which comparisons are at equal training.
    """
    rows = {}
    for row in [*RESERVED, *arms]:
        rows[row] = {m: row_stats([results[r][row][m] for r in runs]) for m in METRICS}

    def against(base: str, names: list[str]) -> dict:
        return {
            a: {m: paired_stats(rows[a][m]["values"], rows[base][m]["values"]) for m in METRICS}
            for a in names
        }

    summary = {
        "runs": runs,
        "rows": rows,
        "paired": against("fpn_1x", arms),
        "paired_fpn_2x": against("fpn_2x", arms),
    }
    if "efpn" in arms and len(arms) > 1:
        # ablations are read against the full method, as the paper's tables are
        summary["paired_efpn"] = against("efpn", [a for a in arms if a != "efpn"])
    if starts:
        # the extension's gain over the very FPN it was added to
        summary["starts"] = dict(starts)
        summary["paired_start"] = {a: against(base, [a])[a] for a, base in starts.items()}
    starts = starts or {}
    at_2x = [b for b in baselines or [] if all(b + AT_2X in results[r] for r in runs)]
    if at_2x:
        # each baseline FPN at 2x input, and its own premise (2x minus 1x)
        summary["rows_2x"] = {
            b: {m: row_stats([results[r][b + AT_2X][m] for r in runs]) for m in METRICS}
            for b in at_2x
        }
        summary["premise_baselines"] = {
            b: {
                m: paired_stats(summary["rows_2x"][b][m]["values"], rows[b][m]["values"])
                for m in METRICS
            }
            for b in at_2x
        }
    if baselines:
        others = [a for a in arms if a not in baselines]
        summary["paired_baselines"] = {
            b: against(b, [a for a in others if starts.get(a) != b]) for b in baselines
        }
    if epochs:
        summary["epochs_after_stage1"] = dict(epochs)
    return summary


def _fmt(v, digits=3, signed=False):
    if v is None:
        return "n/a"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _row_line(row: str, stats: dict) -> str:
    """One table line of a row's mean ± std per metric."""
    cells = [
        "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"
        for s in (stats[m] for m in METRICS)
    ]
    return f"| {row} | " + " | ".join(cells) + " |"


def format_summary(summary: dict) -> str:
    """Markdown tables: rows (mean ± std), paired differences with 95% intervals and
    the per-run values."""
    head = "| row | " + " | ".join(SHORT[m] for m in METRICS) + " |"
    sep = "|" + "---|" * (len(METRICS) + 1)
    lines = [f"runs: {len(summary['runs'])} ({', '.join(summary['runs'])})", "", head, sep]
    lines += [_row_line(row, stats) for row, stats in summary["rows"].items()]
    start_label = (
        "the FPN each arm starts from ("
        + ", ".join(f"{a}: {b}" for a, b in summary.get("starts", {}).items())
        + ")"
    )
    epochs = summary.get("epochs_after_stage1", {})
    sections = [
        ("FPN 1x", summary.get("paired")),
        ("FPN 2x", summary.get("paired_fpn_2x")),
        ("efpn", summary.get("paired_efpn")),
        (start_label, summary.get("paired_start")),
    ]
    if summary.get("rows_2x"):
        lines += ["", "Baseline arms at 2x input (a teacher for the arms that start from them)", ""]
        lines += [head, sep]
        lines += [_row_line(b + AT_2X, stats) for b, stats in summary["rows_2x"].items()]
        premise = {b + AT_2X: p for b, p in summary["premise_baselines"].items()}
        sections.append(("the same arm at 1x (each baseline arm's premise)", premise))
    for b, pairs in summary.get("paired_baselines", {}).items():
        same = [a for a in pairs if a in epochs and epochs[a] == epochs.get(b)]
        label = f"{b}, the FPN trained on for {epochs.get(b, '?')} epoch(s) after stage 1"
        sections.append((label + (f" (as many as {', '.join(same)})" if same else ""), pairs))
    for base, pairs in sections:
        if not pairs:
            continue
        lines += [
            "",
            f"Paired difference to {base}: mean [95% t-interval]",
            "",
            head.replace("row", "arm"),
            sep,
        ]
        for arm, stats in pairs.items():
            cells = []
            for m in METRICS:
                s = stats[m]
                ci = (
                    ""
                    if not s["ci95"]
                    else f" [{_fmt(s['ci95'][0], signed=True)}, {_fmt(s['ci95'][1], signed=True)}]"
                )
                cells.append(_fmt(s["mean"], signed=True) + ci)
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    rows = list(summary["rows"])
    for m in ("AP_small", "AP"):
        lines += [
            "",
            f"Per run, {m}:",
            "",
            "| run | " + " | ".join(rows) + " |",
            "|" + "---|" * (len(rows) + 1),
        ]
        for i, run in enumerate(summary["runs"]):
            vals = [_fmt(summary["rows"][r][m]["values"][i]) for r in rows]
            lines.append(f"| {run} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running
#: settings that change inference and evaluation only: arms that differ from a trained
#: arm only in these reuse its checkpoint
INFERENCE_KEYS = (
    "model.merge",
    "model.p2x_mode",
    "model.sparse_max_coverage",
    "model.p2x_band_rows",
    "model.rpn_post_nms_top_n_test",
    "model.box_score_thresh",
    "model.box_detections_per_img",
    "eval_score_thresh",
    "eval_size_reference",
)


def training_key(cfg: Config) -> str:
    """The recipe without its inference-only settings, as a comparable string."""
    d = copy.deepcopy(cfg.to_dict())
    for dotted in INFERENCE_KEYS:
        node = d
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node.pop(last, None)
    if original_head_on_small_rois(cfg):  # the merge then changes what training does
        d["original_head_on_small_rois"] = True
    return json.dumps(d, sort_keys=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _say(msg: str) -> None:
    print(stamped(msg), flush=True)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=1).encode())


def epochs_after_stage1(cfg: Config, arm_list: list[Arm]) -> dict[str, int]:
    """The epochs each arm trains after the run's stage 1: a baseline arm's stage 1
    again, or stages 2 and 3 plus, for an arm with a start, its start's epochs."""
    epochs: dict[str, int] = {}
    for arm in arm_list:  # parse_arms puts every start before the arms that use it
        acfg = apply_overrides(cfg, arm.overrides, f"--arm {arm.name}")
        if arm.baseline:
            epochs[arm.name] = acfg.stage1.optim.epochs
        else:
            own = acfg.stage2.optim.epochs + acfg.stage3.optim.epochs
            epochs[arm.name] = own + (epochs[arm.start] if arm.start else 0)
    return epochs


def _write_summary(
    out: Path, results, names, arm_list, settings, complete: bool, test_results=None, epochs=None
) -> dict:
    arms = [a.name for a in arm_list]
    starts = {a.name: a.start for a in arm_list if a.start}
    baselines = [a.name for a in arm_list if a.baseline]
    summary = summarize(results, names, arms, starts, baselines, epochs)
    summary["complete"] = complete
    summary["premise"] = {n: _read_json(out / n / "premise.json")["delta_AP_small"] for n in names}
    summary["settings"] = {k: v for k, v in settings.items() if k != "config"}
    text = format_summary(summary)
    from .viz import plot_paired

    if test_results:
        test_names = [n for n in names if n in test_results]
        summary["test"] = summarize(test_results, test_names, arms, starts, baselines, epochs)
        summary["test"]["source"] = settings["test"]
        shared = settings.get("test_shares_val", 0)
        summary["test"]["held_out"] = not shared
        title = (
            f"Held-out test set ({settings['test']}: no run trained or selected on it)"
            if not shared
            else f"Second evaluation on {settings['test']} ({shared} of its images are val "
            "images, where each stage's best epoch was selected: not held out)"
        )
        text += f"\n\n## {title}\n\n{format_summary(summary['test'])}"
        plot_paired(summary["test"], out / "paired_test.png")
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(text + "\n")
    plot_paired(summary, out / "paired.png")
    return summary


def _evaluate(checkpoint: Path, data, cfg: Config, *, quiet: bool, scale=1.0, **inference):
    """One checkpoint on ``data`` with the recipe's evaluation settings: the
    :data:`~efpn.engine.premise.ROW_KEYS` metrics and P'2's coverage."""
    from .engine.evaluate import evaluate_model
    from .engine.premise import ROW_KEYS
    from .engine.train import model_from_checkpoint

    device = "cuda" if cfg.device != "cpu" and _cuda() else "cpu"
    model, _ = model_from_checkpoint(checkpoint, device, **inference)
    m = evaluate_model(
        model,
        data,
        device=device,
        scale=scale,
        score_thresh=cfg.eval_score_thresh,
        size_reference=cfg.eval_size_reference,
        quiet=quiet,
    )
    row = {k: m[k] for k in ROW_KEYS}
    if "p2x_coverage" in m:
        row["p2x_coverage"] = m["p2x_coverage"]
    return row


def model_inference_kwargs(overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``model.*`` inference settings among dotted-key ``overrides``, as
    :func:`~efpn.engine.train.model_from_checkpoint` keywords."""
    return {
        k.split(".", 1)[1]: v
        for k, v in overrides.items()
        if k.startswith("model.") and k in INFERENCE_KEYS
    }


def load_test(test: str | Path, train: DetectionData, root: Path) -> DetectionData:
    """The val split of the recipe ``test``: a held-out set with ``train``'s classes."""
    from .engine.train import load_data

    tcfg = load_config(test)
    data = load_data(tcfg, root if tcfg.data.format == "synth" else None)[1]
    if list(data.classes) != list(train.classes):
        raise ValueError(
            f"{test}: its val split's classes {data.classes} differ from the study's "
            f"{train.classes}"
        )
    if not data.images:
        raise ValueError(f"{test}: its val split has no images")
    return data


def shared_images(a: DetectionData, b: DetectionData) -> int:
    """How many of ``a``'s image files are also in ``b``."""
    paths = {b.image_path(r) for r in b.images}
    return sum(a.image_path(r) in paths for r in a.images)


def _test_rows(rdir: Path, cfg: Config, arm_list, test_data, source: str, quiet: bool) -> dict:
    """Every row of one run on the test set; kept in ``rdir/test.json`` row by row, so
    an interrupted study resumes."""
    path = rdir / "test.json"
    record = _read_json(path)
    if record is None or record.get("source") != source:
        record = {"source": source, "rows": {}}
    rows = record["rows"]
    jobs = [(r, rdir / "stage1" / "best.pt", s, cfg, {}) for r, s in (("fpn_1x", 1), ("fpn_2x", 2))]
    for arm in arm_list:
        metrics = _read_json(rdir / arm.name / "metrics.json") or {}
        trained = metrics.get("checkpoint_of", arm.name)
        acfg = apply_overrides(cfg, arm.overrides, f"--arm {arm.name}")
        best = rdir / trained / f"stage{arm.stage}" / "best.pt"
        jobs.append((arm.name, best, 1, acfg, model_inference_kwargs(arm.overrides)))
        if arm.baseline:
            jobs.append((arm.name + AT_2X, best, 2, acfg, {}))
    for row, best, scale, rcfg, inference in jobs:
        if row in rows:
            continue
        _say(f"{rdir.name}/{row}: evaluated on {source}")
        rows[row] = _evaluate(best, test_data, rcfg, quiet=quiet, scale=scale, **inference)
        _write_json(path, record)
    return rows


def _baseline_2x(adir: Path, cfg: Config, val, label: str, quiet: bool) -> dict:
    """A baseline arm's FPN on val at 2x input (``adir/metrics_2x.json``, kept)."""
    path = adir / "metrics_2x.json"
    metrics = _read_json(path)
    if metrics is None:
        _say(f"{label}: its FPN at 2x input")
        metrics = _evaluate(adir / "stage1" / "best.pt", val, cfg, quiet=quiet, scale=2)
        _write_json(path, metrics)
    return metrics


def run_study(
    config: str | Path,
    *,
    seeds: int,
    out: str | Path,
    folds: int = 0,
    arms: list[list[str]] | None = None,
    quiet: bool = False,
    overrides: dict | None = None,
    test: str | Path | None = None,
) -> dict:
    """Run (or resume) a study and write its summary; returns ``summary.json``'s content.

    Args:
        config: the recipe.
        seeds: how many training seeds (the recipe's ``seed``, +1, +2, ...).
        out: the study folder.
        folds: 0 for the recipe's split; K >= 2 for K folds over train+val.
        arms: ``--arm`` specs (:func:`parse_arms`); ``None`` gives the arm ``efpn``.
        quiet: no progress bars from the trainer.
        overrides: dotted-key changes to the recipe, for every run and arm.
        test: a recipe whose val split is a held-out test set: every row is also
            evaluated there (``test.json`` per run, ``summary["test"]``).
    """
    from .engine.train import Trainer, load_data

    if seeds < 1:
        raise ValueError(f"--seeds must be 1 or more, got {seeds}")
    if folds == 1 or folds < 0:
        raise ValueError(f"--folds must be 0 (the recipe's split) or 2 or more, got {folds}")
    base = load_config(config, overrides)
    arm_list = parse_arms(arms, base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "config": base.to_dict(),
        "config_path": str(config),
        "seeds": seeds,
        "folds": folds,
        "arms": {
            a.name: a.overrides if a.start is None else {**a.overrides, START_KEY: a.start}
            for a in arm_list
        },
        "test": None if test is None else str(test),
    }
    previous = _read_json(out / "study.json")
    if previous is not None:
        # through the current dataclasses, so keys added since (at their defaults) match
        try:
            previous["config"] = config_from_dict(previous.get("config"), "study.json").to_dict()
        except ValueError:
            pass
    if previous is not None and previous.get("config") != settings["config"]:
        raise ValueError(
            f"{out}: holds a study of another recipe; give a new --out or remove {out / 'study.json'}"
        )
    if previous is not None:  # arms may be added to a study; earlier ones keep their runs
        for name, ov in previous.get("arms", {}).items():
            if name in settings["arms"] and settings["arms"][name] != ov:
                raise ValueError(f"{out}: arm {name!r} was run with other overrides {ov}")
    _write_json(out / "study.json", settings)

    train, val = load_data(base, out.parent if base.data.format == "synth" else None)
    test_data = None if test is None else load_test(test, train, out.parent)
    if test_data is not None:
        in_train, in_val = shared_images(test_data, train), shared_images(test_data, val)
        if in_train or (folds and in_val):
            raise ValueError(
                f"{test}: {in_train + in_val} of its {len(test_data.images)} images are "
                f"among the study's training images; a test set must not be trained on"
            )
        # the val split again under other evaluation settings (data.eval_classes, say):
        # allowed, but it is not held out, and the summary says so
        settings["test_shares_val"] = in_val
    test_results: dict[str, dict] = {}
    runs = [(base.seed + s, k) for s in range(seeds) for k in (range(folds) if folds else [None])]
    names = [f"seed{s}" if k is None else f"seed{s}_fold{k}" for s, k in runs]
    trainer_quiet = quiet
    results: dict[str, dict] = {}
    total = len(runs) * (1 + len(arm_list))
    epochs = epochs_after_stage1(base, arm_list)
    done = 0
    start = time.perf_counter()
    for (seed, fold), name in zip(runs, names):
        rdir = out / name
        data = (train, val) if fold is None else fold_data(train, val, fold, folds)
        cfg = apply_overrides(base, {"seed": seed}, f"{name}")
        premise = _read_json(rdir / "premise.json")
        done += 1
        if premise is None:
            _say(f"[{done}/{total}] {name}: stage 1 (FPN) and the premise check")
            trainer = Trainer(cfg, rdir, quiet=trainer_quiet, data=data)
            best = trainer.run_stage(1, resume=True)
            trainer.check_premise(best)
            premise = _read_json(rdir / "premise.json")
        else:
            _say(f"[{done}/{total}] {name}: stage 1 done ({premise['message']})")
        results[name] = {"fpn_1x": premise["fpn_1x"], "fpn_2x": premise["fpn_2x"]}
        trained: dict[str, tuple[str, Path]] = {}  # training settings -> (arm, checkpoint)
        for arm in arm_list:
            adir = rdir / arm.name
            done += 1
            metrics = _read_json(adir / "metrics.json")
            acfg = apply_overrides(cfg, arm.overrides, f"--arm {arm.name}")
            key = (arm.start, training_key(acfg))
            if metrics is None and key in trained:
                # only inference settings differ from an arm already trained: evaluate
                # its checkpoint with this arm's settings instead of training again
                source_arm, best = trained[key]
                _say(
                    f"[{done}/{total}] {name}/{arm.name}: {source_arm}'s checkpoint, {arm.overrides}"
                )
                adir.mkdir(parents=True, exist_ok=True)
                metrics = _evaluate(
                    best,
                    data[1],
                    acfg,
                    quiet=trainer_quiet,
                    **model_inference_kwargs(arm.overrides),
                )
                metrics["checkpoint_of"] = source_arm
                _write_json(adir / "metrics.json", metrics)
            elif metrics is None:
                trainer = Trainer(acfg, adir, quiet=trainer_quiet, data=data)
                if arm.baseline:
                    _say(
                        f"[{done}/{total}] {name}/{arm.name}: the FPN trained on for "
                        f"{acfg.stage1.optim.epochs} epoch(s) at lr {acfg.stage1.optim.lr:g}"
                    )
                    best = trainer.run_stage(1, resume=True, init=rdir / "stage1" / "best.pt")
                else:
                    on_fpn = "" if arm.start is None else f" on {arm.start}'s FPN"
                    _say(
                        f"[{done}/{total}] {name}/{arm.name}: stages 2-3{on_fpn} {arm.overrides or ''}"
                    )
                    fpn = rdir / (arm.start or "") / "stage1" / "best.pt"
                    trainer.run_stage(2, resume=True, init=fpn)
                    best = trainer.run_stage(3, resume=True)
                metrics = _evaluate(best, data[1], acfg, quiet=trainer_quiet)
                _write_json(adir / "metrics.json", metrics)
                vs_start = (
                    ""
                    if arm.start is None
                    else (f", {arm.start} {results[name][arm.start]['AP_small']:.3f}")
                )
                _say(
                    f"{name}/{arm.name}: AP_small {metrics['AP_small']:.3f} "
                    f"(FPN 1x {premise['fpn_1x']['AP_small']:.3f}, 2x {premise['fpn_2x']['AP_small']:.3f}{vs_start})"
                )
            else:
                _say(f"[{done}/{total}] {name}/{arm.name}: done")
            if "checkpoint_of" not in metrics and key not in trained:
                trained[key] = (arm.name, adir / f"stage{arm.stage}" / "best.pt")
            results[name][arm.name] = metrics
            if arm.baseline:
                results[name][arm.name + AT_2X] = _baseline_2x(
                    adir, acfg, data[1], f"[{done}/{total}] {name}/{arm.name}", trainer_quiet
                )
        if test_data is not None:
            test_results[name] = _test_rows(
                rdir, cfg, arm_list, test_data, settings["test"], trainer_quiet
            )
        # after every run, so a long study shows its state (``complete`` says whether
        # every run is in)
        finished = [n for n in names if n in results]
        summary = _write_summary(
            out,
            results,
            finished,
            arm_list,
            settings,
            len(finished) == len(names),
            test_results,
            epochs,
        )
    table = format_summary(summary)
    _say(
        f"study of {len(names)} run(s) x {len(arm_list)} arm(s) in {out} ({time.perf_counter() - start:.0f} s this call)"
    )
    print(table, flush=True)
    return summary
