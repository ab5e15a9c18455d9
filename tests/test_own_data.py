"""`efpn train --data`: one line on a user's own YOLO, VOC or COCO folder."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from efpn.cli import main

SMALL = [
    "model.sr_width=16",
    "model.rpn_batch_size_per_image=32",
    "model.box_batch_size_per_image=32",
    "stage3.ohem_batch_size_per_image=16",
]


def _scene(path, boxes, size=64):
    img = np.full((size, size, 3), 90, np.uint8)
    for x1, y1, x2, y2 in boxes:
        img[int(y1) : int(y2), int(x1) : int(x2)] = (230, 30, 30)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _yolo(root, labels, classes=("car",), box=None):
    """A YOLO folder with one image per label text; ``box`` is drawn in each image."""
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    for i, text in enumerate(labels):
        _scene(root / "images" / f"{i}.png", [box] if box else [])
        (root / "labels" / f"{i}.txt").write_text(text)
    return root


def _voc(root, name, objects, split=None):
    _scene(root / "JPEGImages" / f"{name}.png", [b for _, b in objects])
    xml = [
        f"<annotation><filename>{name}.png</filename><size><width>64</width><height>64</height></size>"
    ]
    for cls, (x1, y1, x2, y2) in objects:
        xml.append(
            f"<object><name>{cls}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        )
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{name}.xml").write_text("".join(xml) + "</annotation>")
    if split:
        folder = root / "ImageSets" / "Main"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{split}.txt", "a") as f:
            f.write(name + "\n")


def test_voc_splits_share_one_class_list_and_train_in_one_line(tmp_path, capsys):
    from efpn.config import load_config
    from efpn.engine.train import load_data

    root = tmp_path / "trees"
    for i in range(4):
        _voc(root, f"t{i}", [("Alive", (5, 5, 20, 20)), ("Dead", (30, 30, 50, 44))], "train")
    for i in range(2):
        _voc(root, f"v{i}", [("Tree", (10, 10, 30, 28))], "val")
    out = tmp_path / "run"
    args = ["train", "--data", str(root), "--imgsz", "64", "--epochs", "1", "--batch", "2"]
    assert main([*args, "--out", str(out), *SMALL]) == 0
    said = capsys.readouterr().out.splitlines()
    # it ends with EFPN against the FPN it extends, and what to run next
    assert said[-2].startswith("val AP_small: FPN (stage 1) ") and "`efpn study`" in said[-2]
    assert said[-1] == (
        f"next: efpn val --weights {out}/stage3/best.pt model.merge=fused; "
        f"efpn predict --weights {out}/stage3/best.pt --source IMAGES --out preds"
    )
    cfg = load_config(out / "config.yaml")
    train, val = load_data(cfg)
    assert train.classes == val.classes == ["Alive", "Dead", "Tree"]  # no label shifts
    assert [train.classes[i] for i in val.images[0].labels] == ["Tree"]
    assert (out / "stage3" / "best.pt").exists() and (out / "eval.json").exists()
    assert cfg.data.train_split == "train" and cfg.model.min_size == 64
    assert cfg.data.scale_jitter == [64, 96, 128]  # stage 1 over S..2S


def test_yolo_folder_without_split_holds_out_val_and_derives_anchors(tmp_path, capsys):
    from efpn.config import load_config
    from efpn.engine.train import load_data

    root = _yolo(tmp_path / "cars", ["0 0.1875 0.171875 0.125 0.09375\n"] * 10, box=(8, 8, 16, 14))
    out = tmp_path / "run"
    args = ["train", "--data", str(root), "--imgsz", "64", "--epochs", "1", "--batch", "2"]
    assert main([*args, "--out", str(out), "--stage", "1", *SMALL, "stage1.optim.lr=5e-3"]) == 0
    printed = capsys.readouterr().out
    assert (
        "20% of the images held out" in printed
        and "derived: anchor_sizes [8, 16, 32, 64, 128]" in printed
    )
    cfg = load_config(out / "config.yaml")
    assert cfg.data.val_fraction == 0.2 and cfg.stage1.optim.lr == pytest.approx(5e-3)
    train, val = load_data(cfg)
    assert len(train.images) == 8 and len(val.images) == 2
    assert not {r.file_name for r in train.images} & {r.file_name for r in val.images}
    assert (out / "premise.json").exists()


def test_dataset_yaml_and_coco_json(tmp_path):
    from efpn.recipe import recipe_from_data

    root = tmp_path / "ds"
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            _scene(root / "images" / split / f"{i}.png", [(8, 8, 30, 30)])
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{i}.txt").write_text("1 0.3 0.3 0.34 0.34\n")
    (tmp_path / "ds.yaml").write_text(
        "path: ds\ntrain: images/train\nval: images/val\nnames: {0: a, 1: b}\n"
    )
    cfg, lines = recipe_from_data(tmp_path / "ds.yaml", imgsz=64)
    assert (
        cfg.data.format == "yolo" and cfg.data.train_split == "train" and cfg.data.classes == "a,b"
    )
    assert "3 train / 2 val images" in lines[0]
    coco = {
        "images": [
            {"id": i + 1, "file_name": f"images/train/{i}.png", "width": 64, "height": 64}
            for i in range(3)
        ],
        "annotations": [
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 5,
                "bbox": [8, 8, 22, 22],
                "area": 484,
                "iscrowd": 0,
            }
            for i in range(3)
        ],
        "categories": [{"id": 5, "name": "b"}],
    }
    (root / "coco.json").write_text(json.dumps(coco))
    cfg, lines = recipe_from_data(root / "coco.json", imgsz=64)
    assert (
        cfg.data.format == "coco" and cfg.data.val_fraction == 0.2 and "2 train / 1 val" in lines[0]
    )
    with pytest.raises(ValueError, match="--model"):
        recipe_from_data(root / "coco.json", model="vgg")


def test_data_split_writes_each_formats_split(tmp_path, capsys):
    from efpn.data import read_dataset

    root = tmp_path / "y"
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("car\n")
    for i in range(10):
        _scene(root / "images" / f"{i}.png", [(8, 8, 16, 14)])
        (root / "labels" / f"{i}.txt").write_text("0 0.1875 0.171875 0.125 0.09375\n")
    assert main(["data", "split", str(root), "--val", "0.3", "--seed", "1"]) == 0
    tr, va = read_dataset(root, "yolo", split="train"), read_dataset(root, "yolo", split="val")
    assert len(tr.images) == 7 and len(va.images) == 3
    assert main(["data", "split", str(root), "--val", "0.3", "--seed", "1"]) == 2  # exists
    assert main(["data", "split", str(root), "--val", "0.3", "--seed", "1", "--overwrite"]) == 0
    voc = tmp_path / "v"
    for i in range(5):
        _voc(voc, f"im{i}", [("a", (5, 5, 20, 20))])
    assert main(["data", "split", str(voc), "--val", "0.2"]) == 0
    assert len(read_dataset(voc, "voc", split="val").images) == 1
    assert len(read_dataset(voc, "voc", split="train").images) == 4


def test_convert_keeps_the_split_and_reads_back_without_warnings(tmp_path, caplog):
    import logging

    from efpn.data import read_dataset

    root = tmp_path / "v"
    for i in range(4):
        _voc(root, f"t{i}", [("a", (5.5, 5, 20.25, 20)), ("b", (30, 30, 50, 44))], "train")
    for i in range(2):
        _voc(root, f"v{i}", [("b", (10, 10, 30, 28))], "val")
    args = ["data", "convert", "--from", "voc", str(root)]
    assert main([*args, "--to", "yolo", "--out", str(tmp_path / "y")]) == 0
    assert main([*args, "--to", "coco", "--out", str(tmp_path / "c")]) == 0
    with caplog.at_level(logging.WARNING, logger="efpn.data"):
        tr = read_dataset(tmp_path / "y", "yolo", split="train")
        va = read_dataset(tmp_path / "y", "yolo", split="val")
    assert not caplog.records, caplog.text  # no clipping from rounding
    assert len(tr.images) == 4 and len(va.images) == 2 and tr.classes == ["a", "b"]
    np.testing.assert_allclose(tr.images[0].boxes[0], [5.5, 5, 20.25, 20], atol=1e-6)
    c_val = read_dataset(tmp_path / "c" / "annotations_val.json", "coco")
    assert (
        len(c_val.images) == 2
        and len(read_dataset(tmp_path / "c" / "annotations_train.json", "coco").images) == 4
    )


def test_one_line_training_on_a_coco_json(tmp_path):
    from efpn.config import load_config

    root = tmp_path / "c"
    coco = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "sign"}]}
    for i in range(5):
        _scene(root / "images" / f"{i}.png", [(8, 8, 24, 24)])
        coco["images"].append(
            {"id": i + 1, "file_name": f"images/{i}.png", "width": 64, "height": 64}
        )
        coco["annotations"].append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 3,
                "bbox": [8, 8, 16, 16],
                "area": 256,
                "iscrowd": 0,
            }
        )
    (root / "train.json").write_text(json.dumps(coco))
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(root / "train.json"),
        "--imgsz",
        "64",
        "--epochs",
        "1",
        "--batch",
        "2",
    ]
    assert main([*args, "--out", str(out), "--stage", "1", "--quiet", *SMALL]) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.data.format == "coco" and cfg.data.val_fraction == 0.2
    assert (out / "stage1" / "best.pt").exists()


def test_images_far_larger_than_imgsz_warn_that_objects_shrink_away(tmp_path):
    from efpn.recipe import recipe_from_data

    root = tmp_path / "scenes"
    (root / "labels").mkdir(parents=True)
    (root / "classes.txt").write_text("car\n")
    for i in range(5):  # 256-px scenes with one 12x12 car and one 48x48 truck
        _scene(root / "images" / f"{i}.png", [(20, 20, 32, 32), (100, 100, 148, 148)], size=256)
        (root / "labels" / f"{i}.txt").write_text(
            "0 0.1015625 0.1015625 0.046875 0.046875\n0 0.484375 0.484375 0.1875 0.1875\n"
        )
    _, lines = recipe_from_data(root, imgsz=64)
    warning = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warning) == 1
    assert "(median 256 px) is 4.0x --imgsz" in warning[0]
    assert "50% of the boxes are under 8 px" in warning[0]  # the cars: 3 px at 64 px
    assert "efpn data slice DATA --size 64" in warning[0]
    _, lines = recipe_from_data(root, imgsz=256)  # the native resolution: nothing to say
    assert not [ln for ln in lines if ln.startswith("warning:")]


def test_a_named_val_set_replaces_the_holdout_and_a_contradiction_is_refused(tmp_path, monkeypatch):
    from efpn.config import load_config
    from efpn.data import read_dataset
    from efpn.recipe import recipe_from_data

    root = tmp_path / "ds"
    for split, n in (("train", 5), ("val", 2)):
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "car"}]}
        for i in range(n):
            _scene(root / split / f"{i}.png", [(8, 8, 20, 20)])
            coco["images"].append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64})
            coco["annotations"].append(
                {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [8, 8, 12, 12]}
            )
        (root / split / "annotations.json").write_text(json.dumps(coco))
    train_json, val_json = root / "train" / "annotations.json", root / "val" / "annotations.json"
    cfg, lines = recipe_from_data(train_json, imgsz=64)  # no split: 20% held out
    assert cfg.data.val_fraction == 0.2 and "4 train / 1 val images" in lines[0]
    # naming a val set used to keep the holdout and silently ignore it
    cfg, lines = recipe_from_data(train_json, imgsz=64, overrides={"data.val": str(val_json)})
    assert cfg.data.val_fraction == 0 and cfg.data.val == str(val_json)
    assert "5 train / 2 val images" in lines[0] and f"val from {val_json}" in lines[0]
    with pytest.raises(ValueError, match="data.val .* would go unused.*val_fraction: 0"):
        recipe_from_data(
            train_json, imgsz=64, overrides={"data.val": str(val_json), "data.val_fraction": 0.2}
        )
    # relative paths are stored absolute, so the run works from any folder; a val set
    # named by another spelling of DATA is DATA, so the holdout stays
    monkeypatch.chdir(root)
    cfg, lines = recipe_from_data(
        "train/annotations.json", imgsz=64, overrides={"data.val": "./train/annotations.json"}
    )
    assert cfg.data.train == cfg.data.val == str(train_json) and cfg.data.val_fraction == 0.2
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError, match=r"^train/annotations\.json: no such dataset file or folder \(from "
    ):
        read_dataset("train/annotations.json")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{format: coco, train: {train_json}, val: {val_json}}}\n")
    assert load_config(recipe).data.val == str(val_json)
    with pytest.raises(ValueError, match=r"r\.yaml: data\.val .* would go unused"):
        load_config(recipe, {"data.val_fraction": 0.1})


def test_splits_that_cannot_train_or_select_are_refused_in_one_line(tmp_path, capsys):
    from efpn.engine.premise import premise_message

    def yolo(name, labels):
        return _yolo(tmp_path / name, labels, classes=("car", "bus"))

    box = "0 0.5 0.5 0.2 0.2\n"
    cases = [
        (yolo("one", [box]), [], r"the val set is empty \(1 training image"),
        (yolo("unlabelled", ["", "", "", ""]), [], r"none of the 3 training images has a box"),
        (
            yolo("bus_only", ["1 0.5 0.5 0.2 0.2\n"] * 4),
            ["data.eval_classes=car"],
            r"none of the 1 val images has a box of car",
        ),
    ]
    for root, extra, problem in cases:
        code = main(
            [
                "train",
                "--data",
                str(root),
                "--imgsz",
                "64",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "runs" / root.name),
                *extra,
            ]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and re.search(problem, err[0]), err
        assert not (tmp_path / "runs" / root.name / "stage1").exists()
    # a val set with no small object: the premise says it cannot be checked
    line, holds = premise_message({"AP_small": -1.0}, {"AP_small": -1.0}, 64)
    assert "cannot be checked at 64 px: val holds no small object" in line and not holds


def test_a_roboflow_export_trains_and_reads_as_it_is(tmp_path, capsys):
    """Roboflow's YOLO export: data.yaml next to train/, valid/, test/, each with images/
    and labels/, and split paths written as ../train/images."""
    from efpn.data import read_dataset
    from efpn.recipe import recipe_from_data

    root = tmp_path / "rf"
    for split, n in (("train", 3), ("valid", 2), ("test", 1)):
        for i in range(n):
            _scene(root / split / "images" / f"{split}{i}.jpg", [(8, 8, 30, 30)])
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            (root / split / "labels" / f"{split}{i}.txt").write_text("1 0.3 0.3 0.34 0.34\n")
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n"
        "nc: 2\nnames: ['sign', 'light']\n\nroboflow:\n  workspace: w\n  version: 1\n"
    )
    for data in (root / "data.yaml", root):  # the YAML, or the folder that holds it
        cfg, lines = recipe_from_data(data, imgsz=64)
        assert (cfg.data.train, cfg.data.val) == (str(root / "train"), str(root / "valid"))
        assert cfg.data.val_fraction == 0 and cfg.data.classes == "sign,light"
        assert "3 train / 2 val images" in lines[0]
    got = {s: read_dataset(root, split=s) for s in (None, "val", "test")}
    assert [len(d.images) for d in got.values()] == [3, 2, 1]
    assert got["test"].classes == ["sign", "light"] and got["test"].images[0].labels.tolist() == [1]
    assert main(["data", "stats", str(root), "--split", "valid"]) == 2
    assert "no split 'valid' (has train, val, test)" in capsys.readouterr().err
    # one split folder alone takes its class names from the YAML one folder up
    assert read_dataset(root / "valid").classes == ["sign", "light"]
    # the YAML names its splits: `data split` on it is refused, not written beside it
    assert main(["data", "split", str(root)]) == 2
    assert "a dataset YAML names its splits itself" in capsys.readouterr().err
    assert not (root / "splits.json").exists()
    # a split may not leave the dataset root
    (root / "data.yaml").write_text("train: ../../elsewhere/images\nnames: [a]\n")
    with pytest.raises(
        ValueError, match=r"train: '\.\./\.\./elsewhere/images' leaves the dataset root"
    ):
        recipe_from_data(root, imgsz=64)


def test_dry_run_checks_the_data_and_writes_the_recipe_without_training(
    tmp_path, capsys, monkeypatch
):
    from efpn.config import load_config

    root = _yolo(tmp_path / "y", ["0 0.22 0.22 0.19 0.19\n"] * 5, box=(8, 8, 20, 20))
    out = tmp_path / "runs" / "y"
    args = ["train", "--data", str(root), "--imgsz", "64", "--dry-run", "--out", str(out)]
    assert main([*args, "stage1.optim.lr=0.005"]) == 0
    said = capsys.readouterr().out
    assert "dry run: 4 train / 1 val images, 4 / 1 boxes; nothing trained" in said
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]
    cfg = load_config(out / "config.yaml")
    assert cfg.stage1.optim.lr == 0.005 and cfg.data.train == str(root)
    # the checks of a real run apply: a dataset without a box is refused, not written
    for i in range(5):
        (root / "labels" / f"{i}.txt").write_text("")
    assert main([*args[:-1], str(tmp_path / "runs" / "z")]) == 2
    assert "has a box" in capsys.readouterr().err and not (tmp_path / "runs" / "z").exists()
    # so do the image-reading variables, even where no image needs them
    monkeypatch.setenv("EFPN_RANGE", "9,1")
    assert main([*args[:-1], str(tmp_path / "runs" / "r")]) == 2
    assert "EFPN_RANGE='9,1': expected two numbers" in capsys.readouterr().err
