"""ONNX export: onnxruntime gives PyTorch's detections, for EFPN and FPN, at any size."""

import json
import sys

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")

from conftest import tiny_detector  # noqa: E402
from efpn.cli import main  # noqa: E402
from efpn.export import (  # noqa: E402
    ExportMismatch,
    OnnxDetector,
    compare_detections,
    export_onnx,
    sample_image,
)

CLASSES = ["a", "b", "c"]
#: several sizes: the trace size, non-square up- and down-scaled, odd sides
SIZES = [(160, 160), (120, 200), (97, 61), (300, 250)]


def _model(**kwargs):
    return tiny_detector(**kwargs)


def _assert_same(ref, got):
    """Same count and labels, boxes within 1e-3 px, scores within 1e-4 (in order, or
    matched as sets where scores tie)."""
    assert len(got["scores"]) == len(ref["scores"])
    assert got["boxes"].shape == ref["boxes"].shape
    problem = compare_detections(ref, got, box_tol=1e-3, score_tol=1e-4)
    assert problem is None, problem


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # EFPN, the paper's exclusive merge
        {"extended": False},  # the FPN baseline
        {"merge": "gated"},
        {"merge": "fused"},
        {"resize_scale": 0.5},  # a fixed-factor (aerial) model
    ],
    ids=["efpn", "fpn", "gated", "fused", "resize_scale"],
)
def test_onnxruntime_matches_pytorch_at_several_sizes(tmp_path, kwargs):
    model = _model(**kwargs)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, classes=CLASSES, dynamic=True, size=160, validate=False)
    detector = OnnxDetector(path)
    assert detector.extended == model.extended
    counts = []
    for i, hw in enumerate(SIZES):
        image = sample_image(hw, seed=i)
        with torch.no_grad():
            ref = model([image])[0]
        got = detector([image])[0]
        _assert_same(ref, got)
        counts.append(len(ref["scores"]))
    assert min(counts) > 0  # the comparison compared detections, not empty sets


def test_image_without_objects_gives_an_empty_result(tmp_path):
    model = _model(box_score_thresh=0.99)  # nothing reaches this score
    path = tmp_path / "m.onnx"
    export_onnx(model, path, classes=CLASSES, dynamic=True, size=128, validate=False)
    blank = torch.full((3, 100, 140), 0.5)
    with torch.no_grad():
        assert len(model([blank])[0]["scores"]) == 0
    out = OnnxDetector(path)([blank])[0]
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,)
    assert out["labels"].shape == (0,) and out["labels"].dtype == torch.int64


def test_export_validates_and_records_metadata(tmp_path):
    model = _model()
    path = tmp_path / "m.onnx"
    info = export_onnx(
        model,
        path,
        classes=CLASSES,
        category_ids=[3, 5, 9],
        image_reading={"EFPN_BANDS": "3,2,1"},
        dynamic=True,
        size=128,
    )
    # checked at the trace size and at a second, non-square one
    assert [(c["height"], c["width"]) for c in info["checked"]] == [(128, 128), (96, 160)]
    assert info["bytes"] == path.stat().st_size > 0
    detector = OnnxDetector(path)
    assert detector.classes == CLASSES and detector.category_ids == [3, 5, 9]
    meta = detector.meta
    assert meta["image_mean"] == list(model.transform.image_mean)
    assert meta["min_size"] == 128 and meta["max_size"] == 192 and meta["dynamic"] is True
    # scenes read as training read them
    assert detector.checkpoint()["image_reading"] == {"EFPN_BANDS": "3,2,1"}
    assert not list(tmp_path.glob(".*tmp"))  # written atomically


def test_static_export_takes_its_size_and_letterboxes_others(tmp_path):
    model = _model()
    path = tmp_path / "s.onnx"
    export_onnx(model, path, classes=CLASSES, size=128)
    detector = OnnxDetector(path)
    assert detector.size == 128
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, 128, 128]
    image = sample_image((128, 128), seed=1)
    with torch.no_grad():
        _assert_same(model([image])[0], detector([image])[0])
    # another size: padded to a square, resized to 128, boxes mapped back into the image
    wide = sample_image((100, 200), seed=2)
    out = detector([wide])[0]
    assert len(out["scores"]) > 0
    assert out["boxes"][:, 2].max() <= 200 and out["boxes"][:, 3].max() <= 100
    letterboxed = torch.zeros(3, 200, 200)
    letterboxed[:, :100] = wide
    small = torch.nn.functional.interpolate(
        letterboxed[None], size=(128, 128), mode="bilinear", antialias=True
    )[0]
    direct = detector([small])[0]
    torch.testing.assert_close(direct["scores"], out["scores"])


def test_a_mismatch_is_refused_and_no_file_is_left(tmp_path, monkeypatch):
    import efpn.export as export

    model = _model()
    monkeypatch.setattr(export, "compare_detections", lambda ref, got: "boxes differ by 3 px")
    with pytest.raises(ExportMismatch, match="disagree on a 128x128 SynthSigns image"):
        export_onnx(model, tmp_path / "m.onnx", classes=CLASSES, size=128)
    assert not list(tmp_path.iterdir())
    # a size of 0 is a mistake, not the default (the recipe's max_size)
    with pytest.raises(ValueError, match="--size 0: at least 32 pixels"):
        export_onnx(model, tmp_path / "m.onnx", classes=CLASSES, size=0)


def test_compare_detections():
    ref = {
        "boxes": torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20]]),
        "scores": torch.tensor([0.9, 0.9]),
        "labels": torch.tensor([1, 2]),
    }
    swapped = {k: v.flip(0) for k, v in ref.items()}
    assert compare_detections(ref, swapped) is None  # equal scores: either order
    moved = {**ref, "boxes": ref["boxes"] + torch.tensor([0.0, 0, 0, 0.01])}
    assert "px" in compare_detections(ref, moved)
    relabelled = {**ref, "labels": torch.tensor([1, 3])}
    assert compare_detections(ref, relabelled) is not None
    fewer = {k: v[:1] for k, v in ref.items()}
    assert compare_detections(ref, fewer) == "1 detections instead of 2"
    rescored = {**ref, "scores": torch.tensor([0.9, 0.9002])}
    assert "score" in compare_detections(ref, rescored)


# ----------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    run, _ = trained_run
    out = tmp_path_factory.mktemp("onnx") / "efpn.onnx"
    assert (
        main(
            ["export", "--weights", str(run / "stage3" / "best.pt"), "--dynamic", "--out", str(out)]
        )
        == 0
    )
    return run, out


def test_export_command_and_val_with_onnx(exported, capsys):
    run, onnx_path = exported
    # one image per pass, as the ONNX file runs (a batch pads images to one size)
    assert (
        main(["val", "--weights", str(run / "stage3" / "best.pt"), "--json", "--batch-size", "1"])
        == 0
    )
    torch_metrics = json.loads(capsys.readouterr().out)
    assert main(["val", "--weights", str(onnx_path), "--json", "--quiet"]) == 0
    onnx_metrics = json.loads(capsys.readouterr().out)
    for key in ("AP", "AP_small", "AR_small", "AP_medium", "f1_small"):
        assert onnx_metrics[key] == pytest.approx(torch_metrics[key], abs=1e-6)
    assert onnx_metrics["tt100k"] == torch_metrics["tt100k"]


def test_predict_with_onnx_writes_the_same_results(exported, tmp_path, capsys):
    from PIL import Image

    run, onnx_path = exported
    src = tmp_path / "images"
    src.mkdir()
    for i, hw in enumerate([(96, 96), (80, 130)]):
        array = (sample_image(hw, seed=i).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(array).save(src / f"{i}.png")
    results = {}
    for name, weights in (("pt", run / "stage3" / "best.pt"), ("onnx", onnx_path)):
        out = tmp_path / name
        code = main(
            [
                "predict",
                "--weights",
                str(weights),
                "--source",
                str(src),
                "--out",
                str(out),
                "--score-thresh",
                "0",
                # one image per pass: a batch pads its images to a common size, which
                # changes the features at their borders (in PyTorch alone)
                "--batch-size",
                "1",
            ]
        )
        assert code == 0
        results[name] = json.loads((out / "predictions.json").read_text())
        assert (out / "0.png").exists() and (out / "1.png").exists()
    assert len(results["onnx"]) == len(results["pt"]) > 0

    def per_file(rows, name):
        rows = [r for r in rows if r["file_name"] == name]
        return {
            "boxes": torch.tensor([r["bbox"] for r in rows], dtype=torch.float64),
            "scores": torch.tensor([r["score"] for r in rows], dtype=torch.float64),
            "labels": torch.tensor([r["category_id"] for r in rows]),
        }

    for name in ("0.png", "1.png"):
        ref, got = per_file(results["pt"], name), per_file(results["onnx"], name)
        assert len(ref["scores"]) > 0
        assert compare_detections(ref, got) is None


def test_export_and_predict_take_inference_settings(trained_run, tmp_path, capsys):
    import onnx
    from PIL import Image

    from efpn.engine.train import model_from_checkpoint

    run, _ = trained_run
    weights = run / "stage3" / "best.pt"
    out = tmp_path / "fused.onnx"
    assert main(["export", "--weights", str(weights), "--out", str(out), "model.merge=fused"]) == 0
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert meta["config"]["model"]["merge"] == "fused"
    # the export validated itself against the fused PyTorch model; predict with the
    # same setting gives that model's detections
    src = tmp_path / "images"
    src.mkdir()
    array = (sample_image((96, 96), seed=3).permute(1, 2, 0).numpy() * 255).round()
    Image.fromarray(array.astype("uint8")).save(src / "a.png")
    argv = ["predict", "--weights", str(weights), "--source", str(src), "--score-thresh", "0"]
    assert main([*argv, "--out", str(tmp_path / "p"), "--quiet", "model.merge=fused"]) == 0
    rows = json.loads((tmp_path / "p" / "predictions.json").read_text())
    model, _ = model_from_checkpoint(weights, merge="fused")
    image = torch.from_numpy(array.astype("uint8")).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        direct = model([image])[0]
    assert len(rows) == len(direct["scores"])
    assert sorted(r["score"] for r in rows) == pytest.approx(
        sorted(direct["scores"].tolist()), abs=1e-6
    )
    # settings that change the weights are refused in one line
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "q"), "model.backbone=resnet50"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "predict changes inference settings only" in err
    assert (
        main(["export", "--weights", str(weights), "--out", str(out), "model.fpn_channels=8"]) == 2
    )
    assert "export changes inference settings only" in capsys.readouterr().err


def test_onnx_bad_input_gives_one_line_errors(exported, tmp_path, capsys):
    run, onnx_path = exported
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    assert main(["val", "--weights", str(broken)]) == 2
    assert "not a loadable ONNX model" in capsys.readouterr().err
    assert main(["val", "--weights", str(onnx_path), "--batch-size", "0"]) == 2
    assert "--batch-size must be 1 or more" in capsys.readouterr().err
    assert main(["val", "--weights", str(onnx_path), "--scale", "2"]) == 2
    assert "test size built in" in capsys.readouterr().err
    assert main(["val", "--weights", str(onnx_path), "model.merge=gated"]) == 2
    assert "inference settings built in" in capsys.readouterr().err
    assert (
        main(
            [
                "export",
                "--weights",
                str(run / "stage3" / "best.pt"),
                "--out",
                str(tmp_path / "m.txt"),
            ]
        )
        == 2
    )
    assert "ends in .onnx" in capsys.readouterr().err
    # a valid ONNX file that efpn did not write
    import onnx

    proto = onnx.load(str(onnx_path))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    assert main(["val", "--weights", str(foreign)]) == 2
    assert "not an efpn export" in capsys.readouterr().err


def test_export_without_onnxruntime_says_what_to_install(trained_run, monkeypatch, capsys):
    run, _ = trained_run
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    code = main(["export", "--weights", str(run / "stage3" / "best.pt")])
    assert code == 2
    err = capsys.readouterr().err
    assert "pip install 'efpn[export]'" in err and len(err.strip().splitlines()) == 1


def test_a_failing_trace_leaves_no_file(tmp_path, monkeypatch):
    model = _model()

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(ValueError, match="could not export the model .unsupported operator"):
        export_onnx(model, tmp_path / "m.onnx", classes=CLASSES, size=64)
    assert not list(tmp_path.iterdir())
