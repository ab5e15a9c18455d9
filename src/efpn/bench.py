"""``efpn bench``: the paper's Table III (inference cost of FPN, FPN-2x and EFPN) as a command.

Five configurations with the same weights, measured side by side in one process:

- ``FPN-S``: Faster R-CNN + FPN at the input size S;
- ``FPN-2S``: the same model on the input up-sampled 2x;
- ``FPN-S + P2-2S``: the EFPN heads with P'2 replaced by the P2 of the 2x input;
- ``EFPN-S w/o FTT``: the extension with nearest up-sampling instead of FTT;
- ``EFPN-S``: the full model.

Times interleave the configurations run by run, so that drift in the machine's speed hits
all of them alike. Peak memory is the CUDA allocator's maximum on a GPU; on the CPU it is
the peak resident memory of a fresh subprocess per configuration, less what the process
held before the model was built.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import efpn_fpn, new_module_keys
from .models.detector import EFPNFasterRCNN

__all__ = [
    "BenchResult",
    "bench_models",
    "build_bench_models",
    "checkpoint_setup",
    "checkpoint_weights",
    "flop_breakdown",
    "format_table",
    "run_bench",
]

NAMES = ("fpn_1x", "fpn_2x", "fpn_1x_p2_2x", "efpn_noftt", "efpn")


#: onnxruntime rows and the PyTorch rows they export
ONNX_ROWS = {"fpn_1x_onnx": "fpn_1x", "efpn_onnx": "efpn"}


def _labels(size: int) -> dict[str, str]:
    return {
        "fpn_1x": f"FPN-{size}",
        "fpn_2x": f"FPN-{2 * size}",
        "fpn_1x_p2_2x": f"FPN-{size} + P2-{2 * size}",
        "efpn_noftt": f"EFPN-{size} w/o FTT",
        "efpn": f"EFPN-{size}",
        "fpn_1x_onnx": f"FPN-{size} (onnxruntime)",
        "efpn_onnx": f"EFPN-{size} (onnxruntime, dense P'2)",
    }


def _onnx_models(models: dict[str, nn.Module], size: int, folder: Path, num_classes: int):
    """The FPN-S and EFPN-S models exported at S and loaded in onnxruntime, with as many
    threads as torch uses."""
    from .export import OnnxDetector, export_onnx

    classes = [f"class{i}" for i in range(1, num_classes)]
    out = {}
    for row, torch_row in ONNX_ROWS.items():
        if torch_row in models:
            path = folder / f"{row}.onnx"
            export_onnx(models[torch_row], path, classes=classes, size=size)
            out[row] = OnnxDetector(path, threads=torch.get_num_threads())
    return out


class UpscaledP2(nn.Module):
    """ "FPN-S + P2-2S" of Table III: an EFPN whose P'2 is the P2 of the input at 2x."""

    def __init__(self, efpn: EFPNFasterRCNN) -> None:
        super().__init__()
        self.model = efpn

    @torch.no_grad()
    def forward(self, images: list[Tensor]):
        m = self.model
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        batch, _ = m.transform(images)
        pyramid, _, _ = m.backbone.forward_pyramid(batch.tensors)
        up = F.interpolate(batch.tensors, scale_factor=2.0, mode="bilinear", align_corners=False)
        features = OrderedDict([("p2x", m.backbone.forward_pyramid(up)[0]["0"])])
        features.update(pyramid)
        proposals, _ = m.rpn(batch, pyramid)
        detections, _ = m.roi_heads(features, proposals, batch.image_sizes)
        return m.transform.postprocess(detections, batch.image_sizes, original_sizes)


def build_bench_models(
    backbone: str = "resnet50",
    size: int = 800,
    num_classes: int = 91,
    seed: int = 0,
    names: tuple[str, ...] = NAMES,
    state: dict[str, Tensor] | None = None,
    **model_kwargs: Any,
) -> dict[str, nn.Module]:
    """The five configurations, all carrying the weights of one seeded EFPN.

    Args:
        backbone: backbone name.
        size: the input side S (images are resized to S, or 2S for ``fpn_2x``).
        num_classes: classes including background.
        seed: seed of the shared weights.
        names: which configurations to build.
        state: trained EFPN weights (a checkpoint's ``model``) instead of seeded ones.
        **model_kwargs: builder arguments (``sr_kwargs``, ``ext_out_width``,
            ``small_roi_size``, ``p2x_mode``...), applied to every EFPN variant.
    """
    torch.manual_seed(seed)
    model_kwargs = {
        k: v
        for k, v in model_kwargs.items()
        if k not in ("min_size", "max_size", "weights_backbone")
    }
    model_kwargs["norm_layer"] = "frozen"  # inference: BN is its statistics
    common = dict(num_classes=num_classes, min_size=size, max_size=size)
    efpn = efpn_fpn(backbone, **common, **model_kwargs).eval()
    if state is not None:
        efpn.load_state_dict(state)
    state = efpn.state_dict()
    out: dict[str, nn.Module] = {}
    if "fpn_1x" in names or "fpn_2x" in names:
        fpn_kwargs = {
            k: v
            for k, v in model_kwargs.items()
            if k not in ("sr_module", "sr_kwargs", "ext_out_width", "ftt_input", "p2x_mode")
        }
        fpn = efpn_fpn(backbone, extended=False, **common, **fpn_kwargs).eval()
        base = {k: v for k, v in state.items() if k not in new_module_keys(efpn)}
        fpn.load_state_dict(base, strict=True)
        if "fpn_1x" in names:
            out["fpn_1x"] = fpn
        if "fpn_2x" in names:
            fpn2 = efpn_fpn(backbone, extended=False, **common, **fpn_kwargs).eval()
            fpn2.load_state_dict(base, strict=True)
            fpn2.transform.min_size, fpn2.transform.max_size = (2 * size,), 2 * size
            out["fpn_2x"] = fpn2
    if "fpn_1x_p2_2x" in names:
        out["fpn_1x_p2_2x"] = UpscaledP2(efpn).eval()
    if "efpn_noftt" in names:
        kw = {k: v for k, v in model_kwargs.items() if k not in ("sr_module", "sr_kwargs")}
        noftt = efpn_fpn(backbone, sr_module="nearest", **common, **kw).eval()
        missing, unexpected = noftt.load_state_dict(state, strict=False)
        if missing or any(not k.startswith("backbone.extension.sr.") for k in unexpected):
            raise RuntimeError(f"w/o FTT weights do not line up: {missing[:3]} {unexpected[:3]}")
        out["efpn_noftt"] = noftt
    if "efpn" in names:
        out["efpn"] = efpn
    return {n: out[n] for n in names if n in out}


def bench_image(size: int, seed: int = 0) -> Tensor:
    """A SynthSigns scene of side ``size``: clutter and small signs, deterministic."""
    from .data.synthetic import render_scene

    image, _, _ = render_scene(np.random.default_rng(seed), size)
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255


@dataclass
class BenchResult:
    name: str
    label: str
    seconds: float
    seconds_q1: float
    seconds_q3: float
    peak_mb: float
    gflops: float
    p2x_coverage: float | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _flops(model: nn.Module, images: list[Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(images)
    return counter.get_total_flops()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of resident memory (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _worker(spec: dict) -> None:
    """Subprocess: build one configuration, run it, print its peak memory as JSON.

    The first forward maps library code and fills allocator pools whatever the input
    size, so a forward on a tiny input comes first; the peak is then measured from
    there and the weights are added back: weights plus activations, as CUDA's
    ``max_memory_allocated`` counts them.
    """
    torch.set_num_threads(spec["threads"])
    image = bench_image(spec["size"], spec["seed"])
    state = checkpoint_weights(spec["weights"]) if spec.get("weights") else None
    models = build_bench_models(
        spec["backbone"],
        spec["size"],
        spec["num_classes"],
        spec["seed"],
        (spec["name"],),
        state=state,
        **spec["model_kwargs"],
    )
    del state
    model = models[spec["name"]]
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    with torch.no_grad():
        model([bench_image(64, spec["seed"])])
        base = _rss_mb()
        _reset_peak_rss()
        for _ in range(2):
            model([image])
    print(json.dumps({"peak_mb": _peak_rss_mb() - base + weights_mb}))


def checkpoint_weights(path: str) -> dict[str, Tensor]:
    from .engine.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


def checkpoint_setup(path: str) -> tuple[str, int, dict[str, Any]]:
    """``(backbone, num_classes, builder kwargs)`` of a trained EFPN checkpoint."""
    from .config import config_from_dict
    from .engine.checkpoint import load_checkpoint
    from .engine.train import model_kwargs

    ckpt = load_checkpoint(path)
    if not ckpt.get("extended"):
        raise ValueError(f"{path}: a baseline checkpoint; bench needs an EFPN one (stage 2 or 3)")
    cfg = config_from_dict(ckpt["config"], f"{path}: config")
    return cfg.model.backbone, len(ckpt["classes"]) + 1, model_kwargs(cfg)


def _cpu_peak_mb(name: str, spec: dict) -> float:
    cmd = [sys.executable, "-m", "efpn.bench", "--worker", json.dumps({**spec, "name": name})]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {name} failed: {done.stderr.strip()[-500:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"])


def bench_models(
    models: dict[str, nn.Module],
    image: Tensor,
    device: torch.device,
    runs: int = 10,
    warmup: int = 2,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Median and quartiles of seconds per image, FLOPs and (CUDA) peak memory."""
    images = [image.to(device)]
    times: dict[str, list[float]] = {n: [] for n in models}
    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        model.to(device)
        # FLOPs are counted on PyTorch graphs (an onnxruntime row takes its source's)
        out[name] = {"gflops": _flops(model, images) / 1e9 if isinstance(model, nn.Module) else 0.0}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            for _ in range(warmup):
                model(images)
        _sync(device)
        if device.type == "cuda":
            out[name]["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    from tqdm import tqdm

    for _ in tqdm(range(runs), desc="timing (interleaved)", disable=not progress):
        for name, model in models.items():
            _sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                model(images)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    for name, model in models.items():
        t = times[name]
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else t * 3
        out[name].update(seconds=statistics.median(times[name]), seconds_q1=q1, seconds_q3=q3)
        target = getattr(model, "last_p2x_coverage", None)
        if target:
            out[name]["p2x_coverage"] = float(np.mean(target))
    return out


def run_bench(
    backbone: str = "resnet50",
    size: int = 800,
    device: str = "cpu",
    runs: int = 10,
    num_classes: int = 91,
    seed: int = 0,
    memory: bool = True,
    progress: bool = True,
    weights: str | None = None,
    onnx: bool = False,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """Measure the five configurations; returns ``configs`` and ``ratios`` (and the setup).

    Args:
        backbone, size, num_classes, seed: the models (see :func:`build_bench_models`).
        device: ``cpu`` or ``cuda``.
        runs: timed runs per configuration (at least 10 for the reported figures).
        memory: measure peak memory (on the CPU one subprocess per configuration).
        weights: a trained EFPN checkpoint whose weights every configuration carries
            (its backbone and widths must match the other arguments, see
            :func:`checkpoint_setup`).
        onnx: add onnxruntime rows (``fpn_1x_onnx``, ``efpn_onnx``): the FPN-S and
            EFPN-S models exported at S (P'2 dense) and timed in the same interleaved
            runs; their GFLOPs are the PyTorch graphs', their memory is not measured.
        **model_kwargs: EFPN builder arguments (cheap widths, ``p2x_mode``...).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    image = bench_image(size, seed)
    state = checkpoint_weights(weights) if weights else None
    models = build_bench_models(backbone, size, num_classes, seed, state=state, **model_kwargs)
    with tempfile.TemporaryDirectory(prefix="efpn-bench-") as tmp:
        if onnx:
            models.update(_onnx_models(models, size, Path(tmp), num_classes))
        measured = bench_models(models, image, dev, runs=runs, progress=progress)
    spec = dict(
        backbone=backbone,
        size=size,
        num_classes=num_classes,
        seed=seed,
        threads=torch.get_num_threads(),
        model_kwargs=model_kwargs,
        weights=str(weights) if weights else None,
    )
    labels = _labels(size)
    results = []
    for name in models:
        m = measured[name]
        peak = m.get("peak_mb", float("nan"))
        if name in ONNX_ROWS:
            peak = float("nan")
            m["gflops"] = measured[ONNX_ROWS[name]]["gflops"]
        elif memory and dev.type == "cpu":
            peak = _cpu_peak_mb(name, spec)
        results.append(
            BenchResult(
                name=name,
                label=labels[name],
                seconds=m["seconds"],
                seconds_q1=m["seconds_q1"],
                seconds_q3=m["seconds_q3"],
                peak_mb=peak,
                gflops=m["gflops"],
                p2x_coverage=m.get("p2x_coverage"),
            )
        )
    by = {r.name: r for r in results}
    ratios = {}
    if {"efpn", "fpn_2x", "fpn_1x"} <= set(by):
        ratios = {
            "efpn_vs_fpn2x_time": by["efpn"].seconds / by["fpn_2x"].seconds,
            "efpn_vs_fpn2x_mem": by["efpn"].peak_mb / by["fpn_2x"].peak_mb,
            "efpn_vs_fpn1x_time": by["efpn"].seconds / by["fpn_1x"].seconds,
            "efpn_vs_fpn2x_gflops": by["efpn"].gflops / by["fpn_2x"].gflops,
        }
    for row, torch_row in ONNX_ROWS.items():
        if row in by and torch_row in by:
            ratios[f"{row}_vs_torch_time"] = by[row].seconds / by[torch_row].seconds
    return {
        "configs": [asdict(r) for r in results],
        "ratios": ratios,
        "setup": {
            "backbone": backbone,
            "size": size,
            "device": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "runs": runs,
            "torch": torch.__version__,
            "weights": str(weights) if weights else f"random (seed {seed})",
            "model_kwargs": model_kwargs,
        },
    }


def format_table(report: dict[str, Any]) -> str:
    """Markdown table like the paper's Table III, then the ratios."""
    lines = [
        "| config | s/image (median) | IQR | peak MB | GFLOPs | P'2 computed |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["configs"]:
        cov = "" if c["p2x_coverage"] is None else f"{100 * c['p2x_coverage']:.0f}%"
        peak = "n/a" if math.isnan(c["peak_mb"]) else f"{c['peak_mb']:.0f}"
        lines.append(
            f"| {c['label']} | {c['seconds']:.3f} | {c['seconds_q1']:.3f}-{c['seconds_q3']:.3f} "
            f"| {peak} | {c['gflops']:.1f} | {cov} |"
        )
    r = report["ratios"]
    if r:
        lines += [
            "",
            f"EFPN / FPN-2x: time {r['efpn_vs_fpn2x_time']:.2f} (paper 0.74), "
            f"memory {r['efpn_vs_fpn2x_mem']:.2f} (paper 0.77), GFLOPs {r['efpn_vs_fpn2x_gflops']:.2f}; "
            f"EFPN / FPN-1x: time {r['efpn_vs_fpn1x_time']:.2f} (paper 2.33)",
        ]
    onnx = [
        f"{_labels(report['setup']['size'])[row].split(' (')[0]} {r[f'{row}_vs_torch_time']:.2f}"
        for row in ONNX_ROWS
        if f"{row}_vs_torch_time" in r
    ]
    if onnx:
        lines.append("onnxruntime / PyTorch time: " + ", ".join(onnx))
    return "\n".join(lines)


BREAKDOWN = (
    ("backbone.body.layer1", "layer1 (C2 at stride 4 and C'2 at stride 2)"),
    ("backbone.body", "rest of the ResNet body"),
    ("backbone.fpn", "FPN"),
    ("backbone.extension.sr", "SR module (FTT)"),
    ("backbone.extension.lateral", "C'2 lateral 1x1"),
    ("backbone.extension.output", "P'2 output conv"),
    ("rpn", "RPN"),
    ("roi_heads.small_box_head", "P'2 box head"),
    ("roi_heads.small_box_predictor", "P'2 box head"),
    ("roi_heads", "box head"),
)


def flop_breakdown(model: nn.Module, image: Tensor) -> list[tuple[str, float]]:
    """GFLOPs of one forward by part of the detector (leaf modules summed by prefix;
    what runs outside any module, such as box decoding, is left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        model([image])
    root = type(model).__name__
    leaves = {f"{root}.{n}" for n, m in model.named_modules() if n and not list(m.children())}
    totals = dict.fromkeys((label for _, label in BREAKDOWN), 0.0)  # ordered, labels unique
    for name, ops in counter.get_flop_counts().items():
        if name not in leaves:
            continue
        path = name[len(root) + 1 :]
        for prefix, label in BREAKDOWN:
            if path == prefix or path.startswith(prefix + "."):
                totals[label] += sum(ops.values()) / 1e9
                break
    totals["total"] = counter.get_total_flops() / 1e9
    return list(totals.items())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[2]))
    else:
        raise SystemExit("usage: efpn bench ... (python -m efpn.bench is the memory worker)")
