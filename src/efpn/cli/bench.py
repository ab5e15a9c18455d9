"""``efpn summary`` and ``efpn bench``: what a model costs (Table III)."""

from __future__ import annotations

from ..config import P2X_MODES


def _add_summary(sub) -> None:
    p = sub.add_parser("summary", help="print the pyramid of a model and its parameter/FLOP counts")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=800, help="square input side in pixels")
    p.add_argument("--num-classes", type=int, default=91)
    p.add_argument("--sr-module", default="ftt", choices=["ftt", "espcn", "nearest"])
    p.add_argument("--no-baseline", action="store_true", help="skip the FPN baseline row")
    p.set_defaults(func=_cmd_summary)


def _cmd_summary(args) -> int:
    import torch

    from ..models import count_flops, count_parameters, efpn_fpn
    from ..models.backbone import LEVEL_STRIDES

    torch.manual_seed(0)
    rows = []
    variants = [("EFPN", True)] + ([] if args.no_baseline else [("FPN", False)])
    image = torch.rand(3, args.size, args.size)
    for name, extended in variants:
        model = efpn_fpn(
            args.backbone,
            num_classes=args.num_classes,
            extended=extended,
            sr_module=args.sr_module,
            min_size=args.size,
            max_size=args.size,
        ).eval()
        if extended:
            with torch.no_grad():
                feats = model.backbone(model.transform([image])[0].tensors)
            print(f"{name}-{args.backbone} pyramid at {args.size}x{args.size}:")
            print(f"  {'level':<6}{'stride':>7}  shape")
            for level, t in feats.items():
                stride = LEVEL_STRIDES[level]
                print(f"  {level:<6}{stride:>7}  {tuple(t.shape)}")
        rows.append((name, count_parameters(model), count_flops(model, [image])))
    print(f"\n{'model':<8}{'params (M)':>12}{'GFLOPs':>10}")
    for name, params, flops in rows:
        print(f"{name:<8}{params / 1e6:>12.2f}{flops / 1e9:>10.1f}")
    if len(rows) == 2:
        print(
            f"EFPN/FPN: params x{rows[0][1] / rows[1][1]:.2f}, FLOPs x{rows[0][2] / rows[1][2]:.2f}"
        )
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="Table III: time, peak memory and FLOPs of FPN, FPN-2x, FPN+P2-2x, EFPN w/o FTT, EFPN",
    )
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--size", type=int, default=800, help="input side S (FPN-2x runs at 2S)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--runs", type=int, default=10, help="timed runs per configuration (>= 10)")
    p.add_argument("--num-classes", type=int, default=91)
    p.add_argument("--small-roi-size", type=float, default=112.0, help="P'2 routing threshold (px)")
    p.add_argument("--sr-width", type=int, default=None, help="FTT inner width (default: 256)")
    p.add_argument("--ext-out-width", type=int, default=None, help="hidden width of P'2's conv")
    p.add_argument(
        "--p2x-mode",
        default="auto",
        choices=P2X_MODES,
        help="how EFPN computes P'2 (auto: sparse on the CPU, banded on CUDA)",
    )
    p.add_argument("--max-coverage", type=float, default=0.5, help="sparse: FTT on the map above")
    p.add_argument(
        "--band-rows",
        type=int,
        default=None,
        help="P'2 in bands of this many stride-2 rows (default: 32 on the CPU, 128 on CUDA; "
        "0: one pass)",
    )
    p.add_argument("--proposals", type=int, default=1000, help="RPN proposals kept at test time")
    p.add_argument(
        "--weights",
        default=None,
        help="a trained EFPN checkpoint (its model settings replace the options above)",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="add onnxruntime rows for FPN-S and EFPN-S, timed in the same runs (efpn[export])",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--breakdown", action="store_true", help="GFLOPs per module of EFPN")
    p.add_argument("--profile", action="store_true", help="torch.profiler's top ops of EFPN")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save-json", default=None, help="also write the JSON report to this file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import json

    from ..bench import (
        bench_image,
        build_bench_models,
        checkpoint_setup,
        flop_breakdown,
        format_table,
        run_bench,
    )

    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    if args.onnx:
        if args.device != "cpu":
            raise ValueError("--onnx: the onnxruntime rows run on the CPU; use --device cpu")
        from ..export import require_onnx

        require_onnx()
    backbone, num_classes = args.backbone, args.num_classes
    if args.weights:
        backbone, num_classes, model_kwargs = checkpoint_setup(args.weights)
    else:
        model_kwargs = dict(
            sr_kwargs={"width": args.sr_width} if args.sr_width else {},
            ext_out_width=args.ext_out_width,
            small_roi_size=args.small_roi_size,
        )
    model_kwargs.update(
        p2x_mode=args.p2x_mode,
        sparse_max_coverage=args.max_coverage,
        p2x_band_rows=args.band_rows,
        rpn_post_nms_top_n_test=args.proposals,
    )
    report = run_bench(
        backbone,
        args.size,
        args.device,
        runs=args.runs,
        num_classes=num_classes,
        memory=not args.no_memory,
        progress=not (args.quiet or args.json),
        weights=args.weights,
        onnx=args.onnx,
        **model_kwargs,
    )
    if args.save_json:
        from pathlib import Path

        Path(args.save_json).write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
    else:
        s = report["setup"]
        print(
            f"{s['backbone']} at {s['size']}, {s['device']}, {s['threads']} threads, "
            f"torch {s['torch']}, {s['runs']} interleaved runs"
        )
        print(format_table(report))
    if args.breakdown or args.profile:
        from ..bench import checkpoint_weights

        state = checkpoint_weights(args.weights) if args.weights else None
        efpn = build_bench_models(
            backbone, args.size, num_classes, 0, ("efpn",), state=state, **model_kwargs
        )["efpn"]
        image = bench_image(args.size)
        if args.breakdown:
            print("\nEFPN GFLOPs per module:")
            for name, g in flop_breakdown(efpn, image):
                print(f"  {name:<45}{g:>9.1f}")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof, __import__("torch").no_grad():
                efpn([image])
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


def _add_sahi_bench(sub) -> None:
    p = sub.add_parser(
        "bench-sahi",
        help="time SAHI's sliced prediction and efpn's side by side on one image (efpn[sahi])",
    )
    p.add_argument("--weights", required=True, help="an efpn checkpoint (.pt) or ONNX file")
    p.add_argument("--source", required=True, help="one (large) image")
    p.add_argument("--slice", type=int, default=512, help="tile side in pixels (512)")
    p.add_argument(
        "--overlap",
        type=float,
        default=0.25,
        help="tile overlap (0.25; SAHI's tiles are efpn's where slice x overlap is whole)",
    )
    p.add_argument("--runs", type=int, default=3, help="interleaved rounds (3)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per pass of efpn's batched row")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_sahi_bench)


def _cmd_sahi_bench(args) -> int:
    import json
    import platform

    import torch

    from ..data.image import load_rgb
    from ..sahi_adapter import bench_sahi

    image = load_rgb(args.source, sliced=True)
    r = bench_sahi(
        args.weights,
        image,
        slice_size=args.slice,
        overlap=args.overlap,
        runs=args.runs,
        batch_size=args.batch_size,
    )
    if args.json:
        print(json.dumps(r))
        return 0
    h, w = image.shape[:2]
    print(
        f"{args.source}: {w}x{h} px, {r['tiles']} tiles of {args.slice} px (overlap {args.overlap}), "
        f"{r['rounds']} interleaved rounds, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| sliced prediction | s/image (median) | vs efpn 1 tile per pass |")
    print("|---|---|---|")
    base = r["seconds"]["efpn (1 tile per pass)"]
    for name, sec in r["seconds"].items():
        print(f"| {name} | {sec:.3f} | {sec / base:.2f} |")
    windows = "the same tiles" if r["same_windows"] else "different tiles (overlap rounding)"
    agree = "the same detections" if r["agree"] is None else f"different detections: {r['agree']}"
    print(f"{windows}; {r['detections']} detections, {agree}")
    return 0


def register(sub) -> None:
    """Add this module's commands to the ``efpn`` subparsers."""
    _add_summary(sub)
    _add_bench(sub)
    _add_sahi_bench(sub)
