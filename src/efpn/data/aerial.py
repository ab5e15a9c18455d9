"""Readers for the aerial and drone formats: DOTA ``labelTxt``, VisDrone-DET, and GIS
annotations (GeoJSON polygons over georeferenced scenes).

Both keep the boxes a benchmark does not score as ignore regions
(:attr:`~efpn.data.records.ImageRecord.ignore`): DOTA's ``difficult=1`` objects, and
VisDrone's ``ignored regions`` (category 0), ``others`` (11) and boxes of score 0.
Training does not see them; COCO evaluation treats them as crowd regions, so a
detection there is neither a true nor a false positive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .formats import IMAGE_SUFFIXES, _finish, _image_size, files_in, load_json
from .records import DataError, DetectionData, ImageRecord, read_text

__all__ = [
    "DOTA_CLASSES",
    "GEOJSON_CLASS_KEYS",
    "VISDRONE_CLASSES",
    "read_dota",
    "read_geojson",
    "read_visdrone",
]

#: DOTA v1.5 categories (v1.0 lacks ``container-crane``)
DOTA_CLASSES = [
    "plane",
    "ship",
    "storage-tank",
    "baseball-diamond",
    "tennis-court",
    "basketball-court",
    "ground-track-field",
    "harbor",
    "bridge",
    "large-vehicle",
    "small-vehicle",
    "helicopter",
    "roundabout",
    "soccer-ball-field",
    "swimming-pool",
    "container-crane",
]
#: VisDrone-DET categories 1..10 (0 "ignored regions" and 11 "others" become ignore)
VISDRONE_CLASSES = [
    "pedestrian",
    "people",
    "bicycle",
    "car",
    "van",
    "truck",
    "tricycle",
    "awning-tricycle",
    "bus",
    "motor",
]


def _split_root(root: Path, split: str | None, need: str) -> Path:
    """``root/split`` when it holds the layout, else ``root`` (one split per folder)."""
    if split and (root / split / need).is_dir():
        return root / split
    if (root / need).is_dir():
        return root
    where = f"{root / split} or {root}" if split else str(root)
    raise DataError(f"{where}: no {need}/ folder")


def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in files_in(folder, suffixes=IMAGE_SUFFIXES)}


def _label_files(folder: Path, pattern: str, images: dict[str, Path]):
    """``([(label file, its image, width, height), ...], count of label files without an
    image)``, pairing label files with images by file stem."""
    pairs, orphans = [], 0
    for label_path in files_in(folder, pattern):
        image = images.get(label_path.stem)
        if image is None:
            orphans += 1
            continue
        pairs.append((label_path, image, *_image_size(image, str(label_path))))
    return pairs, orphans


def _record(rel, w, h, boxes, labels, ignore, ignore_labels, image_id, attributes=None):
    return ImageRecord(
        rel,
        w,
        h,
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        image_id,
        ignore=np.asarray(ignore, dtype=np.float64).reshape(-1, 4),
        ignore_labels=np.asarray(ignore_labels, dtype=np.int64),
        attributes={k: np.asarray(v) for k, v in (attributes or {}).items()},
    )


def read_dota(
    root: str | Path, split: str | None = None, classes: list[str] | None = None
) -> DetectionData:
    """Read DOTA v1.0/v1.5: ``images/`` and ``labelTxt/`` (under ``root/<split>`` when
    that exists).

    Each label line is ``x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]``; the oriented
    quadrilateral becomes its axis-aligned box, ``difficult=1`` an ignore region. The
    header lines (``imagesource:``, ``gsd:``) are optional. ``classes`` defaults to
    the DOTA v1.5 list.
    """
    root = Path(root)
    base = _split_root(root, split, "labelTxt")
    classes = list(classes or DOTA_CLASSES)
    index = {c: i for i, c in enumerate(classes)}
    images = _images_by_stem(base / "images")
    records = []
    pairs, orphans = _label_files(base / "labelTxt", "*.txt", images)
    for label_path, image, w, h in pairs:
        boxes, labels, ignore, ignore_labels = [], [], [], []
        for ln, line in enumerate(read_text(label_path).splitlines(), 1):
            parts = line.split()
            if not parts or ":" in parts[0]:
                continue  # blank, or a header (imagesource:..., gsd:..., "gsd: 0.15")
            if len(parts) not in (9, 10):
                raise DataError(
                    f"{label_path}:{ln}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]', got {line.strip()!r}"
                )
            try:
                xy = np.asarray([float(v) for v in parts[:8]]).reshape(4, 2)
                difficult = int(parts[9]) if len(parts) == 10 else 0
            except ValueError:
                raise DataError(
                    f"{label_path}:{ln}: coordinates and difficult must be numbers, got {line.strip()!r}"
                ) from None
            if not np.isfinite(xy).all():
                raise DataError(f"{label_path}:{ln}: non-finite coordinate in {line.strip()!r}")
            if parts[8] not in index:
                raise DataError(
                    f"{label_path}:{ln}: category {parts[8]!r} is not one of the {len(classes)} classes"
                )
            box = [*xy.min(0).tolist(), *xy.max(0).tolist()]
            if difficult:
                ignore.append(box)
                ignore_labels.append(index[parts[8]])
            else:
                boxes.append(box)
                labels.append(index[parts[8]])
        rel = image.relative_to(root).as_posix()
        records.append(_record(rel, w, h, boxes, labels, ignore, ignore_labels, len(records) + 1))
    unlabelled = len(
        set(images) - {r.file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0] for r in records}
    )
    _report(base, orphans, unlabelled, "labelTxt")
    return _finish(DetectionData(root, classes, records, str(base)))


def read_visdrone(root: str | Path, split: str | None = None) -> DetectionData:
    """Read VisDrone-DET: ``images/`` and ``annotations/`` (under ``root/<split>`` when
    that exists; e.g. ``VisDrone2019-DET-train``).

    Each line is ``left,top,width,height,score,category,truncation,occlusion``.
    Categories 1-10 are the classes; category 0 (ignored regions) and 11 (others) and
    any box of score 0 become ignore regions (class-agnostic for 0 and 11).
    ``truncation`` and ``occlusion`` are kept in ``ImageRecord.attributes``.
    """
    root = Path(root)
    base = _split_root(root, split, "annotations")
    images = _images_by_stem(base / "images")
    records = []
    orphans = 0
    for ann_path in files_in(base / "annotations", "*.txt"):
        image = images.get(ann_path.stem)
        if image is None:
            orphans += 1
            continue
        w, h = _image_size(image, str(ann_path))
        boxes, labels, ignore, ignore_labels = [], [], [], []
        trunc, occl = [], []
        for ln, line in enumerate(read_text(ann_path).splitlines(), 1):
            line = line.strip().rstrip(",")
            if not line:
                continue
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 8:
                raise DataError(
                    f"{ann_path}:{ln}: expected 8 comma-separated fields (left,top,width,height,score,category,truncation,occlusion), got {len(parts)}"
                )
            try:
                x, y, bw, bh = (float(v) for v in parts[:4])
                score, cat, tr, oc = (int(v) for v in parts[4:])
            except ValueError:
                raise DataError(f"{ann_path}:{ln}: expected numbers, got {line!r}") from None
            if not all(np.isfinite([x, y, bw, bh])):
                raise DataError(f"{ann_path}:{ln}: non-finite box in {line!r}")
            if not 0 <= cat <= 11:
                raise DataError(f"{ann_path}:{ln}: category {cat} is not in 0..11")
            box = [x, y, x + bw, y + bh]
            if cat in (0, 11):
                ignore.append(box)
                ignore_labels.append(-1)
            elif score == 0:
                ignore.append(box)
                ignore_labels.append(cat - 1)
            else:
                boxes.append(box)
                labels.append(cat - 1)
                trunc.append(tr)
                occl.append(oc)
        rel = image.relative_to(root).as_posix()
        records.append(
            _record(
                rel,
                w,
                h,
                boxes,
                labels,
                ignore,
                ignore_labels,
                len(records) + 1,
                {
                    "truncation": np.asarray(trunc, dtype=np.int64),
                    "occlusion": np.asarray(occl, dtype=np.int64),
                },
            )
        )
    unlabelled = len(set(images) - {Path(r.file_name).stem for r in records})
    _report(base, orphans, unlabelled, "annotations")
    return _finish(DetectionData(root, list(VISDRONE_CLASSES), records, str(base)))


#: the feature properties that name an object's class, tried in this order
GEOJSON_CLASS_KEYS = ("class", "category", "label", "name", "type", "class_name", "classname")


def read_geojson(
    root: str | Path, split: str | None = None, classes: list[str] | None = None
) -> DetectionData:
    """Read GIS annotations: ``images/`` with georeferenced scenes (GeoTIFF tags or a
    world file, :func:`efpn.geo.georeference`) and ``geojson/<scene stem>.geojson``, a
    FeatureCollection of the scene's objects as polygons (or lines) in the scene's CRS,
    as QGIS or GDAL write them (under ``root/<split>`` when that exists).

    Each feature becomes the pixel box around its vertices; its class is the first of
    :data:`GEOJSON_CLASS_KEYS` among its properties; ``difficult`` or ``ignore`` true
    makes it an ignore region. Points (no extent) and empty geometries are skipped and
    counted. ``classes`` defaults to ``classes.txt`` in ``root``, else the sorted names
    found. Labels in another CRS than their scene's (a GeoJSON without a ``crs`` member
    is WGS 84) are reprojected to it with pyproj, or refused with one line without
    pyproj; labels whose features all fall outside their scene are refused.
    """
    from ..geo import crs_transformer, geojson_epsg, georeference

    root = Path(root)
    base = _split_root(root, split, "geojson")
    images = _images_by_stem(base / "images") if (base / "images").is_dir() else {}
    scenes, names, points = [], set(), 0
    reprojected: dict[tuple[int, int], int] = {}
    pairs, orphans = _label_files(base / "geojson", "*.geojson", images)
    for label_path, image, w, h in pairs:
        ref = georeference(image)
        if ref is None:
            raise DataError(
                f"{label_path}: its scene {image} has no georeference (GeoTIFF tags, or a "
                f"world file such as {image.with_suffix('.wld').name})"
            )
        doc = load_json(label_path)
        if not isinstance(doc, dict) or not isinstance(doc.get("features"), list):
            raise DataError(f"{label_path}: expected a GeoJSON FeatureCollection")
        try:
            epsg = geojson_epsg(doc)
        except ValueError as e:
            raise DataError(f"{label_path}: {e}") from None
        transform = None
        if ref.epsg is not None and epsg != ref.epsg:
            try:
                transform = crs_transformer(epsg, ref.epsg)
            except ValueError as e:
                raise DataError(f"{label_path}: {e}") from None
            if transform is None:
                implicit = "" if "crs" in doc else " (a GeoJSON without a crs member is WGS 84)"
                raise DataError(
                    f"{label_path}: features in EPSG:{epsg}{implicit}, its scene {image.name} "
                    f"in EPSG:{ref.epsg}; pip install pyproj (or efpn[geo]) to have them "
                    f"reprojected as they are read, or reproject them: ogr2ogr -t_srs "
                    f"EPSG:{ref.epsg} {label_path.stem}_{ref.epsg}.geojson {label_path.name}"
                )
            reprojected[(epsg, ref.epsg)] = reprojected.get((epsg, ref.epsg), 0) + 1
        objects = []
        for k, feature in enumerate(doc["features"]):
            where = f"{label_path}: feature {k}"
            if not isinstance(feature, dict):
                raise DataError(f"{where}: not a GeoJSON Feature")
            props = feature.get("properties") or {}
            if not isinstance(props, dict):
                raise DataError(f"{where}: its properties are not an object")
            key = next((c for c in GEOJSON_CLASS_KEYS if props.get(c) not in (None, "")), None)
            if key is None:
                raise DataError(
                    f"{where}: no class property (one of {', '.join(GEOJSON_CLASS_KEYS)}; "
                    f"it has {', '.join(map(str, props)) or 'none'})"
                )
            xy = _vertices(feature.get("geometry"), where)
            if xy is None:
                points += 1
                continue
            if transform is not None:
                xy = transform(xy)
                if not np.isfinite(xy).all():
                    raise DataError(
                        f"{where}: its coordinates do not map from EPSG:{epsg} to the scene's "
                        f"EPSG:{ref.epsg}"
                    )
            px, py = ref.to_pixel(xy[:, 0], xy[:, 1])
            box = [float(px.min()), float(py.min()), float(px.max()), float(py.max())]
            hard = str(props.get("difficult", props.get("ignore", 0))).lower()
            objects.append((str(props[key]).strip(), box, hard in ("1", "true", "yes")))
            names.add(objects[-1][0])
        if objects and not any(
            b[2] > 0 and b[0] < w and b[3] > 0 and b[1] < h for _, b, _ in objects
        ):
            raise DataError(
                f"{label_path}: none of its {len(objects)} features falls inside its scene "
                f"{image.name} ({w}x{h} px); are they drawn over this scene, in its CRS?"
            )
        scenes.append((label_path, image, w, h, objects))
    if classes is None and (root / "classes.txt").is_file():
        classes = [ln.strip() for ln in read_text(root / "classes.txt").splitlines() if ln.strip()]
    classes = list(classes) if classes else sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for label_path, image, w, h, objects in scenes:
        boxes, labels, ignore, ignore_labels = [], [], [], []
        for name, box, hard in objects:
            if name not in index:
                raise DataError(
                    f"{label_path}: class {name!r} is not one of the {len(classes)} classes "
                    f"({', '.join(classes)})"
                )
            (ignore if hard else boxes).append(box)
            (ignore_labels if hard else labels).append(index[name])
        rel = image.relative_to(root).as_posix()
        records.append(_record(rel, w, h, boxes, labels, ignore, ignore_labels, len(records) + 1))
    _report(base, orphans, len(set(images) - {p.stem for p, *_ in scenes}), "geojson")
    import logging

    log = logging.getLogger("efpn.data")
    if points:
        log.warning(f"{base}: skipped {points} point or empty feature(s): a box needs a polygon")
    for (source, target), count in sorted(reprojected.items()):
        log.warning(
            f"{base}: reprojected {count} label file(s) from EPSG:{source} to their scenes' "
            f"EPSG:{target} (pyproj)"
        )
    return _finish(DetectionData(root, classes, records, str(base)))


def _vertices(geometry, where: str) -> np.ndarray | None:
    """Every vertex of a GeoJSON geometry as ``(N, 2)`` map coordinates; ``None`` for
    points and empty geometries (they have no extent)."""
    if geometry is None:
        return None
    if not isinstance(geometry, dict):
        raise DataError(f"{where}: its geometry is not a GeoJSON object")
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        parts = [_vertices(g, where) for g in geometry.get("geometries") or []]
        parts = [p for p in parts if p is not None]
        return np.concatenate(parts) if parts else None
    if kind in ("Point", "MultiPoint"):
        return None
    if kind not in ("LineString", "MultiLineString", "Polygon", "MultiPolygon"):
        raise DataError(f"{where}: unknown geometry type {kind!r}")
    flat: list = []

    def walk(node):
        if (
            isinstance(node, list)
            and node
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in node)
        ):
            if len(node) < 2:
                raise DataError(f"{where}: a position needs two coordinates, got {node}")
            flat.append(node[:2])
        elif isinstance(node, list):
            for child in node:
                walk(child)
        else:
            raise DataError(f"{where}: coordinates must be nested lists of numbers")

    walk(geometry.get("coordinates"))
    if not flat:
        return None
    xy = np.asarray(flat, dtype=np.float64)
    if not np.isfinite(xy).all():
        raise DataError(f"{where}: non-finite coordinate")
    return xy


def _report(base: Path, orphans: int, unlabelled: int, folder: str) -> None:
    import logging

    log = logging.getLogger("efpn.data")
    if orphans:
        log.warning(f"{base}: skipped {orphans} {folder} file(s) without an image")
    if unlabelled:
        log.warning(f"{base}: skipped {unlabelled} image(s) without a {folder} file")
