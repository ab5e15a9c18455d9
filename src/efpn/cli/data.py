"""``efpn data`` (convert, stats, synth, slice, mosaic) and ``efpn eval``: datasets and metrics."""

from __future__ import annotations


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="convert, inspect and generate datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    c = dsub.add_parser("convert", help="convert a dataset between formats")
    c.add_argument("source", help="dataset: COCO/TT100K JSON file, or YOLO/VOC folder")
    c.add_argument(
        "--from",
        dest="src_format",
        required=True,
        choices=["yolo", "voc", "tt100k", "coco", "dota", "visdrone", "geojson"],
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
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c.set_defaults(func=_cmd_data_convert)

    s = dsub.add_parser("stats", help="image count, boxes per class and size histograms")
    s.add_argument("source")
    s.add_argument(
        "--format",
        default=None,
        choices=["yolo", "voc", "tt100k", "coco", "dota", "visdrone", "geojson"],
    )
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

    sp = dsub.add_parser("split", help="write a train/val split in the dataset's own format")
    sp.add_argument("source", help="YOLO or VOC folder, or COCO JSON")
    sp.add_argument("--format", default=None, choices=["yolo", "voc", "coco"])
    sp.add_argument("--val", type=float, default=0.2, help="fraction held out as val (0.2)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--overwrite", action="store_true", help="replace an existing split")
    sp.set_defaults(func=_cmd_data_split)

    t = dsub.add_parser(
        "slice", help="cut a dataset of huge images into overlapping tiles + a COCO JSON"
    )
    t.add_argument("source", help="dataset in any supported format")
    t.add_argument(
        "--format",
        default=None,
        choices=["yolo", "voc", "tt100k", "coco", "dota", "visdrone", "geojson"],
    )
    t.add_argument("--split", default=None, help="split to read")
    t.add_argument("--size", type=int, default=1024, help="tile side in pixels")
    t.add_argument("--overlap", type=float, default=0.2, help="tile overlap fraction")
    t.add_argument(
        "--min-visible",
        type=float,
        default=0.6,
        help="a cut box stays an object when this fraction of it is in the tile, else ignore",
    )
    t.add_argument(
        "--empty-ratio", type=float, default=0.0, help="fraction of tiles without objects kept"
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the empty-tile draw")
    t.add_argument("--out", required=True)
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    t.set_defaults(func=_cmd_data_slice)

    mo = dsub.add_parser(
        "mosaic",
        help="paste images into large scenes (+ a COCO JSON): a test bed for sliced prediction",
    )
    mo.add_argument("source", help="dataset in any supported format")
    mo.add_argument(
        "--format",
        default=None,
        choices=["yolo", "voc", "tt100k", "coco", "dota", "visdrone", "geojson"],
    )
    mo.add_argument("--split", default=None, help="split to read")
    mo.add_argument("--grid", default="4x4", help="ROWSxCOLS images per scene (4x4)")
    mo.add_argument("--out", required=True)
    mo.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    mo.set_defaults(func=_cmd_data_mosaic)


def _read_source(args):
    """The dataset ``args.source`` in ``args.format`` (detected when not given)."""
    from ..data import read_dataset
    from ..data.formats import detect_format

    fmt = args.format or detect_format(args.source)
    return read_dataset(args.source, fmt, **_reader_kwargs(fmt, args))


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
    if fmt in ("voc", "dota", "geojson") and getattr(args, "classes", None):
        from ..data.records import read_text

        kw["classes"] = [ln.strip() for ln in read_text(args.classes).splitlines() if ln.strip()]
    if fmt == "coco":
        kw.pop("split", None)
    return kw


def _cmd_data_convert(args) -> int:
    import shutil
    from pathlib import Path

    from ..data import read_dataset, write_coco, write_yolo

    target = Path(args.out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not args.overwrite or not target.is_dir():
            raise ValueError(
                f"{target}: exists and is not empty (old images would stay beside the new labels); "
                "pass --overwrite or another --out"
            )
    splits = _source_splits(args)
    if splits:  # keep the source's train/val split in the output
        parts = {
            name: read_dataset(
                args.source, args.src_format, **_reader_kwargs(args.src_format, args), split=name
            )
            for name in splits
        }
        data = _merge(list(parts.values()))
    else:
        data = read_dataset(args.source, args.src_format, **_reader_kwargs(args.src_format, args))
    if target.exists() and args.overwrite:
        shutil.rmtree(target)
    out = write_coco(data, args.out) if args.dst_format == "coco" else write_yolo(data, args.out)
    if splits:
        _write_splits(target, args.dst_format, parts, data)
    print(
        f"wrote {len(data.images)} images, {data.num_boxes()} boxes, {len(data.classes)} classes as {args.dst_format} to {out}"
    )
    return 0


def _source_splits(args) -> list[str]:
    """``["train", "val"]`` when converting a whole dataset that has both splits."""
    if args.split is not None:
        return []
    from pathlib import Path

    src = Path(args.source)
    if args.src_format == "voc":
        has = all((src / "ImageSets" / "Main" / f"{n}.txt").exists() for n in ("train", "val"))
    elif args.src_format == "yolo":
        from ..recipe import _yolo_has_split

        has = _yolo_has_split(src)
    else:
        has = False
    return ["train", "val"] if has else []


def _merge(parts):
    import copy

    from ..data.records import DetectionData

    first = parts[0]
    images = []
    for part in parts:
        for r in part.images:
            r = copy.copy(r)
            r.image_id = len(images) + 1
            images.append(r)
    return DetectionData(
        first.root, list(first.classes), images, first.source, list(first.category_ids)
    )


def _write_splits(out, fmt: str, parts: dict, merged) -> None:
    """The split beside the converted data: YOLO ``splits.json``, COCO
    ``annotations_<split>.json``."""
    import json
    from pathlib import PurePosixPath

    which = {}
    for name, part in parts.items():
        for r in part.images:
            which.setdefault(r.file_name, name)
    if fmt == "yolo":
        # names as write_yolo placed them, relative to images/
        listing = {name: [] for name in parts}
        for r in merged.images:
            rel = PurePosixPath(r.file_name)
            if rel.parts and rel.parts[0] == "images":
                rel = PurePosixPath(*rel.parts[1:])
            listing[which[r.file_name]].append(rel.as_posix())
        (out / "splits.json").write_text(json.dumps(listing, indent=1))
        return
    coco = json.loads((out / "annotations.json").read_text())
    names = {im["id"]: r.file_name for im, r in zip(coco["images"], merged.images)}
    for name in parts:
        ids = {i for i, f in names.items() if which[f] == name}
        part = {
            **coco,
            "images": [im for im in coco["images"] if im["id"] in ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids],
        }
        (out / f"annotations_{name}.json").write_text(json.dumps(part))


def _cmd_data_stats(args) -> int:
    import json

    from ..data import read_dataset
    from ..data.formats import detect_format
    from ..data.stats import dataset_stats, format_stats

    fmt = args.format or detect_format(args.source)
    data = read_dataset(args.source, fmt, **_reader_kwargs(fmt, args))
    stats = dataset_stats(data)
    print(json.dumps(stats) if args.json else format_stats(stats, str(args.source)))
    return 0


def _cmd_data_split(args) -> int:
    from pathlib import Path

    from ..data import read_dataset
    from ..data.formats import dataset_yaml_of, detect_format
    from ..data.splits import write_split

    fmt = args.format or detect_format(args.source)
    src = Path(args.source)
    yaml_file = dataset_yaml_of(src)
    if yaml_file is not None:
        raise ValueError(
            f"{yaml_file}: a dataset YAML names its splits itself; edit its "
            "train/val, or split one of its YOLO folders (e.g. its train/)"
        )
    existing = {
        "yolo": [src / "splits.json"],
        "voc": [src / "ImageSets" / "Main" / "train.txt", src / "ImageSets" / "Main" / "val.txt"],
        "coco": [src.with_name(f"{src.stem}_train.json"), src.with_name(f"{src.stem}_val.json")],
    }.get(fmt, [])
    there = [str(f) for f in existing if f.exists()]
    if there and not args.overwrite:
        raise ValueError(f"{there[0]}: a split exists; pass --overwrite to replace it")
    data = read_dataset(src, fmt)
    files = write_split(src, fmt, data, args.val, args.seed)
    print(
        f"{len(data.images)} images: val {args.val:.0%} (seed {args.seed}); wrote "
        + ", ".join(str(f) for f in files)
    )
    return 0


def _cmd_data_slice(args) -> int:
    import sys
    import time

    from ..console import stamped
    from ..data.tiles import slice_dataset

    data = _read_source(args)
    started = time.monotonic()

    def said(file_name: str, tiles: int) -> None:  # no terminal: a timestamped line each
        print(stamped(f"{file_name}: {tiles} tiles ({time.monotonic() - started:.0f} s)"))

    c = slice_dataset(
        data,
        args.out,
        size=args.size,
        overlap=args.overlap,
        min_visible=args.min_visible,
        empty_ratio=args.empty_ratio,
        seed=args.seed,
        overwrite=args.overwrite,
        on_image=None if sys.stdout.isatty() else said,
    )
    print(
        f"{c['images']} image(s) -> {c['tiles']} tiles of {args.size} px ({c['boxes']} boxes; "
        f"{c['cut_to_ignore']} cut boxes under {args.min_visible:.0%} visible became ignore regions; "
        f"empty tiles kept {c['kept_empty']}, dropped {c['dropped_empty']}); "
        f"wrote {args.out}/annotations.json"
    )
    return 0


def _cmd_data_mosaic(args) -> int:
    from ..data.tiles import mosaic_dataset

    try:
        rows, cols = (int(v) for v in args.grid.lower().split("x"))
    except ValueError:
        raise ValueError(f"--grid {args.grid!r}: expected ROWSxCOLS, e.g. 4x4") from None
    data = _read_source(args)
    c = mosaic_dataset(data, args.out, rows=rows, cols=cols, overwrite=args.overwrite)
    print(
        f"{c['images']} image(s) -> {c['scenes']} scene(s) of up to {c['max_width']}x{c['max_height']} px "
        f"({c['boxes']} boxes); wrote {args.out}/annotations.json"
    )
    return 0


def _cmd_data_synth(args) -> int:
    import time

    from ..data.synthetic import generate

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

    from ..data.formats import TT100K_45, load_json
    from ..data.records import DataError
    from ..metrics import coco_metrics, evaluate_tt100k_bins
    from ..metrics.tt100k import table_cells

    if Path(args.dets).is_dir() or Path(args.gt).is_dir():
        raise DataError(
            f"{args.dets if Path(args.dets).is_dir() else args.gt}: a folder, expected a JSON file"
        )
    dets = load_json(args.dets)
    if args.format == "coco":
        from ..data.formats import read_coco, to_coco_dict
        from ..metrics.results import check_coco_results

        gt = to_coco_dict(read_coco(args.gt))  # the reader's checks, one line each
        dets = check_coco_results(dets, gt, str(args.dets))
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
    gt = load_json(args.gt)
    if not isinstance(gt, dict) or not isinstance(gt.get("imgs"), dict):
        raise DataError(f"{args.gt}: TT100K annotations need an 'imgs' object")
    if not isinstance(dets, dict) or not isinstance(dets.get("imgs"), dict):
        raise DataError(f"{args.dets}: TT100K results need an 'imgs' object")
    from ..metrics.tt100k import check_tt100k_results

    check_tt100k_results(dets, str(args.dets))
    if args.classes == "tt100k45":
        classes = list(TT100K_45)
    elif args.classes == "all":
        classes = None
    else:
        from ..data.records import read_text

        classes = [ln.strip() for ln in read_text(args.classes).splitlines() if ln.strip()]
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
        acc, rec, f1 = table_cells(r)
        print(
            f"  {k:<8}{acc:>10}{rec:>10}{f1:>10}{r['tp']:>8}{r['detections']:>8}{r['ground_truth']:>8}"
        )
    return 0


def register(sub) -> None:
    """Add this module's commands to the ``efpn`` subparsers."""
    _add_data(sub)
    _add_eval(sub)
