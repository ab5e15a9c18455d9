"""Georeferenced scenes: GeoTIFF tags and world files to map coordinates, GeoJSON output."""

import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from efpn.cli import main
from efpn.data import DataError
from efpn.geo import GeoReference, box_feature, georeference

UTM33N = 32633


def _geokeys(epsg, raster_type=1):
    # version 1.1.0, two keys: GTRasterTypeGeoKey and ProjectedCSTypeGeoKey
    return [1, 1, 0, 2, 1025, 0, 1, raster_type, 3072, 0, 1, epsg]


def _geotiff(path, *, epsg=UTM33N, raster_type=1, transform=None, shape=(64, 96)):
    rng = np.random.default_rng(0)
    keys = _geokeys(epsg, raster_type)
    tags = [(34735, "H", len(keys), keys, True)]
    if transform is None:  # 0.5 m pixels, top left corner at (500000, 4000000)
        tags += [
            (33550, "d", 3, (0.5, 0.5, 0.0), True),
            (33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0), True),
        ]
    else:
        tags.append((34264, "d", 16, transform, True))
    arr = rng.integers(0, 255, (*shape, 3), dtype=np.uint8)
    tifffile.imwrite(path, arr, photometric="rgb", extratags=tags)
    return path


def test_geotiff_tags_map_pixels_as_gdal_does(tmp_path):
    ref = georeference(_geotiff(tmp_path / "area.tif"))
    assert ref.epsg == UTM33N
    assert ref.to_map(0, 0) == (500000.0, 4000000.0)  # the top left pixel's corner
    assert ref.to_map(10, 4) == (500005.0, 3999998.0)
    # "pixel is point": the tie point is the top left pixel's centre
    point = georeference(_geotiff(tmp_path / "point.tif", raster_type=2))
    assert point.to_map(0.5, 0.5) == (500000.0, 4000000.0)
    # a model transformation, rotated by 90 degrees
    m = (0, 2.0, 0, 10.0, 2.0, 0, 0, 20.0, 0, 0, 0, 0, 0, 0, 0, 1)
    rot = georeference(_geotiff(tmp_path / "rot.tif", transform=m))
    assert rot.to_map(3, 1) == (12.0, 26.0)
    # without tags: none
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    assert georeference(plain) is None


def test_world_files_and_their_errors(tmp_path):
    image = tmp_path / "scene.png"
    Image.new("RGB", (20, 10)).save(image)
    assert georeference(image) is None
    # the world file gives the top left pixel's centre
    (tmp_path / "scene.pgw").write_text("0.5\n0\n0\n-0.5\n100.25\n200.75\n")
    ref = georeference(image)
    assert ref.to_map(0, 0) == (100.0, 201.0) and ref.epsg is None
    (tmp_path / "scene.pgw").write_text("0.5\n0\nzero\n")
    with pytest.raises(DataError, match=r"scene\.pgw: a world file holds six numbers"):
        georeference(image)
    (tmp_path / "scene.pgw").unlink()
    (tmp_path / "scene.wld").write_text("0\n0\n0\n0\n1\n1\n")  # maps every pixel to one point
    with pytest.raises(DataError, match="do not map pixels"):
        georeference(image)


def test_box_features_are_closed_counterclockwise_map_rings():
    ref = GeoReference(0.5, 0.0, 1000.0, 0.0, -0.5, 2000.0)
    f = box_feature(ref, (2, 4, 6, 10), {"score": 0.9})
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    assert {tuple(p) for p in ring} == {
        (1001.0, 1998.0),
        (1003.0, 1998.0),
        (1003.0, 1995.0),
        (1001.0, 1995.0),
    }
    area = sum(p[0] * q[1] - q[0] * p[1] for p, q in zip(ring, ring[1:]))
    assert area == pytest.approx(2 * 2.0 * 3.0)  # twice the area, counterclockwise
    assert f["properties"] == {"score": 0.9}


def test_predict_save_geojson(trained_run, tmp_path, capsys):
    run, _ = trained_run
    weights = str(run / "stage3" / "best.pt")
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    _geotiff(scenes / "a.tif")
    Image.new("RGB", (96, 64), (90, 90, 90)).save(scenes / "photo.png")
    out = tmp_path / "out"
    args = ["predict", "--weights", weights, "--source", str(scenes), "--conf", "0"]
    assert main([*args, "--out", str(out), "--save-geojson"]) == 0
    err = capsys.readouterr().err
    assert "1 image(s) carry no georeference" in err and "photo.png" in err
    found = json.loads((out / "predictions.geojson").read_text())
    assert found["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    dets = [
        d for d in json.loads((out / "predictions.json").read_text()) if d["file_name"] == "a.tif"
    ]
    assert len(found["features"]) == len(dets) > 0
    ref = georeference(scenes / "a.tif")
    for feature, d in zip(found["features"], dets):
        x, y, w, h = d["bbox"]
        ring = feature["geometry"]["coordinates"][0]
        np.testing.assert_allclose(
            sorted(map(tuple, ring[:4])),
            sorted(
                ref.to_map(px, py) for px, py in ((x, y), (x + w, y), (x + w, y + h), (x, y + h))
            ),
        )
        assert feature["properties"]["category"] == d["category"]
        assert feature["properties"]["score"] == pytest.approx(d["score"], abs=1e-5)
    # scenes in two CRSs: one file per scene
    _geotiff(scenes / "b.tif", epsg=32632)
    out2 = tmp_path / "out2"
    assert main([*args, "--out", str(out2), "--save-geojson", "--quiet"]) == 0
    assert not (out2 / "predictions.geojson").exists()
    per_scene = {p.name: json.loads(p.read_text()) for p in (out2 / "geojson").glob("*.geojson")}
    assert set(per_scene) == {"a.geojson", "b.geojson"}
    assert per_scene["b.geojson"]["crs"]["properties"]["name"].endswith("EPSG::32632")
    # --geojson-crs wgs84: both scenes in one RFC 7946 file, in longitudes and latitudes
    out_wgs84 = tmp_path / "out_wgs84"
    flags = ["--save-geojson", "--geojson-crs", "wgs84", "--quiet"]
    assert main([*args, "--out", str(out_wgs84), *flags]) == 0
    lonlat = json.loads((out_wgs84 / "predictions.geojson").read_text())
    assert "crs" not in lonlat
    by_scene = {name: per_scene[name]["features"] for name in ("a.geojson", "b.geojson")}
    assert len(lonlat["features"]) == sum(map(len, by_scene.values()))
    # the scenes' corner (easting 500000) lies on their zones' central meridians: 15 and
    # 9 degrees east; each polygon is the scene's polygon mapped to WGS 84
    from pyproj import Transformer

    features = iter(lonlat["features"])
    for name, epsg, meridian in (("a.geojson", 32633, 15.0), ("b.geojson", 32632, 9.0)):
        to_wgs84 = Transformer.from_crs(epsg, 4326, always_xy=True)
        for projected in by_scene[name]:
            ring = next(features)["geometry"]["coordinates"][0]
            assert all(abs(lon - meridian - 0.005) < 0.006 and 36 < lat < 36.2 for lon, lat in ring)
            expected = [
                to_wgs84.transform(x, y) for x, y in projected["geometry"]["coordinates"][0]
            ]
            np.testing.assert_allclose(sorted(ring), sorted(expected), atol=1e-9)
    # a world file without a side file naming the CRS: said, as the GeoJSON cannot say it
    (scenes / "b.tif").unlink()
    Image.new("RGB", (96, 64), (90, 90, 90)).save(scenes / "w.png")
    (scenes / "w.pgw").write_text("0.5\n0\n0\n-0.5\n100.25\n200.75\n")
    assert main([*args, "--out", str(tmp_path / "out3"), "--save-geojson", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "--save-geojson: 1 scene(s) name no CRS" in err and "w.png.aux.xml" in err


def _square(x1, y1, x2, y2):
    """A pixel box as a map polygon over _geotiff's scene (0.5 m pixels)."""
    X1, X2 = 500000 + 0.5 * x1, 500000 + 0.5 * x2
    Y1, Y2 = 4000000 - 0.5 * y1, 4000000 - 0.5 * y2
    return [[[X1, Y1], [X2, Y1], [X2, Y2], [X1, Y2], [X1, Y1]]]


def _feature(props, kind, coordinates):
    return {
        "type": "Feature",
        "properties": props,
        "geometry": {"type": kind, "coordinates": coordinates},
    }


def _gis_dataset(root, features, crs="urn:ogc:def:crs:EPSG::32633"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "geojson").mkdir(exist_ok=True)
    _geotiff(root / "images" / "area.tif")
    doc = {"type": "FeatureCollection", "features": features}
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    (root / "geojson" / "area.geojson").write_text(json.dumps(doc))
    return root


def test_gis_polygons_over_a_geotiff_read_as_pixel_boxes(tmp_path, caplog, capsys):
    import logging

    from efpn.data import read_dataset
    from efpn.data.formats import detect_format

    features = [
        _feature({"class": "car"}, "Polygon", _square(10, 8, 20, 14)),
        _feature(
            {"category": "truck"},
            "MultiPolygon",
            [_square(30, 30, 40, 36), _square(38, 34, 50, 40)],
        ),
        _feature({"class": "car", "difficult": 1}, "Polygon", _square(60, 10, 66, 16)),
        _feature({"class": "car"}, "Point", [500001.0, 3999999.0]),  # no extent: skipped, counted
    ]
    root = _gis_dataset(tmp_path / "gis", features)
    assert detect_format(root) == "geojson"
    with caplog.at_level(logging.WARNING, logger="efpn.data"):
        data = read_dataset(root)
    assert data.classes == ["car", "truck"]
    r = data.images[0]
    assert (r.file_name, r.width, r.height) == ("images/area.tif", 96, 64)
    np.testing.assert_allclose(r.boxes, [[10, 8, 20, 14], [30, 30, 50, 40]], atol=1e-6)
    assert r.labels.tolist() == [0, 1]
    np.testing.assert_allclose(r.ignore, [[60, 10, 66, 16]], atol=1e-6)
    assert any("skipped 1 point or empty feature" in m.getMessage() for m in caplog.records)
    # into COCO with the data commands, as any other format
    assert (
        main(
            [
                "data",
                "convert",
                str(root),
                "--from",
                "geojson",
                "--to",
                "coco",
                "--out",
                str(tmp_path / "coco"),
            ]
        )
        == 0
    )
    coco = json.loads(next((tmp_path / "coco").glob("*.json")).read_text())
    assert sorted(a["bbox"] for a in coco["annotations"] if not a.get("iscrowd")) == [
        [10, 8, 10, 6],
        [30, 30, 20, 10],
    ]
    # tiles cut from a georeferenced scene keep their place on the map: a world file each
    args = ["data", "slice", str(root), "--format", "geojson", "--size", "48", "--overlap", "0"]
    assert main([*args, "--empty-ratio", "1", "--out", str(tmp_path / "tiles")]) == 0
    scene = georeference(root / "images" / "area.tif")
    tiles = sorted((tmp_path / "tiles" / "images").glob("*.png"))
    assert [t.name for t in tiles] == [
        f"images__area_{x}_{y}.png" for x in (0, 48) for y in (0, 16)
    ]
    for tile in tiles:
        x0, y0 = (int(v) for v in tile.stem.split("_")[-2:])
        ref = georeference(tile)
        assert tile.with_suffix(".pgw").is_file() and ref.epsg == UTM33N
        for u, v in [(0, 0), (47.5, 3.25), (48, 48)]:
            assert ref.to_map(u, v) == pytest.approx(scene.to_map(x0 + u, y0 + v), abs=1e-6)


@pytest.mark.parametrize(
    "case, says",
    [
        (
            "wgs84",
            r"features in EPSG:4326 \(a GeoJSON without a crs member is WGS 84\), its scene area.tif in EPSG:32633; pip install pyproj \(or efpn\[geo\]\) to have them reprojected as they are read, or reproject them: ogr2ogr -t_srs EPSG:32633",
        ),
        ("no_class", r"feature 0: no class property \(one of class, category, .*; it has id\)"),
        ("outside", r"none of its 1 features falls inside its scene area.tif \(96x64 px\)"),
        ("no_georeference", r"its scene .*area.png has no georeference"),
        ("bad_crs", r"its crs 'local' is not an EPSG code"),
        ("bad_geometry", r"feature 0: unknown geometry type 'Circle'"),
    ],
)
def test_gis_labels_that_cannot_be_placed_are_one_line_errors(tmp_path, monkeypatch, case, says):
    import sys

    from efpn.data import read_dataset

    monkeypatch.setitem(sys.modules, "pyproj", None)  # reprojection needs pyproj

    feature = _feature({"class": "car"}, "Polygon", _square(10, 8, 20, 14))
    crs = "urn:ogc:def:crs:EPSG::32633"
    if case == "wgs84":
        crs = None
    elif case == "no_class":
        feature["properties"] = {"id": 3}
    elif case == "outside":
        feature = _feature({"class": "car"}, "Polygon", _square(200, 200, 210, 210))
    elif case == "bad_crs":
        crs = "local"
    elif case == "bad_geometry":
        feature["geometry"]["type"] = "Circle"
    root = _gis_dataset(tmp_path / "gis", [feature], crs=crs)
    if case == "no_georeference":
        (root / "images" / "area.tif").unlink()
        Image.new("RGB", (96, 64)).save(root / "images" / "area.png")
    with pytest.raises(DataError, match=says) as e:
        read_dataset(root)
    assert "\n" not in str(e.value) and "area.geojson" in str(e.value)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_georeference_follows_the_image_turned_upright(tmp_path, orientation):
    from efpn.data import load_rgb

    rows, cols = np.mgrid[0:6, 0:10]
    stored = np.stack([rows * 10, cols * 10, np.zeros_like(rows)], axis=2).astype(np.uint8)
    tags = [
        (33550, "d", 3, (0.5, 0.5, 0.0), True),
        (33922, "d", 6, (0, 0, 0, 500000.0, 4000000.0, 0), True),
    ]
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, stored, photometric="rgb", extratags=tags)
    turned = tmp_path / "turned.tif"
    tifffile.imwrite(
        turned, stored, photometric="rgb", extratags=[*tags, (274, "H", 1, orientation, True)]
    )
    upright = load_rgb(turned)  # as efpn reads it
    ref, ref_stored = georeference(turned), georeference(plain)
    for v in range(upright.shape[0]):
        for u in range(upright.shape[1]):
            row, col = upright[v, u, 0] // 10, upright[v, u, 1] // 10  # where it is stored
            expected = ref_stored.to_map(float(col) + 0.5, float(row) + 0.5)
            assert ref.to_map(u + 0.5, v + 0.5) == pytest.approx(expected, abs=1e-6, rel=0)


def test_gis_labels_in_another_crs_are_reprojected_to_their_scene(tmp_path, caplog):
    import logging

    from pyproj import Transformer

    from efpn.data import read_dataset

    boxes = [(10, 8, 20, 14), (40, 30, 70, 44)]
    utm = [_feature({"class": "car"}, "Polygon", _square(*b)) for b in boxes]
    to_wgs84 = Transformer.from_crs(UTM33N, 4326, always_xy=True)
    wgs84 = [
        _feature(
            {"class": "car"},
            "Polygon",
            [[list(to_wgs84.transform(x, y)) for x, y in f["geometry"]["coordinates"][0]]],
        )
        for f in utm
    ]
    # easting 500000 is UTM zone 33's central meridian, 15 degrees east
    assert wgs84[0]["geometry"]["coordinates"][0][0][0] == pytest.approx(15.0, abs=1e-4)
    expected = read_dataset(_gis_dataset(tmp_path / "utm", utm)).images[0].boxes
    np.testing.assert_allclose(expected, boxes)
    with caplog.at_level(logging.WARNING, logger="efpn.data"):
        got = read_dataset(_gis_dataset(tmp_path / "wgs84", wgs84, crs=None)).images[0].boxes
    np.testing.assert_allclose(got, boxes, atol=1e-3)  # a thousandth of a pixel
    assert "reprojected 1 label file(s) from EPSG:4326 to their scenes' EPSG:32633" in caplog.text
    # coordinates that do not map (a latitude beyond the pole): one line
    bad = _feature({"class": "car"}, "Polygon", [[[15, 91], [15.1, 91], [15.1, 92], [15, 91]]])
    with pytest.raises(DataError, match=r"area.geojson: feature 0: its coordinates do not map"):
        read_dataset(_gis_dataset(tmp_path / "bad", [bad], crs=None))


def test_world_file_tiles_name_their_crs_in_a_gdal_side_file(tmp_path):
    from efpn.geo import write_world_file

    tile = tmp_path / "tile.png"
    Image.new("RGB", (8, 8)).save(tile)
    ref = GeoReference(0.5, 0.0, 500000.0, 0.0, -0.5, 4000000.0, UTM33N)
    write_world_file(tile, ref)
    # GDAL reads <SRS>EPSG:n</SRS> (checked with GDAL 3.10 through rasterio: crs EPSG:32633)
    assert (tmp_path / "tile.png.aux.xml").read_text() == (
        "<PAMDataset>\n  <SRS>EPSG:32633</SRS>\n</PAMDataset>\n"
    )
    assert georeference(tile) == ref
    # a side file as GDAL writes it: WKT, whose outermost AUTHORITY names the CRS
    wkt = (
        'PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID['
        '"WGS 84",6378137,298.257223563,AUTHORITY["EPSG","7030"]],AUTHORITY["EPSG","6326"]]'
        ',AUTHORITY["EPSG","4326"]],PROJECTION["Transverse_Mercator"],AUTHORITY["EPSG","32633"]]'
    )
    (tmp_path / "tile.png.aux.xml").write_text(
        f'<PAMDataset>\n  <SRS dataAxisToSRSAxisMapping="1,2">{wkt}</SRS>\n</PAMDataset>\n'
    )
    assert georeference(tile).epsg == UTM33N
    # without a side file, a world file names no CRS
    (tmp_path / "tile.png.aux.xml").unlink()
    assert georeference(tile).epsg is None


def test_wgs84_output_without_pyproj_is_refused_before_inference(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "pyproj", None)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    args = ["predict", "--weights", str(tmp_path / "none.pt"), "--source", str(tmp_path / "a.png")]
    code = main([*args, "--out", str(tmp_path / "out"), "--save-geojson", "--geojson-crs", "wgs84"])
    err = capsys.readouterr().err
    assert code != 0 and "--geojson-crs wgs84 needs pyproj: pip install pyproj" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
