"""Huge scenes read window by window: the same pixels as a whole read, a fraction of its
memory, and sliced prediction and ``data slice`` on top of them."""

import json
import re
import tracemalloc

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from efpn.data import DataError
from efpn.data import scene as scene_module
from efpn.data.image import load_rgb
from efpn.data.scene import ArrayScene, TiffScene, open_scene, reduce_scene
from efpn.slicing import predict_sliced
from test_slicing import IdDetector, _scene

NODATA = [(42113, "s", 0, "0", True)]  # GDAL_NODATA "0"


def _deep(h=301, w=517, bands=4):
    rng = np.random.default_rng(0)
    a = rng.integers(100, 4095, (h, w, bands)).astype(np.uint16)
    a[:20, :30] = 0  # nodata
    return a


LAYOUTS = {
    # 16-bit four-band, tiled, one plane per band, Deflate, a nodata value
    "tiled_planar_16bit": lambda: (
        np.moveaxis(_deep(), -1, 0),
        dict(
            tile=(64, 128),
            compression="zlib",
            photometric="minisblack",
            planarconfig="separate",
            extratags=NODATA,
        ),
    ),
    # striped, interleaved bands, strips of 7 rows
    "striped_16bit": lambda: (
        _deep(),
        dict(rowsperstrip=7, compression="zlib", photometric="minisblack", planarconfig="contig"),
    ),
    # uncompressed and contiguous: mapped from the file, not decoded
    "uncompressed_16bit": lambda: (
        _deep(),
        dict(photometric="minisblack", planarconfig="contig"),
    ),
    "tiled_8bit_rgb": lambda: (
        _deep()[..., :3].astype(np.uint8),
        dict(tile=(32, 48), photometric="rgb"),
    ),
    "striped_float_gray": lambda: (
        _deep()[..., 0].astype(np.float32) - 2000,
        dict(rowsperstrip=16, compression="zlib", photometric="minisblack"),
    ),
    # the compressions most GDAL output uses (decoded by imagecodecs)
    "tiled_lzw_16bit": lambda: (
        _deep(),
        dict(
            tile=(64, 64),
            compression="lzw",
            photometric="minisblack",
            planarconfig="contig",
            predictor=True,
        ),
    ),
    "tiled_jpeg_ycbcr": lambda: (  # orthophotos: JPEG in YCbCr, chroma subsampled 2x2
        _deep()[..., :3].astype(np.uint8),
        dict(tile=(64, 64), compression="jpeg", photometric="rgb", subsampling=(2, 2)),
    ),
    "tiled_zstd_8bit_rgbn": lambda: (  # 8-bit RGB + near infrared: bands 1-3 as RGB
        _deep().astype(np.uint8),
        dict(tile=(32, 64), compression="zstd", photometric="rgb", extrasamples=["unspecified"]),
    ),
    "striped_8bit_planar_4band": lambda: (  # band-interleaved gray bands
        np.moveaxis(_deep().astype(np.uint8), -1, 0),
        dict(
            rowsperstrip=32, compression="zlib", photometric="minisblack", planarconfig="separate"
        ),
    ),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_windowed_scenes_read_as_load_rgb_reads_them(tmp_path, layout):
    data, kw = LAYOUTS[layout]()
    path = tmp_path / f"{layout}.tif"
    tifffile.imwrite(path, data, **kw)
    whole = load_rgb(path, sliced=True)
    with open_scene(path) as scene:
        assert isinstance(scene, TiffScene)
        assert scene.shape == whole.shape == (301, 517, 3)
        for x0, y0, x1, y1 in [(0, 0, 517, 301), (13, 7, 200, 150), (400, 250, 517, 301)]:
            window = scene.window(x0, y0, x1, y1)
            assert window.dtype == np.uint8
            np.testing.assert_array_equal(window, whole[y0:y1, x0:x1])
        # the whole scene averaged down band by band, as Pillow reduces the whole image
        for factor in (1, 3, 7):
            reduced = np.asarray(Image.fromarray(whole).reduce(factor))
            np.testing.assert_array_equal(scene.reduced(factor), reduced)
            np.testing.assert_array_equal(reduce_scene(scene, factor, band_rows=10), reduced)
    if data.dtype == np.uint16:  # deep data are stretched, not cut to their high byte
        assert whole.max() == 255


def test_a_preview_is_collected_from_the_windows_sliced_prediction_reads(tmp_path):
    from efpn.data.tiles import slice_windows

    data, kw = LAYOUTS["striped_16bit"]()
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, data, **kw)
    whole = Image.fromarray(load_rgb(path, sliced=True))
    for factor in (3, 7):
        with open_scene(path) as scene:
            scene.collect_preview(factor)
            for win in slice_windows(301, 517, 100, 0.2):
                scene.window(*win)
            calls = []
            scene._raw = lambda *args, calls=calls: calls.append(args)  # reads nothing more
            got = scene.reduced(factor)
            assert not calls
            np.testing.assert_array_equal(got, np.asarray(whole.reduce(factor)))
    # windows that leave blocks out: the reduce reads the scene itself
    with open_scene(path) as scene:
        scene.collect_preview(7)
        scene.window(0, 0, 100, 100)
        np.testing.assert_array_equal(scene.reduced(7), np.asarray(whole.reduce(7)))


def test_other_images_are_read_whole(tmp_path):
    rgb = _deep(40, 60)[..., :3].astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    with open_scene(tmp_path / "a.png") as scene:
        assert isinstance(scene, ArrayScene)
        np.testing.assert_array_equal(scene.window(5, 6, 30, 20), rgb[6:20, 5:30])
    # a TIFF turned by its orientation tag is read whole, upright; as stored, by window
    turned = tmp_path / "turned.tif"
    tifffile.imwrite(turned, rgb, photometric="rgb", tile=(16, 16), extratags=[(274, "H", 1, 6)])
    with open_scene(turned) as scene:
        assert isinstance(scene, ArrayScene) and scene.shape == (60, 40, 3)
        np.testing.assert_array_equal(scene.window(0, 0, 40, 60), load_rgb(turned))
    with open_scene(turned, upright=False) as scene:
        assert isinstance(scene, TiffScene) and scene.shape == (40, 60, 3)
        np.testing.assert_array_equal(scene.window(0, 0, 60, 40), rgb)
    # associated (premultiplied) alpha: Pillow's colours, un-premultiplied
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["assocalpha"])
    with open_scene(tmp_path / "rgba.tif") as scene:
        assert isinstance(scene, ArrayScene)
        np.testing.assert_array_equal(scene.window(0, 0, 60, 40), load_rgb(tmp_path / "rgba.tif"))
    # a palette image: Pillow's colours, not tifffile's indices
    palette = Image.fromarray(rgb).convert("P")
    palette.save(tmp_path / "palette.tif")
    with open_scene(tmp_path / "palette.tif") as scene:
        assert isinstance(scene, ArrayScene)
        np.testing.assert_array_equal(scene.window(0, 0, 60, 40), np.array(palette.convert("RGB")))


def test_a_windowed_scene_decodes_only_the_windows_it_reads(tmp_path, monkeypatch):
    h, w = 1536, 2048  # 24 MB of 16-bit samples in four bands
    data = np.random.default_rng(1).integers(0, 4095, (h, w, 4)).astype(np.uint16)
    path = tmp_path / "big.tif"
    tiff = dict(
        tile=(256, 256), compression="zlib", photometric="minisblack", planarconfig="contig"
    )
    tifffile.imwrite(path, data, **tiff)
    del data
    monkeypatch.setattr(scene_module, "CACHE_BYTES", 2 * 2**20)
    monkeypatch.setattr(scene_module, "SAMPLE_BAND_BYTES", 2 * 2**20)
    # over the pixel limit of sliced prediction: refused whole, read by window
    monkeypatch.setenv("EFPN_MAX_SLICED_PIXELS", str(1000 * 1000))
    with pytest.raises(DataError, match="over the limit"):
        load_rgb(path, sliced=True)
    with open_scene(path) as scene:  # its stretch comes from a sample, read band by band
        tracemalloc.start()
        try:
            window = scene.window(300, 700, 556, 956)  # four of 48 tiles
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert window.shape == (256, 256, 3)
        assert peak < 8 * 2**20, peak  # the scene's samples alone are 24 MB
        np.testing.assert_array_equal(window, scene.window(0, 0, w, h)[700:956, 300:556])
    # a band the scene lacks is said at once, not as the pixel limit of a whole read
    monkeypatch.setenv("EFPN_BANDS", "5")
    with pytest.raises(DataError, match="big.tif: EFPN_BANDS asks for band 5 of 4"):
        open_scene(path)


def test_sliced_prediction_reads_a_windowed_scene_as_the_whole_image(tmp_path):
    boxes = [(5, 5, 15, 15), (285, 185, 300, 200), (85, 10, 95, 20), (150, 120, 170, 135)]
    img = _scene(200, 300, boxes)
    tifffile.imwrite(tmp_path / "s.tif", img, photometric="rgb", tile=(32, 64))
    model = IdDetector()
    with open_scene(tmp_path / "s.tif") as scene:
        assert isinstance(scene, TiffScene)
        windowed = predict_sliced(model, scene, 100, 0.2, merge="nmm", batch_size=3)
        assert all(c[0] <= 100 and c[1] <= 100 for c in model.calls)  # tiles, never the scene
        whole = predict_sliced(IdDetector(), img, 100, 0.2, merge="nmm", batch_size=3)
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(windowed[key], whole[key])
        got = sorted(tuple(int(v) for v in b) for b in windowed["boxes"].tolist())
        assert got == sorted(boxes)
    # the full-image pass of a windowed scene: the scene averaged down, boxes scaled back
    big = _scene(200, 200, [(20, 20, 180, 180)])
    tifffile.imwrite(tmp_path / "big.tif", big, photometric="rgb", rowsperstrip=9)
    with open_scene(tmp_path / "big.tif") as scene:
        assert isinstance(scene, TiffScene)
        both = predict_sliced(IdDetector(), scene, 64, 0.2, merge="nmm", full_image=True)
    assert [20.0, 20.0, 180.0, 180.0] in both["boxes"].tolist()


def test_a_damaged_tile_is_named_without_a_whole_read(tmp_path, monkeypatch):
    data, kw = LAYOUTS["tiled_lzw_16bit"]()
    path = tmp_path / "garbled.tif"
    tifffile.imwrite(path, data, **kw)
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[13], tif.pages[0].databytecounts[13]
    raw = bytearray(path.read_bytes())
    raw[offset + count // 3 : offset + count // 3 + 64] = bytes(64)
    path.write_bytes(bytes(raw))

    def whole_read(*args, **kwargs):
        raise AssertionError("a damaged windowed scene was read whole")

    monkeypatch.setattr(scene_module, "load_rgb", whole_read)
    # the 14th of 5 x 9 tiles: the stretch's sample pass meets it first
    pattern = r"garbled.tif: cannot decode image: tile 14 of 45 \(rows 64-127, columns 256-319\)"
    with pytest.raises(DataError, match=pattern):
        open_scene(path)


def test_predict_reads_tiffs_by_window_draws_huge_ones_shrunk_and_skips_damaged_ones(
    trained_run, tmp_path, monkeypatch, capsys
):
    from efpn.cli import main
    from efpn.engine import predict as predict_module

    run, _ = trained_run
    weights = str(run / "stage3" / "best.pt")
    rng = np.random.default_rng(0)
    folder = tmp_path / "scenes"
    folder.mkdir()
    scene = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
    tifffile.imwrite(folder / "a.tif", scene, photometric="rgb", tile=(32, 32))
    Image.fromarray(scene).save(folder / "a_copy.png")
    # a tiled scene whose last tiles are cut off: the header reads, the pixels do not
    tifffile.imwrite(folder / "cut.tif", scene, photometric="rgb", tile=(32, 32))
    raw = (folder / "cut.tif").read_bytes()
    (folder / "cut.tif").write_bytes(raw[: len(raw) - 4000])
    with open_scene(folder / "cut.tif") as cut:
        assert isinstance(cut, TiffScene)
    # a header whose image was never written (a write cut short): one line, no traceback
    header_only = tmp_path / "header_only.tif"
    with tifffile.TiffWriter(header_only):
        pass
    with pytest.raises(DataError, match=r"header_only.tif: cannot decode image: the TIFF holds no"):
        open_scene(header_only)
    monkeypatch.setattr(predict_module, "MAX_DRAWING_SIDE", 100)
    out = tmp_path / "out"
    args = ["predict", "--weights", weights, "--source", str(folder), "--out", str(out)]
    assert main([*args, "--slice", "64", "--score-thresh", "0", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"skipped: {folder / 'cut.tif'}: cannot decode image" in err
    assert "skipped 1 of 3 image(s)" in err
    results = json.loads((out / "predictions.json").read_text())
    by_file = {
        name: sorted((r["bbox"], r["score"]) for r in results if r["file_name"] == name)
        for name in ("a.tif", "a_copy.png")
    }
    assert by_file["a.tif"] == by_file["a_copy.png"]  # by window as from the whole image
    # the windowed scene is drawn averaged down to MAX_DRAWING_SIDE or less, the PNG whole
    assert Image.open(out / "a.png").size == (100, 75)  # blocks of 2x2
    assert Image.open(out / "a_copy.png").size == (200, 150)
    # without a terminal: a timestamped line per scene, and tile counts while one runs
    one = ["predict", "--weights", weights, "--source", str(folder / "a.tif")]
    assert main([*one, "--out", str(tmp_path / "one"), "--slice", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\[[-0-9: ]+\] a\.tif: 200x150 px, \d+ detections in \d+ s", lines[0])
    # --no-draw: the same results, no drawing
    bare = tmp_path / "bare"
    assert main([*one, "--out", str(bare), "--slice", "64", "--no-draw", "--quiet"]) == 0
    assert sorted(p.name for p in bare.iterdir()) == ["predictions.json"]
    same = json.loads((tmp_path / "one" / "predictions.json").read_text())
    assert json.loads((bare / "predictions.json").read_text()) == same
    progress = predict_module._ProgressLines("a.tif", every=0.0)
    progress(4, 12)
    progress(12, 12)  # the last batch is the scene's own line
    assert re.fullmatch(r"\[[-0-9: ]+\] a\.tif: 4/12 tiles\n", capsys.readouterr().out)
