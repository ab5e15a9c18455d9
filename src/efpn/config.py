"""YAML recipes mapped onto dataclasses. Unknown keys are errors; nothing is evaluated."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Config",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "OptimConfig",
    "StageConfig",
    "apply_overrides",
    "load_config",
    "parse_override",
]


#: how EFPN computes P'2 at inference (see ``EFPNFasterRCNN``)
P2X_MODES = ("auto", "sparse", "banded", "dense")


@dataclass
class DataConfig:
    """Where the data is. ``format`` is coco, yolo, voc, tt100k, dota, visdrone or synth
    (generated)."""

    format: str = "synth"
    train: str = ""
    val: str = ""
    image_root: str | None = None
    train_split: str | None = "train"
    val_split: str | None = "val"
    classes: str | None = None
    keep_other: bool = False
    # comma-separated classes that evaluation counts (training still sees every class)
    eval_classes: str | None = None
    # hold out this fraction of `train` (its `train_split`) as val, by sorted file name
    # shuffled with split_seed, for data without a split of its own (0: use `val`)
    val_fraction: float = 0.0
    split_seed: int = 0
    synth_train: int = 200
    synth_val: int = 50
    synth_size: int = 512
    synth_seed: int = 0
    # augmentation
    hflip: float = 0.0
    color_jitter: float = 0.0
    # hue shift strength; None: color_jitter / 4 (the hue part costs most of the jitter)
    hue_jitter: float | None = None
    # shorter sides drawn per training batch (multi-scale training; model.min_size at test)
    scale_jitter: list[int] = field(default_factory=list)
    crop: float = 0.0
    balance_per_class: int = 0
    balance_crop: int = 512
    workers: int = 0


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    fpn_channels: int = 256
    representation_size: int = 1024
    sr_module: str = "ftt"
    sr_width: int | None = None
    ftt_blocks: int = 2
    ftt_input: str = "output"
    ext_out_width: int | None = None
    small_roi_size: float = 56.0
    merge: str = "exclusive"
    rpn_on_p2x: bool = False
    min_size: int = 512
    max_size: int = 512
    # resize every image by this factor at the test size (None: shorter side to min_size)
    resize_scale: float | None = None
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    trainable_backbone_layers: int = 3
    # "batchnorm" trains the stage-1 baseline with BN (needed from scratch); stages 2-3
    # always freeze BN, with the statistics stage 1 learnt.
    norm_layer: str = "frozen"
    sync_bn: bool = False
    p2x_mode: str = "auto"  # sparse on the CPU, banded elsewhere (same detections)
    sparse_max_coverage: float = 0.5
    p2x_band_rows: int | None = None  # None: 32 on the CPU, 128 elsewhere; 0: one pass
    weights_backbone: str | None = None
    rpn_post_nms_top_n_test: int = 1000
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512


@dataclass
class OptimConfig:
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 12
    batch_size: int = 2
    warmup_iters: int = 100
    schedule: str = "step"
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])
    gamma: float = 0.1
    clip_grad: float = 10.0
    amp: bool = True
    max_bad_steps: int = 5


@dataclass
class DistillConfig:
    enabled: bool = True
    teacher_mode: str = "upsample_teacher"
    lam: float = 1.0
    ftt_loss: bool = True


@dataclass
class StageConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    ohem: bool = True
    ohem_batch_size_per_image: int = 128
    unfreeze_extension: bool = False
    train_all: bool = False
    init: str | None = None


@dataclass
class Config:
    name: str = "efpn"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=StageConfig)
    stage3: StageConfig = field(default_factory=StageConfig)
    eval_score_thresh: float = 0.5
    # size bins (small/medium/large) in the image files' pixels ("source") or in the
    # pixels the model sees at its test size ("model")
    eval_size_reference: str = "source"
    # after stage 1, evaluate its FPN at S and 2S and write premise.json
    premise_check: bool = True
    checkpoint_every: int = 200
    # without a terminal, print a timestamped progress line every this many steps
    log_every: int = 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str, prefix: str = ""):
    if not isinstance(values, dict):
        raise ValueError(
            f"{where}: {prefix.rstrip('.') or 'the recipe'}: expected a mapping, got {type(values).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(
                f"{where}: unknown key {prefix + str(key)!r} (expected one of {', '.join(fields)})"
            )
        default = (
            fields[key].default_factory()
            if fields[key].default_factory is not dataclasses.MISSING
            else fields[key].default
        )
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value or {}, where, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, str(fields[key].type), f"{where}: {prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, kind: str, where: str) -> Any:
    """Check a recipe value against its field's annotation; numbers that YAML reads as
    strings (``1e-3``) become floats. Errors name the key."""
    optional = kind.endswith("| None")
    base = kind.replace("| None", "").strip()
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: a value is required (got null)")
    if base == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected a whole number, got {value!r}")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if base.startswith("list["):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = base[5:-1]
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


#: ``(key, rule, message)``: the checks a recipe's values must pass beyond their types
_RULES = [
    ("seed", lambda v: v >= 0, "must be 0 or more"),
    ("model.min_size", lambda v: v >= 1, "must be 1 or more"),
    ("model.max_size", lambda v: v >= 1, "must be 1 or more"),
    ("model.small_roi_size", lambda v: v >= 0, "must be 0 or more"),
    ("model.resize_scale", lambda v: v is None or v > 0, "must be positive"),
    ("model.p2x_mode", lambda v: v in P2X_MODES, f"must be one of {P2X_MODES}"),
    (
        "model.merge",
        lambda v: v in ("exclusive", "duplicate", "gated", "fused"),
        "must be exclusive, duplicate, gated or fused",
    ),
    (
        "model.sr_module",
        lambda v: v in ("ftt", "espcn", "nearest"),
        "must be ftt, espcn or nearest",
    ),
    ("model.norm_layer", lambda v: v in ("frozen", "batchnorm"), "must be frozen or batchnorm"),
    ("data.scale_jitter", lambda v: all(s >= 1 for s in v), "sizes must be 1 or more"),
    ("data.val_fraction", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("data.color_jitter", lambda v: v >= 0, "must be 0 or more"),
    ("data.hue_jitter", lambda v: v is None or 0 <= v <= 0.5, "must be in [0, 0.5] (or null)"),
    (
        "data.format",
        lambda v: v in ("synth", "coco", "yolo", "voc", "tt100k", "dota", "visdrone", "geojson"),
        "must be synth, coco, yolo, voc, tt100k, dota, visdrone or geojson",
    ),
    (
        "distill.teacher_mode",
        lambda v: v in ("upsample_teacher", "downsample_student"),
        "must be upsample_teacher or downsample_student",
    ),
    ("distill.lam", lambda v: v >= 0, "must be 0 or more"),
    ("eval_score_thresh", lambda v: 0 <= v <= 1, "must be within [0, 1]"),
    ("eval_size_reference", lambda v: v in ("source", "model"), "must be source or model"),
    ("checkpoint_every", lambda v: v >= 0, "must be 0 or more"),
    (
        "name",
        lambda v: _SAFE_NAME.match(v) is not None,
        "must be a plain folder name (letters, digits, _ . -)",
    ),
]
_OPTIM_RULES = [
    ("lr", lambda v: v > 0, "must be positive"),
    ("epochs", lambda v: v >= 1, "must be 1 or more"),
    ("batch_size", lambda v: v >= 1, "must be 1 or more"),
    ("warmup_iters", lambda v: v >= 0, "must be 0 or more"),
    ("momentum", lambda v: v >= 0, "must be 0 or more"),
    ("weight_decay", lambda v: v >= 0, "must be 0 or more"),
    ("max_bad_steps", lambda v: v >= 1, "must be 1 or more"),
    ("optimizer", lambda v: v in ("sgd", "adamw"), "must be sgd or adamw"),
    ("schedule", lambda v: v in ("step", "cosine"), "must be step or cosine"),
]
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def original_head_on_small_rois(cfg: Config) -> bool:
    """Whether stage 3 trains the original box head on small RoIs too: in joint training
    (``stage3.train_all``) with a merge that scores small RoIs through both heads."""
    return cfg.stage3.train_all and cfg.model.merge != "exclusive"


def validate(cfg: Config, where: str = "config") -> Config:
    """Check the values of a recipe; the error names the key."""

    def get(dotted):
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    rules = list(_RULES)
    for stage in ("stage1", "stage2", "stage3"):
        rules += [(f"{stage}.optim.{k}", rule, msg) for k, rule, msg in _OPTIM_RULES]
    for key, rule, msg in rules:
        value = get(key)
        if not rule(value):
            raise ValueError(f"{where}: {key} {msg}, got {value!r}")
    for stage in ("stage1", "stage2"):
        if get(f"{stage}.train_all"):
            raise ValueError(
                f"{where}: {stage}.train_all applies to stage 3 only (stage 1 trains every "
                "layer, stage 2 the extension alone)"
            )
    d = cfg.data
    if d.val_fraction > 0 and d.val not in (None, d.train):
        raise ValueError(
            f"{where}: data.val {d.val!r} would go unused, since data.val_fraction "
            f"{d.val_fraction:g} holds val out of data.train; set data.val_fraction: 0 to "
            "validate on data.val"
        )
    return cfg


def config_from_dict(values: dict, where: str = "config") -> Config:
    return validate(_build(Config, values or {}, where), where)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML recipe (``yaml.safe_load``) into a :class:`Config`."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
        except FileNotFoundError:
            raise ValueError(f"{path}: config not found") from None
        except IsADirectoryError:
            raise ValueError(f"{path}: is a folder, not a recipe file") from None
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})"
            ) from None
        except yaml.YAMLError as e:
            detail = " ".join(str(e).split())  # one line
            raise ValueError(
                f"{path}: invalid YAML (or a tag safe_load refuses): {detail}"
            ) from None
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(values, str(path or "config"))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML scalar or list value (``yaml.safe_load``; nothing is
    evaluated)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r}: expected key=value, e.g. distill.lam=0")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise ValueError(f"override {text!r}: the value is not valid YAML") from None


def apply_overrides(cfg: Config, overrides: dict[str, Any], where: str) -> Config:
    """A copy of ``cfg`` with dotted-key overrides; an unknown key is an error."""
    values = copy.deepcopy(cfg.to_dict())
    for dotted, value in overrides.items():
        node = values
        *parents, last = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"{where}: unknown key {dotted!r}")
            node = node[p]
        if last not in node:
            raise ValueError(f"{where}: unknown key {dotted!r}")
        node[last] = value
    return config_from_dict(values, where)
