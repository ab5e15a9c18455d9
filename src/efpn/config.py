"""YAML recipes mapped onto dataclasses. Unknown keys are errors; nothing is evaluated."""

from __future__ import annotations

import dataclasses
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
    "load_config",
]


#: how EFPN computes P'2 at inference (see ``EFPNFasterRCNN``)
P2X_MODES = ("auto", "sparse", "banded", "dense")


@dataclass
class DataConfig:
    """Where the data is. ``format`` is coco, yolo, voc, tt100k or synth (generated)."""

    format: str = "synth"
    train: str = ""
    val: str = ""
    image_root: str | None = None
    train_split: str | None = "train"
    val_split: str | None = "val"
    classes: str | None = None
    keep_other: bool = False
    synth_train: int = 200
    synth_val: int = 50
    synth_size: int = 512
    synth_seed: int = 0
    # augmentation
    hflip: float = 0.0
    color_jitter: float = 0.0
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
    log_every: int = 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{where}: unknown key {key!r} (expected one of {', '.join(fields)})")
        default = (
            fields[key].default_factory()
            if fields[key].default_factory is not dataclasses.MISSING
            else fields[key].default
        )
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value or {}, f"{where}.{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(values: dict, where: str = "config") -> Config:
    return _build(Config, values or {}, where)


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML recipe (``yaml.safe_load``) into a :class:`Config`."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ValueError(f"{path}: config not found") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = values
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(values, str(path or "config"))
