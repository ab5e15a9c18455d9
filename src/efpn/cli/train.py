"""``efpn train``, ``val``, ``predict`` and ``demo``: training and using detectors."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import P2X_MODES


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train FPN/EFPN: stage 1 baseline, 2 distillation, 3 OHEM head, or all",
        description=(
            "One line on your own data: efpn train --data DATA (a dataset folder in any "
            "supported format, a COCO JSON or an Ultralytics-style dataset YAML); the "
            "recipe is derived from the data and written to the run folder. Or give a "
            "recipe with --config. Either takes key=value overrides, e.g. "
            "stage1.optim.epochs=3 model.min_size=800."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="YAML recipe (see configs/ and docs/config.md)")
    src.add_argument("--data", help="dataset folder, COCO JSON or dataset YAML")
    add_override_args(p, "recipe overrides")
    p.add_argument(
        "--model", default="resnet18", help="with --data: resnet18, resnet50 or resnext101_32x8d"
    )
    p.add_argument("--imgsz", type=int, default=640, help="with --data: test size S (shorter side)")
    p.add_argument("--epochs", type=int, default=12, help="with --data: stage-1 epochs")
    p.add_argument("--batch", type=int, default=4, help="with --data: images per step")
    p.add_argument("--device", default="auto", help="with --data: auto, cpu, cuda")
    p.add_argument("--stage", default="all", choices=["1", "2", "3", "all"])
    p.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from last.pt in the run folder")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="read and check the data, write the resolved recipe to the run folder, train nothing",
    )
    p.add_argument(
        "--init",
        default=None,
        help="checkpoint to start the stage from (stage 1: a trained detector)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


def add_override_args(p, help: str) -> None:
    """``key=value`` arguments, and the same as ``--set key=value`` (``efpn study``'s
    spelling, where positional pairs would belong to ``--arm``)."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help=help)
    p.add_argument(
        "--set",
        dest="set_pairs",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the same as a key=value argument (repeatable)",
    )


def override_pairs(args) -> list[str]:
    """Every ``key=value`` of a command line: the positional ones, then ``--set``'s."""
    return [*args.overrides, *args.set_pairs]


def inference_overrides(pairs: list[str], command: str) -> dict:
    """``model.KEY=VALUE`` pairs that change only inference (``model.merge=fused``), as
    :func:`~efpn.engine.train.model_from_checkpoint` keywords."""
    from ..study import INFERENCE_KEYS, model_inference_kwargs

    overrides = parse_overrides(pairs)
    for key in overrides:
        if key not in INFERENCE_KEYS or not key.startswith("model."):
            allowed = ", ".join(k for k in INFERENCE_KEYS if k.startswith("model."))
            raise ValueError(f"{key}: {command} changes inference settings only ({allowed})")
    return model_inference_kwargs(overrides)


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` arguments as a dict (values read as YAML scalars or lists)."""
    from ..config import parse_override

    return dict(parse_override(p) for p in pairs)


def _dry_run(cfg, out: Path) -> int:
    """Check the data and write the resolved recipe, without training."""
    from ..data.image import reading_settings
    from ..engine.train import check_splits, load_data, write_recipe

    reading_settings()  # EFPN_BANDS / EFPN_RANGE, as training checks them
    train, val = load_data(cfg, out.parent if cfg.data.format == "synth" else None)
    check_splits(train, val)
    out.mkdir(parents=True, exist_ok=True)
    write_recipe(cfg, out)
    print(
        f"dry run: {len(train.images)} train / {len(val.images)} val images, "
        f"{train.num_boxes()} / {val.num_boxes()} boxes; nothing trained. The recipe is in "
        f"{out / 'config.yaml'} (every key in docs/config.md); edit it and train it with "
        f"efpn train --config {out / 'config.yaml'}",
        flush=True,
    )
    return 0


def _cmd_train(args) -> int:
    import json

    from ..config import load_config
    from ..engine.train import Trainer

    overrides = parse_overrides(override_pairs(args))
    if args.data:
        from ..recipe import recipe_from_data

        cfg, lines = recipe_from_data(
            args.data,
            model=args.model,
            imgsz=args.imgsz,
            epochs=args.epochs,
            device=args.device,
            batch=args.batch,
            overrides=overrides,
        )
        if not args.quiet:
            for line in lines:
                print(line, flush=True)
            if overrides:
                print(f"overrides: {overrides}", flush=True)
    else:
        cfg = load_config(args.config, overrides)
    out = args.out or f"runs/{cfg.name}"
    if args.dry_run:
        return _dry_run(cfg, Path(out))
    if not args.quiet:
        print(f"run folder: {out} (resolved recipe in {out}/config.yaml)", flush=True)
    trainer = Trainer(cfg, out, quiet=args.quiet)
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
        if 3 in stages and not args.quiet:
            _say_what_next(Path(out), metrics)
    return 0


def _say_what_next(out: Path, metrics: dict) -> None:
    """After stage 3: EFPN against the FPN it extends, on val, and the next commands."""
    import json

    premise = out / "premise.json"
    if premise.exists():
        fpn, efpn = json.loads(premise.read_text())["fpn_1x"]["AP_small"], metrics["AP_small"]
        if fpn >= 0 and efpn >= 0:
            print(
                f"val AP_small: FPN (stage 1) {fpn:.3f}, EFPN {efpn:.3f} ({100 * (efpn - fpn):+.1f} "
                "points; one run on the split that chose each stage's best epoch: `efpn study` "
                "gives paired seeds with an interval)",
                flush=True,
            )
    weights = out / "stage3" / "best.pt"
    print(
        f"next: efpn val --weights {weights} model.merge=fused; "
        f"efpn predict --weights {weights} --source IMAGES --out preds",
        flush=True,
    )


def _add_val(sub) -> None:
    p = sub.add_parser(
        "val", help="evaluate a checkpoint: COCO per size and TT100K-style accuracy/recall/F1"
    )
    p.add_argument(
        "--weights", required=True, help="an efpn checkpoint (.pt) or ONNX export (.onnx)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="YAML recipe whose val split to use (default: the checkpoint's)",
    )
    p.add_argument(
        "--score-thresh",
        type=score_value,
        default=0.5,
        help="score threshold of the TT100K-style figures (0.5)",
    )
    p.add_argument(
        "--scale", type=float, default=1.0, help="test at this input scale (2 = the paper's FPN-2x)"
    )
    p.add_argument(
        "--batch-size",
        "--batch",
        type=int,
        default=2,
        help="images per forward pass (2); a batch pads images of different sizes to one "
        "size, which moves detections slightly: 1 gives each image alone, as ONNX files run",
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
    p.add_argument(
        "--size-reference",
        default=None,
        choices=["source", "model"],
        help="size bins in the image files' pixels or in the model's at 1x (default: recipe)",
    )
    _add_slice_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--save", default=None, metavar="FILE", help="write the COCO results here")
    add_override_args(p, "inference settings of the checkpoint's recipe, e.g. model.merge=fused")
    p.set_defaults(func=_cmd_val)


def _cmd_val(args) -> int:
    import json
    from pathlib import Path

    from ..config import config_from_dict, load_config
    from ..engine.evaluate import evaluate_model
    from ..engine.train import detector_from_file, load_data
    from ..metrics import metric_keys

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
    overrides.update(inference_overrides(override_pairs(args), "val"))
    onnx = str(args.weights).lower().endswith(".onnx")
    if onnx and args.scale != 1.0:
        raise ValueError(
            f"--scale {args.scale}: an ONNX file has its test size built in; "
            "export a checkpoint with a scaled model.min_size instead"
        )
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be 1 or more, got {args.batch_size}")
    slicing = _slicing(args)
    model, ckpt = detector_from_file(args.weights, **overrides)
    if args.data:
        cfg = load_config(args.data)
    elif ckpt.get("config"):
        cfg = config_from_dict(ckpt["config"])
    else:
        raise ValueError(f"{args.weights}: it records no recipe; name the val data with --data")
    _, val = load_data(cfg, None)
    if ckpt.get("classes") is not None and list(ckpt["classes"]) != list(val.classes):
        raise ValueError(
            f"{val.source}: its classes ({', '.join(val.classes)}) are not the checkpoint's "
            f"({', '.join(ckpt['classes'])}), in that order; labels would be scored as the "
            "wrong class"
        )
    m = evaluate_model(
        model,
        val,
        batch_size=args.batch_size,
        scale=args.scale,
        score_thresh=args.score_thresh,
        size_reference=args.size_reference or cfg.eval_size_reference,
        quiet=args.quiet,
        slicing=slicing,
    )
    results = m.pop("_results", [])
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(results))
    if args.json:
        print(json.dumps(m))
        return 0
    print(f"COCO box metrics of {args.weights} on {val.source} ({len(val.images)} images):")
    from ..metrics.tt100k import table_cells

    for k in metric_keys():  # COCO's -1: no object of that size
        print(f"  {k:<10} {m[k]:7.3f}" if m[k] >= 0 else f"  {k:<10}     n/a")
    print(f"TT100K-style at score >= {args.score_thresh}:")
    print(f"  {'size':<8}{'accuracy':>10}{'recall':>10}{'F1':>10}")
    for k in ["overall", "small", "medium", "large"]:
        acc, rec, f1 = table_cells(m["tt100k"][k])
        print(f"  {k:<8}{acc:>10}{rec:>10}{f1:>10}")
    print(
        f"best F1_small over thresholds: {m['f1_small']:.4f}; {m['seconds_per_image']:.3f} s/image"
    )
    if m["p2x_coverage"] is not None:
        print(f"P'2 computed on {m['p2x_coverage']:.1%} of the stride-2 map (mean per image)")
    kept = sum(r["score"] >= args.score_thresh for r in results)
    print(
        f"{len(val.images)} images, {len(results)} detections ({kept} at score >= {args.score_thresh}); "
        + (
            f"results in {args.save}"
            if args.save
            else "results not written (--save FILE writes them)"
        )
    )
    return 0


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="detect objects in images; draw boxes and write COCO results"
    )
    p.add_argument(
        "--weights", required=True, help="an efpn checkpoint (.pt) or ONNX export (.onnx)"
    )
    p.add_argument("--source", required=True, help="an image or a folder")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--batch-size", "--batch", type=int, default=4, help="images (or tiles) per forward pass"
    )
    p.add_argument(
        "--score-thresh",
        "--conf",
        type=score_value,
        default=0.5,
        help="boxes drawn from this score (0.5)",
    )
    p.add_argument(
        "--compare",
        default=None,
        help="COCO ground truth (file names relative to --source): TP green, FP blue, FN red",
    )
    _add_slice_args(p)
    p.add_argument(
        "--save-txt",
        action="store_true",
        help="also write YOLO labels (out/labels/, classes.txt) of the boxes at --score-thresh",
    )
    p.add_argument("--save-conf", action="store_true", help="with --save-txt: append each score")
    p.add_argument(
        "--save-geojson",
        action="store_true",
        help="also write the boxes at --score-thresh of georeferenced scenes (GeoTIFF, world "
        "file) as map polygons, predictions.geojson",
    )
    p.add_argument(
        "--geojson-crs",
        choices=("scene", "wgs84"),
        default="scene",
        help="with --save-geojson: the scene's own CRS (named in the file's crs member), or "
        "WGS 84 longitudes and latitudes as RFC 7946 has it, one file for scenes of any CRS "
        "(needs pyproj: pip install 'efpn[geo]')",
    )
    p.add_argument(
        "--no-draw",
        action="store_true",
        help="write no drawings, only the results (saves writing a PNG per image)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary line")
    add_override_args(p, "inference settings of the checkpoint's recipe, e.g. model.merge=fused")
    p.set_defaults(func=_cmd_predict)


def score_value(text: str) -> float:
    """argparse type of a detection score threshold: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a score in [0, 1], got {text!r}")
    return value


def _add_slice_args(p) -> None:
    p.add_argument(
        "--slice",
        type=int,
        default=None,
        metavar="PX",
        help="detect huge images in overlapping tiles of this many pixels",
    )
    p.add_argument("--overlap", type=float, default=None, help="tile overlap fraction (0.2)")
    p.add_argument(
        "--merge",
        default=None,
        choices=["nms", "nmm"],
        help="merge across tiles: NMS (default), or NMM (intersection over the smaller box)",
    )
    p.add_argument(
        "--full-image",
        action="store_true",
        help="also run the whole image once, for objects larger than a tile",
    )


def _slicing(args) -> dict | None:
    """The sliced-prediction settings, or ``None`` without ``--slice``; tile settings
    without it are refused rather than silently ignored."""
    if args.slice is None:
        given = [
            flag
            for flag, value in (
                ("--overlap", args.overlap),
                ("--merge", args.merge),
                ("--full-image", args.full_image or None),
            )
            if value is not None
        ]
        if given:
            raise ValueError(
                f"{', '.join(given)} set without --slice: tile settings apply only to sliced "
                "prediction; add --slice PX (the tile size)"
            )
        return None
    if args.slice < 1:
        raise ValueError(f"--slice must be a tile size of 1 pixel or more, got {args.slice}")
    return {
        "slice_size": args.slice,
        "overlap": 0.2 if args.overlap is None else args.overlap,
        "merge": args.merge or "nms",
        "full_image": args.full_image,
    }


def _cmd_predict(args) -> int:
    from ..engine.predict import predict

    if args.save_conf and not args.save_txt:
        raise ValueError("--save-conf set without --save-txt: it adds scores to the YOLO labels")

    path = predict(
        args.weights,
        args.source,
        args.out,
        batch_size=args.batch_size,
        score_thresh=args.score_thresh,
        compare=args.compare,
        quiet=args.quiet,
        **(_slicing(args) or {}),
        model_overrides=inference_overrides(override_pairs(args), "predict"),
        save_txt=args.save_txt,
        save_conf=args.save_conf,
        save_geojson=args.save_geojson,
        geojson_crs=args.geojson_crs,
        draw=not args.no_draw,
    )
    if not args.quiet and not args.no_draw:
        print(f"drawings in {path.parent}")
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
    p.add_argument(
        "--test",
        default=None,
        metavar="RECIPE",
        help="a recipe whose val split is a held-out test set to compare on as well "
        "(default with the packaged demo recipe: its 128-image configs/demo_test.yaml)",
    )
    p.add_argument("--no-test", action="store_true", help="compare on val only")
    p.add_argument("--quiet", action="store_true")
    add_override_args(p, "recipe overrides")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from ..demo import default_test, run_demo

    test = args.test
    if test is None and args.config is None:
        test = default_test()
    run_demo(
        args.config,
        args.out,
        quiet=args.quiet,
        eval_only=args.eval_only,
        overrides=parse_overrides(override_pairs(args)),
        test=None if args.no_test else test,
    )
    return 0


def register(sub) -> None:
    """Add this module's commands to the ``efpn`` subparsers."""
    _add_train(sub)
    _add_val(sub)
    _add_predict(sub)
    _add_demo(sub)
