"""SAHI interop: efpn models inside SAHI give efpn's own sliced detections."""

import numpy as np
import pytest
import torch

pytest.importorskip("sahi", reason="the sahi extra is not installed")

from sahi import AutoDetectionModel  # noqa: E402
from sahi.predict import get_sliced_prediction  # noqa: E402

from conftest import tiny_detector  # noqa: E402
from efpn.export import compare_detections, sample_image  # noqa: E402
from efpn.sahi_adapter import category_mapping, sahi_model  # noqa: E402
from efpn.slicing import predict_sliced  # noqa: E402


def _model():
    return tiny_detector()


def _as_detections(result):
    preds = result.object_prediction_list
    return {
        "boxes": torch.tensor([p.bbox.to_xyxy() for p in preds], dtype=torch.float64).reshape(
            -1, 4
        ),
        "scores": torch.tensor([p.score.value for p in preds], dtype=torch.float64),
        "labels": torch.tensor([p.category.id for p in preds], dtype=torch.long),
    }


def _sliced(image, detection_model):
    # overlap 0.25 of 128 px: SAHI's windows (step 128 - 32) are efpn's (step 0.75 x 128)
    return get_sliced_prediction(
        image,
        detection_model,
        slice_height=128,
        slice_width=128,
        overlap_height_ratio=0.25,
        overlap_width_ratio=0.25,
        perform_standard_pred=False,
        postprocess_type="NMS",
        postprocess_match_metric="IOU",
        postprocess_match_threshold=0.5,
        postprocess_class_agnostic=False,
        verbose=0,
    )


@pytest.mark.parametrize("entry", ["adapter", "auto_model"])
def test_sahi_sliced_prediction_equals_efpns(entry):
    model = _model()
    image = (sample_image((200, 260), seed=1).permute(1, 2, 0).numpy() * 255).round()  # 6 tiles
    image = image.astype(np.uint8)
    if entry == "adapter":
        dm = sahi_model(model=model, classes=["a", "b", "c"], confidence_threshold=0.0)
    else:
        dm = AutoDetectionModel.from_pretrained(
            model_type="torchvision",
            model=model,
            category_mapping=category_mapping(["a", "b", "c"]),
            confidence_threshold=0.0,
            device="cpu",
        )
    got = _as_detections(_sliced(image, dm))
    ref = predict_sliced(model, image, 128, 0.25, merge="nms", merge_threshold=0.5)
    assert len(ref["scores"]) > 0
    assert compare_detections(ref, got, box_tol=1e-3, score_tol=1e-4) is None


def test_adapter_reads_checkpoints_and_onnx_files(trained_run, tmp_path):
    run, _ = trained_run
    dm = sahi_model(run / "stage3" / "best.pt", confidence_threshold=0.01)
    from efpn.engine.train import model_from_checkpoint

    _, ckpt = model_from_checkpoint(run / "stage3" / "best.pt")
    assert dm.category_names == ckpt["classes"]
    image = (sample_image((96, 96)).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    dm.perform_inference(image)
    dm.convert_original_predictions()
    assert all(p.score.value > 0.01 for p in dm.object_prediction_list)
    with pytest.raises(ValueError, match="either weights"):
        sahi_model()
    with pytest.raises(FileNotFoundError):
        sahi_model(tmp_path / "missing.pt")


def test_bench_sahi_times_both_and_compares_detections(trained_run):
    from efpn.sahi_adapter import bench_sahi

    run, _ = trained_run
    image = (sample_image((150, 170), seed=2).permute(1, 2, 0).numpy() * 255).round()
    report = bench_sahi(
        run / "stage3" / "best.pt", image.astype(np.uint8), slice_size=96, overlap=0.25, runs=1
    )
    assert report["same_windows"] and report["tiles"] == 6
    assert report["agree"] is None and report["detections"] > 0
    assert set(report["seconds"]) == {
        "efpn (1 tile per pass)",
        "efpn (4 tiles per pass)",
        "SAHI get_sliced_prediction",
    }
    assert all(s > 0 for s in report["seconds"].values())
