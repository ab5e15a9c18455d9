"""``efpn predict``: batched inference on images of any size, drawings and COCO results."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..console import stamped
from ..data.dataset import load_rgb
from ..data.formats import IMAGE_SUFFIXES, files_in, read_dataset
from ..data.records import DataError
from ..data.scene import ArrayScene, Scene, TiffScene, open_scene
from ..geo import box_feature, crs_transformer, features_to_wgs84, georeference, write_geojson
from ..viz import draw_detections
from .train import detector_from_file

__all__ = ["predict"]


def _images(source: Path) -> list[Path]:
    if source.is_dir():
        found = files_in(source, recursive=True, suffixes=IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return found
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such image or folder")
    return [source]


def _relative(path: Path, source: Path) -> str:
    return path.relative_to(source).as_posix() if source.is_dir() else path.name


def _drawing_names(paths: list[Path], source: Path) -> dict[Path, str]:
    """Each image's drawing, ``<path relative to source>`` as ``.png``; images that would
    share one (``1.jpg`` and ``1.png``) keep their own suffix too (``1.jpg.png``)."""
    plain = {p: Path(_relative(p, source)).with_suffix(".png").as_posix() for p in paths}
    taken = Counter(plain.values())
    return {p: n if taken[n] == 1 else f"{_relative(p, source)}.png" for p, n in plain.items()}


#: the longest side of the drawing of a scene read window by window; a larger scene is
#: drawn shrunk (a 40000-px scene drawn whole would be a 4.8 GB image)
MAX_DRAWING_SIDE = 8192


class _ProgressLines:
    """Timestamped ``scene: k/N tiles`` lines at most once a minute, for sliced
    prediction of a huge scene when there is no terminal for a progress bar."""

    def __init__(self, name: str, every: float = 60.0):
        self.name, self.every, self.last = name, every, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every and done < total:
            self.last = now
            print(stamped(f"{self.name}: {done}/{total} tiles"), flush=True)


def _drawing_factor(scene: Scene) -> int:
    """By how much a windowed scene's drawing is reduced (1: drawn whole)."""
    return -(-max(scene.height, scene.width) // MAX_DRAWING_SIDE)


def _drawing_base(image, pred: dict, gt: dict | None):
    """The image to draw on, and the predictions and ground truth in its pixels: the
    image itself, or a windowed scene over :data:`MAX_DRAWING_SIDE` averaged down by
    whole blocks to at most that."""
    if not isinstance(image, Scene):
        return Image.fromarray(image), pred, gt
    if isinstance(image, ArrayScene):
        return Image.fromarray(image.array), pred, gt
    h, w = image.height, image.width
    factor = _drawing_factor(image)
    if factor == 1:
        return Image.fromarray(image.window(0, 0, w, h)), pred, gt
    small = image.reduced(factor)
    sh, sw = small.shape[:2]
    scale = torch.tensor([sw / w, sh / h, sw / w, sh / h])

    def shrunk(target):
        if target is None:
            return None
        return {**target, "boxes": torch.as_tensor(target["boxes"]).reshape(-1, 4) * scale}

    return Image.fromarray(small), shrunk(pred), shrunk(gt)


def _write_labels(path: Path, output: dict, shape, score_thresh: float, save_conf: bool) -> None:
    """One image's detections at ``score_thresh`` or above as YOLO label lines."""
    h, w = shape[:2]
    lines = []
    for (x1, y1, x2, y2), sc, lab in zip(
        output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist()
    ):
        if sc < score_thresh:
            continue
        line = f"{lab - 1} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
        lines.append(line + (f" {sc:.4f}" if save_conf else ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines))


def _features(ref, output: dict, path: Path, source: Path, classes, cat_ids, score_thresh):
    return [
        box_feature(
            ref,
            b,
            {
                "file_name": _relative(path, source),
                "category": classes[lab - 1],
                "category_id": cat_ids[lab - 1],
                "score": round(sc, 5),
            },
        )
        for b, sc, lab in zip(
            output["boxes"].tolist(), output["scores"].tolist(), output["labels"].tolist()
        )
        if sc >= score_thresh
    ]


def _write_scenes(
    out: Path, scenes, missing: list[Path], drawings: dict, quiet: bool, wgs84: bool = False
) -> None:
    """``predictions.geojson`` when every scene has one CRS (or all are mapped to WGS 84),
    else one file per scene."""
    if missing:
        print(
            f"--save-geojson: {len(missing)} image(s) carry no georeference (GeoTIFF tags or "
            f"a world file) and are left out (first: {missing[0]})",
            file=sys.stderr,
            flush=True,
        )
    if not scenes:
        return
    unnamed = [p for p, epsg, _ in scenes if epsg is None]
    if unnamed:
        print(
            f"--save-geojson: {len(unnamed)} scene(s) name no CRS (a world file without a "
            f"GDAL side file {Path(unnamed[0]).name}.aux.xml, or a GeoTIFF of a user-defined "
            f"CRS; first: {unnamed[0]}): "
            + (
                "left out of the WGS 84 output, with no CRS to map from"
                if wgs84
                else "their polygons are in the scene's map units with no crs member, which "
                "GIS tools take for WGS 84; set the layer's CRS when you open it"
            ),
            file=sys.stderr,
            flush=True,
        )
    if wgs84:
        scenes = [(p, 4326, features_to_wgs84(fs, e)) for p, e, fs in scenes if e is not None]
        if not scenes:
            return
    crs = {epsg for _, epsg, _ in scenes}
    if len(crs) == 1:
        written = write_geojson(
            out / "predictions.geojson", [f for _, _, fs in scenes for f in fs], crs.pop()
        )
    else:
        for p, epsg, features in scenes:
            target = out / "geojson" / Path(drawings[p]).with_suffix(".geojson")
            target.parent.mkdir(parents=True, exist_ok=True)
            write_geojson(target, features, epsg)
        written = out / "geojson"
    if not quiet:
        print(
            f"{len(scenes)} georeferenced scene(s): map polygons in {written}"
            + ("" if len(crs) <= 1 else f" (one file per scene: {len(crs)} CRSs)"),
            flush=True,
        )


@torch.no_grad()
def predict(
    weights: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    batch_size: int = 4,
    score_thresh: float = 0.5,
    compare: str | Path | None = None,
    device: str = "cpu",
    quiet: bool = False,
    slice_size: int | None = None,
    overlap: float = 0.2,
    merge: str = "nms",
    full_image: bool = False,
    model_overrides: dict | None = None,
    save_txt: bool = False,
    save_conf: bool = False,
    save_geojson: bool = False,
    geojson_crs: str = "scene",
    draw: bool = True,
) -> Path:
    """Detect objects in ``source`` (an image or a folder) with a checkpoint.

    Writes drawings (``out/<path relative to source>`` as ``.png``) and ``out/predictions.json``
    (COCO results, every detection the model keeps whatever ``score_thresh``, with each
    image's ``file_name`` and the class name as ``category``; image ids from ``compare``
    when given, else 1..N in sorted order). In
    a folder, an image that cannot be read is skipped, named on stderr and counted; a
    single image that cannot be read is an error. With ``compare`` (a COCO
    ground-truth JSON whose ``file_name``s are relative to ``source``), true positives
    are green, false positives blue and false negatives red, as the paper's Fig. 8.
    With ``slice_size``, each image is detected in overlapping tiles
    (:func:`efpn.slicing.predict_sliced`; ``batch_size`` tiles per pass), boxes in the
    original image's pixels. ``model_overrides`` change the checkpoint's inference
    settings (e.g. ``{"merge": "fused"}``). ``save_txt`` also writes YOLO labels of the
    boxes at ``score_thresh`` or above, ``out/labels/<path relative to source>.txt``
    (``class cx cy w h`` normalised, one file per image, empty without a box; a dataset
    to correct and train on, with ``classes.txt``); ``save_conf`` appends each score.
    ``save_geojson`` writes the boxes at ``score_thresh`` or above of georeferenced
    scenes (GeoTIFF tags or a world file, :func:`efpn.geo.georeference`) as map polygons,
    ``out/predictions.geojson``, or one file per scene in ``out/geojson/`` when the scenes'
    CRSs differ; scenes without a georeference are counted and named. ``geojson_crs``
    ``"wgs84"`` maps them to WGS 84 longitudes and latitudes instead (RFC 7946; one file
    for scenes of any CRS; needs pyproj). ``draw=False`` writes no drawings.
    """
    from ..slicing import predict_sliced

    if batch_size < 1:
        raise ValueError(f"--batch-size must be 1 or more, got {batch_size}")
    if geojson_crs not in ("scene", "wgs84"):
        raise ValueError(f"--geojson-crs must be scene or wgs84, got {geojson_crs!r}")
    if save_geojson and geojson_crs == "wgs84" and crs_transformer(4326, 4326) is None:
        raise ValueError("--geojson-crs wgs84 needs pyproj: pip install pyproj (or efpn[geo])")
    model, ckpt = detector_from_file(weights, device, **(model_overrides or {}))
    classes, cat_ids = ckpt["classes"], ckpt["category_ids"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(source)
    paths = _images(source)
    gt_by_name = {}
    if compare is not None:
        gt = read_dataset(compare, "coco")
        if list(gt.classes) != list(classes):
            raise DataError(
                f"{compare}: its classes ({', '.join(gt.classes)}) are not the checkpoint's "
                f"({', '.join(classes)}), in that order; boxes would be matched to the wrong class"
            )
        gt_by_name = {r.file_name: r for r in gt.images}
    results, kept, skipped = [], 0, 0
    scenes: list[tuple[Path, int | None, list[dict]]] = []  # --save-geojson, per scene
    # read before any inference: a bad world file stops the run before it costs anything
    refs = {p: georeference(p) for p in paths} if save_geojson else {}
    not_georeferenced: list[Path] = []
    tty = sys.stderr.isatty()
    step = 1 if slice_size else batch_size
    ids = {p: k + 1 for k, p in enumerate(paths)}
    drawings = _drawing_names(paths, source)
    for start in tqdm(range(0, len(paths), step), desc="predict", disable=quiet or not tty):
        chunk, arrays = [], []
        for p in paths[start : start + step]:
            try:
                known = gt_by_name.get(_relative(p, source))  # as --compare annotates it
                upright = known.upright if known is not None else True
                if slice_size:  # a tiled or striped TIFF is read window by window
                    arrays.append(open_scene(p, upright=upright))
                else:
                    arrays.append(load_rgb(p, upright=upright))
            except DataError as e:
                if not source.is_dir():
                    raise
                skipped += 1
                print(f"skipped: {e}", file=sys.stderr, flush=True)
                continue
            chunk.append(p)
        if not chunk:
            continue
        if slice_size:
            started = time.monotonic()
            if draw and isinstance(arrays[0], TiffScene):
                factor = _drawing_factor(arrays[0])
                if factor > 1:  # the drawing is collected from the windows as they are read
                    arrays[0].collect_preview(factor)
            try:
                outputs = [
                    predict_sliced(
                        model,
                        arrays[0],
                        slice_size,
                        overlap,
                        merge=merge,
                        full_image=full_image,
                        batch_size=batch_size,
                        device=device,
                        progress=not quiet and tty,
                        desc=chunk[0].name,
                        on_batch=None if quiet or tty else _ProgressLines(chunk[0].name),
                    )
                ]
                if not quiet and not tty:
                    scene = arrays[0]
                    print(
                        stamped(
                            f"{chunk[0].name}: {scene.shape[1]}x{scene.shape[0]} px, "
                            f"{len(outputs[0]['boxes'])} detections in "
                            f"{time.monotonic() - started:.0f} s"
                        ),
                        flush=True,
                    )
            except DataError as e:  # a strip or tile of a windowed scene is damaged
                arrays[0].close()
                if not source.is_dir():
                    raise
                skipped += 1
                print(f"skipped: {e}", file=sys.stderr, flush=True)
                continue
        else:
            images = [
                torch.from_numpy(a).permute(2, 0, 1).float().div(255).to(device) for a in arrays
            ]
            outputs = model(images)
        for p, a, o in zip(chunk, arrays, outputs):
            o = {key: v.cpu() for key, v in o.items()}
            r = gt_by_name.get(_relative(p, source))
            image_id = r.image_id if r is not None else ids[p]
            kept += int((o["scores"] >= score_thresh).sum())
            for b, sc, lab in zip(o["boxes"].tolist(), o["scores"].tolist(), o["labels"].tolist()):
                results.append(
                    {
                        "image_id": image_id,
                        "file_name": _relative(p, source),
                        "category_id": cat_ids[lab - 1],
                        "category": classes[lab - 1],
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "score": sc,
                    }
                )
            gt_target = None
            if r is not None:
                gt_target = {
                    "boxes": torch.as_tensor(r.boxes),
                    "labels": torch.as_tensor(r.labels) + 1,
                }
            if draw:
                base, o_drawn, gt_drawn = _drawing_base(a, o, gt_target)
                drawn = draw_detections(
                    base, o_drawn, classes, gt=gt_drawn, score_thresh=score_thresh
                )
                drawing = out / drawings[p]
                drawing.parent.mkdir(parents=True, exist_ok=True)
                drawn.save(drawing)
            if save_geojson:
                ref = refs[p]
                if ref is None:
                    not_georeferenced.append(p)
                else:
                    scenes.append(
                        (p, ref.epsg, _features(ref, o, p, source, classes, cat_ids, score_thresh))
                    )
            if save_txt:
                _write_labels(
                    out / "labels" / Path(drawings[p]).with_suffix(".txt"),
                    o,
                    a.shape,
                    score_thresh,
                    save_conf,
                )
            if isinstance(a, Scene):
                a.close()
    if skipped == len(paths):  # _images never returns an empty list
        raise DataError(f"{source}: none of its {skipped} image(s) could be read (named above)")
    path = out / "predictions.json"
    path.write_text(json.dumps(results))
    if save_txt:
        (out / "classes.txt").write_text("\n".join(classes) + "\n")
    if save_geojson:
        _write_scenes(out, scenes, not_georeferenced, drawings, quiet, geojson_crs == "wgs84")
    if skipped:
        print(
            f"{source}: skipped {skipped} of {len(paths)} image(s) that could not be read "
            "(named above)",
            file=sys.stderr,
            flush=True,
        )
    if not quiet:
        print(
            f"{len(paths) - skipped} image(s): {len(results)} detections, {kept} at score >= "
            f"{score_thresh}{' (drawn)' if draw else ''}; wrote {path}",
            flush=True,
        )
    return path
