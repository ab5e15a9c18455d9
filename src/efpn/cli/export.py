"""``efpn export``: a checkpoint to ONNX, checked in onnxruntime."""

from __future__ import annotations

from .train import add_override_args


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (EFPN or FPN) and check it in onnxruntime",
        description=(
            "Export the whole detector (resize, backbone with a dense P'2, RPN, both box "
            "heads, NMS) to ONNX. Input: one RGB image, float32 in [0, 1], (1, 3, H, W); "
            "outputs: boxes (xyxy, input pixels), scores, labels. The file is run in "
            "onnxruntime on SynthSigns scenes right away and refused if its detections "
            "differ from PyTorch's. Needs `pip install 'efpn[export]'`."
        ),
    )
    p.add_argument("--weights", required=True, help="an efpn checkpoint (best.pt, last.pt)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (onnx)")
    p.add_argument("--out", default=None, help="the .onnx file (default: next to --weights)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")
    p.add_argument("--dynamic", action="store_true", help="accept any input height and width")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="square input side (the only one without --dynamic; default: the recipe's max_size)",
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch"
    )
    add_override_args(p, "inference settings built into the graph, e.g. model.merge=fused")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from pathlib import Path

    from ..config import apply_overrides, config_from_dict
    from ..engine.train import model_from_checkpoint
    from ..export import DEFAULT_OPSET, export_onnx, require_onnx
    from .train import inference_overrides, override_pairs

    require_onnx()  # before loading anything: say what to install
    out = Path(args.out) if args.out else Path(args.weights).with_suffix(".onnx")
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"--out {out}: an ONNX file ends in .onnx")
    overrides = inference_overrides(override_pairs(args), "export")
    model, ckpt = model_from_checkpoint(args.weights, "cpu", **overrides)
    config = ckpt.get("config")
    if config and overrides:  # the file's recipe names what its graph does
        dotted = {f"model.{k}": v for k, v in overrides.items()}
        config = apply_overrides(config_from_dict(config), dotted, "overrides").to_dict()
    info = export_onnx(
        model,
        out,
        classes=ckpt["classes"],
        category_ids=ckpt.get("category_ids"),
        config=config,
        image_reading=ckpt.get("image_reading"),
        size=args.size,
        dynamic=args.dynamic,
        opset=args.opset or DEFAULT_OPSET,
        validate=not args.no_check,
    )
    kind = "EFPN" if ckpt.get("extended") else "FPN"
    shape = "any H x W" if args.dynamic else f"{info['size']} x {info['size']}"
    checked = ", ".join(
        f"{c['height']}x{c['width']} ({c['detections']} detections)" for c in info["checked"]
    )
    print(
        f"{kind} exported to {out} ({info['bytes'] / 1e6:.1f} MB, opset {info['opset']}, "
        f"input 1 x 3 x {shape}); "
        + (f"onnxruntime matches PyTorch on {checked}" if checked else "not checked (--no-check)")
    )
    return 0


def register(sub) -> None:
    """Add this module's commands to the ``efpn`` subparsers."""
    _add_export(sub)
