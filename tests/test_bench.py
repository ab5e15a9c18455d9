"""efpn bench: five configurations with one set of weights, and its report."""

import json

import pytest
import torch

from efpn.bench import (
    NAMES,
    _cpu_peak_mb,
    bench_image,
    build_bench_models,
    flop_breakdown,
    format_table,
    run_bench,
)
from efpn.cli import main

SMALL = dict(
    sr_kwargs={"width": 16},
    out_channels=32,
    representation_size=64,
    small_roi_size=48,
    rpn_post_nms_top_n_test=50,
)


def test_five_configs_share_weights_and_scales():
    models = build_bench_models("resnet18", 128, 5, 0, **SMALL)
    assert list(models) == list(NAMES)
    efpn, fpn, noftt = models["efpn"], models["fpn_1x"], models["efpn_noftt"]
    for name, p in fpn.named_parameters():
        assert torch.equal(p, efpn.get_parameter(name)), name
    assert torch.equal(
        noftt.backbone.extension.lateral.weight, efpn.backbone.extension.lateral.weight
    )
    assert models["fpn_2x"].transform.min_size == (256,)
    image = bench_image(128)
    with torch.no_grad():
        for name, m in models.items():
            out = m([image])
            assert set(out[0]) == {"boxes", "labels", "scores"}, name
    # FPN + P2-2x pools the P2 of the doubled input as its stride-2 level
    up = models["fpn_1x_p2_2x"]
    batch, _ = efpn.transform([image])
    x2 = torch.nn.functional.interpolate(batch.tensors, scale_factor=2.0, mode="bilinear")
    with torch.no_grad():
        p2 = efpn.backbone.forward_pyramid(x2)[0]["0"]
    assert p2.shape[-1] == batch.tensors.shape[-1] // 2 and up.model is efpn
    parts = dict(flop_breakdown(efpn, image))
    total = parts.pop("total")
    assert parts["SR module (FTT)"] > 0 and parts["P'2 output conv"] > 0
    assert 0.95 * total <= sum(parts.values()) <= total


def test_report_schema_ratios_and_cli_json(capsys):
    report = run_bench("resnet18", 96, runs=2, num_classes=5, memory=False, progress=False, **SMALL)
    by = {c["name"]: c for c in report["configs"]}
    assert set(by) == set(NAMES)
    for c in by.values():
        assert c["seconds_q1"] <= c["seconds"] <= c["seconds_q3"] and c["gflops"] > 0
    assert report["ratios"]["efpn_vs_fpn1x_time"] == pytest.approx(
        by["efpn"]["seconds"] / by["fpn_1x"]["seconds"]
    )
    assert by["fpn_2x"]["gflops"] > 2.5 * by["fpn_1x"]["gflops"]
    assert "EFPN / FPN-2x" in format_table(report)
    code = main(
        [
            "bench",
            "--backbone",
            "resnet18",
            "--size",
            "64",
            "--runs",
            "1",
            "--no-memory",
            "--num-classes",
            "3",
            "--sr-width",
            "8",
            "--proposals",
            "20",
            "--json",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"efpn_vs_fpn2x_time", "efpn_vs_fpn2x_mem", "efpn_vs_fpn1x_time"} <= set(
        printed["ratios"]
    )
    assert {"name", "seconds", "peak_mb", "gflops"} <= set(printed["configs"][0])


def test_cpu_peak_memory_subprocess_grows_with_input():
    spec = dict(backbone="resnet18", num_classes=3, seed=0, threads=1, model_kwargs={})
    small = _cpu_peak_mb("fpn_1x", {**spec, "size": 64})
    large = _cpu_peak_mb("fpn_1x", {**spec, "size": 384})
    assert 0 < small < large


def test_onnx_rows_are_timed_in_the_same_run(capsys):
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    report = run_bench(
        "resnet18", 96, runs=2, num_classes=5, memory=False, progress=False, onnx=True, **SMALL
    )
    by = {c["name"]: c for c in report["configs"]}
    assert set(by) == set(NAMES) | {"fpn_1x_onnx", "efpn_onnx"}
    for row, source in (("fpn_1x_onnx", "fpn_1x"), ("efpn_onnx", "efpn")):
        assert by[row]["seconds"] > 0 and by[row]["gflops"] == by[source]["gflops"]
        assert report["ratios"][f"{row}_vs_torch_time"] == pytest.approx(
            by[row]["seconds"] / by[source]["seconds"]
        )
    table = format_table(report)
    assert "EFPN-96 (onnxruntime, dense P'2)" in table and "onnxruntime / PyTorch time: " in table
    assert main(["bench", "--onnx", "--device", "cuda", "--size", "64"]) == 2
    assert "run on the CPU" in capsys.readouterr().err
