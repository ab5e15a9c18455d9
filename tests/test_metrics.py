import contextlib
import io
import json
from collections import Counter

import numpy as np
import pytest
import torch

from efpn.cli import main
from efpn.data.formats import TT100K_45
from efpn.metrics import (
    accuracy_recall_curve,
    coco_gt_to_tt100k,
    coco_metrics,
    coco_results_to_tt100k,
    evaluate_tt100k,
    evaluate_tt100k_bins,
    metric_keys,
    to_coco_results,
    to_tt100k_results,
)

COCO_KEYS = [
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR_1",
    "AR_10",
    "AR_100",
    "AR_small",
    "AR_medium",
    "AR_large",
]


def _generated_case(seed=0, n_images=6):
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 400, "height": 300})
        for _ in range(rng.integers(2, 8)):
            s = float(rng.choice([6, 12, 24, 40, 80, 150]) * rng.uniform(0.8, 1.2))
            x, y = float(rng.uniform(0, 400 - s)), float(rng.uniform(0, 300 - s))
            cat = int(rng.integers(1, 4))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": cat,
                    "bbox": [x, y, s, s * 0.9],
                    "area": s * s * 0.9,
                    "iscrowd": 0,
                }
            )
            if rng.random() < 0.8:
                j = rng.normal(0, s * 0.08, 4)
                dets.append(
                    {
                        "image_id": i,
                        "category_id": cat if rng.random() < 0.85 else 1 + cat % 3,
                        "bbox": [x + j[0], y + j[1], s + j[2], s * 0.9 + j[3]],
                        "score": float(rng.random()),
                    }
                )
        for _ in range(rng.integers(0, 4)):
            dets.append(
                {
                    "image_id": i,
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [float(rng.uniform(0, 300)), float(rng.uniform(0, 200)), 20.0, 20.0],
                    "score": float(rng.random() * 0.5),
                }
            )
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": k, "name": f"c{k}"} for k in (1, 2, 3)],
    }
    return gt, dets


def test_pycocotools_parity_on_generated_case():
    pycocotools = pytest.importorskip("pycocotools.cocoeval")
    from pycocotools.coco import COCO

    gt, dets = _generated_case()
    ours = coco_metrics(gt, dets)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(gt))
        coco_gt.createIndex()
        ev = pycocotools.COCOeval(coco_gt, coco_gt.loadRes(json.loads(json.dumps(dets))), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert 0 < ours["AP"] < 1
    for key, ref in zip(COCO_KEYS, ev.stats):
        assert ours[key] == pytest.approx(ref, abs=1e-9), key


def test_coco_metrics_perfect_and_presets():
    gt, _ = _generated_case(1)
    perfect = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]
    m = coco_metrics(gt, perfect)
    assert m["AP"] == pytest.approx(1.0) and m["AR_100"] == pytest.approx(1.0)
    assert set(m["per_class"]) == {"c1", "c2", "c3"} and all(
        v == pytest.approx(1.0) for v in m["per_class"].values()
    )
    aitod = coco_metrics(gt, perfect, size_bins="aitod", max_dets=300)
    assert list(k for k in aitod if k != "per_class") == metric_keys("aitod", 300)
    assert "AP_very_tiny" in aitod and "AR_300" in aitod
    empty = coco_metrics(gt, [])
    assert empty["AP"] == 0.0


def test_tt100k_conformance_official_output(shared_data):
    root = shared_data("tt100k_eval")
    gt = json.loads((root / "test_annotations.json").read_text())
    dets = json.loads((root / "zhu2016_detections.json").read_text())
    official = json.loads((root / "zhu2016_official_eval.json").read_text())
    r = evaluate_tt100k(gt, dets, iou=0.5, classes=TT100K_45, min_score=40)
    assert (r.tp, r.detections, r.ground_truth) == (6735, 7621, 7703)
    assert r.accuracy == pytest.approx(0.883742291038, abs=1e-12)
    assert r.recall == pytest.approx(0.874334674802, abs=1e-12)

    def objects(lists):
        c = Counter()
        for img, v in lists["imgs"].items() if "imgs" in lists else lists.items():
            for o in v["objects"]:
                b = o["bbox"]
                c[
                    (img, o["category"], o.get("score"), b["xmin"], b["ymin"], b["xmax"], b["ymax"])
                ] += 1
        return c

    for name in ("right", "wrong", "miss"):
        assert objects(getattr(r, name)) == objects(official[name]), name
    bins = evaluate_tt100k_bins(gt, dets, classes=TT100K_45, min_score=40)
    assert (bins["small"]["accuracy"], bins["small"]["recall"]) == (
        pytest.approx(0.8420, abs=5e-5),
        pytest.approx(0.8092, abs=5e-5),
    )
    assert (bins["medium"]["accuracy"], bins["medium"]["recall"]) == (
        pytest.approx(0.9069, abs=5e-5),
        pytest.approx(0.9233, abs=5e-5),
    )
    assert (bins["large"]["accuracy"], bins["large"]["recall"]) == (
        pytest.approx(0.9153, abs=5e-5),
        pytest.approx(0.8660, abs=5e-5),
    )


def test_tt100k_rules_on_hand_case():
    def obj(cat, x1, y1, x2, y2, score=None):
        o = {"category": cat, "bbox": {"xmin": x1, "ymin": y1, "xmax": x2, "ymax": y2}}
        if score is not None:
            o["score"] = score
        return o

    gt = {
        "imgs": {
            "1": {
                "objects": [
                    obj("a", 0, 0, 10, 10),
                    obj("a", 100, 100, 132, 120),
                    obj("z", 50, 50, 60, 60),
                ]
            },
            "2": {"objects": [obj("a", 0, 0, 10, 10)]},  # absent from results: skipped
        }
    }
    res = {
        "imgs": {
            "1": {
                "objects": [
                    obj("a", 0, 0, 10, 10, 0.9),  # TP, small
                    obj("b", 100, 100, 132, 120, 0.9),  # wrong class: FP and the gt is a miss
                    obj("a", 0, 0, 10, 11, 0.2),  # below min score: ignored
                    obj("z", 50, 50, 60, 60, 0.9),  # class not evaluated: ignored
                    obj("a", 200, 200, 205, 205),  # no score: kept, unmatched FP
                ]
            }
        }
    }
    r = evaluate_tt100k(gt, res, classes=["a", "b"], min_score=0.5)
    assert (r.tp, r.detections, r.ground_truth) == (1, 3, 2)
    small = evaluate_tt100k(gt, res, classes=["a", "b"], min_score=0.5, size_range=(0, 32))
    assert (small.tp, small.detections, small.ground_truth) == (
        1,
        2,
        1,
    )  # 32 px long side is medium
    medium = evaluate_tt100k(gt, res, classes=["a", "b"], min_score=0.5, size_range=(32, 96))
    assert (medium.tp, medium.detections, medium.ground_truth) == (0, 1, 1)
    empty = evaluate_tt100k(gt, {"imgs": {}}, classes=["a"])
    assert empty.accuracy == 1.0 and empty.recall == 1.0


def test_accuracy_recall_curve_monotone():
    gt, dets = _generated_case(2)
    tgt, tdet = coco_gt_to_tt100k(gt), coco_results_to_tt100k(gt, dets)
    curve = accuracy_recall_curve(tgt, tdet, steps=20)
    assert len(curve["threshold"]) == 20 and curve["threshold"][0] == 0.0
    assert np.all(np.diff(curve["accuracy"]) >= 0)
    assert curve["recall"][0] >= curve["recall"][-1]


def test_writers_list_every_image_and_map_labels():
    outputs = [
        {
            "boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]),
            "scores": torch.tensor([0.7]),
            "labels": torch.tensor([2]),
        },
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        },
    ]
    coco = to_coco_results([5, 6], outputs, category_ids=[10, 20])
    assert coco == [
        {
            "image_id": 5,
            "category_id": 20,
            "bbox": [1.0, 2.0, 10.0, 20.0],
            "score": pytest.approx(0.7),
        }
    ]
    tt = to_tt100k_results(["a", "b"], outputs, ["pn", "pl40"])
    assert set(tt["imgs"]) == {"a", "b"} and tt["imgs"]["b"]["objects"] == []
    assert tt["imgs"]["a"]["objects"][0]["category"] == "pl40"


def test_cli_eval_json(tmp_path, capsys):
    gt, dets = _generated_case(3)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert (
        main(
            [
                "eval",
                "--format",
                "coco",
                "--gt",
                str(tmp_path / "gt.json"),
                "--dets",
                str(tmp_path / "dets.json"),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert list(out) == COCO_KEYS
    assert all(-1 <= v <= 1 for v in out.values())
    (tmp_path / "tgt.json").write_text(json.dumps(coco_gt_to_tt100k(gt)))
    (tmp_path / "tdet.json").write_text(json.dumps(coco_results_to_tt100k(gt, dets)))
    args = [
        "eval",
        "--format",
        "tt100k",
        "--gt",
        str(tmp_path / "tgt.json"),
        "--dets",
        str(tmp_path / "tdet.json"),
        "--classes",
        "all",
        "--min-score",
        "0.3",
        "--json",
    ]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == ["overall", "small", "medium", "large"]
    assert set(out["small"]) == {"accuracy", "recall", "f1", "tp", "detections", "ground_truth"}
    assert main(args[:-1]) == 0
    assert "accuracy" in capsys.readouterr().out
    (tmp_path / "broken.json").write_text("[{")
    assert (
        main(
            [
                "eval",
                "--format",
                "coco",
                "--gt",
                str(tmp_path / "gt.json"),
                "--dets",
                str(tmp_path / "broken.json"),
            ]
        )
        == 2
    )
    assert "broken.json: invalid JSON" in capsys.readouterr().err


def test_tables_print_na_where_a_figure_is_undefined():
    from efpn.metrics.tt100k import table_cells

    none = {"accuracy": 1.0, "recall": 0.0, "f1": 0.0, "tp": 0, "detections": 0, "ground_truth": 5}
    assert table_cells(none) == ("n/a", "0.0000", "0.0000")
    empty = {"accuracy": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "detections": 0, "ground_truth": 0}
    assert table_cells(empty) == ("n/a", "n/a", "n/a")
    some = {
        "accuracy": 0.5,
        "recall": 0.25,
        "f1": 1 / 3,
        "tp": 1,
        "detections": 2,
        "ground_truth": 4,
    }
    assert table_cells(some) == ("0.5000", "0.2500", "0.3333")
