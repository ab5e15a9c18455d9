"""ONNX export of EFPN and FPN detectors, and an onnxruntime detector with the PyTorch
model's interface.

The exported graph is the whole detector, as torchvision exports Faster R-CNN: its input
is one RGB image as float32 in [0, 1] of shape ``(1, 3, H, W)``; inside, it normalizes
and resizes the image as the PyTorch model does, runs the backbone with P'2 computed
densely (the sparse windows depend on the data), the RPN, both box heads with small RoIs
routed to P'2, and the per-class NMS. Its outputs are ``boxes`` (xyxy in the input's
pixels), ``scores`` and ``labels`` (1-based, 0 is the background).

The file's metadata records what a runtime needs without efpn: the class names, the
category ids, the normalization (mean, std), the resize (``min_size``, ``max_size``,
``resize_scale``) and the recipe.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__

__all__ = [
    "DEFAULT_OPSET",
    "ExportMismatch",
    "OnnxDetector",
    "compare_detections",
    "export_onnx",
    "require_onnx",
    "sample_image",
]

DEFAULT_OPSET = 17
#: how far the exported detections may be from PyTorch's
BOX_TOLERANCE = 1e-3  # pixels
SCORE_TOLERANCE = 1e-4
INSTALL_HINT = "pip install 'efpn[export]' (onnx and onnxruntime)"


class ExportMismatch(ValueError):
    """The exported file's detections differ from the PyTorch model's."""


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a one-line error that says what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ValueError(
            f"ONNX needs the export extra ({e.name} is missing): {INSTALL_HINT}"
        ) from None
    return onnx, onnxruntime


class _SingleImage(nn.Module):
    """The detector as a graph of one image: ``(1, 3, H, W)`` in, three tensors out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model([image[0]])[0]
        return out["boxes"], out["scores"], out["labels"]


@contextlib.contextmanager
def _dense(model: nn.Module):
    """P'2 in one dense pass while exporting (sparse windows and bands are planned from
    the proposals and the map size, which a traced graph cannot re-plan)."""
    mode = getattr(model, "p2x_mode", None)
    if mode is not None:
        model.p2x_mode = "dense"
    try:
        yield
    finally:
        if mode is not None:
            model.p2x_mode = mode


def sample_image(size: int | tuple[int, int], seed: int = 0) -> Tensor:
    """A SynthSigns scene as ``(3, H, W)`` float in [0, 1] (rendered square, then
    resized to ``size`` when it is not)."""
    from .data.synthetic import render_scene

    h, w = (size, size) if isinstance(size, int) else size
    image, _, _ = render_scene(np.random.default_rng([seed, 7]), max(h, w))
    if (h, w) != (max(h, w), max(h, w)):
        image = image.resize((w, h))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def compare_detections(
    ref: dict[str, Tensor],
    got: dict[str, Tensor],
    *,
    box_tol: float = BOX_TOLERANCE,
    score_tol: float = SCORE_TOLERANCE,
) -> str | None:
    """``None`` when two detection sets agree, else what differs.

    They agree when they have the same count and each detection of ``ref`` has its own
    partner in ``got`` with the same label, every box coordinate within ``box_tol``
    pixels and the score within ``score_tol``. Partners are matched as sets, since
    detections with equal scores may come out in either order.
    """
    n_ref, n_got = len(ref["scores"]), len(got["scores"])
    if n_ref != n_got:
        return f"{n_got} detections instead of {n_ref}"
    if n_ref == 0:
        return None
    rb, gb = ref["boxes"].cpu().double(), got["boxes"].cpu().double()
    rs, gs = ref["scores"].cpu().double(), got["scores"].cpu().double()
    rl, gl = ref["labels"].cpu().long(), got["labels"].cpu().long()
    box = (rb[:, None, :] - gb[None, :, :]).abs().amax(-1)  # (ref, got)
    score = (rs[:, None] - gs[None, :]).abs()
    fits = (rl[:, None] == gl[None, :]) & (box <= box_tol) & (score <= score_tol)
    taken = torch.zeros(n_got, dtype=torch.bool)
    for i in range(n_ref):
        free = torch.where(fits[i] & ~taken)[0]
        if free.numel() == 0:
            same = torch.where(rl[i] == gl)[0]
            if same.numel() == 0:
                return f"no detection of label {int(rl[i])} where PyTorch has one"
            k = same[box[i, same].argmin()]
            return (
                f"a detection differs by up to {box[i, k].item():.2g} px and "
                f"{score[i, k].item():.2g} in score (tolerances {box_tol} px, {score_tol})"
            )
        taken[free[box[i, free].argmin()]] = True
    return None


def _metadata(model: nn.Module, meta: dict[str, Any], dynamic: bool, size: int) -> dict[str, str]:
    t = model.transform
    values = {
        "efpn_version": __version__,
        "input": "image: RGB float32 in [0, 1], shape (1, 3, H, W)"
        + ("" if dynamic else f" with H = W = {size}"),
        "outputs": "boxes (N, 4) xyxy in input pixels, scores (N,), labels (N,) 1-based",
        "dynamic": dynamic,
        "size": None if dynamic else size,
        "image_mean": list(t.image_mean),
        "image_std": list(t.image_std),
        "min_size": int(t.min_size[-1]),
        "max_size": int(t.max_size),
        "resize_scale": getattr(t, "resize_scale", None),
        "reference_size": getattr(t, "reference_size", None),
        "extended": bool(getattr(model, "extended", False)),
        **meta,
    }
    return {k: json.dumps(v) for k, v in values.items()}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    classes: list[str],
    category_ids: list[int] | None = None,
    config: dict | None = None,
    image_reading: dict | None = None,
    size: int | None = None,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
) -> dict[str, Any]:
    """Export an EFPN or FPN detector to ONNX and check it in onnxruntime.

    Args:
        model: an :class:`~efpn.models.EFPNFasterRCNN` (extended or not).
        path: the ``.onnx`` file to write (atomically: a failed export leaves no file).
        classes: class names, in label order (label 1 is ``classes[0]``).
        category_ids: the dataset's category id of each class (default 1..K).
        config: the recipe, recorded in the metadata (``efpn val`` reads its val split).
        image_reading: how the training images were read (the checkpoint's
            ``image_reading``: ``EFPN_BANDS``, ``EFPN_RANGE``), so that efpn reads
            scenes for the file as training did.
        size: the square input side the graph is traced at; without ``dynamic``, the
            only input size it accepts. Default: the model's ``max_size``.
        dynamic: accept any height and width.
        opset: ONNX opset (11 or later).
        validate: run the file in onnxruntime on SynthSigns scenes (at ``size``; with
            ``dynamic``, also at a non-square size) and raise :class:`ExportMismatch`
            when its detections differ from PyTorch's.

    Returns:
        ``{"path", "bytes", "size", "dynamic", "opset", "checked"}``, where ``checked``
        lists, per validation image, its size and detection count.
    """
    require_onnx()
    if opset < 11:
        raise ValueError(f"--opset {opset}: the detector needs opset 11 or later")
    size = int(model.transform.max_size if size is None else size)
    if size < 32:
        raise ValueError(f"--size {size}: at least 32 pixels")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    meta = {
        "classes": list(classes),
        "category_ids": list(category_ids or range(1, len(classes) + 1)),
        "config": config,
        "image_reading": image_reading or {},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        info = _write_and_check(
            model, tmp, meta, size=size, dynamic=dynamic, opset=opset, validate=validate
        )
    except ExportMismatch as e:
        tmp.unlink(missing_ok=True)
        raise ExportMismatch(f"{path}: {e}; the file was not written") from None
    except RuntimeError as e:  # torch.onnx.OnnxExporterError is one
        tmp.unlink(missing_ok=True)
        first = (str(e).splitlines() or [type(e).__name__])[0][:300]
        raise ValueError(
            f"{path}: torch.onnx could not export the model ({first}); try another --opset"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed export leaves no file
        raise
    tmp.replace(path)
    info.update(path=str(path), bytes=path.stat().st_size)
    return info


def _write_and_check(
    model: nn.Module, tmp: Path, meta: dict, *, size: int, dynamic: bool, opset: int, validate: bool
) -> dict[str, Any]:
    """Trace ``model`` into ``tmp`` at ``size``, add the metadata, and check it."""
    onnx, _ = require_onnx()
    wrapper = _SingleImage(model).eval()
    example = sample_image(size)[None]
    with _dense(model), torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on constants (the per-level scales, the stride) are expected
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=["boxes", "scores", "labels"],
            dynamic_axes={
                "image": {2: "height", 3: "width"} if dynamic else {},
                "boxes": {0: "detections"},
                "scores": {0: "detections"},
                "labels": {0: "detections"},
            },
            do_constant_folding=True,
        )
    proto = onnx.load(str(tmp))
    for key, value in _metadata(model, meta, dynamic, size).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "efpn"
    proto.producer_version = __version__
    onnx.save(proto, str(tmp))
    info: dict[str, Any] = {"size": size, "dynamic": dynamic, "opset": opset, "checked": []}
    if validate:
        info["checked"] = _validate(model, tmp, size, dynamic)
    return info


def _validate(model: nn.Module, path: Path, size: int, dynamic: bool) -> list[dict]:
    detector = OnnxDetector(path)
    sizes = [(size, size)]
    if dynamic:  # a second, non-square size proves the graph is not fixed to the first
        sizes.append((max(32, int(size * 0.75)), max(32, int(size * 1.25))))
    checked = []
    for i, hw in enumerate(sizes):
        image = sample_image(hw, seed=i)
        with _dense(model), torch.no_grad():
            ref = model([image])[0]
        got = detector([image])[0]
        problem = compare_detections(ref, got)
        if problem:
            raise ExportMismatch(
                f"onnxruntime and PyTorch disagree on a {hw[0]}x{hw[1]} SynthSigns image: {problem}"
            )
        checked.append({"height": hw[0], "width": hw[1], "detections": len(ref["scores"])})
    return checked


def _transform_from_meta(meta: dict[str, Any]):
    """The PyTorch model's transform rebuilt from the file's metadata: what evaluation
    reads of it (test size, ``factor``, for a fixed-factor model ``resize_scale``)."""
    from .models.transform import ExportableTransform, ScaleTransform

    args = (int(meta["min_size"]), int(meta["max_size"]), meta["image_mean"], meta["image_std"])
    if meta.get("resize_scale") is None:
        return ExportableTransform(*args)
    return ScaleTransform(
        *args,
        resize_scale=float(meta["resize_scale"]),
        reference_size=int(meta["reference_size"]),
    )


class OnnxDetector:
    """An exported detector in onnxruntime, called like the PyTorch model in eval mode.

    ``detector(images)`` takes a list of ``(3, H, W)`` float tensors in [0, 1] and
    returns a list of ``{"boxes", "scores", "labels"}`` tensors on the CPU. A file
    exported without ``--dynamic`` accepts one size ``S``: other images are padded at
    the bottom and right to a square, resized to ``S`` and their boxes mapped back.

    Args:
        path: the ``.onnx`` file.
        threads: onnxruntime's intra-op threads (``None``: its default).
        providers: onnxruntime execution providers (default: CPU).
    """

    def __init__(
        self, path: str | Path, *, threads: int | None = None, providers: list[str] | None = None
    ) -> None:
        _, ort = require_onnx()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: ONNX file not found")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own classes for bad files
            first = (str(e).splitlines() or [""])[0][:200]
            raise ValueError(f"{self.path}: not a loadable ONNX model ({first})") from None
        raw = self.session.get_modelmeta().custom_metadata_map
        try:
            self.meta = {k: json.loads(v) for k, v in raw.items()}
            self.classes = list(self.meta["classes"])
            self.transform = _transform_from_meta(self.meta)
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{self.path}: not an efpn export (its metadata lacks the classes and "
                "preprocessing; export it with `efpn export`)"
            ) from None
        self.category_ids = list(self.meta.get("category_ids") or range(1, len(self.classes) + 1))
        self.extended = bool(self.meta.get("extended"))
        self.size = None if self.meta.get("dynamic") else int(self.meta["size"])
        self.last_p2x_coverage: list[float] = []

    def eval(self) -> OnnxDetector:
        return self

    def to(self, device) -> OnnxDetector:
        return self

    def checkpoint(self) -> dict[str, Any]:
        """The parts of a checkpoint that prediction and evaluation read."""
        return {
            "classes": self.classes,
            "category_ids": self.category_ids,
            "config": self.meta.get("config"),
            "extended": self.extended,
            "image_reading": self.meta.get("image_reading") or {},
        }

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        outputs = [self._one(img) for img in images]
        # a dense P'2: the whole stride-2 map is computed for every image
        self.last_p2x_coverage = [1.0] * len(images) if self.extended else []
        return outputs

    def _one(self, image: Tensor) -> dict[str, Tensor]:
        image = image.detach().float().cpu()
        _, h, w = image.shape
        side = None
        if self.size is not None and (h, w) != (self.size, self.size):
            side = max(h, w)
            square = torch.zeros(3, side, side)
            square[:, :h, :w] = image
            image = torch.nn.functional.interpolate(
                square[None], size=(self.size, self.size), mode="bilinear", antialias=True
            )[0]
        try:
            boxes, scores, labels = self.session.run(None, {"image": image[None].numpy()})
        except Exception as e:  # onnxruntime's own error classes
            first = (str(e).splitlines() or [""])[0][:300]
            raise ValueError(
                f"{self.path}: onnxruntime failed on a {h}x{w} image ({first})"
            ) from None
        out = {
            "boxes": torch.from_numpy(boxes).float(),
            "scores": torch.from_numpy(scores).float(),
            "labels": torch.from_numpy(labels).long(),
        }
        if side is not None:
            out["boxes"] = out["boxes"] * (side / self.size)
            out["boxes"][:, 0::2] = out["boxes"][:, 0::2].clamp(0, w)
            out["boxes"][:, 1::2] = out["boxes"][:, 1::2].clamp(0, h)
        return out
