"""Three-stage EFPN training (Sec. IV-A3): baseline, distillation, OHEM fine-tuning."""

from __future__ import annotations

import csv
import json
import logging
import math
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from ..config import Config, StageConfig, original_head_on_small_rois
from ..console import stamped
from ..data import (
    AugmentConfig,
    BalancedCropDataset,
    DetectionDataset,
    build_transforms,
    collate,
    generate,
    read_dataset,
)
from ..data.image import reading_settings, use_reading_of
from ..data.records import DataError, DetectionData
from ..distill import distillation_loss, freeze_all_but_new_modules, source_teacher_batch
from ..models import efpn_fpn, load_baseline_state_dict
from . import distributed as dist_utils
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .evaluate import evaluate_model
from .premise import check_premise

__all__ = [
    "StageLoss",
    "Trainer",
    "build_model",
    "load_data",
    "model_from_checkpoint",
    "model_kwargs",
]

log = logging.getLogger("efpn.train")

LOSS_COLUMNS = [
    "loss",
    "loss_objectness",
    "loss_rpn_box_reg",
    "loss_classifier",
    "loss_box_reg",
    "loss_classifier_small",
    "loss_box_reg_small",
    "loss_distill",
    "glob_p3",
    "pos_p3",
    "glob_p2",
    "pos_p2",
]
VAL_COLUMNS = [
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR_100",
    "AR_small",
    "f1_small",
]
CSV_COLUMNS = ["stage", "epoch", "step", "split", "lr", *LOSS_COLUMNS, *VAL_COLUMNS]


# ----------------------------------------------------------------------------- data and model
def load_data(cfg: Config, root: Path | None = None) -> tuple[DetectionData, DetectionData]:
    """Train and val records for a config; ``synth`` generates SynthSigns under ``root``.
    With ``data.eval_classes``, both count only those classes in evaluation."""
    train, val = _read_splits(cfg, root)
    if cfg.data.eval_classes is not None:
        names = _names(cfg.data.eval_classes)
        for data in (train, val):
            unknown = [c for c in names if c not in data.classes]
            if unknown or not names:
                raise DataError(
                    f"{data.source}: data.eval_classes {cfg.data.eval_classes!r}: "
                    + (f"no class {unknown[0]!r}" if unknown else "names no class")
                    + f"; the data's classes are {', '.join(data.classes)}"
                )
            data.eval_classes = names
    return train, val


def write_recipe(cfg: Config, out: Path) -> Path:
    """The resolved recipe as ``out/config.yaml`` (what ``--config`` reads back)."""
    path = Path(out) / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def check_splits(train: DetectionData, val: DetectionData) -> None:
    """Refuse splits that cannot train or select a checkpoint: no training image, no box
    to learn from, an empty val set or one without a box of the evaluated classes."""
    if not train.images:
        raise DataError(f"{train.source}: no training images")
    if not train.num_boxes():
        raise DataError(
            f"{train.source}: none of the {len(train.images)} training images has a box; "
            f"nothing to learn (for YOLO, labels/ must mirror images/)"
        )
    if not val.images:
        raise DataError(
            f"{val.source}: the val set is empty ({len(train.images)} training image(s)); "
            f"add images or name a val set with data.val=PATH"
        )
    counted = [
        i for i, c in enumerate(val.classes) if val.eval_classes is None or c in val.eval_classes
    ]
    if not any(np.isin(r.labels, counted).any() for r in val.images):
        raise DataError(
            f"{val.source}: none of the {len(val.images)} val images has a box"
            + (f" of {', '.join(val.eval_classes)}" if val.eval_classes is not None else "")
            + "; AP is undefined, so no epoch can be chosen as best.pt"
        )


def advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One step of the per-iteration learning-rate schedule.

    With mixed precision, ``GradScaler`` skips the optimizer step while it searches for
    a loss scale (often on the first iteration); the schedule still counts that
    iteration, so torch's warning about the call order is expected and not shown.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        scheduler.step()


def _names(text: str) -> list[str]:
    """A comma-separated list of class names."""
    return [c.strip() for c in text.split(",") if c.strip()]


def _read_splits(cfg: Config, root: Path | None) -> tuple[DetectionData, DetectionData]:
    d = cfg.data
    if d.format == "synth":
        # One folder per generator setting, so a changed recipe never reads stale data.
        name = f"synthsigns_{d.synth_train}x{d.synth_val}_{d.synth_size}px_seed{d.synth_seed}"
        out = Path(root or "runs") / name
        if not (out / "val.json").exists() or not (out / "train.json").exists():
            if dist_utils.is_main():
                generate(out, d.synth_train, d.synth_val, d.synth_size, d.synth_seed)
            if dist_utils.world_size() > 1:
                torch.distributed.barrier()
        return read_dataset(out / "train.json", "coco"), read_dataset(out / "val.json", "coco")

    def read(path, split):
        kw = {}
        if d.format in ("yolo", "voc", "tt100k", "dota", "visdrone", "geojson") and split:
            kw["split"] = split
        if d.format == "coco" and d.image_root:
            kw["image_root"] = d.image_root
        if d.format == "tt100k":
            kw.update(classes=d.classes or "tt100k45", keep_other=d.keep_other)
        elif d.format in ("yolo", "voc", "dota", "geojson") and d.classes:
            kw["classes"] = _names(d.classes)
        return read_dataset(path, d.format, **kw)

    if d.val_fraction > 0:  # no split in the data: hold out a deterministic fraction
        from ..data.splits import holdout

        return holdout(read(d.train, d.train_split), d.val_fraction, d.split_seed)
    return read(d.train, d.train_split), read(d.val or d.train, d.val_split)


def model_kwargs(cfg: Config, extended: bool = True) -> dict:
    """The builder arguments (:func:`efpn.models.efpn_fpn`) of a recipe's model section."""
    m = cfg.model
    sr_kwargs = {"width": m.sr_width} if m.sr_module != "nearest" else {}
    if m.sr_module == "ftt":
        sr_kwargs.update(content_blocks=m.ftt_blocks, texture_blocks=m.ftt_blocks)
    return dict(
        sr_module=m.sr_module,
        sr_kwargs=sr_kwargs,
        ftt_input=m.ftt_input,
        ext_out_width=m.ext_out_width,
        out_channels=m.fpn_channels,
        representation_size=m.representation_size,
        small_roi_size=m.small_roi_size,
        merge=m.merge,
        rpn_on_p2x=m.rpn_on_p2x,
        anchor_sizes=tuple(m.anchor_sizes),
        weights_backbone=m.weights_backbone,
        trainable_backbone_layers=m.trainable_backbone_layers,
        norm_layer="frozen" if extended else m.norm_layer,
        p2x_mode=m.p2x_mode,
        sparse_max_coverage=m.sparse_max_coverage,
        p2x_band_rows=m.p2x_band_rows,
        # the detector's transform resizes every image, so multi-scale training happens
        # there: torchvision draws a training size from the tuple and tests at the last.
        # Only the stage-1 baseline trains multi-scale (it must work at S and at 2S to be
        # the teacher); stages 2-3 train at the test scale S, the teacher at 2S.
        min_size=(*cfg.data.scale_jitter, m.min_size)
        if cfg.data.scale_jitter and not extended
        else m.min_size,
        max_size=m.max_size,
        resize_scale=m.resize_scale,
        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        box_score_thresh=m.box_score_thresh,
        box_detections_per_img=m.box_detections_per_img,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image,
        box_batch_size_per_image=m.box_batch_size_per_image,
    )


def build_model(cfg: Config, num_classes: int, extended: bool) -> nn.Module:
    return efpn_fpn(
        cfg.model.backbone,
        num_classes=num_classes,
        extended=extended,
        **model_kwargs(cfg, extended),
    )


def model_from_checkpoint(
    path: str | Path, device="cpu", **model_overrides
) -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint alone (it carries config and class names).

    ``model_overrides`` replace fields of the recipe's model section that do not change
    the weights, e.g. ``p2x_mode`` or ``rpn_post_nms_top_n_test``.
    """
    ckpt = load_checkpoint(path)
    from ..config import config_from_dict

    missing = [
        k
        for k in ("config", "classes", "model", "extended")
        if not isinstance(ckpt, dict) or k not in ckpt
    ]
    if missing:
        raise ValueError(
            f"{path}: not an efpn checkpoint (no {', '.join(missing)}); a torchvision detector's "
            "weights start training with `efpn train --init`"
        )
    cfg = config_from_dict(ckpt["config"], f"{path}: config")
    for key, value in model_overrides.items():
        if not hasattr(cfg.model, key):
            raise ValueError(f"{path}: unknown model setting {key!r}")
        setattr(cfg.model, key, value)
    use_reading_of(ckpt.get("image_reading"), path)
    model = build_model(cfg, len(ckpt["classes"]) + 1, ckpt["extended"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path}: its weights do not fit its own recipe ({first})") from None
    return model.to(device).eval(), ckpt


def detector_from_file(path: str | Path, device="cpu", **model_overrides) -> tuple[Any, dict]:
    """A detector and its checkpoint's description (classes, category ids, recipe) from
    an efpn checkpoint or, for a ``.onnx`` file, an :class:`~efpn.export.OnnxDetector`
    (onnxruntime, CPU)."""
    if str(path).lower().endswith(".onnx"):
        if model_overrides:
            raise ValueError(
                f"{path}: an ONNX file has its inference settings built in "
                f"({', '.join(sorted(model_overrides))}); export again from a checkpoint with them"
            )
        from ..export import OnnxDetector

        detector = OnnxDetector(path)
        use_reading_of(detector.meta.get("image_reading"), path)
        return detector, detector.checkpoint()
    return model_from_checkpoint(path, device, **model_overrides)


# ----------------------------------------------------------------------------- stage losses
class StageLoss(nn.Module):
    """The loss of one stage as a module, so DDP wraps it (its forward prepares the
    gradient all-reduce).

    Stage 1: every Faster R-CNN loss. Stage 2: Eq. (5) distillation (or, with
    distillation off, the small head's detection loss). Stage 3: the small head's
    detection loss (OHEM when configured), or with ``stage3.train_all`` every loss of
    both heads and the RPN.
    """

    def __init__(self, model: nn.Module, stage: int, cfg: Config) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.distill = cfg.distill
        self.train_all = stage == 3 and cfg.stage3.train_all

    def forward(self, images, targets) -> dict[str, torch.Tensor]:
        if self.stage == 2 and self.distill.enabled:
            transform = self.model.transform
            image_list, targets_t = transform(images, targets)
            teacher_images = None
            if self.distill.teacher_mode == "upsample_teacher":
                # the teacher sees the source pixels at 2x the student's size (Sec. IV-A3:
                # 2800 px from TT100K's 2048-px images), not an upsampled student batch
                teacher_images = source_teacher_batch(
                    images,
                    image_list.image_sizes,
                    image_list.tensors.shape,
                    mean=transform.image_mean,
                    std=transform.image_std,
                )
            terms = distillation_loss(
                self.model.backbone,
                image_list.tensors,
                [t["boxes"] for t in targets_t],
                mode=self.distill.teacher_mode,
                lam=self.distill.lam,
                ftt_loss=self.distill.ftt_loss,
                teacher_images=teacher_images,
            )
            return {"loss": terms["loss_distill"], **terms}
        losses = self.model(images, targets)
        if self.train_all:
            keys = list(losses)
        elif self.stage == 1:
            keys = [k for k in losses if not k.endswith("_small")]
        else:
            keys = ["loss_classifier_small", "loss_box_reg_small"]
        return {"loss": sum(losses[k] for k in keys), **losses}


def _freeze_for_stage(
    model: nn.Module, stage: int, cfg: Config, stage_cfg: StageConfig
) -> list[str]:
    if stage == 1:
        return [n for n, p in model.named_parameters() if p.requires_grad]
    if stage == 2:
        prefixes = ["backbone.extension."]
        if not cfg.distill.enabled:  # the extension learns from the detection loss alone
            prefixes += ["roi_heads.small_box_head.", "roi_heads.small_box_predictor."]
        return freeze_all_but_new_modules(model, prefixes)
    if stage_cfg.train_all:  # every layer stage 1 trained, and the extension
        return [n for n, p in model.named_parameters() if p.requires_grad]
    prefixes = ["roi_heads.small_box_head.", "roi_heads.small_box_predictor."]
    if stage_cfg.unfreeze_extension:
        prefixes.append("backbone.extension.")
    return freeze_all_but_new_modules(model, prefixes)


# ----------------------------------------------------------------------------- samplers
class GroupedBatchSampler(Sampler):
    """Batches of images with the same orientation (landscape or portrait), drawn in the
    order of ``sampler`` (torchvision's aspect-ratio grouping, two groups)."""

    def __init__(self, sampler: Sampler, groups: list[int], batch_size: int, skip: int = 0) -> None:
        self.sampler, self.groups, self.batch_size, self.skip = sampler, groups, batch_size, skip

    def _batches(self):
        buckets: dict[int, list[int]] = {}
        for idx in self.sampler:
            b = buckets.setdefault(self.groups[idx], [])
            b.append(idx)
            if len(b) == self.batch_size:
                yield list(b)
                b.clear()
        for b in buckets.values():
            if b:
                yield list(b)

    def __iter__(self):
        for i, batch in enumerate(self._batches()):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self._batches()) - self.skip


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Runs the stages of a config into a run folder.

    Args:
        cfg: the recipe.
        out: the run folder (``config.yaml``, ``stage{1,2,3}/`` with ``last.pt``,
            ``best.pt``, ``metrics.csv`` and plots, ``eval.json``).
        quiet: no progress bars.
        stop_after_steps: stop (saving ``last.pt``) after this many steps in total, as
            an interrupt would; used to test resuming.
        data: ``(train, val)`` records to use instead of the recipe's (``efpn study``
            passes its folds this way).
    """

    def __init__(
        self,
        cfg: Config,
        out: str | Path,
        quiet: bool = False,
        stop_after_steps: int | None = None,
        data: tuple[DetectionData, DetectionData] | None = None,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out)
        # EFPN_BANDS / EFPN_RANGE: checked before anything is read, recorded in checkpoints
        self.image_reading = reading_settings()
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.stop_after_steps = stop_after_steps
        self.distributed, local_rank = dist_utils.init()
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        else:
            try:
                self.device = torch.device(cfg.device)
            except RuntimeError:
                raise ValueError(
                    f"device {cfg.device!r}: not a torch device (auto, cpu, cuda, cuda:1)"
                ) from None
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(
                    f"device {cfg.device!r}: no CUDA GPU here; use device: auto or cpu"
                )
        if data is None:
            data = load_data(cfg, self.out.parent if cfg.data.format == "synth" else None)
        self.train_data, self.val_data = data
        check_splits(self.train_data, self.val_data)
        self.classes = list(self.train_data.classes)
        self.premise: dict | None = None
        if dist_utils.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            write_recipe(cfg, self.out)

    # -- data
    def _dataset(self):
        d = self.cfg.data
        aug = AugmentConfig(
            hflip=d.hflip,
            color_jitter=d.color_jitter,
            hue_jitter=d.hue_jitter,
            crop=d.crop,
        )
        ds = DetectionDataset(self.train_data, build_transforms(aug, train=True))
        if d.balance_per_class:
            ds = BalancedCropDataset(ds, d.balance_per_class, d.balance_crop, seed=self.cfg.seed)
        return ds

    def _loader(self, ds, batch_size: int, epoch: int, skip: int) -> DataLoader:
        sampler = DistributedSampler(
            ds,
            num_replicas=dist_utils.world_size(),
            rank=dist_utils.rank(),
            shuffle=True,
            seed=self.cfg.seed,
            drop_last=False,
        )
        sampler.set_epoch(epoch)
        groups = []
        for i in range(len(ds)):
            if i < len(self.train_data.images):
                r = self.train_data.images[i]
                groups.append(int(r.width >= r.height))
            else:
                groups.append(1)
        # Its own generator: creating a loader must not draw from the global RNG, or a
        # resumed run would see different RPN/RoI sampling than an uninterrupted one.
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        return DataLoader(
            ds,
            batch_sampler=GroupedBatchSampler(sampler, groups, batch_size, skip),
            collate_fn=collate,
            num_workers=self.cfg.data.workers,
            generator=gen,
        )

    # -- optimisation
    def _optimizer(self, params, o):
        if o.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
            )
        if o.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        raise ValueError(f"unknown optimizer {o.optimizer!r}; expected sgd or adamw")

    @staticmethod
    def _lr_lambda(o, total: int):
        def f(it: int) -> float:
            warm = min(1.0, 0.001 + (1 - 0.001) * it / o.warmup_iters) if o.warmup_iters else 1.0
            if o.schedule == "cosine":
                return warm * 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))
            if o.schedule == "step":
                return warm * o.gamma ** sum(it >= m * total for m in o.milestones)
            raise ValueError(f"unknown schedule {o.schedule!r}; expected step or cosine")

        return f

    # -- one stage
    def stage_dir(self, stage: int) -> Path:
        return self.out / f"stage{stage}"

    def run_stage(self, stage: int, resume: bool = False, init: str | Path | None = None) -> Path:
        """Train one stage; returns the path of its best checkpoint."""
        cfg, scfg = self.cfg, getattr(self.cfg, f"stage{stage}")
        o = scfg.optim
        torch.manual_seed(cfg.seed + stage)
        model = build_model(cfg, len(self.classes) + 1, extended=stage > 1)
        init = init or scfg.init
        if stage > 1 and init is None:
            init = self.stage_dir(stage - 1) / "best.pt"
        sdir = self.stage_dir(stage)
        resuming = resume and (sdir / "last.pt").exists()
        # --resume on a stage that never wrote last.pt starts it fresh from its init.
        if init is not None and not resuming:
            self._initialise(model, stage, Path(init))
        if stage == 3:
            model.roi_heads.ohem = scfg.ohem
            model.roi_heads.ohem_batch_size_per_image = scfg.ohem_batch_size_per_image
            model.roi_heads.original_on_small = original_head_on_small_rois(cfg)
        trainable = _freeze_for_stage(model, stage, cfg, scfg)
        if self.distributed and cfg.model.sync_bn:
            if self.device.type == "cpu":  # torch's SyncBatchNorm runs on accelerators only
                if dist_utils.is_main():
                    log.warning("sync_bn: SyncBatchNorm needs a GPU; keeping per-process BN on CPU")
            else:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        loss_module = StageLoss(model, stage, cfg)
        wrapped = loss_module
        if self.distributed:
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            wrapped = nn.parallel.DistributedDataParallel(
                loss_module, find_unused_parameters=True, **ddp_kwargs
            )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = self._optimizer(params, o)
        ds = self._dataset()
        steps_per_epoch = len(self._loader(ds, o.batch_size, 0, 0))
        total = steps_per_epoch * o.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_lambda(o, total))
        use_amp = o.amp and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        start_epoch, step, best = 0, 0, -float("inf")
        if resuming:
            ckpt = load_checkpoint(sdir / "last.pt")
            self._same_reading(ckpt, sdir / "last.pt")
            model.load_state_dict(ckpt["model"])
            if "optimizer" in ckpt:  # a finished stage's last.pt has none (nothing to resume)
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                scaler.load_state_dict(ckpt["scaler"])
            start_epoch, step, best = ckpt["epoch"], ckpt["step"], ckpt["best"]
            restore_rng(ckpt["rng"])
            if dist_utils.is_main():
                log.info(
                    f"stage {stage}: resumed from {sdir / 'last.pt'} at epoch {start_epoch}, step {step}"
                )
        rows = self._csv_rows(sdir, step if resume else 0)

        def state(epoch: int) -> dict:
            return {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "step": step,
                "best": best,
                "rng": capture_rng(),
                "config": cfg.to_dict(),
                "classes": self.classes,
                "category_ids": list(self.train_data.category_ids),
                "image_reading": self.image_reading,
                "stage": stage,
                "extended": stage > 1,
                "trainable": trainable,
            }

        def save(name: str, epoch: int, slim: bool = False) -> None:
            # best.pt, and last.pt once the stage is over, keep what inference and the
            # next stage need: no optimiser, scheduler or scaler state (half the disk)
            if dist_utils.is_main():
                st = state(epoch)
                if slim or name == "best.pt":
                    for key in ("optimizer", "scheduler", "scaler"):
                        st.pop(key)
                save_checkpoint(st, sdir / name)
                self._write_csv(sdir, rows)

        bad = 0
        interrupted = False
        previous = signal.getsignal(signal.SIGINT)
        # Ctrl-C finishes the step under way, then saves: a checkpoint taken mid-step
        # would hold batch-norm statistics and RNG state of a step it does not count.
        stop = {"requested": False, "saved": False}

        def on_sigint(signum, frame):
            if stop["requested"]:  # a second Ctrl-C stops at once; last.pt stays as saved
                raise KeyboardInterrupt
            stop["requested"] = True
            if dist_utils.is_main():
                log.warning(
                    "interrupt: finishing this step, then saving (Ctrl-C again to stop now)"
                )

        def stop_if_requested(at_epoch: int) -> None:
            if self.distributed:  # every rank stops after the same step
                flag = torch.tensor([float(stop["requested"])], device=self.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop["requested"] = bool(flag.item())
            if stop["requested"]:
                save("last.pt", at_epoch)
                stop["saved"] = True
                raise KeyboardInterrupt

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, on_sigint)
        try:
            for epoch in range(start_epoch, o.epochs):
                model.train()
                skip = step - epoch * steps_per_epoch
                loader = self._loader(ds, o.batch_size, epoch, max(skip, 0))
                bar = tqdm(
                    loader,
                    desc=f"stage {stage} epoch {epoch + 1}/{o.epochs}",
                    disable=self.quiet or not self.tty or not dist_utils.is_main(),
                    leave=False,
                )
                for images, targets in bar:
                    images = [i.to(self.device) for i in images]
                    targets = [
                        {
                            "boxes": t["boxes"].as_subclass(torch.Tensor).to(self.device),
                            "labels": t["labels"].to(self.device),
                            # a class-balancing crop: resized by its source image's factor
                            **({"source_size": t["source_size"]} if "source_size" in t else {}),
                        }
                        for t in targets
                    ]
                    with torch.autocast(self.device.type, enabled=use_amp):
                        losses = wrapped(images, targets)
                    loss = losses["loss"]
                    finite = torch.isfinite(loss.detach())
                    if self.distributed:
                        flag = finite.float().to(self.device)
                        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                        finite = flag > 0
                    optimizer.zero_grad(set_to_none=True)
                    if not finite:
                        bad += 1
                        log.warning(
                            f"stage {stage} step {step}: non-finite loss skipped ({bad} in a row)"
                        )
                        if bad >= o.max_bad_steps:
                            raise RuntimeError(
                                f"stage {stage}: {bad} non-finite losses in a row at step {step}; "
                                f"lower the learning rate (now {scheduler.get_last_lr()[0]:.3g}) or check the data"
                            )
                        continue
                    bad = 0
                    scaler.scale(loss).backward()
                    if o.clip_grad:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    advance_schedule(scheduler)
                    step += 1
                    row = {
                        "stage": stage,
                        "epoch": epoch + 1,
                        "step": step,
                        "split": "train",
                        "lr": scheduler.get_last_lr()[0],
                    }
                    row.update(
                        {k: float(v.detach()) for k, v in losses.items() if k in LOSS_COLUMNS}
                    )
                    rows.append(row)
                    if (
                        not self.quiet
                        and dist_utils.is_main()
                        and step % max(cfg.log_every, 1) == 0
                    ):
                        # a line in train.log; on the output too unless a bar shows it
                        self._say(
                            f"stage {stage} epoch {epoch + 1}/{o.epochs} step {step}/{total} "
                            f"loss {row['loss']:.4f} lr {row['lr']:.3g}",
                            echo=not self.tty,
                        )
                    if not self.quiet and self.tty:
                        bar.set_postfix(
                            {
                                k: f"{v:.3f}"
                                for k, v in row.items()
                                if k.startswith(("loss", "glob", "pos"))
                                and k
                                in (
                                    "loss",
                                    "glob_p2",
                                    "pos_p2",
                                    "loss_classifier",
                                    "loss_classifier_small",
                                )
                            }
                        )
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                        save("last.pt", epoch)
                    if self.stop_after_steps is not None and step >= self.stop_after_steps:
                        save("last.pt", epoch)
                        return sdir / "last.pt"
                    stop_if_requested(epoch)
                metrics = evaluate_model(
                    model,
                    self.val_data,
                    device=self.device,
                    batch_size=o.batch_size,
                    score_thresh=cfg.eval_score_thresh,
                    size_reference=cfg.eval_size_reference,
                    quiet=self.quiet,
                )
                if dist_utils.is_main():
                    metrics.pop("_results", None)
                    rows.append(
                        {
                            "stage": stage,
                            "epoch": epoch + 1,
                            "step": step,
                            "split": "val",
                            **{k: metrics[k] for k in VAL_COLUMNS},
                        }
                    )
                    score = metrics["AP_small"]
                    if not self.quiet:
                        self._say(
                            f"stage {stage} epoch {epoch + 1}: AP {metrics['AP']:.3f} AP_small {score:.3f} AR_small {metrics['AR_small']:.3f}"
                        )
                    # ties go to the later epoch: when the metric never moves (all 0
                    # early in training from scratch), the next stage starts from the
                    # last epoch, not the first
                    if score >= best or not (sdir / "best.pt").exists():
                        best = max(score, best)
                        save("best.pt", epoch + 1)
                        if not self.quiet:
                            self._say(
                                f"stage {stage}: best.pt is epoch {epoch + 1} (AP_small {score:.3f})"
                            )
                save("last.pt", epoch + 1, slim=epoch + 1 == o.epochs)
                stop_if_requested(epoch + 1)
        except KeyboardInterrupt:
            interrupted = True
            if dist_utils.is_main():
                if stop["saved"]:
                    log.warning(
                        f"interrupted: saved {sdir / 'last.pt'} at step {step}; continue with --resume"
                    )
                else:
                    log.warning(
                        f"interrupted mid-step: {sdir / 'last.pt'} holds the last saved step; "
                        "continue with --resume"
                    )
            raise
        finally:
            signal.signal(signal.SIGINT, previous)
            if not interrupted and dist_utils.is_main() and rows:
                self._write_csv(sdir, rows)
                from ..viz import plot_losses

                plot_losses(rows, sdir / "losses.png", title=f"stage {stage}")
        return sdir / "best.pt"

    def _say(self, msg: str, echo: bool = True) -> None:
        """A progress line: timestamped when the output is not a terminal, and always
        appended, timestamped, to ``train.log`` in the run folder."""
        line = stamped(msg)
        if echo and self.tty:
            tqdm.write(msg)
        elif echo:
            print(line, flush=True)
        if dist_utils.is_main():
            with open(self.out / "train.log", "a") as f:
                f.write(line + "\n")

    def _same_reading(self, ckpt: dict, path: Path) -> None:
        """A run goes on only with the image reading its checkpoints were trained with."""
        recorded = ckpt.get("image_reading")
        if recorded is not None and recorded != self.image_reading:

            def said(settings):
                return " ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "the defaults"

            raise ValueError(
                f"{path}: trained on images read with {said(recorded)}, this run reads them "
                f"with {said(self.image_reading)}; set the same to go on"
            )

    def _initialise(self, model: nn.Module, stage: int, path: Path) -> None:
        """Stage 1 from a trained detector (torchvision or ours; a predictor of another
        class count is left fresh); later stages from the previous stage."""
        ckpt = load_checkpoint(path)
        if isinstance(ckpt, dict):
            self._same_reading(ckpt, path)
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(
                f"{path}: not a detector's weights (expected a state dict of tensors, or an "
                "efpn checkpoint)"
            )
        if stage > 1 and not ckpt.get("extended", False):
            load_baseline_state_dict(model, state, source=str(path))
            return
        own = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        refit = sorted(set(state) & set(own) - set(fitting))
        missing, unexpected = model.load_state_dict(fitting, strict=False)
        allowed = ("roi_heads.box_predictor.",) if stage == 1 else ()
        bad = [
            k
            for k in list(missing) + refit
            if not k.startswith(allowed) and not k.endswith("num_batches_tracked")
        ]
        unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if bad or unexpected:
            raise ValueError(
                f"{path}: does not fit this model (missing or mismatched {bad[:3]}, unexpected {unexpected[:3]})"
            )
        fresh = [k for k in refit if k.startswith("roi_heads.box_predictor.cls_score")]
        if fresh:
            theirs = (
                state[fresh[0]].shape[0] if fresh[0].endswith("weight") else len(state[fresh[0]])
            )
            self._say(
                f"{path}: its box predictor has {theirs} classes (with the background), this "
                f"recipe {own[fresh[0]].shape[0]}: the predictor starts fresh, the rest is loaded"
            )

    @staticmethod
    def _csv_rows(sdir: Path, keep_until: int) -> list[dict]:
        path = sdir / "metrics.csv"
        if keep_until <= 0 or not path.exists():
            return []
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        return [{k: v for k, v in r.items() if v != ""} for r in rows]

    @staticmethod
    def _write_csv(sdir: Path, rows: list[dict]) -> None:
        sdir.mkdir(parents=True, exist_ok=True)
        tmp = sdir / ".metrics.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
        tmp.replace(sdir / "metrics.csv")

    def check_premise(self, checkpoint: str | Path) -> dict:
        """Stage 1's FPN on val at S and 2S (``premise.json``; see :mod:`.premise`)."""
        model, _ = model_from_checkpoint(checkpoint, self.device)
        return check_premise(
            model,
            self.val_data,
            out=self.out,
            device=self.device,
            score_thresh=self.cfg.eval_score_thresh,
            size_reference=self.cfg.eval_size_reference,
            quiet=self.quiet,
            curves=True,
        )

    # -- all stages
    def run(self, stages: list[int], resume: bool = False) -> dict:
        best = None
        for s in stages:
            init = None
            if s == 1:
                init = self.cfg.stage1.init
            best = self.run_stage(s, resume=resume, init=init)
            if s == 1 and self.cfg.premise_check and dist_utils.is_main():
                self.premise = self.check_premise(best)
        if best is None or not dist_utils.is_main():
            return {}
        model, _ = model_from_checkpoint(best, self.device)
        metrics = evaluate_model(
            model,
            self.val_data,
            device=self.device,
            score_thresh=self.cfg.eval_score_thresh,
            size_reference=self.cfg.eval_size_reference,
            quiet=self.quiet,
            curves=True,
        )
        results = metrics.pop("_results")
        (self.out / "predictions.json").write_text(json.dumps(results))
        (self.out / "eval.json").write_text(json.dumps(metrics, indent=1))
        from ..viz import plot_accuracy_recall, plot_size_ap

        plot_size_ap({"model": metrics}, self.out / "ap_by_size.png")
        plot_accuracy_recall({"model": metrics["curves"]}, self.out / "accuracy_recall.png")
        return metrics
