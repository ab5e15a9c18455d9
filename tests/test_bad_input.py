"""A corpus of bad inputs through the CLI entry point: each gives a one-line error that
names the file (exit 2) or a counted skip (exit 0), never a traceback."""

import json

import numpy as np
import pytest
from PIL import Image

from efpn.cli import main


def _png(path, w=40, h=30):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _coco(**changes):
    d = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [1, 2, 10, 8],
                "area": 80,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": 1, "name": "car"}],
    }
    d.update(changes)
    return d


def _ann(**changes):
    a = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 8], "area": 80, "iscrowd": 0}
    a.update(changes)
    for k in [k for k, v in changes.items() if v is _DROP]:
        del a[k]
    return a


_DROP = object()

COCO_BAD = {
    "not_json": "{not json",
    "empty": "",
    "a_list": "[]",
    "no_images": json.dumps({"categories": []}),
    "no_categories": json.dumps({"images": []}),
    "image_is_string": json.dumps(_coco(images=["a.png"])),
    "image_no_width": json.dumps(_coco(images=[{"id": 1, "file_name": "a.png", "height": 30}])),
    "image_no_file_name": json.dumps(_coco(images=[{"id": 1, "width": 40, "height": 30}])),
    "image_width_string": json.dumps(
        _coco(images=[{"id": 1, "file_name": "a.png", "width": "wide", "height": 30}])
    ),
    "dup_image_id": json.dumps(
        _coco(images=[{"id": 1, "file_name": "a.png", "width": 40, "height": 30}] * 2)
    ),
    "bbox_missing": json.dumps(_coco(annotations=[_ann(bbox=_DROP)])),
    "bbox_null": json.dumps(_coco(annotations=[_ann(bbox=None)])),
    "bbox_3": json.dumps(_coco(annotations=[_ann(bbox=[1, 2, 3])])),
    "bbox_strings": json.dumps(_coco(annotations=[_ann(bbox=["1", "2", "x", "4"])])),
    "bbox_nan": json.dumps(_coco(annotations=[_ann(bbox=[1, 2, float("nan"), 4])])).replace(
        "NaN", "NaN"
    ),
    "bbox_inf": json.dumps(_coco(annotations=[_ann(bbox=[1, 2, float("inf"), 4])])),
    "ann_unknown_image": json.dumps(_coco(annotations=[_ann(image_id=9)])),
    "ann_unknown_category": json.dumps(_coco(annotations=[_ann(category_id=9)])),
    "ann_is_string": json.dumps(_coco(annotations=["box"])),
    "annotations_not_list": json.dumps(_coco(annotations={"a": 1})),
    "category_no_name": json.dumps(_coco(categories=[{"id": 1}])),
    "category_is_string": json.dumps(_coco(categories=["car"])),
    "escape_root": json.dumps(
        _coco(images=[{"id": 1, "file_name": "../../etc/passwd", "width": 40, "height": 30}])
    ),
    "absolute_path": json.dumps(
        _coco(images=[{"id": 1, "file_name": "/etc/passwd", "width": 40, "height": 30}])
    ),
}


@pytest.mark.parametrize("case", sorted(COCO_BAD))
@pytest.mark.parametrize("command", ["stats", "convert"])
def test_bad_coco_files(tmp_path, capsys, case, command):
    _png(tmp_path / "a.png")
    f = tmp_path / f"{case}.json"
    f.write_text(COCO_BAD[case])
    argv = (
        ["data", "stats", str(f), "--format", "coco"]
        if command == "stats"
        else [
            "data",
            "convert",
            "--from",
            "coco",
            "--to",
            "yolo",
            str(f),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    _expect_error(main(argv), capsys, f.name)


def _expect_error(code, capsys, name):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert name in err, err


YOLO_LINES = {
    "four_fields": "0 0.5 0.5 0.1",
    "six_fields": "0 0.5 0.5 0.1 0.1 0.9",
    "class_out_of_range": "3 0.5 0.5 0.1 0.1",
    "class_negative": "-1 0.5 0.5 0.1 0.1",
    "class_float": "0.5 0.5 0.5 0.1 0.1",
    "not_numbers": "car 0.5 0.5 0.1 0.1",
    "nan": "0 nan 0.5 0.1 0.1",
    "inf": "0 0.5 inf 0.1 0.1",
    "comma_separated": "0,0.5,0.5,0.1,0.1",
}


@pytest.mark.parametrize("case", sorted(YOLO_LINES))
def test_bad_yolo_labels(tmp_path, capsys, case):
    root = tmp_path / "y"
    _png(root / "images" / "a.png")
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("car\nbus\n")
    (root / "labels" / "a.txt").write_text(YOLO_LINES[case] + "\n")
    _expect_error(main(["data", "stats", str(root), "--format", "yolo"]), capsys, "a.txt")


YOLO_LAYOUT = {
    "no_images_folder": lambda r: (r / "labels").mkdir(parents=True),
    "no_classes_file": lambda r: _png(r / "images" / "a.png"),
    "splits_not_json": lambda r: (
        _png(r / "images" / "a.png"),
        (r / "classes.txt").write_text("car\n"),
        (r / "splits.json").write_text("{"),
    ),
    "splits_escape": lambda r: (
        _png(r / "images" / "a.png"),
        (r / "classes.txt").write_text("car\n"),
        (r / "splits.json").write_text(json.dumps({"train": ["../../x.png"]})),
    ),
    "splits_missing_image": lambda r: (
        _png(r / "images" / "a.png"),
        (r / "classes.txt").write_text("car\n"),
        (r / "splits.json").write_text(json.dumps({"train": ["b.png"]})),
    ),
    "undecodable_image": lambda r: (
        (r / "images").mkdir(parents=True),
        (r / "images" / "a.png").write_text("not an image"),
        (r / "classes.txt").write_text("car\n"),
    ),
    "empty_image": lambda r: (
        (r / "images").mkdir(parents=True),
        (r / "images" / "a.png").write_bytes(b""),
        (r / "classes.txt").write_text("car\n"),
    ),
}


@pytest.mark.parametrize("case", sorted(YOLO_LAYOUT))
def test_bad_yolo_layouts(tmp_path, capsys, case):
    root = tmp_path / "y"
    root.mkdir()
    YOLO_LAYOUT[case](root)
    split = ["--split", "train"] if case.startswith("splits") else []
    code = main(["data", "stats", str(root), "--format", "yolo", *split])
    _expect_error(code, capsys, "y")


def _voc_xml(obj: str, filename="a.png") -> str:
    return f"<annotation><filename>{filename}</filename><size><width>40</width><height>30</height></size>{obj}</annotation>"


VOC_BAD = {
    "invalid_xml": "<annotation><object>",
    "no_name": _voc_xml(
        "<object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
    ),
    "empty_name": _voc_xml(
        "<object><name> </name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
    ),
    "no_bndbox": _voc_xml("<object><name>car</name></object>"),
    "bndbox_text": _voc_xml(
        "<object><name>car</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
    ),
    "bndbox_missing_tag": _voc_xml(
        "<object><name>car</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox></object>"
    ),
    "bndbox_nan": _voc_xml(
        "<object><name>car</name><bndbox><xmin>nan</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
    ),
    "escape_root": _voc_xml(
        "<object><name>car</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
        "../../etc/passwd",
    ),
    "entity_bomb": '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;"><!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;"><!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]><annotation><filename>&lol4;</filename></annotation>',
    "undeclared_class": _voc_xml(
        "<object><name>boat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
    ),
}


@pytest.mark.parametrize("case", sorted(VOC_BAD))
def test_bad_voc_files(tmp_path, capsys, case):
    root = tmp_path / "v"
    _png(root / "JPEGImages" / "a.png")
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text(VOC_BAD[case])
    (root / "classes.txt").write_text("car\n")
    code = main(["data", "stats", str(root), "--format", "voc"])
    _expect_error(code, capsys, "a.xml" if case != "escape_root" else "passwd")


DETS_BAD = {
    "not_list": {"a": 1},
    "entry_string": ["x"],
    "no_score": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]}],
    "no_bbox": [{"image_id": 1, "category_id": 1, "score": 0.5}],
    "unknown_image": [{"image_id": 7, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}],
    "string_image": [{"image_id": "a.png", "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}],
    "category_name": [{"image_id": 1, "category_id": "car", "bbox": [1, 2, 3, 4], "score": 0.5}],
    "unknown_category": [{"image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "score": 0.5}],
    "nan_score": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": float("nan")}],
    "string_score": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "score": "high"}],
    "bbox_3": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}],
    "bbox_negative": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, -3, 4], "score": 0.5}],
    "bbox_inf": [{"image_id": 1, "category_id": 1, "bbox": [1, 2, float("inf"), 4], "score": 0.5}],
}


@pytest.mark.parametrize("case", sorted(DETS_BAD))
def test_bad_coco_detections(tmp_path, capsys, case):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps(_coco()))
    dets = tmp_path / f"{case}.json"
    dets.write_text(json.dumps(DETS_BAD[case]))
    _expect_error(
        main(["eval", "--format", "coco", "--gt", str(gt), "--dets", str(dets)]), capsys, dets.name
    )


TT_BAD = {
    "no_imgs": {"x": 1},
    "objects_not_list": {"imgs": {"1": {"objects": 3}}},
    "bbox_missing": {"imgs": {"1": {"objects": [{"category": "pn", "score": 50}]}}},
    "bbox_text": {
        "imgs": {
            "1": {
                "objects": [
                    {
                        "category": "pn",
                        "score": 50,
                        "bbox": {"xmin": "a", "ymin": 1, "xmax": 2, "ymax": 3},
                    }
                ]
            }
        }
    },
    "nan_score": {
        "imgs": {
            "1": {
                "objects": [
                    {
                        "category": "pn",
                        "score": float("nan"),
                        "bbox": {"xmin": 0, "ymin": 1, "xmax": 2, "ymax": 3},
                    }
                ]
            }
        }
    },
}


@pytest.mark.parametrize("case", sorted(TT_BAD))
def test_bad_tt100k_detections(tmp_path, capsys, case):
    gt = tmp_path / "gt.json"
    gt.write_text(
        json.dumps({"imgs": {"1": {"path": "test/1.jpg", "objects": []}}, "types": ["pn"]})
    )
    dets = tmp_path / f"{case}.json"
    dets.write_text(json.dumps(TT_BAD[case]))
    _expect_error(
        main(["eval", "--format", "tt100k", "--gt", str(gt), "--dets", str(dets)]),
        capsys,
        dets.name,
    )


RECIPES_BAD = {
    "invalid_yaml": "name: [unclosed",
    "python_tag": "name: !!python/object/apply:os.system ['echo hi']",
    "not_mapping": "- a\n- b",
    "unknown_key": "nmae: x",
    "epochs_text": "stage1:\n  optim: {epochs: three}",
    "lr_zero": "stage1:\n  optim: {lr: 0}",
    "batch_negative": "stage2:\n  optim: {batch_size: -1}",
    "bad_format": "data: {format: parquet, train: x}",
    "name_escape": "name: ../../x",
    "section_not_mapping": "model: 3",
}


@pytest.mark.parametrize("case", sorted(RECIPES_BAD))
def test_bad_recipes(tmp_path, capsys, case):
    f = tmp_path / f"{case}.yaml"
    f.write_text(RECIPES_BAD[case])
    _expect_error(main(["train", "--config", str(f)]), capsys, f.name)


def test_missing_files_and_folders(tmp_path, capsys):
    for argv, name in [
        (["data", "stats", str(tmp_path / "nope")], "nope"),
        (
            [
                "eval",
                "--format",
                "coco",
                "--gt",
                str(tmp_path / "gt.json"),
                "--dets",
                str(tmp_path / "d.json"),
            ],
            "d.json",
        ),
        (["train", "--config", str(tmp_path / "r.yaml")], "r.yaml"),
        (["train", "--data", str(tmp_path / "ds")], "ds"),
        (["data", "slice", str(tmp_path / "nope2"), "--out", str(tmp_path / "o")], "nope2"),
    ]:
        _expect_error(main(argv), capsys, name)
    (tmp_path / "folder.json").mkdir()
    _expect_error(
        main(
            [
                "eval",
                "--format",
                "coco",
                "--gt",
                str(tmp_path / "folder.json"),
                "--dets",
                str(tmp_path / "folder.json"),
            ]
        ),
        capsys,
        "folder.json",
    )


def test_out_of_image_boxes_are_counted_skips(tmp_path, capsys, caplog):
    import logging

    _png(tmp_path / "a.png")
    f = tmp_path / "gt.json"
    f.write_text(
        json.dumps(
            _coco(annotations=[_ann(bbox=[30, 20, 20, 20]), _ann(id=2, bbox=[50, 50, 5, 5])])
        )
    )
    with caplog.at_level(logging.WARNING, logger="efpn.data"):
        assert main(["data", "stats", str(f), "--format", "coco"]) == 0
    assert "clipped 1 box(es)" in caplog.text and "dropped 1 box(es)" in caplog.text


def _png_header_only(path, width, height):
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_huge_images_are_refused_from_their_header(tmp_path, capsys, monkeypatch):
    from efpn.data.image import load_rgb
    from efpn.data.records import DataError

    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 50000, 50000)  # 2.5 gigapixels declared, a few bytes on disk
    with pytest.raises(DataError, match=r"bomb.png: 50000x50000 is 2500 megapixels.*--slice"):
        load_rgb(bomb)
    with pytest.raises(DataError, match="EFPN_MAX_SLICED_PIXELS"):
        load_rgb(bomb, sliced=True)
    root = tmp_path / "y"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("car\n")
    _png_header_only(root / "images" / "a.png", 50000, 50000)
    _expect_error(main(["data", "stats", str(root)]), capsys, "a.png")
    # the documented override
    _png(tmp_path / "small.png", 40, 30)
    monkeypatch.setenv("EFPN_MAX_PIXELS", "1000")
    with pytest.raises(DataError, match="over the limit of 0"):
        load_rgb(tmp_path / "small.png")
    monkeypatch.setenv("EFPN_MAX_PIXELS", "2000")
    assert load_rgb(tmp_path / "small.png").shape == (30, 40, 3)


def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    import torch

    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")  # no config
    torch.save(
        {"config": {}, "classes": ["a"], "extended": False, "model": {"x": torch.zeros(1)}},
        tmp_path / "wrong.pt",
    )
    for name in ("empty.pt", "text.pt", "plain.pt", "wrong.pt", "missing.pt"):
        _expect_error(main(["val", "--weights", str(tmp_path / name)]), capsys, name)


def test_unwritable_outputs_and_a_full_disk_end_with_one_line_and_an_error_code(
    tmp_path, tiny_cfg, monkeypatch, capsys
):
    from conftest import write_tiny_config
    from efpn.cli import main

    recipe = write_tiny_config(tmp_path)
    # --out names an existing file
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code = main(["train", "--config", str(recipe), "--stage", "1", "--out", str(blocker)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.startswith("efpn: error:") and len(err.splitlines()) == 1
    assert "a_file" in err
    # the disk fills while a checkpoint is written: torch's writer raises RuntimeError
    import efpn.engine.checkpoint as checkpoint

    def full_disk(state, path):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed"
        )

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    code = main(["train", "--config", str(recipe), "--stage", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "could not write the checkpoint" in err and "disk full" in err
    assert not list((tmp_path / "run").rglob("*.tmp"))  # no half-written file left
    # a folder that cannot be written (root ignores permissions, so simulate it)
    monkeypatch.undo()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr("pathlib.Path.mkdir", read_only)
    code = main(["train", "--config", str(recipe), "--stage", "1", "--out", str(tmp_path / "ro")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == f"efpn: error: {tmp_path / 'ro'}: Permission denied"


def test_init_weights_of_another_detector(tmp_path, tiny_cfg, capsys):
    """--init: another class count starts a fresh predictor (said), another architecture
    or a file that holds no weights is one line."""
    import torch

    from conftest import write_tiny_config
    from efpn.cli import main
    from efpn.models import efpn_fpn

    recipe = write_tiny_config(tmp_path)
    other = efpn_fpn("resnet18", extended=False, num_classes=91, out_channels=256)
    torch.save(other.state_dict(), tmp_path / "frcnn91.pt")
    args = ["train", "--config", str(recipe), "--stage", "1", "--out"]
    init = ["--init", str(tmp_path / "frcnn91.pt")]
    # the tiny recipe's pyramid is 256 wide too, so everything but the predictor fits
    assert main([*args, str(tmp_path / "a"), *init, "stage1.optim.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "its box predictor has 91 classes" in out and "starts fresh" in out
    narrow = efpn_fpn("resnet18", extended=False, num_classes=91, out_channels=64)
    torch.save(narrow.state_dict(), tmp_path / "narrow.pt")
    code = main([*args, str(tmp_path / "b"), "--init", str(tmp_path / "narrow.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "narrow.pt: does not fit this model" in err and len(err.splitlines()) == 1
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    code = main([*args, str(tmp_path / "c"), "--init", str(tmp_path / "tensor.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "tensor.pt: not a detector's weights" in err


def test_sahi_commands_without_sahi_say_what_to_install(tmp_path, monkeypatch, capsys):
    import sys

    import numpy as np
    from PIL import Image

    from efpn.cli import main

    for name in ("sahi", "sahi.models", "sahi.models.torchvision", "sahi.predict"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "a.png")
    code = main(
        ["bench-sahi", "--weights", str(tmp_path / "w.pt"), "--source", str(tmp_path / "a.png")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pip install 'efpn[sahi]'" in err and len(err.splitlines()) == 1
