import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from efpn.cli import main
from efpn.data import (
    AugmentConfig,
    BalancedCropDataset,
    DataError,
    DetectionDataset,
    build_transforms,
    generate,
    load_rgb,
    read_coco,
    read_tt100k,
    read_voc,
    read_yolo,
    write_coco,
    write_yolo,
)
from efpn.data.stats import dataset_stats
from efpn.data.synthetic import SYNTH_CLASSES


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, train=6, val=3, size=128, seed=1)
    return out


def _yolo_dataset(root: Path, lines: dict[str, str], classes=("a", "b")) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for name, text in lines.items():
        Image.new("RGB", (100, 50), (10, 20, 30)).save(root / "images" / f"{name}.png")
        (root / "labels" / f"{name}.txt").write_text(text)
    return root


def test_synth_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, train=2, val=1, size=96, seed=5)
    generate(b, train=2, val=1, size=96, seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (
            hashlib.sha256((a / f).read_bytes()).digest()
            == hashlib.sha256((b / f).read_bytes()).digest()
        )
    # a second writer on the same folder (two runs of one recipe) replaces each file
    # whole and leaves no temporary file behind
    before = {f: (a / f).read_bytes() for f in files}
    generate(a, train=2, val=1, size=96, seed=5)
    assert not [p for p in a.rglob("*") if p.name.endswith(".tmp")]
    assert {f: (a / f).read_bytes() for f in files} == before
    generate(tmp_path / "c", train=2, val=1, size=96, seed=6)
    assert (tmp_path / "c" / "train.json").read_bytes() != (a / "train.json").read_bytes()


def test_synth_distribution_small_dominated(tmp_path):
    generate(tmp_path, train=40, val=0, size=512, seed=0)
    data = read_coco(tmp_path / "train.json")
    stats = dataset_stats(data)
    assert len(data.classes) >= 10
    assert stats["long_side"]["small"] / stats["boxes"] > 0.6
    assert stats["long_side"]["medium"] > 0 and stats["long_side"]["large"] > 0
    assert all(len(r.labels) >= 2 for r in data.images)
    assert all(v > 0 for v in stats["per_class"].values())


def test_synth_classes_differ_only_inside_families():
    from efpn.data.synthetic import _template

    def arr(n):
        return np.asarray(_template(n), dtype=np.int16)

    # same outline and colour ring: the border pixels agree, the interior differs
    a, b = arr("ring_bar1"), arr("ring_bar2")
    border = np.zeros(a.shape[:2], bool)
    border[:8] = border[-8:] = True
    border[:, :8] = border[:, -8:] = True
    assert np.array_equal(a[border], b[border])
    assert not np.array_equal(a, b)


def test_dataset_yields_tv_tensors(synth):
    data = read_coco(synth / "train.json")
    ds = DetectionDataset(data, build_transforms(train=False))
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["labels"].min() >= 1 and target["labels"].max() <= len(SYNTH_CLASSES)
    assert len(target["boxes"]) == len(data.images[0].labels)


@pytest.mark.parametrize("dst", ["coco", "yolo"])
def test_round_trip_lossless(synth, tmp_path, dst):
    data = read_coco(synth / "train.json")
    if dst == "coco":
        back = read_coco(write_coco(data, tmp_path / "c"))
    else:
        back = read_yolo(write_yolo(data, tmp_path / "y"))
    assert back.classes == data.classes
    assert len(back.images) == len(data.images)
    for r, s in zip(data.images, back.images):
        assert (r.width, r.height) == (s.width, s.height)
        np.testing.assert_allclose(s.boxes, r.boxes, atol=1e-6)
        assert s.labels.tolist() == r.labels.tolist()


def test_cli_convert_yolo_to_coco_to_yolo(tmp_path):
    root = _yolo_dataset(tmp_path / "src", {"x": "0 0.5 0.5 0.2 0.4\n1 0.1 0.1 0.1 0.1\n"})
    assert (
        main(
            [
                "data",
                "convert",
                "--from",
                "yolo",
                "--to",
                "coco",
                str(root),
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "data",
                "convert",
                "--from",
                "coco",
                "--to",
                "yolo",
                str(tmp_path / "c" / "annotations.json"),
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 0
    )
    a, b = read_yolo(root), read_yolo(tmp_path / "y")
    np.testing.assert_allclose(a.images[0].boxes, b.images[0].boxes, atol=1e-6)
    np.testing.assert_allclose(a.images[0].boxes[0], [40, 15, 60, 35])


def test_voc_reader_and_undeclared_class(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "JPEGImages" / "a.jpg")
    xml = """<annotation><filename>a.jpg</filename><size><width>64</width><height>48</height></size>
    <object><name>sign</name><bndbox><xmin>5</xmin><ymin>6</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
    <object><name>car</name><bndbox><xmin>30</xmin><ymin>10</ymin><xmax>70</xmax><ymax>40</ymax></bndbox></object></annotation>"""
    (tmp_path / "Annotations" / "a.xml").write_text(xml)
    data = read_voc(tmp_path)
    assert data.classes == ["car", "sign"]
    np.testing.assert_allclose(
        data.images[0].boxes, [[5, 6, 20, 30], [30, 10, 64, 40]]
    )  # second one clipped
    with pytest.raises(DataError, match=r"a\.xml: object 1 has class 'car' that is not declared"):
        read_voc(tmp_path, classes=["sign"])
    (tmp_path / "Annotations" / "b.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"b\.xml: invalid XML"):
        read_voc(tmp_path)
    ET.fromstring(xml)  # the fixture itself is valid XML


def test_tt100k_reader_subset_and_keep_other(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "1.jpg")
    ann = {
        "types": ["pn", "pl40", "zz"],
        "imgs": {
            "1": {
                "path": "1.jpg",
                "id": 1,
                "objects": [
                    {"category": "pn", "bbox": {"xmin": 1, "ymin": 2, "xmax": 11, "ymax": 12}},
                    {"category": "zz", "bbox": {"xmin": 20, "ymin": 20, "xmax": 40, "ymax": 40}},
                ],
            }
        },
    }
    (tmp_path / "annotations.json").write_text(json.dumps(ann))
    only = read_tt100k(tmp_path / "annotations.json", classes=["pn", "pl40"])
    assert only.classes == ["pn", "pl40"] and only.images[0].labels.tolist() == [0]
    kept = read_tt100k(tmp_path / "annotations.json", classes=["pn", "pl40"], keep_other=True)
    assert kept.classes == ["pn", "pl40", "zz"] and kept.eval_classes == ["pn", "pl40"]
    assert kept.images[0].labels.tolist() == [0, 2]
    ann["imgs"]["1"]["objects"].append(
        {"category": "xx", "bbox": {"xmin": 1, "ymin": 1, "xmax": 5, "ymax": 5}}
    )
    (tmp_path / "annotations.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"image 1 object 2 has category 'xx' not declared"):
        read_tt100k(tmp_path / "annotations.json", classes="all")


def test_bad_input_errors_name_file_and_entry(tmp_path, synth):
    truncated = tmp_path / "t.json"
    truncated.write_text((synth / "train.json").read_text()[:200])
    with pytest.raises(DataError, match=r"t\.json: invalid JSON at line 1"):
        read_coco(truncated)
    d = json.loads((synth / "train.json").read_text())
    d["annotations"][3]["category_id"] = 99
    (tmp_path / "undeclared.json").write_text(json.dumps(d))
    with pytest.raises(
        DataError, match=r"undeclared\.json: annotation 4 has category_id 99 not declared"
    ):
        read_coco(tmp_path / "undeclared.json", image_root=synth)
    root = _yolo_dataset(tmp_path / "y", {"a": "7 0.5 0.5 0.1 0.1\n"})
    with pytest.raises(DataError, match=r"a\.txt:1: class 7 is not declared"):
        read_yolo(root)


def test_missing_and_undecodable_images(tmp_path, synth):
    d = json.loads((synth / "train.json").read_text())
    d["images"][0]["file_name"] = "train/missing.png"
    (synth / "missing.json").write_text(json.dumps(d))
    data = read_coco(synth / "missing.json")
    with pytest.raises(DataError, match=r"missing\.png: image not found"):
        DetectionDataset(data)[0]
    bad = synth / "train" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    d["images"][0]["file_name"] = "train/broken.png"
    (synth / "broken.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        DetectionDataset(read_coco(synth / "broken.json"))[0]


def test_path_escaping_root_is_an_error(tmp_path, synth):
    d = json.loads((synth / "train.json").read_text())
    d["images"][0]["file_name"] = "../../etc/passwd"
    (synth / "escape.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"escapes the dataset root"):
        read_coco(synth / "escape.json")  # refused when read, before any image is opened


def test_clip_and_drop_counted_in_one_line(tmp_path, caplog):
    root = _yolo_dataset(
        tmp_path, {"a": "0 0.95 0.5 0.2 0.2\n0 0.5 0.5 0.0 0.1\n1 0.5 0.5 0.2 0.2\n"}
    )
    with caplog.at_level("WARNING", logger="efpn.data"):
        data = read_yolo(root)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"{root}: clipped 1 box(es) to the image, dropped 1 box(es) with zero or negative area"
    ]
    np.testing.assert_allclose(data.images[0].boxes, [[85, 20, 100, 30], [40, 20, 60, 30]])


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_gray_rgba_16bit_load_as_rgb(tmp_path, mode):
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    if mode == "I;16":
        arr = np.full((4, 5), 65535, dtype=np.uint16)
        arr[0, 0] = 0
        Image.fromarray(arr).save(path)
    elif mode == "P":
        Image.new("RGB", (5, 4), (255, 0, 0)).convert("P").save(path)
    else:
        Image.new(mode, (5, 4), 200 if mode == "L" else (10, 20, 30, 40)).save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    if mode == "I;16":
        assert rgb[1, 1].tolist() == [255, 255, 255] and rgb[0, 0].tolist() == [0, 0, 0]
    if mode == "L":
        assert rgb[0, 0].tolist() == [200, 200, 200]
    if mode == "RGBA":
        assert rgb[0, 0].tolist() == [10, 20, 30]


def test_transforms_keep_boxes_valid(synth):
    data = read_coco(synth / "train.json")
    cfg = AugmentConfig(min_size=96, max_size=128, hflip=0.5, color_jitter=0.3, crop=1.0)
    ds = DetectionDataset(data, build_transforms(cfg, train=True))
    for i in range(len(ds)):
        image, target = ds[i]
        b = target["boxes"]
        assert len(b) == len(target["labels"])
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b[:, 2] <= image.shape[-1]).all() and (b[:, 3] <= image.shape[-2]).all()


def test_hue_jitter_defaults_to_a_quarter_of_color_jitter_and_can_be_turned_off():
    from torchvision.transforms import v2

    def jitter(**kw):
        ops = [
            op
            for op in build_transforms(AugmentConfig(**kw)).transforms
            if isinstance(op, v2.ColorJitter)
        ]
        return ops[0] if ops else None

    assert jitter(color_jitter=0.2).hue == pytest.approx(
        (-0.05, 0.05)
    )  # recipes keep their augmentation
    off = jitter(color_jitter=0.2, hue_jitter=0.0)
    assert off.hue is None and off.brightness == pytest.approx((0.8, 1.2))
    only = jitter(hue_jitter=0.1)
    assert only.hue == pytest.approx((-0.1, 0.1)) and only.brightness is None
    assert jitter() is None


def test_hue_jitter_out_of_range_is_one_line(tmp_path):
    from efpn.config import load_config

    path = tmp_path / "r.yaml"
    path.write_text("data: {hue_jitter: 0.7}\n")
    with pytest.raises(ValueError, match=r"data.hue_jitter.*0, 0.5"):
        load_config(path)


def test_balanced_crops_reach_target_per_class(synth):
    data = read_coco(synth / "train.json")
    base = DetectionDataset(data, build_transforms(train=False))
    bal = BalancedCropDataset(base, target_per_class=10, crop_size=64, seed=0)
    counts = dict(bal.counts)
    expected_extra = sum(max(10 - n, 0) for n in counts.values())
    assert len(bal) == len(base) + expected_extra
    chosen = {}
    for i, k, _, _ in bal.extra:
        lab = int(data.images[i].labels[k])
        chosen[lab] = chosen.get(lab, 0) + 1
    for lab, n in counts.items():
        assert n + chosen.get(lab, 0) >= 10
    image, target = bal[len(base)]
    assert image.shape[-2:] == (64, 64)
    assert len(target["boxes"]) >= 1


def test_aerial_cars_real_data(shared_data):
    root = shared_data("aerial_cars")
    train, val = read_yolo(root, split="train"), read_yolo(root, split="val")
    assert len(train.images) == 52 and len(val.images) == 13
    assert val.num_boxes() == 519
    image, target = DetectionDataset(val, build_transforms(train=False))[0]
    assert image.shape[0] == 3 and len(target["boxes"]) > 0


def test_conversion_and_reader_gaps_are_refused_or_counted(tmp_path, caplog):
    import json as _json
    import logging

    from efpn.cli import main
    from efpn.data import read_dataset, write_yolo
    from efpn.data.records import DataError

    img = np.zeros((20, 30, 3), np.uint8)
    (tmp_path / "c").mkdir()
    Image.fromarray(img).save(tmp_path / "c" / "a.png")
    Image.fromarray(img).save(tmp_path / "c" / "a.jpg")
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
            {"id": 2, "file_name": "a.jpg", "width": 30, "height": 20},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "c" / "gt.json").write_text(_json.dumps(coco))
    data = read_dataset(tmp_path / "c" / "gt.json", "coco")
    with pytest.raises(DataError, match="share one YOLO label file"):
        write_yolo(data, tmp_path / "y")
    coco["images"][1]["id"] = 1  # duplicate id
    (tmp_path / "c" / "dup.json").write_text(_json.dumps(coco))
    with pytest.raises(DataError, match="image id 1 appears twice"):
        read_dataset(tmp_path / "c" / "dup.json", "coco")
    # convert refuses to mix new labels with old images in a used --out
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old.png").write_text("x")
    coco["images"] = coco["images"][:1]
    (tmp_path / "c" / "one.json").write_text(_json.dumps(coco))
    args = [
        "data",
        "convert",
        "--from",
        "coco",
        "--to",
        "yolo",
        str(tmp_path / "c" / "one.json"),
        "--out",
        str(tmp_path / "used"),
    ]
    assert main(args) == 2
    assert main([*args, "--overwrite"]) == 0 and not (tmp_path / "used" / "old.png").exists()
    # YOLO: a 6-field line (a prediction with a score) is not a label; orphan labels are counted
    y = tmp_path / "used"
    (y / "labels" / "stray.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with caplog.at_level(logging.WARNING, logger="efpn.data"):
        read_dataset(y, "yolo")
    assert "1 label file(s) without an image" in caplog.text
    (y / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1 0.9\n")
    with pytest.raises(DataError, match=r"a\.txt:1: expected 'class cx cy w h'"):
        read_dataset(y, "yolo")


def test_data_commands_do_not_import_torch(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "y"
    (root / "labels").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "classes.txt").write_text("car\n")
    for i in range(5):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / f"{i}.png")
        (root / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    commands = [
        ["data", "stats", str(root)],
        ["data", "split", str(root), "--val", "0.4"],
        [
            "data",
            "convert",
            "--from",
            "yolo",
            "--to",
            "coco",
            str(root),
            "--out",
            str(tmp_path / "c"),
        ],
    ]
    script = (
        "import sys\nfrom efpn.cli import main\n"
        f"for c in {commands!r}:\n    assert main(c) == 0, c\n"
        "gt = sys.argv[1]\n"
        "assert main(['eval', '--format', 'coco', '--gt', gt, '--dets', sys.argv[2]]) == 0\n"
        "loaded = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    dets = tmp_path / "dets.json"
    dets.write_text(
        json.dumps([{"image_id": 1, "category_id": 1, "bbox": [6, 6, 4, 4], "score": 0.9}])
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "c" / "annotations.json"), str(dets)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-1500:]


def test_balanced_crops_keep_the_source_images_scale(synth):
    """A crop is resized by its source image's factor, not to min_size: an object is the
    size it has when the whole image goes through the detector."""
    from efpn.models import efpn_fpn

    data = read_coco(synth / "train.json")  # 128-px images
    base = DetectionDataset(data, build_transforms(train=False))
    bal = BalancedCropDataset(base, target_per_class=10, crop_size=48, seed=0)
    index = len(base)
    i = bal.extra[0][0]
    crop, target = bal[index]
    assert crop.shape[-2:] == (48, 48)
    assert target["source_size"].tolist() == [128, 128]
    for model in (
        efpn_fpn("resnet18", num_classes=4, out_channels=16, min_size=256, max_size=256),
        efpn_fpn(
            "resnet18", num_classes=4, out_channels=16, min_size=256, max_size=600, resize_scale=2.0
        ),
    ):
        model.train()
        t = model.transform
        full, full_target = base[i]
        whole, _ = t([full.float() / 255], [{"boxes": full_target["boxes"].clone()}])
        assert whole.image_sizes[0] == (256, 256)  # the full image: 128 -> 256, a factor of 2
        out, out_t = t(
            [crop.float() / 255],
            [{"boxes": target["boxes"].clone(), "source_size": target["source_size"]}],
        )
        assert out.image_sizes[0] == (96, 96)  # the crop at the same factor 2, not to 256
        torch.testing.assert_close(out_t[0]["boxes"], target["boxes"] * 2)
        # without the key a crop is resized as an image of its own
        alone, _ = t([crop.float() / 255], [{"boxes": target["boxes"].clone()}])
        assert alone.image_sizes[0] == ((256, 256) if model.transform.max_size == 256 else (96, 96))


def test_coco_declared_size_is_checked_against_the_file(tmp_path, caplog):
    import json as _json
    import logging

    from efpn.cli import main

    Image.fromarray(np.zeros((50, 200, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "b.png")
    gt = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 100, "height": 100},  # wrong: 200x50
            {"id": 2, "file_name": "b.png", "width": 40, "height": 40},
            {"id": 3, "file_name": "absent.png", "width": 30, "height": 30},  # not checked
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 10, 50, 20], "area": 1000}
        ],
        "categories": [{"id": 1, "name": "car"}],
    }
    (tmp_path / "gt.json").write_text(_json.dumps(gt))
    with caplog.at_level(logging.WARNING, logger="efpn.data"):
        data = read_coco(tmp_path / "gt.json")
    sizes = {r.file_name: (r.width, r.height) for r in data.images}
    assert sizes == {"a.png": (200, 50), "b.png": (40, 40), "absent.png": (30, 30)}
    np.testing.assert_allclose(data.images[0].boxes, [[100, 10, 150, 30]])  # not clipped at 100
    assert "1 image(s) declare a width and height that differ" in caplog.text
    assert "a.png declares 100x100, is 200x50" in caplog.text
    (tmp_path / "absent.png").write_bytes(b"")  # convert needs every image
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(tmp_path / "absent.png")
    out = tmp_path / "yolo"
    assert (
        main(
            [
                "data",
                "convert",
                "--from",
                "coco",
                "--to",
                "yolo",
                str(tmp_path / "gt.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    line = (out / "labels" / "a.txt").read_text().split()
    # normalised by the file's 200x50, not the declared 100x100
    np.testing.assert_allclose([float(v) for v in line[1:]], [0.625, 0.4, 0.25, 0.4])


def _sideways_photo(path: Path) -> np.ndarray:
    """Save a 20x40 (w x h) upright picture as a phone does: stored turned by 90 degrees
    (40x20) with EXIF orientation 6. Returns the upright pixels."""
    upright = np.zeros((40, 20, 3), np.uint8)
    upright[2:8, 3:9] = 255  # a white square near the top left, as a viewer shows it
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)
    return upright


def test_exif_rotated_photos_are_read_upright_unless_annotated_unturned(tmp_path, caplog):
    import logging

    # YOLO (normalised boxes, no declared size): upright, as Ultralytics reads it
    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("sign\n")
    upright = _sideways_photo(root / "images" / "p.png")
    # the white square in the upright frame: x 3..9 of 20, y 2..8 of 40
    (root / "labels" / "p.txt").write_text("0 0.3 0.125 0.3 0.15\n")
    data = read_yolo(root)
    r = data.images[0]
    assert (r.width, r.height, r.upright) == (20, 40, True)
    np.testing.assert_allclose(r.boxes, [[3, 2, 9, 8]])
    image, target = DetectionDataset(data)[0]
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), upright)
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert (image[:, y1:y2, x1:x2] == 255).all()  # the box holds the object it names
    np.testing.assert_array_equal(load_rgb(root / "images" / "p.png"), upright)

    # COCO declaring the upright size: upright; declaring the stored size: unturned
    for declared, turned in (((20, 40), True), ((40, 20), False)):
        gt = {
            "images": [
                {"id": 1, "file_name": "images/p.png", "width": declared[0], "height": declared[1]}
            ],
            "annotations": [],
            "categories": [{"id": 1, "name": "sign"}],
        }
        (root / "gt.json").write_text(json.dumps(gt))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="efpn.data"):
            data = read_coco(root / "gt.json")
        r = data.images[0]
        assert (r.width, r.height, r.upright) == (*declared, turned)
        image, _ = DetectionDataset(data)[0]
        assert tuple(image.shape[1:]) == (declared[1], declared[0])
        assert ("declare their stored, unturned size" in caplog.text) is not turned
        assert "differ from the file" not in caplog.text

    # VOC: the same rule on <size>, and a <size> of 0 (some tools write it) is read
    # from the file
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    _sideways_photo(voc / "JPEGImages" / "p.png")
    _sideways_photo(voc / "JPEGImages" / "q.png")
    box = "<object><name>sign</name><bndbox><xmin>3</xmin><ymin>2</ymin><xmax>9</xmax><ymax>8</ymax></bndbox></object>"
    for stem, (w, h) in (("p", (40, 20)), ("q", (0, 0))):
        (voc / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.png</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{box}</annotation>"
        )
    data = read_voc(voc)
    got = {r.file_name: (r.width, r.height, r.upright) for r in data.images}
    assert got == {"JPEGImages/p.png": (40, 20, False), "JPEGImages/q.png": (20, 40, True)}
    assert [tuple(DetectionDataset(data)[i][0].shape[1:]) for i in (0, 1)] == [(20, 40), (40, 20)]


def test_yolo_polygons_encodings_and_bad_names_files(tmp_path):
    # an Ultralytics segmentation label is read as its polygon's bounding box
    root = _yolo_dataset(
        tmp_path / "poly", {"a": "0 0.1 0.2 0.4 0.2 0.4 0.6 0.1 0.6\n1 0.5 0.5 0.2 0.2\n"}
    )
    np.testing.assert_allclose(
        read_yolo(root).images[0].boxes, [[10, 10, 40, 30], [40, 20, 60, 30]]
    )
    (root / "labels" / "a.txt").write_text("0 0.1 0.2 0.4 0.2 0.4 0.6 0.1\n")  # half a point
    with pytest.raises(DataError, match=r"a\.txt:1: expected 'class cx cy w h' \(or a polygon"):
        read_yolo(root)
    # a byte-order mark (UTF-8 or UTF-16, as Windows editors write) is text; binary is one line
    (root / "classes.txt").write_bytes("a\nb\n".encode("utf-16"))
    (root / "labels" / "a.txt").write_bytes("\ufeff1 0.5 0.5 0.2 0.2\n".encode())
    data = read_yolo(root)
    assert data.classes == ["a", "b"] and data.images[0].labels.tolist() == [1]
    (root / "labels" / "a.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    with pytest.raises(DataError, match=r"a\.txt: not a UTF-8 text file"):
        read_yolo(root)
    # a names file that cannot give the class list: one line naming it
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "classes.txt").unlink()
    for text, problem in (
        ("names: [a, b\n", r"data\.yaml: invalid YAML at line 2"),
        (
            "names: {0: a, 2: b}\n",
            r"data\.yaml: names: the mapping's keys must be the class indices 0\.\.1",
        ),
        ("names: {0: a, '1': b}\n", r"the mapping's keys must be the class indices"),
        ("names: 7\n", r"data\.yaml: names must be a list of strings"),
    ):
        (root / "data.yaml").write_text(text)
        with pytest.raises(DataError, match=problem):
            read_yolo(root)
    (root / "data.yaml").write_text("names: {1: b, 0: a}\n")
    assert read_yolo(root).classes == ["a", "b"]


@pytest.mark.parametrize(
    "change, problem",
    [
        (
            {"images": [{"id": "img_a", "file_name": "a.png", "width": 64, "height": 48}]},
            r"image 'a\.png': id must be a whole number \(COCO\), got 'img_a'",
        ),
        (
            {"images": [{"id": 1.5, "file_name": "a.png", "width": 64, "height": 48}]},
            r"image 'a\.png': id must be a whole number",
        ),
        (
            {"categories": [{"id": 1, "name": "car"}, {"id": 1, "name": "bus"}]},
            r"category id 1 appears twice \('car' and 'bus'\)",
        ),
        (
            {"categories": [{"id": "car", "name": "car"}, {"id": 2, "name": "bus"}]},
            r"category 'car': id must be a whole number",
        ),
        (
            {
                "annotations": [
                    {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "iscrowd": "0"}
                ]
            },
            r"annotation 7: iscrowd must be 0 or 1, got '0'",
        ),
    ],
)
def test_coco_ids_and_crowd_flags_are_checked(tmp_path, change, problem):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9]}],
        "categories": [{"id": 1, "name": "car"}],
        **change,
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(DataError, match=r"gt\.json: " + problem):
        read_coco(tmp_path / "gt.json")
    gt["images"] = [{"id": 1.0, "file_name": "a.png", "width": 64, "height": 48}]
    gt["annotations"] = [
        {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "iscrowd": False}
    ]
    gt["categories"] = [{"id": 1, "name": "car"}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    data = read_coco(tmp_path / "gt.json")  # 1.0 is a whole number; false is not a crowd
    assert data.images[0].image_id == 1 and len(data.images[0].boxes) == 1


def test_synth_refuses_counts_and_sizes_it_cannot_render(tmp_path, capsys):
    for args, problem in (
        (["--train", "-1", "--val", "1"], "--train and --val must be 0 or more"),
        (["--train", "0", "--val", "0"], "together 1 or more"),
        (["--size", "8"], "--size must be 32 pixels or more"),
    ):
        assert main(["data", "synth", "--out", str(tmp_path / "s"), *args]) == 2
        assert problem in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_hidden_files_are_left_out_as_shell_globs_and_ultralytics_do(tmp_path):
    from efpn.data.aerial import read_dota

    # a dataset copied from a Mac carries ._* resource forks with image suffixes
    root = _yolo_dataset(tmp_path / "y", {"a": "0 0.5 0.5 0.2 0.2\n"})
    (root / "images" / "._a.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    (root / "labels" / "._a.txt").write_bytes(b"\x00\x05\x16\x07\xff")
    (root / "images" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(root / "images" / ".thumbs" / "a.png")
    assert [r.file_name for r in read_yolo(root).images] == ["images/a.png"]
    dota = tmp_path / "d"
    (dota / "images").mkdir(parents=True)
    (dota / "labelTxt").mkdir()
    Image.new("RGB", (64, 64)).save(dota / "images" / "P1.png")
    (dota / "labelTxt" / "P1.txt").write_text("1 1 9 1 9 9 1 9 ship 0\n")
    (dota / "images" / "._P1.png").write_bytes(b"\x00\x05\x16\x07")
    (dota / "labelTxt" / "._P1.txt").write_bytes(b"\x00\x05\x16\x07\xff")
    data = read_dota(dota)
    assert [r.file_name for r in data.images] == ["images/P1.png"] and data.num_boxes() == 1


def _tiff(path, arr, **kw):
    import tifffile

    tifffile.imwrite(path, arr, **kw)
    return path


def _png16(path, arr, colour_type):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour), every other row
    with the Sub filter, so that the decoder must undo PNG's filtering."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    data = arr.astype(">u2").reshape(h, -1).view(np.uint8).reshape(h, -1)
    bpp = data.shape[1] // w
    rows = []
    for r in range(h):
        row = data[r]
        if r % 2:
            sub = row.copy()
            sub[bpp:] = row[bpp:] - row[:-bpp]  # uint8 arithmetic wraps, as PNG's does
            rows.append(b"\x01" + sub.tobytes())
        else:
            rows.append(b"\x00" + row.tobytes())

    def chunk(kind, body):
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )
    return path


def test_bands_are_picked_in_8bit_rgb_tiffs_with_extra_bands(tmp_path, monkeypatch):
    import tifffile

    # an RGB TIFF with a fourth band (near infrared, or alpha): Pillow reads the first
    # three whatever EFPN_BANDS says
    bands = np.stack([np.full((8, 10), v, np.uint8) for v in (10, 20, 30, 40)], axis=2)
    for extra in ("unspecified", "unassalpha"):
        path = tmp_path / f"rgbn_{extra}.tif"
        tifffile.imwrite(path, bands, photometric="rgb", extrasamples=[extra])
        monkeypatch.delenv("EFPN_BANDS", raising=False)
        assert load_rgb(path)[0, 0].tolist() == [10, 20, 30]
        monkeypatch.setenv("EFPN_BANDS", "4,3,2")
        assert load_rgb(path)[0, 0].tolist() == [40, 30, 20]
    # bands stored one plane each (GDAL's INTERLEAVE=BAND): Pillow reads the first alone,
    # as gray
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(
        planar,
        np.moveaxis(bands, -1, 0),
        photometric="minisblack",
        planarconfig="separate",
        compression="zlib",
    )
    with Image.open(planar) as im:
        assert im.mode == "L"
    assert load_rgb(planar)[0, 0].tolist() == [40, 30, 20]
    monkeypatch.delenv("EFPN_BANDS")
    assert load_rgb(planar)[0, 0].tolist() == [10, 20, 30]


def test_16bit_colour_pngs_read_as_stretched_rgb(tmp_path):
    from efpn.data.image import stretch_to_uint8

    rng = np.random.default_rng(0)
    rgb12 = rng.integers(0, 4096, (24, 36, 3)).astype(np.uint16)  # 12-bit data in 16 bits
    path = _png16(tmp_path / "rgb16.png", rgb12, colour_type=2)
    with Image.open(path) as im:
        assert np.asarray(im.convert("RGB")).max() <= 16  # Pillow keeps the high byte
    got = load_rgb(path)
    assert got.max() >= 250
    np.testing.assert_array_equal(got, stretch_to_uint8(rgb12))
    # alpha is dropped; gray and alpha reads as gray
    alpha = np.full((24, 36, 1), 65535, np.uint16)
    rgba = _png16(tmp_path / "rgba16.png", np.concatenate([rgb12, alpha], axis=2), 6)
    np.testing.assert_array_equal(load_rgb(rgba), stretch_to_uint8(rgb12))
    gray = _png16(tmp_path / "ga16.png", np.concatenate([rgb12[..., :1], alpha], axis=2), 4)
    np.testing.assert_array_equal(load_rgb(gray), stretch_to_uint8(rgb12[..., [0, 0, 0]]))
    # a file cut short is a one-line error naming it
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:300])
    with pytest.raises(
        DataError, match=r"cut.png: cannot decode image: its PNG data are dam"
    ) as err:
        load_rgb(cut)
    assert "\n" not in str(err.value)


def test_16bit_and_multiband_tiffs_read_as_stretched_rgb(tmp_path, monkeypatch, caplog):
    import logging

    from efpn.data import image as image_module
    from efpn.data.image import image_sizes, stretch_to_uint8

    monkeypatch.setattr(image_module, "_warned_bands", set())  # said once per process
    # a 12-bit colour scene in 16-bit samples: Pillow keeps the high byte (0..15, black)
    ramp = np.linspace(0, 4095, 30 * 40).reshape(30, 40).astype(np.uint16)
    rgb12 = np.stack([ramp, ramp // 2, 4095 - ramp], axis=2)
    path = _tiff(tmp_path / "rgb12.tif", rgb12, photometric="rgb")
    with Image.open(path) as im:
        assert np.asarray(im.convert("RGB")).max() <= 16  # what efpn read before
    rgb = load_rgb(path)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8 and rgb.max() >= 250
    np.testing.assert_array_equal(rgb, stretch_to_uint8(rgb12))
    # one range for all bands: the dimmer band stays dimmer
    assert rgb[..., 1].max() < 140 and rgb[..., 0].max() >= 250

    # four bands (B, G, R, NIR), each constant: 1000, 2000, 3000, 4000
    bands = np.stack([np.full((20, 30), 1000 * (k + 1), np.uint16) for k in range(4)], axis=2)
    contig = _tiff(tmp_path / "bgrn.tif", bands, photometric="minisblack", planarconfig="contig")
    planar = _tiff(
        tmp_path / "bgrn_planar.tif",
        np.moveaxis(bands, 2, 0).copy(),
        photometric="minisblack",
        planarconfig="separate",
    )
    assert image_sizes(contig) == ((30, 20), (30, 20))  # Pillow cannot open it
    with caplog.at_level(logging.WARNING, logger="efpn.data"):
        default = load_rgb(contig)
    assert default[0, 0].tolist() == [0, 128, 255]  # bands 1, 2, 3
    assert any("4 bands; read bands 1, 2, 3" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("EFPN_BANDS", "3,2,1")
    assert load_rgb(contig)[0, 0].tolist() == [255, 128, 0]
    np.testing.assert_array_equal(load_rgb(planar), load_rgb(contig))
    monkeypatch.setenv("EFPN_BANDS", "4")
    assert load_rgb(planar)[0, 0].tolist() == [128, 128, 128]  # a flat band: mid-gray
    for bad, says in (("5,2,1", "band 5 of 4"), ("3,2", "one band or three"), ("r,g,b", "1-based")):
        monkeypatch.setenv("EFPN_BANDS", bad)
        with pytest.raises(DataError, match=says) as e:
            load_rgb(contig)
        assert "\n" not in str(e.value)
    monkeypatch.delenv("EFPN_BANDS")
    # memory: 30x20 pixels of 8 bytes count as 1600 RGB pixels
    monkeypatch.setenv("EFPN_MAX_PIXELS", "1000")
    with pytest.raises(DataError, match=r"30x20 is 0 megapixels of 8 bytes \(0 as RGB\)"):
        load_rgb(contig)
    monkeypatch.setenv("EFPN_MAX_PIXELS", "1600")
    load_rgb(contig)
    monkeypatch.delenv("EFPN_MAX_PIXELS")

    # a GeoTIFF's nodata (outside the footprint) is left out of the range and read as 0
    scene = np.full((20, 20), 3000, np.uint16)
    scene[:, 10:] = 1000
    scene[:5] = 0  # nodata
    geo = _tiff(tmp_path / "geo.tif", scene, extratags=[(42113, "s", 0, "0", True)])
    out = load_rgb(geo)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[10, 0, 0] == 255 and out[10, 15, 0] == 0  # stretched over 1000..3000
    # EFPN_RANGE: one fixed range for every image
    monkeypatch.setenv("EFPN_RANGE", "1000, 5000")
    assert load_rgb(geo)[10, 0, 0] == 128 and load_rgb(geo)[10, 15, 0] == 0
    for bad in ("5000,1000", "0", "a,b", "nan,1"):
        monkeypatch.setenv("EFPN_RANGE", bad)
        with pytest.raises(DataError, match="EFPN_RANGE=.*expected two numbers LOW,HIGH"):
            load_rgb(geo)
    monkeypatch.delenv("EFPN_RANGE")
    # one deep band in a compression tifffile cannot decode without imagecodecs (LZW):
    # Pillow's own decoder reads it, as before
    lzw = tmp_path / "lzw16.tif"
    Image.fromarray(scene).save(lzw, compression="tiff_lzw")
    np.testing.assert_array_equal(load_rgb(lzw), stretch_to_uint8(scene[..., None].repeat(3, 2)))
    # complex radar samples read as their amplitude
    sar = _tiff(tmp_path / "sar.tif", (scene * (0.6 + 0.8j)).astype(np.complex64))
    np.testing.assert_array_equal(
        load_rgb(sar), stretch_to_uint8(np.abs(scene * 1.0)[..., None].repeat(3, 2))
    )
    # a YOLO dataset of such scenes reads its sizes from the headers
    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("car\n")
    _tiff(root / "images" / "s.tif", bands, photometric="minisblack", planarconfig="contig")
    (root / "labels" / "s.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    data = read_yolo(root)
    assert (data.images[0].width, data.images[0].height) == (30, 20)
    np.testing.assert_allclose(data.images[0].boxes, [[12, 8, 18, 12]])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiffs_read_by_tifffile_turn_as_pillow_turns(tmp_path, orientation):
    from efpn.data.image import image_sizes, read_tiff_rgb

    rng = np.random.default_rng(orientation)
    arr = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = _tiff(
        tmp_path / "o.tif", arr, photometric="rgb", extratags=[(274, "H", 1, orientation, True)]
    )
    by_pillow = load_rgb(path)  # 8-bit RGB: Pillow reads it and turns it
    assert by_pillow.shape == ((10, 6, 3) if orientation >= 5 else (6, 10, 3))
    np.testing.assert_array_equal(read_tiff_rgb(path), by_pillow)
    np.testing.assert_array_equal(read_tiff_rgb(path, upright=False), arr)
    # sizes from the header: stored, and upright as read (Pillow reports a turned TIFF's
    # size already upright, so they come from tifffile)
    assert image_sizes(path) == ((10, 6), by_pillow.shape[1::-1])
    np.testing.assert_array_equal(load_rgb(path, upright=False), arr)
