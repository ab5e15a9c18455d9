"""The ``efpn`` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import P2X_MODES


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

    from .models import count_flops, count_parameters, efpn_fpn
    from .models.backbone import LEVEL_STRIDES

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


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="convert, inspect and generate datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = dsub.add_parser("convert", help="convert a dataset between formats")
    c.add_argument("source", help="dataset: COCO/TT100K JSON file, or YOLO/VOC folder")
    c.add_argument(
        "--from", dest="src_format", required=True, choices=["yolo", "voc", "tt100k", "coco"]
    )
    c.add_argument("--to", dest="dst_format", required=True, choices=["coco", "yolo"])
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument(
        "--split",
        default=None,
        help="split to read (YOLO splits.json or images/<split>, VOC ImageSets, TT100K path prefix)",
    )
    c.add_argument(
        "--image-root", default=None, help="COCO/TT100K image root (default: the JSON's folder)"
    )
    c.add_argument(
        "--classes", default=None, help="TT100K: tt100k45|all; VOC: a file with one class per line"
    )
    c.add_argument(
        "--keep-other", action="store_true", help="TT100K: keep the other declared classes"
    )
    c.set_defaults(func=_cmd_data_convert)

    s = dsub.add_parser("stats", help="image count, boxes per class and size histograms")
    s.add_argument("source")
    s.add_argument("--format", default=None, choices=["yolo", "voc", "tt100k", "coco"])
    s.add_argument("--split", default=None)
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_cmd_data_stats)

    g = dsub.add_parser("synth", help="generate the SynthSigns benchmark (PNG + COCO JSON)")
    g.add_argument("--out", required=True)
    g.add_argument("--train", type=int, default=200)
    g.add_argument("--val", type=int, default=50)
    g.add_argument("--size", type=int, default=512)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_data_synth)


def _reader_kwargs(fmt: str, args) -> dict:
    kw: dict = {}
    if getattr(args, "split", None):
        kw["split"] = args.split
    if fmt in ("coco", "tt100k") and getattr(args, "image_root", None):
        kw["image_root" if fmt == "coco" else "root"] = args.image_root
    if fmt == "tt100k":
        if getattr(args, "classes", None):
            kw["classes"] = args.classes
        kw["keep_other"] = getattr(args, "keep_other", False)
    if fmt == "voc" and getattr(args, "classes", None):
        from pathlib import Path

        kw["classes"] = [
            ln.strip() for ln in Path(args.classes).read_text().splitlines() if ln.strip()
        ]
    if fmt == "coco":
        kw.pop("split", None)
    return kw


def _cmd_data_convert(args) -> int:
    from .data import read_dataset, write_coco, write_yolo

    data = read_dataset(args.source, args.src_format, **_reader_kwargs(args.src_format, args))
    out = write_coco(data, args.out) if args.dst_format == "coco" else write_yolo(data, args.out)
    print(
        f"wrote {len(data.images)} images, {data.num_boxes()} boxes, {len(data.classes)} classes as {args.dst_format} to {out}"
    )
    return 0


def _cmd_data_stats(args) -> int:
    import json

    from .data import read_dataset
    from .data.formats import detect_format
    from .data.stats import dataset_stats, format_stats

    fmt = args.format or detect_format(args.source)
    data = read_dataset(args.source, fmt, **_reader_kwargs(fmt, args))
    stats = dataset_stats(data)
    print(json.dumps(stats) if args.json else format_stats(stats, str(args.source)))
    return 0


def _cmd_data_synth(args) -> int:
    import time

    from .data.synthetic import generate

    start = time.perf_counter()
    paths = generate(args.out, train=args.train, val=args.val, size=args.size, seed=args.seed)
    n = args.train + args.val
    dt = time.perf_counter() - start
    print(
        f"SynthSigns: {n} images of {args.size}x{args.size} in {dt:.1f} s ({n / max(dt, 1e-9):.1f} images/s)"
    )
    for split, path in paths.items():
        print(f"  {split}: {path}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate detections: COCO AP/AR or the TT100K accuracy/recall protocol"
    )
    p.add_argument("--format", required=True, choices=["coco", "tt100k"])
    p.add_argument("--gt", required=True, help="ground truth (COCO JSON or TT100K annotations)")
    p.add_argument("--dets", required=True, help="COCO results list, or TT100K results layout")
    p.add_argument("--iou", type=float, default=0.5, help="tt100k: IoU threshold (strictly above)")
    p.add_argument(
        "--min-score",
        type=float,
        default=None,
        help="tt100k: score threshold in the detector's units (official: 40)",
    )
    p.add_argument(
        "--classes",
        default="tt100k45",
        help="tt100k: tt100k45, all, or a file with one class per line",
    )
    p.add_argument("--size-bins", default="coco", choices=["coco", "aitod"])
    p.add_argument("--max-dets", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    import json
    from pathlib import Path

    from .data.formats import TT100K_45, load_json
    from .data.records import DataError
    from .metrics import coco_metrics, evaluate_tt100k_bins

    gt = load_json(args.gt)
    dets = load_json(args.dets)
    if args.format == "coco":
        if not isinstance(dets, list):
            raise DataError(f"{args.dets}: COCO results must be a list of detections")
        m = coco_metrics(gt, dets, size_bins=args.size_bins, max_dets=args.max_dets)
        per_class = m.pop("per_class")
        if args.json:
            print(json.dumps(m))
            return 0
        print(
            f"COCO box metrics ({args.size_bins} size bins, maxDets {args.max_dets}) for {args.dets}"
        )
        for k, v in m.items():
            print(f"  {k:<14} {v:7.3f}")
        print("per-class AP:")
        for k, v in per_class.items():
            print(f"  {k:<14} {v:7.3f}")
        return 0
    if not isinstance(dets, dict) or "imgs" not in dets:
        raise DataError(f"{args.dets}: TT100K results need an 'imgs' object")
    if args.classes == "tt100k45":
        classes = list(TT100K_45)
    elif args.classes == "all":
        classes = None
    else:
        classes = [ln.strip() for ln in Path(args.classes).read_text().splitlines() if ln.strip()]
    min_score = 40.0 if args.min_score is None else args.min_score
    res = evaluate_tt100k_bins(gt, dets, iou=args.iou, classes=classes, min_score=min_score)
    order = ["overall", "small", "medium", "large"]
    if args.json:
        print(json.dumps({k: res[k] for k in order}))
        return 0
    print(f"TT100K protocol: IoU > {args.iou}, min score {min_score}, classes {args.classes}")
    print(f"  {'size':<8}{'accuracy':>10}{'recall':>10}{'F1':>10}{'TP':>8}{'dets':>8}{'GT':>8}")
    for k in order:
        r = res[k]
        print(
            f"  {k:<8}{r['accuracy']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}{r['tp']:>8}{r['detections']:>8}{r['ground_truth']:>8}"
        )
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train FPN/EFPN: stage 1 baseline, 2 distillation, 3 OHEM head, or all"
    )
    p.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    p.add_argument("--stage", default="all", choices=["1", "2", "3", "all"])
    p.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from last.pt in the run folder")
    p.add_argument(
        "--init",
        default=None,
        help="checkpoint to start the stage from (stage 1: a trained detector)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    import json

    from .config import load_config
    from .engine.train import Trainer

    cfg = load_config(args.config)
    trainer = Trainer(cfg, args.out or f"runs/{cfg.name}", quiet=args.quiet)
    stages = [1, 2, 3] if args.stage == "all" else [int(args.stage)]
    if args.init and len(stages) == 1:
        getattr(cfg, f"stage{stages[0]}").init = args.init
    elif args.init:
        cfg.stage1.init = args.init
    metrics = trainer.run(stages, resume=args.resume)
    if metrics:
        keys = [
            "AP",
            "AP_small",
            "AP_medium",
            "AP_large",
            "AR_small",
            "f1_small",
            "seconds_per_image",
        ]
        print(json.dumps({k: metrics[k] for k in keys}))
    return 0


def _add_val(sub) -> None:
    p = sub.add_parser(
        "val", help="evaluate a checkpoint: COCO per size and TT100K-style accuracy/recall/F1"
    )
    p.add_argument("--weights", required=True)
    p.add_argument(
        "--data",
        default=None,
        help="YAML recipe whose val split to use (default: the checkpoint's)",
    )
    p.add_argument(
        "--score-thresh", type=float, default=0.5, help="threshold of the TT100K-style figures"
    )
    p.add_argument(
        "--scale", type=float, default=1.0, help="test at this input scale (2 = the paper's FPN-2x)"
    )
    p.add_argument(
        "--proposals", type=int, default=None, help="RPN proposals kept per image (default: recipe)"
    )
    p.add_argument(
        "--p2x-mode", default=None, choices=P2X_MODES, help="how P'2 is computed (default: recipe)"
    )
    p.add_argument(
        "--band-rows",
        type=int,
        default=None,
        help="P'2 in bands of this many stride-2 rows, 0 for one pass (default: recipe)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_val)


def _cmd_val(args) -> int:
    import json

    from .config import config_from_dict, load_config
    from .engine.evaluate import evaluate_model
    from .engine.train import load_data, model_from_checkpoint
    from .metrics import metric_keys

    overrides = {}
    if args.proposals is not None:
        if args.proposals < 1:
            raise ValueError("--proposals must be at least 1")
        overrides["rpn_post_nms_top_n_test"] = args.proposals
    if args.p2x_mode is not None:
        overrides["p2x_mode"] = args.p2x_mode
    if args.band_rows is not None:
        if args.band_rows < 0:
            raise ValueError("--band-rows must be 0 (one pass) or more")
        overrides["p2x_band_rows"] = args.band_rows
    model, ckpt = model_from_checkpoint(args.weights, **overrides)
    cfg = load_config(args.data) if args.data else config_from_dict(ckpt["config"])
    _, val = load_data(cfg, None)
    m = evaluate_model(model, val, scale=args.scale, score_thresh=args.score_thresh)
    m.pop("_results", None)
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"COCO box metrics of {args.weights} on {val.source} ({len(val.images)} images):")
    for k in metric_keys():
        print(f"  {k:<10} {m[k]:7.3f}")
    print(f"TT100K-style at score >= {args.score_thresh}:")
    print(f"  {'size':<8}{'accuracy':>10}{'recall':>10}{'F1':>10}")
    for k in ["overall", "small", "medium", "large"]:
        r = m["tt100k"][k]
        print(f"  {k:<8}{r['accuracy']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}")
    print(
        f"best F1_small over thresholds: {m['f1_small']:.4f}; {m['seconds_per_image']:.3f} s/image"
    )
    if m["p2x_coverage"] is not None:
        print(f"P'2 computed on {m['p2x_coverage']:.1%} of the stride-2 map (mean per image)")
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="detect objects in images; draw boxes and write COCO results"
    )
    p.add_argument("--weights", required=True)
    p.add_argument("--source", required=True, help="an image or a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument(
        "--compare", default=None, help="COCO ground truth: colour TP green, FP blue, FN red"
    )
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    from .engine.predict import predict

    path = predict(
        args.weights,
        args.source,
        args.out,
        batch_size=args.batch_size,
        score_thresh=args.score_thresh,
        compare=args.compare,
    )
    print(f"wrote {path} and the drawings in {path.parent}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="SynthSigns end to end: FPN vs FPN-2x vs EFPN (Table VIII style)"
    )
    p.add_argument("--config", default=None, help="recipe (default: the packaged demo recipe)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument(
        "--eval-only", action="store_true", help="compare the checkpoints already in --out"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.config, args.out, quiet=args.quiet, eval_only=args.eval_only)
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
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--breakdown", action="store_true", help="GFLOPs per module of EFPN")
    p.add_argument("--profile", action="store_true", help="torch.profiler's top ops of EFPN")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--save-json", default=None, help="also write the JSON report to this file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args) -> int:
    import json

    from .bench import (
        bench_image,
        build_bench_models,
        checkpoint_setup,
        flop_breakdown,
        format_table,
        run_bench,
    )

    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
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
        from .bench import checkpoint_weights

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="efpn", description="Extended Feature Pyramid Network for small-object detection"
    )
    parser.add_argument("--version", action="version", version=f"efpn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_summary(sub)
    _add_data(sub)
    _add_eval(sub)
    _add_train(sub)
    _add_val(sub)
    _add_predict(sub)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        # Bad input (data, recipe, options): one line. EFPN_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("EFPN_DEBUG"):
            raise
        print(f"efpn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
