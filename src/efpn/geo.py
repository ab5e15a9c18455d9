"""Detections in map coordinates: the georeference of a scene (GeoTIFF tags or a world
file) and GeoJSON output, so that ``efpn predict --save-geojson`` results open in QGIS or
GDAL on top of the scene."""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.records import DataError

__all__ = [
    "GeoReference",
    "box_feature",
    "crs_transformer",
    "features_to_wgs84",
    "geojson_epsg",
    "georeference",
    "write_geojson",
    "write_world_file",
]

_PIXEL_SCALE, _TIEPOINT, _TRANSFORMATION, _GEOKEYS = 33550, 33922, 34264, 34735
_RASTER_TYPE, _GEOGRAPHIC_CRS, _PROJECTED_CRS = 1025, 2048, 3072
_PIXEL_IS_POINT = 2
_USER_DEFINED = 32767
# world-file suffixes as GDAL and ESRI name them: .tfw next to .tif, .pgw next to .png, ...
_WORLD_SUFFIXES = {".tif": ".tfw", ".tiff": ".tfw", ".png": ".pgw", ".jpg": ".jgw", ".jpeg": ".jgw"}


@dataclass(frozen=True)
class GeoReference:
    """An affine map from pixel coordinates (x right, y down, ``(0, 0)`` at the top left
    corner of the top left pixel) to map coordinates: ``X = a x + b y + c``,
    ``Y = d x + e y + f``; ``epsg`` names the map's CRS when the source says which."""

    a: float
    b: float
    c: float
    d: float
    e: float
    f: float
    epsg: int | None = None

    def to_map(self, x: float, y: float) -> tuple[float, float]:
        return self.a * x + self.b * y + self.c, self.d * x + self.e * y + self.f

    def upright(self, orientation: int, width: int, height: int) -> GeoReference:
        """The same map for the image turned upright as its EXIF/TIFF ``orientation``
        says (efpn reads images upright); ``width`` and ``height`` as stored."""
        # stored pixel (x, y) as an affine function of the upright pixel (u, v)
        p, q, r, s, t, u = {
            1: (1, 0, 0, 0, 1, 0),
            2: (-1, 0, width, 0, 1, 0),
            3: (-1, 0, width, 0, -1, height),
            4: (1, 0, 0, 0, -1, height),
            5: (0, 1, 0, 1, 0, 0),
            6: (0, 1, 0, -1, 0, height),
            7: (0, -1, width, -1, 0, height),
            8: (0, -1, width, 1, 0, 0),
        }[orientation]
        a, b, c, d, e, f = self.a, self.b, self.c, self.d, self.e, self.f
        return GeoReference(
            a * p + b * s,
            a * q + b * t,
            a * r + b * u + c,
            d * p + e * s,
            d * q + e * t,
            d * r + e * u + f,
            self.epsg,
        )

    def shifted(self, x0: float, y0: float) -> GeoReference:
        """The map of a window whose top left corner is pixel ``(x0, y0)`` of this one."""
        c, f = self.to_map(x0, y0)
        return GeoReference(self.a, self.b, c, self.d, self.e, f, self.epsg)

    def to_pixel(self, xs, ys):
        """Map coordinates (arrays) back to pixel coordinates."""
        det = self.a * self.e - self.b * self.d
        dx, dy = xs - self.c, ys - self.f
        return (self.e * dx - self.b * dy) / det, (self.a * dy - self.d * dx) / det


def georeference(path: str | Path) -> GeoReference | None:
    """The scene's georeference, or ``None`` when it has none: GeoTIFF tags (a model
    transformation, or a tie point with a pixel scale; "pixel is point" rasters are
    shifted by half a pixel, as GDAL does), else a world file next to the image
    (``scene.tfw``, ``.pgw``, ``.jgw`` or ``scene.wld``; its CRS from GDAL's side file
    ``scene.png.aux.xml`` when there is one). Both describe the stored
    pixels; the map returned is for the image as efpn reads it, turned upright."""
    path = Path(path)
    found = _geotiff(path) if path.suffix.lower() in (".tif", ".tiff") else None
    found = found if found is not None else _world_file(path)
    if found is None:
        return None
    from .data.image import image_orientation

    orientation, (width, height) = image_orientation(path)
    return found if orientation == 1 else found.upright(orientation, width, height)


def _geotiff(path: Path) -> GeoReference | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            values = {
                k: tags[k].value
                for k in (_PIXEL_SCALE, _TIEPOINT, _TRANSFORMATION, _GEOKEYS)
                if k in tags
            }
    except Exception:  # not readable as a TIFF: load_rgb names the problem
        return None
    keys = _geokeys(values.get(_GEOKEYS))
    epsg = keys.get(_PROJECTED_CRS) or keys.get(_GEOGRAPHIC_CRS)
    epsg = None if epsg in (None, 0, _USER_DEFINED) else int(epsg)
    if _TRANSFORMATION in values and len(values[_TRANSFORMATION]) == 16:
        m = [float(v) for v in values[_TRANSFORMATION]]
        ref = GeoReference(m[0], m[1], m[3], m[4], m[5], m[7], epsg)
    elif _TIEPOINT in values and _PIXEL_SCALE in values:
        tie, scale = values[_TIEPOINT], values[_PIXEL_SCALE]
        if len(tie) < 6 or len(scale) < 2:
            return None
        i, j, _, x, y, _ = (float(v) for v in tie[:6])
        sx, sy = float(scale[0]), float(scale[1])
        ref = GeoReference(sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy, epsg)
    else:
        return None
    if keys.get(_RASTER_TYPE) == _PIXEL_IS_POINT:  # the tie point is a pixel's centre
        ref = _shift_half_pixel(ref)
    return ref if _finite(ref) else None


def _geokeys(directory) -> dict[int, int]:
    """The GeoKeyDirectory's keys stored in the directory itself (the CRS codes and the
    raster type are; keys stored in other tags are not needed here)."""
    if directory is None or len(directory) < 4:
        return {}
    count = int(directory[3])
    keys = {}
    for k in range(count):
        entry = directory[4 + 4 * k : 8 + 4 * k]
        if len(entry) == 4 and int(entry[1]) == 0:
            keys[int(entry[0])] = int(entry[3])
    return keys


def _shift_half_pixel(r: GeoReference) -> GeoReference:
    return GeoReference(
        r.a, r.b, r.c - 0.5 * (r.a + r.b), r.d, r.e, r.f - 0.5 * (r.d + r.e), r.epsg
    )


def _finite(r: GeoReference) -> bool:
    return all(math.isfinite(v) for v in (r.a, r.b, r.c, r.d, r.e, r.f)) and (
        r.a * r.e - r.b * r.d != 0
    )


def _world_file(path: Path) -> GeoReference | None:
    candidates = [path.with_suffix(".wld")]
    if path.suffix.lower() in _WORLD_SUFFIXES:
        candidates.insert(0, path.with_suffix(_WORLD_SUFFIXES[path.suffix.lower()]))
    for world in candidates:
        if not world.is_file():
            continue
        lines = [ln.strip() for ln in world.read_text(errors="replace").splitlines() if ln.strip()]
        try:
            a, d, b, e, c, f = (float(v) for v in lines[:6])
        except ValueError:
            raise DataError(f"{world}: a world file holds six numbers, one per line") from None
        # (c, f) is the centre of the top left pixel
        ref = _shift_half_pixel(GeoReference(a, b, c, d, e, f, _aux_epsg(path)))
        if not _finite(ref):
            raise DataError(f"{world}: its six numbers do not map pixels to a map")
        return ref
    return None


def _aux_path(image: Path) -> Path:
    return image.with_name(image.name + ".aux.xml")


def _aux_epsg(image: Path) -> int | None:
    """The EPSG code that GDAL's side file ``image.aux.xml`` gives the image's CRS: its
    ``<SRS>`` as ``EPSG:n`` (as efpn writes it) or WKT (as GDAL writes it, the code of
    the outermost ``AUTHORITY``/``ID``); ``None`` without one."""
    aux = _aux_path(image)
    if not aux.is_file():
        return None
    with open(aux, "rb") as fh:
        text = fh.read(1 << 20).decode("utf-8", errors="replace")
    srs = re.search(r"<SRS[^>]*>(.*?)</SRS>", text, flags=re.S)
    if srs is None:
        return None
    value = html.unescape(srs.group(1)).strip()
    if re.fullmatch(r"EPSG:\d+", value, flags=re.I):
        return int(value.split(":")[1])
    codes = re.findall(r'(?:AUTHORITY|ID)\[\s*"EPSG"\s*,\s*"?(\d+)"?\s*\]', value, flags=re.I)
    return int(codes[-1]) if codes else None


def write_world_file(image: str | Path, ref: GeoReference) -> Path:
    """The world file that places ``image`` (``tile.png`` gets ``tile.pgw``) on the map
    as ``ref`` says: six lines, the last two the centre of the top left pixel, as GDAL
    and QGIS read it. A world file names no CRS: with ``ref.epsg`` known, a GDAL side
    file ``tile.png.aux.xml`` names it (``<SRS>EPSG:n</SRS>``, which GDAL, and so QGIS,
    reads)."""
    image = Path(image)
    suffix = _WORLD_SUFFIXES.get(image.suffix.lower(), ".wld")
    c, f = ref.to_map(0.5, 0.5)
    lines = [ref.a, ref.d, ref.b, ref.e, c, f]
    world = image.with_suffix(suffix)
    world.write_text("".join(f"{v!r}\n" for v in lines))
    if ref.epsg is not None:
        _aux_path(image).write_text(f"<PAMDataset>\n  <SRS>EPSG:{ref.epsg}</SRS>\n</PAMDataset>\n")
    return world


def geojson_epsg(collection: dict) -> int:
    """The EPSG code of a GeoJSON object's coordinates: its ``crs`` member
    (``urn:ogc:def:crs:EPSG::32633``, ``EPSG:32633``; ``CRS84`` is 4326), or 4326 (WGS 84)
    without one, as RFC 7946 says. Raises :class:`ValueError` for a CRS it cannot name."""
    crs = collection.get("crs")
    if crs is None:
        return 4326
    name = str((crs.get("properties") or {}).get("name", "")) if isinstance(crs, dict) else ""
    if name.upper().endswith("CRS84"):
        return 4326
    code = name.rsplit(":", 1)[-1]
    if "EPSG" not in name.upper() or not code.isdigit():
        raise ValueError(f"its crs {name or crs!r} is not an EPSG code")
    return int(code)


def crs_transformer(source_epsg: int, target_epsg: int):
    """A function mapping ``(N, 2)`` coordinates (x/easting or longitude first) from
    EPSG:``source_epsg`` to EPSG:``target_epsg`` with pyproj, or ``None`` when pyproj is
    not installed (``pip install efpn[geo]``). Raises :class:`ValueError` for a code
    pyproj does not know."""
    try:
        from pyproj import Transformer
        from pyproj.exceptions import CRSError
    except ImportError:
        return None
    try:
        transformer = Transformer.from_crs(source_epsg, target_epsg, always_xy=True)
    except CRSError as e:
        raise ValueError(f"cannot map EPSG:{source_epsg} to EPSG:{target_epsg}: {e}") from None

    def transform(xy):
        xs, ys = transformer.transform(xy[:, 0], xy[:, 1])
        return np.stack([np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)], axis=1)

    return transform


def features_to_wgs84(features: list[dict], epsg: int) -> list[dict]:
    """Polygon features in EPSG:``epsg`` as WGS 84 longitudes and latitudes (RFC 7946's
    coordinates; rings kept counterclockwise). Needs pyproj: raises :class:`ValueError`
    without it."""
    if epsg == 4326:
        return features
    transform = crs_transformer(epsg, 4326)
    if transform is None:
        raise ValueError("WGS 84 output needs pyproj: pip install pyproj (or efpn[geo])")
    out = []
    for feature in features:
        rings = []
        for ring in feature["geometry"]["coordinates"]:
            lonlat = transform(np.asarray(ring, dtype=float)).tolist()
            area = sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(lonlat, lonlat[1:]))
            rings.append(lonlat[::-1] if area < 0 else lonlat)
        out.append({**feature, "geometry": {**feature["geometry"], "coordinates": rings}})
    return out


def write_geojson(path: str | Path, features: list[dict], epsg: int | None) -> Path:
    """A GeoJSON FeatureCollection; a CRS other than WGS 84 is named with the ``crs``
    member that GDAL and QGIS read (RFC 7946 drops it, but its coordinates must be
    WGS 84 longitudes and latitudes, which a projected scene's are not)."""
    collection: dict = {"type": "FeatureCollection"}
    if epsg is not None and epsg != 4326:
        collection["crs"] = {
            "type": "name",
            "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"},
        }
    collection["features"] = features
    path = Path(path)
    path.write_text(json.dumps(collection))
    return path


def box_feature(ref: GeoReference, box, properties: dict) -> dict:
    """A detection box ``(x1, y1, x2, y2)`` in pixels as a map polygon (a rotated
    rectangle when the georeference rotates), with its properties."""
    x1, y1, x2, y2 = box
    ring = [ref.to_map(x, y) for x, y in ((x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1))]
    area = sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(ring, ring[1:]))
    if area < 0:  # RFC 7946: exterior rings run counterclockwise
        ring.reverse()
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]},
        "properties": properties,
    }
