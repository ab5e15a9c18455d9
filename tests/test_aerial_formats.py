"""DOTA and VisDrone readers: boxes, ignore regions, attributes, one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

from efpn.data import read_dataset, to_coco_dict
from efpn.data.aerial import DOTA_CLASSES, VISDRONE_CLASSES, read_dota, read_visdrone
from efpn.data.records import DataError


def _image(path, w=200, h=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _dota(root, text, name="P0001"):
    _image(root / "images" / f"{name}.png")
    (root / "labelTxt").mkdir(parents=True, exist_ok=True)
    (root / "labelTxt" / f"{name}.txt").write_text(text)


def test_dota_quadrilaterals_headers_and_difficult(tmp_path):
    _dota(
        tmp_path,
        "imagesource: GoogleEarth\ngsd: 0.146\n"  # some tools write a space after the colon
        "10 10 30 12 28 40 8 38 small-vehicle 0\n"
        "50 50 70 50 70 60 50 60 plane 1\n"
        "100 20 120 20 120 30 100 30 ship\n",
    )
    _dota(tmp_path, "1 1 5 1 5 5 1 5 ship 0\n", name="P0002")  # no header at all
    data = read_dataset(tmp_path)  # the format is detected
    assert data.classes == DOTA_CLASSES
    r = data.images[0]
    assert r.file_name == "images/P0001.png"
    np.testing.assert_allclose(r.boxes, [[8, 10, 30, 40], [100, 20, 120, 30]])
    assert [data.classes[i] for i in r.labels] == ["small-vehicle", "ship"]
    np.testing.assert_allclose(r.ignore, [[50, 50, 70, 60]])  # difficult
    assert data.classes[r.ignore_labels[0]] == "plane"
    coco = to_coco_dict(data)
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    assert len(crowd) == 1 and crowd[0]["bbox"] == [50, 50, 20, 10]
    assert len(data.images) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("1 2 3 4 5 6 plane", ":3: expected .x1 y1"),
        ("1 2 3 4 5 6 7 8 tank 0", ":3: category 'tank'"),
        ("1 2 x 4 5 6 7 8 plane 0", ":3: coordinates and difficult must be numbers"),
        ("1 2 nan 4 5 6 7 8 plane 0", ":3: non-finite"),
    ],
)
def test_dota_bad_lines_name_the_file_and_line(tmp_path, line, message):
    _dota(tmp_path, f"imagesource:x\ngsd:1\n{line}\n")
    with pytest.raises(DataError, match=message) as err:
        read_dota(tmp_path)
    assert "P0001.txt" in str(err.value) and "\n" not in str(err.value)


def _visdrone(root, text, name="0000001_00000_d_0000001"):
    _image(root / "images" / f"{name}.jpg")
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"{name}.txt").write_text(text)


def test_visdrone_ignore_regions_and_attributes(tmp_path):
    base = tmp_path / "VisDrone2019-DET-val"
    _visdrone(
        base,
        "10,20,30,40,1,4,0,1\n"  # car
        "50,5,10,10,1,1,1,2,\n"  # pedestrian (trailing comma, as in the release)
        "0,0,60,30,0,0,0,0\n"  # ignored region: any class
        "100,50,20,20,1,11,0,0\n"  # others: any class
        "150,60,10,10,0,6,0,0\n",  # score 0: ignore, its class
    )
    data = read_dataset(tmp_path, "visdrone", split="VisDrone2019-DET-val")
    assert data.classes == VISDRONE_CLASSES
    r = data.images[0]
    np.testing.assert_allclose(r.boxes, [[10, 20, 40, 60], [50, 5, 60, 15]])
    assert [data.classes[i] for i in r.labels] == ["car", "pedestrian"]
    assert r.attributes["truncation"].tolist() == [0, 1]
    assert r.attributes["occlusion"].tolist() == [1, 2]
    assert len(r.ignore) == 3 and r.ignore_labels.tolist() == [-1, -1, 5]
    coco = to_coco_dict(data)
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    # two class-agnostic regions for each of the 10 classes, one truck region
    assert len(crowd) == 2 * len(VISDRONE_CLASSES) + 1
    assert json.dumps(coco)  # serialisable


@pytest.mark.parametrize(
    "line, message",
    [
        ("1,2,3,4,1,4,0", "expected 8 comma-separated fields"),
        ("1,2,3,4,1,12,0,0", "category 12"),
        ("a,2,3,4,1,4,0,0", "expected numbers"),
    ],
)
def test_visdrone_bad_lines_name_the_file_and_line(tmp_path, line, message):
    _visdrone(tmp_path, f"1,1,5,5,1,4,0,0\n{line}\n")
    with pytest.raises(DataError, match=message) as err:
        read_visdrone(tmp_path)
    assert "0000001_00000_d_0000001.txt:2" in str(err.value)


def test_crowd_regions_are_ignored_by_coco_evaluation(tmp_path):
    from efpn.metrics import coco_metrics

    _dota(tmp_path, "10 10 30 10 30 30 10 30 ship 0\n60 10 80 10 80 30 60 30 ship 1\n")
    gt = to_coco_dict(read_dota(tmp_path))
    cat = gt["categories"][DOTA_CLASSES.index("ship")]["id"]
    dets = [
        {"image_id": 1, "category_id": cat, "bbox": [10, 10, 20, 20], "score": 0.9},
        {
            "image_id": 1,
            "category_id": cat,
            "bbox": [60, 10, 20, 20],
            "score": 0.95,
        },  # on the difficult one
    ]
    assert coco_metrics(gt, dets)["AP"] == pytest.approx(1.0)  # not a false positive


def test_convert_dota_to_coco_keeps_ignore_regions(tmp_path, capsys):
    from efpn.cli import main

    _dota(tmp_path / "dota", "10 10 30 10 30 30 10 30 ship 0\n60 10 80 10 80 30 60 30 ship 1\n")
    assert (
        main(
            [
                "data",
                "convert",
                "--from",
                "dota",
                "--to",
                "coco",
                str(tmp_path / "dota"),
                "--out",
                str(tmp_path / "coco"),
            ]
        )
        == 0
    )
    back = read_dataset(tmp_path / "coco" / "annotations.json", "coco")
    assert len(back.images[0].boxes) == 1 and len(back.images[0].ignore) == 1
    assert main(["data", "stats", str(tmp_path / "dota")]) == 0
    assert "1 ignore regions" in capsys.readouterr().out
