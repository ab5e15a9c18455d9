"""Readers and writers for COCO JSON, YOLO txt, Pascal VOC XML and TT100K annotations."""

from __future__ import annotations

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from .records import (
    DataError,
    DetectionData,
    ImageRecord,
    read_text,
    resolve_inside,
    sanitize_boxes,
)

__all__ = [
    "FORMATS",
    "TT100K_45",
    "detect_format",
    "load_json",
    "read_coco",
    "read_dataset",
    "read_tt100k",
    "read_voc",
    "read_yolo",
    "to_coco_dict",
    "write_coco",
    "write_yolo",
]

FORMATS = ("coco", "yolo", "voc", "tt100k", "dota", "visdrone", "geojson")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def files_in(
    folder: Path, pattern: str = "*", *, recursive: bool = False, suffixes=None
) -> list[Path]:
    """The files under ``folder`` matching ``pattern``, sorted, without hidden ones (a name
    or folder starting with ``.``: macOS ``._*`` resource forks, ``.cache``), as shell
    globs and Ultralytics leave them out; ``suffixes`` keeps only those (any case)."""
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    return sorted(
        p
        for p in found
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and (suffixes is None or p.suffix.lower() in suffixes)
    )


# The 45 TT100K classes with more than 100 instances, evaluated in every paper.
TT100K_45 = (
    "i2 i4 i5 il100 il60 il80 io ip p10 p11 p12 p19 p23 p26 p27 p3 p5 p6 pg ph4 ph4.5 ph5 "
    "pl100 pl120 pl20 pl30 pl40 pl5 pl50 pl60 pl70 pl80 pm20 pm30 pm55 pn pne po pr40 w13 "
    "w32 w55 w57 w59 wo"
).split()


def load_yaml(path: str | Path):
    """yaml.safe_load with a one-line error naming the file and the position."""
    import yaml

    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1} column {where.column + 1}" if where else ""
        raise DataError(f"{path}: invalid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def class_names_of(names, source) -> list[str]:
    """The class list of a dataset YAML's ``names``: a list of strings, or a mapping
    from the class index 0..K-1 to its name (Ultralytics)."""
    if isinstance(names, dict):
        keys = list(names)
        whole = all(isinstance(k, int) and not isinstance(k, bool) for k in keys)
        if not whole or sorted(keys) != list(range(len(keys))):
            raise DataError(
                f"{source}: names: the mapping's keys must be the class indices 0..{len(keys) - 1}, "
                f"got {keys[:6]}"
            )
        names = [names[k] for k in range(len(keys))]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise DataError(
            f"{source}: names must be a list of strings or a mapping index -> name, got "
            f"{str(names)[:60]!r}"
        )
    return names


def load_json(path: str | Path):
    """json.load with a one-line error naming the file and the position."""
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None


def _image_size(path: Path, source: str) -> tuple[int, int]:
    """The image's upright ``(width, height)`` (after its EXIF orientation), from its
    header."""
    from .image import check_size, image_sizes

    try:
        stored, upright = image_sizes(path)
        check_size(path, *stored, sliced=True)  # readable at all, if only sliced
        return upright
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{source}: image {path} not found") from None
    except Exception as e:  # PIL raises several types for undecodable files
        raise DataError(f"{source}: cannot decode image {path}: {e}") from None


def _finish(data: DetectionData) -> DetectionData:
    sanitize_boxes(data.images, data.source)
    return data


# ----------------------------------------------------------------------------- COCO
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int_id(v) -> bool:
    """A COCO id: a whole number (``3`` or ``3.0``), not a string or a bool."""
    return _is_number(v) and float(v).is_integer()


def read_coco(ann_file: str | Path, image_root: str | Path | None = None) -> DetectionData:
    """Read a COCO detection JSON; image paths are relative to ``image_root``
    (default: the JSON's folder). Crowd annotations become ignore regions. Every entry
    is checked; the first problem is a one-line error naming the file and the entry."""
    ann_file = Path(ann_file)
    src = str(ann_file)
    d = load_json(ann_file)
    if not isinstance(d, dict) or "images" not in d or "categories" not in d:
        raise DataError(f"{src}: not a COCO detection file (needs 'images' and 'categories')")
    for key in ("images", "categories", "annotations"):
        if not isinstance(d.get(key, []), list):
            raise DataError(f"{src}: '{key}' must be a list")
    seen_cats: dict[int, str] = {}
    for i, c in enumerate(d["categories"]):
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            raise DataError(f"{src}: category {i} needs an 'id' and a 'name'")
        if not _is_int_id(c["id"]):
            raise DataError(
                f"{src}: category {c['name']!r}: id must be a whole number, got {c['id']!r}"
            )
        if int(c["id"]) in seen_cats:
            raise DataError(
                f"{src}: category id {c['id']} appears twice ({seen_cats[int(c['id'])]!r} and {c['name']!r})"
            )
        seen_cats[int(c["id"])] = c["name"]
    from collections import Counter

    repeated = sorted(n for n, k in Counter(seen_cats.values()).items() if k > 1)
    if repeated:
        import logging

        logging.getLogger("efpn.data").warning(
            f"{src}: class name(s) {', '.join(map(repr, repeated))} belong to more than one "
            f"category id; they are kept apart, but selecting classes by name takes them all"
        )
    root = Path(image_root) if image_root is not None else ann_file.parent
    cats = sorted(d["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    images: dict[int, ImageRecord] = {}
    paths: dict[int, Path] = {}
    for i, entry in enumerate(d["images"]):
        if not isinstance(entry, dict):
            raise DataError(f"{src}: image entry {i} is not an object")
        if "id" in entry and not _is_int_id(entry["id"]):
            raise DataError(
                f"{src}: image {entry.get('file_name')!r}: id must be a whole number (COCO), "
                f"got {entry['id']!r}"
            )
        if entry.get("id") in images:
            raise DataError(
                f"{src}: image id {entry['id']} appears twice (the second is {entry.get('file_name')!r})"
            )
        for key in ("id", "file_name", "width", "height"):
            if key not in entry:
                raise DataError(f"{src}: image entry {entry.get('id', i)} lacks '{key}'")
        w, h = entry["width"], entry["height"]
        if not (_is_number(w) and _is_number(h) and w > 0 and h > 0):
            raise DataError(
                f"{src}: image {entry['id']}: width and height must be positive numbers"
            )
        if not isinstance(entry["file_name"], str):
            raise DataError(f"{src}: image {entry['id']}: file_name must be a string")
        paths[entry["id"]] = resolve_inside(root, entry["file_name"], src)
        images[entry["id"]] = ImageRecord(
            entry["file_name"], int(w), int(h), image_id=int(entry["id"])
        )
    boxes: dict[int, list] = {i: [] for i in images}
    labels: dict[int, list] = {i: [] for i in images}
    crowd_boxes: dict[int, list] = {i: [] for i in images}
    crowd_labels: dict[int, list] = {i: [] for i in images}
    crowd = 0
    for k, ann in enumerate(d.get("annotations", [])):
        if not isinstance(ann, dict):
            raise DataError(f"{src}: annotation {k} is not an object")
        aid = ann.get("id", k)
        if ann.get("image_id") not in images:
            raise DataError(
                f"{src}: annotation {aid} refers to unknown image_id {ann.get('image_id')}"
            )
        if ann.get("category_id") not in cat_index:
            raise DataError(
                f"{src}: annotation {aid} has category_id {ann.get('category_id')} not declared in categories"
            )
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DataError(
                f"{src}: annotation {aid}: bbox must be 4 finite numbers [x, y, w, h], got {bbox!r}"
            )
        x, y, w, h = (float(v) for v in bbox)
        crowd_flag = ann.get("iscrowd", 0)
        if crowd_flag not in (0, 1):  # True/False compare equal to 1/0; "0" does not
            raise DataError(f"{src}: annotation {aid}: iscrowd must be 0 or 1, got {crowd_flag!r}")
        if crowd_flag:  # kept as an ignore region of its class
            crowd += 1
            crowd_boxes[ann["image_id"]].append([x, y, x + w, y + h])
            crowd_labels[ann["image_id"]].append(cat_index[ann["category_id"]])
            continue
        boxes[ann["image_id"]].append([x, y, x + w, y + h])
        labels[ann["image_id"]].append(cat_index[ann["category_id"]])
    for i, r in images.items():
        r.boxes = np.asarray(boxes[i], dtype=np.float64).reshape(-1, 4)
        r.labels = np.asarray(labels[i], dtype=np.int64)
        r.ignore = np.asarray(crowd_boxes[i], dtype=np.float64).reshape(-1, 4)
        r.ignore_labels = np.asarray(crowd_labels[i], dtype=np.int64)
    if crowd:
        import logging

        logging.getLogger("efpn.data").info(
            f"{src}: {crowd} crowd annotation(s) kept as ignore regions (not trained on)"
        )
    _check_declared_sizes(images, paths, src)
    return _finish(
        DetectionData(
            root,
            [c["name"] for c in cats],
            list(images.values()),
            src,
            category_ids=[c["id"] for c in cats],
        )
    )


def _check_declared_sizes(images: dict[int, ImageRecord], paths: dict[int, Path], src: str):
    """Compare each declared width and height with the image file's header (cheap: the
    pixels are not decoded). A declared size that is the stored size of an image whose
    EXIF orientation turns it means the annotations were drawn on the unturned pixels:
    that image is read unturned, with one counted line. Any other mismatch takes the
    file's size, with one counted warning. Files that are absent (an annotation file
    read for evaluation only) are not checked."""
    from .image import image_sizes

    wrong, unturned = [], []
    for i, r in images.items():
        try:
            stored, upright = image_sizes(paths[i])
        except (FileNotFoundError, IsADirectoryError):
            continue
        except Exception:  # undecodable: reported with the file when it is loaded
            continue
        declared = (r.width, r.height)
        if declared == upright:
            continue
        if declared == stored:
            r.upright = False
            unturned.append(r.file_name)
            continue
        wrong.append((r.file_name, r.width, r.height, *upright))
        r.width, r.height = upright
    import logging

    log = logging.getLogger("efpn.data")
    if unturned:
        log.warning(
            f"{src}: {len(unturned)} image(s) carry an EXIF rotation but declare their stored, "
            f"unturned size; read them unturned, as annotated (first: {unturned[0]})"
        )
    if wrong:
        name, dw, dh, w, h = wrong[0]
        log.warning(
            f"{src}: {len(wrong)} image(s) declare a width and height that differ from "
            f"the file; used the file's (first: {name} declares {dw}x{dh}, is {w}x{h})"
        )


def to_coco_dict(data: DetectionData) -> dict:
    """The dataset as a COCO detection dict (boxes as xywh, areas from the boxes)."""
    images, annotations = [], []
    ann_id = 1
    for r in data.images:
        images.append(
            {"id": r.image_id, "file_name": r.file_name, "width": r.width, "height": r.height}
        )
        for (x1, y1, x2, y2), lab in zip(r.boxes.tolist(), r.labels.tolist()):
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": r.image_id,
                    "category_id": data.category_ids[lab],
                    "bbox": [x1, y1, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            ann_id += 1
        for (x1, y1, x2, y2), lab in zip(r.ignore.tolist(), r.ignore_labels.tolist()):
            # a class-agnostic region (-1) ignores detections of every class
            for cat in data.category_ids if lab < 0 else [data.category_ids[lab]]:
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": r.image_id,
                        "category_id": cat,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 1,
                    }
                )
                ann_id += 1
    categories = [{"id": cid, "name": n} for cid, n in zip(data.category_ids, data.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _place_images(data: DetectionData, out_dir: Path, images_subdir: str) -> list[str]:
    """Hard-link (or copy) every image under ``out_dir/images_subdir`` keeping its
    relative name; returns the new relative names."""
    names = []
    for r in data.images:
        src = data.image_path(r)
        rel = Path(r.file_name)
        if rel.parts and rel.parts[0] == images_subdir:
            rel = Path(*rel.parts[1:])
        dst = out_dir / images_subdir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        names.append((Path(images_subdir) / rel).as_posix())
    return names


def write_coco(
    data: DetectionData,
    out_dir: str | Path,
    copy_images: bool = True,
    name: str = "annotations.json",
) -> Path:
    """Write ``out_dir/annotations.json`` (and the images under ``out_dir/images``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    coco = to_coco_dict(data)
    if copy_images:
        for entry, rel in zip(coco["images"], _place_images(data, out_dir, "images")):
            entry["file_name"] = rel
    path = out_dir / name
    path.write_text(json.dumps(coco))
    return path


# ----------------------------------------------------------------------------- YOLO
def _read_class_names(root: Path) -> list[str]:
    for name in ("classes.txt", "obj.names", "names.txt"):
        if (root / name).exists():
            return [line.strip() for line in read_text(root / name).splitlines() if line.strip()]
    # a dataset YAML here, or one folder up (a split folder of a Roboflow export)
    for folder in (root, root.parent):
        for name in ("data.yaml", "dataset.yaml"):
            if (folder / name).exists():
                d = load_yaml(folder / name)
                if isinstance(d, dict) and d.get("names") is not None:
                    return class_names_of(d["names"], folder / name)
    raise DataError(
        f"{root}: no class-names file (classes.txt, obj.names, or data.yaml with 'names' "
        "here or one folder up)"
    )


def read_yolo(
    root: str | Path, split: str | None = None, classes: list[str] | None = None
) -> DetectionData:
    """Read a YOLO dataset: ``images/``, ``labels/`` (``class cx cy w h`` normalised) and
    a class-names file (or ``classes``, e.g. from a dataset YAML's ``names``). ``split``
    selects names from ``splits.json`` or the ``images/<split>`` subfolder (Ultralytics
    layout)."""
    root = Path(root)
    classes = list(classes) if classes else _read_class_names(root)
    img_dir = root / "images"
    if not img_dir.is_dir():
        raise DataError(f"{root}: no images/ folder")
    if split is not None and (root / "splits.json").exists():
        splits = load_json(root / "splits.json")
        if split not in splits:
            raise DataError(f"{root / 'splits.json'}: no split {split!r} (has {', '.join(splits)})")
        files = [Path("images") / n for n in splits[split]]
    else:
        base = img_dir / split if split else img_dir
        if not base.is_dir():
            raise DataError(f"{root}: no split {split!r} (no splits.json and no {base})")
        files = [
            p.relative_to(root) for p in files_in(base, recursive=True, suffixes=IMAGE_SUFFIXES)
        ]
    records = []
    polygons = 0
    for idx, rel in enumerate(files):
        path = resolve_inside(root, rel.as_posix(), str(root))
        w, h = _image_size(path, str(root))
        label_rel = Path("labels", *rel.parts[1:]).with_suffix(".txt")
        label_path = root / label_rel
        boxes, labels = [], []
        if label_path.exists():
            text = read_text(label_path)
            for ln, line in enumerate(text.splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                try:
                    # 5 fields: a box; 7, 9, ...: an Ultralytics segmentation polygon
                    # (class x1 y1 x2 y2 ...), read as its bounding box; 6 fields is a
                    # prediction with a score, not a label
                    if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
                        raise ValueError
                    c = int(parts[0])
                    values = [float(v) for v in parts[1:]]
                    if not all(math.isfinite(v) for v in values):
                        raise ValueError
                except ValueError:
                    raise DataError(
                        f"{label_path}:{ln}: expected 'class cx cy w h' (or a polygon 'class "
                        f"x1 y1 x2 y2 x3 y3 ...'), got {line.strip()[:80]!r}"
                    ) from None
                if not 0 <= c < len(classes):
                    raise DataError(
                        f"{label_path}:{ln}: class {c} is not declared ({len(classes)} classes)"
                    )
                if len(values) == 4:
                    cx, cy, bw, bh = values
                    box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
                else:
                    xs, ys = values[0::2], values[1::2]
                    box = [min(xs), min(ys), max(xs), max(ys)]
                    polygons += 1
                boxes.append([box[0] * w, box[1] * h, box[2] * w, box[3] * h])
                labels.append(c)
        records.append(
            ImageRecord(
                rel.as_posix(),
                w,
                h,
                np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64),
                idx + 1,
            )
        )
    if polygons:
        import logging

        logging.getLogger("efpn.data").info(
            f"{root}: {polygons} polygon label(s) (YOLO segmentation) read as their bounding boxes"
        )
    if split is None and (root / "labels").is_dir():
        stems = {Path(*rel.parts[1:]).with_suffix("").as_posix() for rel in files}
        orphans = [
            p
            for p in files_in(root / "labels", "*.txt", recursive=True)
            if p.relative_to(root / "labels").with_suffix("").as_posix() not in stems
        ]
        if orphans:
            import logging

            logging.getLogger("efpn.data").warning(
                f"{root}: skipped {len(orphans)} label file(s) without an image (e.g. {orphans[0]})"
            )
    return _finish(DetectionData(root, classes, records, str(root)))


def write_yolo(data: DetectionData, out_dir: str | Path) -> Path:
    """Write ``images/``, ``labels/`` and ``classes.txt`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems: dict[str, str] = {}
    for r in data.images:
        key = Path(r.file_name).with_suffix("").as_posix()
        if key in stems:
            raise DataError(
                f"{data.source}: {stems[key]!r} and {r.file_name!r} would share one YOLO label file; rename one"
            )
        stems[key] = r.file_name
    names = _place_images(data, out_dir, "images")
    for r, rel in zip(data.images, names):
        label_path = (out_dir / "labels" / Path(*Path(rel).parts[1:])).with_suffix(".txt")
        label_path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for (x1, y1, x2, y2), lab in zip(r.boxes.tolist(), r.labels.tolist()):
            cx, cy = (x1 + x2) / 2 / r.width, (y1 + y2) / 2 / r.height
            bw, bh = (x2 - x1) / r.width, (y2 - y1) / r.height
            lines.append(f"{lab} {cx:.10f} {cy:.10f} {bw:.10f} {bh:.10f}")
        label_path.write_text("\n".join(lines) + ("\n" if lines else ""))
    (out_dir / "classes.txt").write_text("\n".join(data.classes) + "\n")
    import logging

    log = logging.getLogger("efpn.data")
    dropped = sum(len(r.ignore) for r in data.images)
    if dropped:
        log.warning(
            f"{out_dir}: YOLO has no ignore regions; {dropped} left out (convert to COCO to keep them)"
        )
    unturned = [r.file_name for r in data.images if not r.upright]
    if unturned:
        log.warning(
            f"{out_dir}: {len(unturned)} image(s) were annotated unturned despite an EXIF "
            f"rotation, but YOLO readers (efpn, Ultralytics) turn them; remove their EXIF "
            f"orientation, or convert to COCO, which keeps the declared size (first: {unturned[0]})"
        )
    return out_dir


# ----------------------------------------------------------------------------- VOC
def read_voc(
    root: str | Path, split: str | None = None, classes: list[str] | None = None
) -> DetectionData:
    """Read Pascal VOC: ``Annotations/*.xml``, ``JPEGImages/`` and optionally
    ``ImageSets/Main/<split>.txt``. ``classes`` declares the class list (else it is
    collected from the files, sorted)."""
    root = Path(root)
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise DataError(f"{root}: no Annotations/ folder")
    if split:
        ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
        if not ids_file.exists():
            raise DataError(f"{root}: no split file {ids_file}")
        xmls = [
            ann_dir / f"{line.split()[0]}.xml"
            for line in read_text(ids_file).splitlines()
            if line.strip()
        ]
    else:
        xmls = files_in(ann_dir, "*.xml")
    parsed = []
    for x in xmls:
        try:
            tree = ET.parse(x).getroot()
        except FileNotFoundError:
            raise DataError(f"{x}: annotation file not found") from None
        except ET.ParseError as e:
            raise DataError(f"{x}: invalid XML: {e}") from None
        parsed.append((x, tree))
    if classes is None:
        # one class list per dataset, whatever the split: a classes file, else the
        # union over every annotation file, sorted (a split's own list would shift labels)
        classes = _voc_classes(root, ann_dir)
    index = {c: i for i, c in enumerate(classes)}
    records = []
    to_check: dict[int, ImageRecord] = {}
    for idx, (x, t) in enumerate(parsed):
        fname = t.findtext("filename") or f"{x.stem}.jpg"
        rel = f"JPEGImages/{fname}"
        size = t.find("size")
        declared = size is not None and bool(size.findtext("width"))
        if declared:
            try:
                w, h = int(float(size.findtext("width"))), int(float(size.findtext("height")))
            except (TypeError, ValueError):
                raise DataError(f"{x}: <size> needs numeric <width> and <height>") from None
            declared = w > 0 and h > 0  # some tools write 0 when they did not know
        if not declared:
            w, h = _image_size(resolve_inside(root, rel, str(x)), str(x))
        boxes, labels, ignore, ignore_labels = [], [], [], []
        for k, o in enumerate(t.iter("object")):
            name = o.findtext("name", "").strip()
            if not name:
                raise DataError(f"{x}: object {k} has no <name>")
            if name not in index:
                raise DataError(f"{x}: object {k} has class {name!r} that is not declared")
            bb = o.find("bndbox")
            try:
                box = [float(bb.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError):
                raise DataError(f"{x}: object {k} has no valid bndbox") from None
            if not np.isfinite(box).all():
                raise DataError(f"{x}: object {k} has a non-finite bndbox")
            if (o.findtext("difficult") or "0").strip() == "1":  # VOC: not scored
                ignore.append(box)
                ignore_labels.append(index[name])
            else:
                boxes.append(box)
                labels.append(index[name])
        resolve_inside(root, rel, str(x))
        records.append(
            ImageRecord(
                rel,
                w,
                h,
                np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64),
                idx + 1,
                ignore=np.asarray(ignore, dtype=np.float64).reshape(-1, 4),
                ignore_labels=np.asarray(ignore_labels, dtype=np.int64),
            )
        )
        if declared:
            to_check[idx] = records[-1]
    _check_declared_sizes(to_check, {i: root / r.file_name for i, r in to_check.items()}, str(root))
    return _finish(DetectionData(root, list(classes), records, str(root)))


def _voc_classes(root: Path, ann_dir: Path) -> list[str]:
    for name in ("classes.txt", "labels.txt"):
        if (root / name).exists():
            return [ln.strip() for ln in read_text(root / name).splitlines() if ln.strip()]
    names = set()
    for x in files_in(ann_dir, "*.xml"):
        try:
            tree = ET.parse(x).getroot()
        except ET.ParseError as e:
            raise DataError(f"{x}: invalid XML: {e}") from None
        names |= {o.findtext("name", "").strip() for o in tree.iter("object")}
    return sorted(n for n in names if n)


# ----------------------------------------------------------------------------- TT100K
def read_tt100k(
    ann_file: str | Path,
    root: str | Path | None = None,
    split: str | None = None,
    classes: str | list[str] = "tt100k45",
    keep_other: bool = False,
) -> DetectionData:
    """Read TT100K ``annotations.json`` (``types`` and ``imgs -> id -> {path, objects}``).

    Args:
        ann_file: the annotations file.
        root: image root (default: the file's folder); ``path`` entries are relative to it.
        split: keep images whose path starts with ``<split>/`` (``train``, ``test``).
        classes: ``"tt100k45"``, ``"all"`` (every declared type) or a list.
        keep_other: keep objects of the other declared classes for training (the
            paper does); evaluation still counts only ``classes``.
    """
    ann_file = Path(ann_file)
    src = str(ann_file)
    d = load_json(ann_file)
    if not isinstance(d, dict) or "imgs" not in d:
        raise DataError(f"{src}: not a TT100K annotations file (needs 'imgs')")
    declared = list(
        d.get("types")
        or sorted({o["category"] for v in d["imgs"].values() for o in v.get("objects", [])})
    )
    eval_classes = (
        list(TT100K_45)
        if classes == "tt100k45"
        else declared
        if classes == "all"
        else list(classes)
    )
    unknown = [c for c in eval_classes if c not in declared]
    if unknown:
        raise DataError(f"{src}: classes {unknown[:5]} are not declared in 'types'")
    all_classes = eval_classes + (
        [c for c in declared if c not in eval_classes] if keep_other else []
    )
    index = {c: i for i, c in enumerate(all_classes)}
    root = Path(root) if root is not None else ann_file.parent
    records = []
    for key, v in d["imgs"].items():
        path = v.get("path", f"{key}.jpg")
        if split and not path.startswith(f"{split}/"):
            continue
        boxes, labels = [], []
        for k, o in enumerate(v.get("objects", [])):
            cat = o.get("category")
            if cat not in declared:
                raise DataError(
                    f"{src}: image {key} object {k} has category {cat!r} not declared in 'types'"
                )
            if cat not in index:
                continue
            b = o["bbox"]
            boxes.append([float(b["xmin"]), float(b["ymin"]), float(b["xmax"]), float(b["ymax"])])
            labels.append(index[cat])
        img_path = resolve_inside(root, path, src)
        w, h = _image_size(img_path, src)
        image_id = int(v.get("id", key)) if str(v.get("id", key)).isdigit() else len(records) + 1
        records.append(
            ImageRecord(
                path,
                w,
                h,
                np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64),
                image_id,
            )
        )
    return _finish(DetectionData(root, all_classes, records, src, eval_classes=eval_classes))


# ----------------------------------------------------------------------------- dispatch
def _yaml_splits(path: Path) -> tuple[dict[str, tuple[Path, str | None]], list[str] | None]:
    """The splits (``train``, and ``val`` and ``test`` where given) of an Ultralytics
    dataset YAML as ``(YOLO root, split)``, and its class names (``None`` if absent).
    See :func:`read_dataset_yaml` for the layouts."""
    d = load_yaml(path) or {}
    if not isinstance(d, dict) or "train" not in d:
        raise DataError(
            f"{path}: a dataset YAML needs at least 'train' (and 'path', 'val', 'names')"
        )
    root = (path.parent / str(d.get("path", "."))).resolve()

    def split_of(key: str) -> tuple[Path, str | None]:
        value = d[key]
        if not isinstance(value, str) or value.endswith(".txt") or "://" in value:
            raise DataError(
                f"{path}: {key}: only a folder of images is supported (images/<split> or "
                f"<split>/images), got {value!r}"
            )
        rel = value[3:] if value.startswith("../") else value
        folder = (root / rel).resolve()
        if folder != root and root not in folder.parents:
            raise DataError(f"{path}: {key}: {value!r} leaves the dataset root {root}")
        parts = folder.relative_to(root).parts
        if len(parts) == 2 and parts[0] == "images":
            return root, parts[1]
        if parts and parts[-1] == "images":
            return folder.parent, None
        raise DataError(
            f"{path}: {key}: expected images/<split> or <split>/images under {root}, got {value!r}"
        )

    names = d.get("names")
    if names is not None:
        names = class_names_of(names, path)
        if any("," in n for n in names):
            raise DataError(f"{path}: class names may not contain ','")
    splits = {key: split_of(key) for key in ("train", "val", "test") if d.get(key) is not None}
    return splits, names


def read_dataset_yaml(path: str | Path) -> dict:
    """The data section of a recipe for an Ultralytics-style dataset YAML.

    ``path`` (the root, relative to the YAML's folder), ``train`` and ``val`` (``test``
    is read by the data commands only), and ``names`` (a list, or a mapping from class
    index). A split is a folder under the root, in either layout that Ultralytics reads
    (labels where the last ``images`` of the path becomes ``labels``): ``images/<split>``
    with ``labels/<split>``, or ``<split>/images`` with ``<split>/labels`` (Roboflow's
    export, whose ``../train/images`` is read as ``train/images`` under the root, as
    Ultralytics does). Lists of image files and URLs are not supported and say so; a
    split may not leave the root. Without ``val``, 20% of train is held out.
    """
    splits, names = _yaml_splits(Path(path))
    train, val = splits["train"], splits.get("val")
    section: dict = {"format": "yolo", "train": str(train[0]), "val": str((val or train)[0])}
    if names is not None:
        section["classes"] = ",".join(names)
    section.update(train_split=train[1], val_split=val[1] if val else None)
    if val is None:
        section["val_fraction"] = 0.2
    return section


def detect_format(path: str | Path) -> str:
    """Guess the format of a dataset path."""
    path = Path(path)
    if dataset_yaml_of(path) is not None:
        return "yolo"
    if path.is_file() and path.suffix == ".json":
        d = load_json(path)
        return "tt100k" if isinstance(d, dict) and "imgs" in d else "coco"
    if (path / "Annotations").is_dir():
        return "voc"
    for sub in ("", "train", "val", "test"):
        if (path / sub / "labelTxt").is_dir():
            return "dota"
        if (path / sub / "annotations").is_dir():
            return "visdrone"
        if (path / sub / "geojson").is_dir():
            return "geojson"
    if (path / "labels").is_dir() or (path / "images").is_dir():
        return "yolo"
    raise DataError(f"{path}: cannot tell the dataset format; pass --format")


def dataset_yaml_of(path: str | Path) -> Path | None:
    """The Ultralytics dataset YAML that ``path`` names: the file itself, or the
    ``data.yaml`` of a folder that holds no ``images/`` or ``labels/`` of its own (a
    Roboflow export: ``data.yaml`` next to ``train/``, ``valid/``, ``test/``)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return path
    if path.is_dir() and not (path / "images").is_dir() and not (path / "labels").is_dir():
        for name in ("data.yaml", "dataset.yaml"):
            if (path / name).is_file():
                return path / name
    return None


def _read_dataset_yaml_split(path: Path, split: str | None, **kwargs) -> DetectionData:
    """One split (``train`` by default, ``val`` or ``test``) of an Ultralytics dataset YAML."""
    splits, names = _yaml_splits(path)
    split = split or "train"
    if split not in splits:
        raise DataError(f"{path}: no split {split!r} (has {', '.join(splits)})")
    root, sub = splits[split]
    return read_yolo(root, split=sub, classes=names, **kwargs)


def read_dataset(path: str | Path, fmt: str | None = None, **kwargs) -> DetectionData:
    """Read any supported format (guessed when ``fmt`` is None); an Ultralytics dataset
    YAML reads its train split, or ``split="val"``."""
    if not Path(path).exists():
        raise DataError(f"{path}: no such dataset file or folder (from {Path.cwd()})")
    yaml_file = dataset_yaml_of(path) if fmt in (None, "yolo") else None
    if yaml_file is not None:
        return _read_dataset_yaml_split(yaml_file, kwargs.pop("split", None), **kwargs)
    fmt = fmt or detect_format(path)
    from .aerial import read_dota, read_geojson, read_visdrone

    readers = {
        "coco": read_coco,
        "yolo": read_yolo,
        "voc": read_voc,
        "tt100k": read_tt100k,
        "dota": read_dota,
        "visdrone": read_visdrone,
        "geojson": read_geojson,
    }
    if fmt not in readers:
        raise DataError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return readers[fmt](path, **kwargs)
