"""The val, predict and bench commands, on a tiny trained run."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from efpn.cli import main
from efpn.engine.train import model_from_checkpoint


def _demo_eval_args(run):
    """``efpn demo`` repeating the comparison on the trained tiny run."""
    return [
        "demo",
        "--config",
        str(run.parent / "cfg.yaml"),
        "--out",
        str(run),
        "--eval-only",
        "--quiet",
    ]


def test_demo_comparison_summary(trained_run, capsys):
    run, _ = trained_run
    code = main(_demo_eval_args(run))
    assert code == 0
    printed = capsys.readouterr().out
    assert "| EFPN (1x) " in printed and "| EFPN (1x, model.merge=fused)" in printed
    summary = json.loads((run / "summary.json").read_text())
    keys = {"AP_small", "AR_small", "AP_medium", "AP_large", "AP", "f1_small", "seconds_per_image"}
    assert set(summary) == {"fpn_1x", "fpn_2x", "efpn_1x", "efpn_fused_1x"}
    assert all(set(v) == keys for v in summary.values())
    # EFPN's row is the stage-3 model the run itself evaluated into eval.json
    saved = json.loads((run / "eval.json").read_text())
    assert summary["efpn_1x"]["AP"] == pytest.approx(saved["AP"], abs=1e-9)
    # the fused row is the same checkpoint with model.merge=fused, as `efpn val` gives it
    assert (
        main(["val", "--weights", str(run / "stage3" / "best.pt"), "--json", "model.merge=fused"])
        == 0
    )
    fused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["efpn_fused_1x"]["AP"] == pytest.approx(fused["AP"], abs=1e-9)
    assert (run / "fig8_comparison.png").exists() and (run / "summary.md").exists()


def test_demo_compares_on_a_held_out_test_set(trained_run, tmp_path, capsys):
    import yaml

    run, _ = trained_run
    # the tiny recipe's SynthSigns from another generator seed: 3 images nobody trained on
    test = tmp_path / "test.yaml"
    test.write_text(
        yaml.safe_dump(
            {
                "name": "tiny_test",
                "data": {
                    "format": "synth",
                    "synth_train": 0,
                    "synth_val": 3,
                    "synth_size": 96,
                    "synth_seed": 5,
                },
            }
        )
    )
    args = _demo_eval_args(run)
    assert main([*args, "--test", str(test)]) == 0
    printed = capsys.readouterr().out
    assert "tiny test (3 images" in printed and "held out" in printed
    assert "AP_S minus FPN (1x), points: EFPN " in printed
    rows = json.loads((run / "summary_test.json").read_text())
    assert set(rows) == {"fpn_1x", "fpn_2x", "efpn_1x", "efpn_fused_1x"}
    # the test rows are the checkpoints evaluated on the test images, as `efpn val --data` gives
    assert (
        main(["val", "--weights", str(run / "stage3" / "best.pt"), "--data", str(test), "--json"])
        == 0
    )
    direct = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows["efpn_1x"]["AP"] == pytest.approx(direct["AP"], abs=1e-9)
    # a "test set" holding the recipe's own val images is refused in one line
    assert main([*args, "--test", str(run.parent / "cfg.yaml")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must be held out" in err[0]


def test_val_matches_the_runs_evaluation(trained_run, capsys):
    run, _ = trained_run
    assert main(["val", "--weights", str(run / "stage3" / "best.pt"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "eval.json").read_text())
    for key in ("AP", "AP_small", "AR_small", "f1_small"):
        assert printed[key] == pytest.approx(saved[key], abs=1e-9)
    assert set(printed["tt100k"]) == {"overall", "small", "medium", "large"}
    save = run.parent / "val_results.json"
    assert main(["val", "--weights", str(run / "stage1" / "best.pt"), "--save", str(save)]) == 0
    text = capsys.readouterr().out
    last = text.strip().splitlines()[-1]
    assert f"results in {save}" in last and "detections" in last
    assert isinstance(json.loads(save.read_text()), list)
    assert "AP_small" in text and "TT100K-style at score >= 0.5" in text
    assert "P'2 computed" not in text  # the baseline has no P'2


def test_val_p2x_mode_and_proposals(trained_run, capsys):
    run, _ = trained_run
    weights = str(run / "stage3" / "best.pt")
    runs = {}
    for name, extra in {
        "sparse": ["--p2x-mode", "sparse"],
        "dense": ["--p2x-mode", "dense"],
        "bands": ["--band-rows", "3"],
        "few": ["--proposals", "2"],
    }.items():
        assert main(["val", "--weights", weights, "--json", *extra]) == 0
        runs[name] = json.loads(capsys.readouterr().out)
    assert runs["dense"]["p2x_coverage"] == 1.0
    assert 0.0 <= runs["sparse"]["p2x_coverage"] <= 1.0
    for key in ("AP", "AP_small", "AR_small", "f1_small"):  # sparse (banded) P'2 = dense P'2
        assert runs["sparse"][key] == pytest.approx(runs["dense"][key], abs=1e-9)
        assert runs["bands"][key] == pytest.approx(runs["dense"][key], abs=1e-9)
    assert model_from_checkpoint(weights, p2x_band_rows=3)[0].p2x_band_rows == 3
    assert runs["few"]["AR_100"] <= runs["sparse"]["AR_100"]
    model, _ = model_from_checkpoint(weights, rpn_post_nms_top_n_test=2)
    assert model.rpn.post_nms_top_n() == 2
    with pytest.raises(ValueError, match="unknown model setting"):
        model_from_checkpoint(weights, no_such_setting=1)


def test_predict_any_size_with_compare(trained_run, tmp_path):
    run, val = trained_run
    src = tmp_path / "images"
    src.mkdir()
    paths = [val.image_path(r) for r in val.images]
    for p in paths:
        Image.open(p).save(src / Path(p).name)
    odd = np.asarray(Image.open(paths[0]).convert("RGB"))[:77, :131]
    Image.fromarray(odd).save(src / "odd.png")
    from efpn.data import write_coco

    gt = write_coco(val, tmp_path / "coco")
    weights = run / "stage3" / "best.pt"
    code = main(
        [
            "predict",
            "--weights",
            str(weights),
            "--source",
            str(src),
            "--out",
            str(tmp_path / "out"),
            "--batch-size",
            "2",
            "--score-thresh",
            "0.0",
            "--compare",
            str(gt),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {Path(p).stem for p in paths} | {"odd"} == {
        p.stem for p in (tmp_path / "out").glob("*.png")
    }
    model, ckpt = model_from_checkpoint(weights)
    image = torch.from_numpy(odd.copy()).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        direct = model([image])[0]
    mine = [r for r in results if r["file_name"] == "odd.png"]
    assert len(mine) == direct["boxes"].shape[0]
    if mine:
        best = max(mine, key=lambda r: r["score"])
        assert best["score"] == pytest.approx(direct["scores"].max().item(), abs=1e-6)
        assert best["category_id"] in ckpt["category_ids"]
    for r in results:  # the class name travels with its id
        assert r["category"] == ckpt["classes"][ckpt["category_ids"].index(r["category_id"])]
    ids = {r.image_id for r in val.images}
    assert {r["image_id"] for r in results if r["file_name"] != "odd.png"} <= ids


def test_predict_missing_source_is_one_line_error(trained_run, tmp_path, capsys):
    run, _ = trained_run
    code = main(
        [
            "predict",
            "--weights",
            str(run / "stage3" / "best.pt"),
            "--source",
            str(tmp_path / "nope.png"),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope.png" in err and len(err.splitlines()) == 1


def test_demo_table_prints_na_for_sizes_without_objects():
    from efpn.demo import ROWS, format_table

    row = {
        "AP_small": 0.4,
        "AR_small": 0.5,
        "AP_medium": 0.3,
        "AP_large": -1.0,
        "AP": 0.25,
        "f1_small": 0.8,
        "seconds_per_image": 1.0,
    }
    lines = format_table({key: row for key, _ in ROWS}).splitlines()
    assert len(lines) == 2 + len(ROWS)
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[1:] == ["0.400", "0.500", "0.300", "n/a", "0.250", "0.800", "1.000"]
    assert len({len(line) for line in lines}) == 1  # columns stay aligned


def test_predict_compare_matches_by_relative_path_not_basename(trained_run, tmp_path, capsys):
    run, val = trained_run
    src = tmp_path / "ds"
    for sub in ("train", "val"):
        (src / sub).mkdir(parents=True)
        Image.open(val.image_path(val.images[0])).save(src / sub / "0.png")
    gt = {
        "images": [{"id": 7, "file_name": "val/0.png", "width": 96, "height": 96}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": val.category_ids[0],
                "bbox": [10, 10, 20, 20],
                "area": 400,
                "iscrowd": 0,
            }
        ],
        "categories": [{"id": i, "name": n} for i, n in zip(val.category_ids, val.classes)],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    args = ["predict", "--weights", str(run / "stage3" / "best.pt"), "--source", str(src)]
    args += [
        "--out",
        str(tmp_path / "o"),
        "--score-thresh",
        "0",
        "--compare",
        str(tmp_path / "gt.json"),
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "o" / "predictions.json").read_text())
    ids = {r["file_name"]: r["image_id"] for r in results}
    assert set(ids) <= {"train/0.png", "val/0.png"}
    if "val/0.png" in ids:
        assert ids["val/0.png"] == 7
    if "train/0.png" in ids:
        assert ids["train/0.png"] != 7
    assert "detections" in capsys.readouterr().out  # it says what it found


def test_predict_and_val_sliced(trained_run, tmp_path, capsys):
    run, val = trained_run
    weights = str(run / "stage3" / "best.pt")
    # a 250x300 mosaic of val images, detected in 96-px tiles
    tiles = [np.asarray(Image.open(val.image_path(r)).convert("RGB")) for r in val.images]
    big = np.zeros((250, 300, 3), np.uint8)
    big[:96, :96] = tiles[0]
    big[154:250, 204:300] = tiles[-1]
    Image.fromarray(big).save(tmp_path / "big.png")
    args = [
        "predict",
        "--weights",
        weights,
        "--source",
        str(tmp_path / "big.png"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert (
        main(
            [
                *args,
                "--slice",
                "96",
                "--overlap",
                "0.25",
                "--merge",
                "nmm",
                "--full-image",
                "--score-thresh",
                "0",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "o" / "predictions.json").read_text())
    for r in results:
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 300 + 1e-3 and y + h <= 250 + 1e-3
    capsys.readouterr()
    vargs = ["val", "--weights", weights, "--json"]
    assert main([*vargs, "--slice", "64", "--overlap", "0.2"]) == 0
    captured = capsys.readouterr()
    sliced = json.loads(captured.out)
    assert 0 <= sliced["AP"] <= 1 and sliced["seconds_per_image"] > 0
    # without a terminal, a timestamped line per scene, on stderr (stdout stays JSON)
    per_scene = [ln for ln in captured.err.splitlines() if "] eval (sliced) " in ln]
    assert per_scene and re.fullmatch(
        r"\[[-0-9: ]+\] eval \(sliced\) 1/\d+: \S+, \d+ detections in \d+ s", per_scene[0]
    )
    assert main([*vargs, "--slice", "0"]) == 2  # a bad slice size is a one-line error
    capsys.readouterr()
    # tile settings without --slice would be ignored: refused instead, on both commands
    for command in (vargs, [*args, "--quiet"]):
        assert main([*command, "--overlap", "0.3", "--full-image"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            "efpn: error: --overlap, --full-image set without --slice: tile settings apply "
            "only to sliced prediction; add --slice PX (the tile size)"
        )
    # a score threshold outside [0, 1] would keep every box or none; --conf is predict's
    # Ultralytics spelling of --score-thresh
    for bad in ("2", "nan", "-0.1"):
        with pytest.raises(SystemExit):
            main([*args, "--conf", bad])
        assert "expected a score in [0, 1]" in capsys.readouterr().err
    assert main([*args, "--conf", "1", "--quiet"]) == 0


def test_val_takes_inference_overrides_only(trained_run, capsys):
    run, _ = trained_run
    weights = str(run / "stage3" / "best.pt")
    assert main(["val", "--weights", weights, "--json", "model.merge=gated"]) == 0
    gated = json.loads(capsys.readouterr().out)
    assert 0 <= gated["AP"] <= 1
    assert main(["val", "--weights", weights, "stage1.optim.lr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "inference settings only" in err and len(err.splitlines()) == 1
    # ``--set`` (efpn study's spelling) is the same as a key=value argument
    assert main(["val", "--weights", weights, "--json", "--set", "model.merge=gated"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in same.items() if k != "seconds_per_image"} == {
        k: v for k, v in gated.items() if k != "seconds_per_image"
    }
    assert main(["val", "--weights", weights, "--set", "stage1.optim.lr=1"]) == 2
    assert "inference settings only" in capsys.readouterr().err


def test_val_on_data_with_other_classes_is_refused(trained_run, tmp_path, capsys):
    run, _ = trained_run
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 8, 10, 10]}],
        "categories": [{"id": 1, "name": "car"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "r.yaml").write_text(f"data: {{format: coco, train: {tmp_path / 'gt.json'}}}\n")
    code = main(
        ["val", "--weights", str(run / "stage3" / "best.pt"), "--data", str(tmp_path / "r.yaml")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "its classes (car) are not the checkpoint's" in err
    # the same for predict's --compare, whose colours match boxes by class
    args = ["predict", "--weights", str(run / "stage3" / "best.pt"), "--source", str(tmp_path)]
    assert main([*args, "--out", str(tmp_path / "o"), "--compare", str(tmp_path / "gt.json")]) == 2
    assert "gt.json: its classes (car) are not the checkpoint's" in capsys.readouterr().err


def test_predict_on_a_folder_skips_unreadable_images_and_keeps_same_named_ones_apart(
    trained_run, tmp_path, capsys
):
    run, _ = trained_run
    weights = str(run / "stage3" / "best.pt")
    src = tmp_path / "src"
    image = Image.fromarray(np.full((48, 64, 3), 120, np.uint8))
    for rel in ("a/1.png", "b/1.png", "2.png", "2.jpg"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(src / rel)
    (src / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["predict", "--weights", weights, "--source", str(src), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"skipped: {src / 'broken.png'}: cannot decode image" in err
    assert f"{src}: skipped 1 of 5 image(s)" in err
    drawn = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert drawn == ["2.jpg.png", "2.png.png", "a/1.png", "b/1.png"]  # none overwritten
    assert (out / "predictions.json").exists()
    # a single image that cannot be read stays an error
    code = main(
        ["predict", "--weights", weights, "--source", str(src / "broken.png"), "--out", str(out)]
    )
    assert code != 0
    assert "broken.png: cannot decode image" in capsys.readouterr().err
    # a folder with no image, or none readable, is an error, not an empty result
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    for folder, says in (("empty", "no images"), ("bad", "none of its 1 image(s) could be read")):
        args = ["predict", "--weights", weights, "--source", str(tmp_path / folder)]
        assert main([*args, "--out", str(tmp_path / f"o_{folder}")]) != 0
        assert says in capsys.readouterr().err


def test_predict_save_txt_writes_yolo_labels_of_the_drawn_boxes(trained_run, tmp_path, capsys):
    run, val = trained_run
    weights = str(run / "stage3" / "best.pt")
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    Image.open(val.image_path(val.images[0])).save(src / "x" / "0.png")
    Image.open(val.image_path(val.images[1])).save(src / "1.png")
    out = tmp_path / "out"
    args = ["predict", "--weights", weights, "--source", str(src), "--score-thresh", "0.05"]
    assert main([*args, "--out", str(out), "--save-txt", "--save-conf", "--quiet"]) == 0
    results = json.loads((out / "predictions.json").read_text())
    ckpt = torch.load(weights, weights_only=True, map_location="cpu")
    assert (out / "classes.txt").read_text().split("\n")[:-1] == list(ckpt["classes"])
    for rel, label in (("x/0.png", "labels/x/0.txt"), ("1.png", "labels/1.txt")):
        kept = [r for r in results if r["file_name"] == rel and r["score"] >= 0.05]
        lines = [ln.split() for ln in (out / label).read_text().splitlines()]
        assert len(lines) == len(kept)
        size = Image.open(src / rel).size
        for fields, r in zip(
            sorted(lines, key=lambda f: -float(f[5])), sorted(kept, key=lambda r: -r["score"])
        ):
            cls, cx, cy, w, h, score = int(fields[0]), *map(float, fields[1:])
            assert ckpt["classes"][cls] == r["category"] and score == pytest.approx(
                r["score"], abs=1e-4
            )
            x, y, bw, bh = r["bbox"]
            got = [cx * size[0], cy * size[1], w * size[0], h * size[1]]
            assert got == pytest.approx([x + bw / 2, y + bh / 2, bw, bh], abs=1e-3)
    assert main([*args, "--out", str(tmp_path / "o2"), "--save-txt", "--quiet"]) == 0
    assert all(
        len(ln.split()) == 5
        for ln in (tmp_path / "o2" / "labels" / "1.txt").read_text().splitlines()
    )
    assert main([*args, "--out", str(tmp_path / "o3"), "--save-conf"]) == 2
    assert "--save-conf set without --save-txt" in capsys.readouterr().err


def test_checkpoints_carry_how_images_were_read(trained_run, tmp_path, monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from efpn.engine.train import Trainer

    run, _ = trained_run
    weights = run / "stage3" / "best.pt"
    ckpt = torch.load(weights, weights_only=True)
    assert ckpt["image_reading"] == {}  # trained without EFPN_BANDS or EFPN_RANGE
    ckpt["image_reading"] = {"EFPN_BANDS": "3,2,1", "EFPN_RANGE": "0,4095"}
    multiband = tmp_path / "bgrn.pt"
    torch.save(ckpt, multiband)
    for name in ("EFPN_BANDS", "EFPN_RANGE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.delenv(name)  # restored (unset) after the test
    model_from_checkpoint(multiband)
    # val and predict read as training did
    assert (os.environ["EFPN_BANDS"], os.environ["EFPN_RANGE"]) == ("3,2,1", "0,4095")
    monkeypatch.setenv("EFPN_BANDS", "4")
    with caplog.at_level(logging.WARNING, logger="efpn.data"):
        model_from_checkpoint(multiband)
        model_from_checkpoint(weights)
    assert os.environ["EFPN_BANDS"] == "4"  # an explicit choice is kept, and said
    said = [r.getMessage() for r in caplog.records]
    assert f"{multiband}: trained with EFPN_BANDS=3,2,1, read here with EFPN_BANDS=4" in said
    assert any("trained without EFPN_BANDS" in m for m in said)
    # training goes on only with the reading its checkpoints were trained with
    trainer = SimpleNamespace(image_reading={"EFPN_BANDS": "4"})
    with pytest.raises(ValueError, match="EFPN_BANDS=3,2,1 EFPN_RANGE=0,4095, this run reads"):
        Trainer._same_reading(trainer, ckpt, multiband)
    Trainer._same_reading(SimpleNamespace(image_reading=ckpt["image_reading"]), ckpt, multiband)
    # a 16-bit four-band scene predicts, whole and sliced, drawn as 8-bit RGB
    import tifffile

    rng = np.random.default_rng(0)
    scene = rng.integers(200, 3000, (96, 128, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "scene.tif", scene, photometric="minisblack", planarconfig="contig")
    monkeypatch.delenv("EFPN_BANDS")
    monkeypatch.delenv("EFPN_RANGE")
    for extra in ([], ["--slice", "64"]):
        out = tmp_path / f"out{len(extra)}"
        args = ["predict", "--weights", str(multiband), "--source", str(tmp_path / "scene.tif")]
        assert main([*args, "--out", str(out), *extra]) == 0
        assert json.loads((out / "predictions.json").read_text()) is not None
        drawn = np.asarray(Image.open(out / "scene.png"))
        assert drawn.shape == (96, 128, 3) and drawn.dtype == np.uint8
