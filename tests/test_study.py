"""efpn study: arms, folds, paired statistics, the premise check and a resumable run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from efpn.study import (
    PRESETS,
    epochs_after_stage1,
    fold_data,
    paired_stats,
    parse_arms,
    row_stats,
    t_quantile,
)


@pytest.mark.parametrize(
    "df, q", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]
)
def test_t_quantile_matches_the_tables(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-4)


def test_paired_stats_hand_computed():
    s = paired_stats([0.3, 0.4, 0.5], [0.1, 0.3, 0.2])
    assert s["values"] == pytest.approx([0.2, 0.1, 0.3])
    assert s["mean"] == pytest.approx(0.2)
    half = 4.302653 * 0.1 / np.sqrt(3)  # sd of the differences is 0.1
    assert s["ci95"] == pytest.approx([0.2 - half, 0.2 + half], abs=1e-5)
    assert paired_stats([0.3], [0.1])["ci95"] is None  # one run: no interval
    # a size bin without objects (COCO's -1) has no statistics, not a fake number
    assert paired_stats([-1.0, -1.0], [0.2, 0.1])["mean"] is None
    assert row_stats([-1.0, 0.5])["mean"] is None
    r = row_stats([0.1, 0.3])
    assert r["mean"] == pytest.approx(0.2) and r["std"] == pytest.approx(np.sqrt(0.02))


def test_parse_arms_presets_groups_and_overrides(tiny_cfg):
    cfg = tiny_cfg()
    assert [(a.name, a.overrides) for a in parse_arms(None, cfg)] == [("efpn", {})]
    arms = parse_arms([["table2"], ["table4"], ["cheap"], ["lam05", "distill.lam=0.5"]], cfg)
    by = {a.name: a.overrides for a in arms}
    assert list(by) == [
        "ext_only",
        "espcn",
        "ftt",
        "lambda0",
        "no_ftt_loss",
        "cheap_widths",
        "lam05",
    ]
    assert by["ext_only"] == {"model.sr_module": "nearest", "distill.enabled": False}
    assert by["lam05"] == {"distill.lam": 0.5}
    assert by["cheap_widths"]["model.ext_out_width"] == cfg.model.fpn_channels // 4
    with pytest.raises(ValueError, match="unknown key 'distill.lamda'"):
        parse_arms([["x", "distill.lamda=0"]], cfg)
    with pytest.raises(ValueError, match="not a preset"):
        parse_arms([["nosuch"]], cfg)
    with pytest.raises(ValueError, match="given twice"):
        parse_arms([["efpn"], ["efpn"]], cfg)
    with pytest.raises(ValueError, match="other than"):
        parse_arms([["fpn_1x", "distill.lam=0"]], cfg)
    with pytest.raises(ValueError, match="key=value"):
        parse_arms([["x", "distill.lam"]], cfg)


def test_arms_share_a_checkpoint_only_when_they_train_alike(tiny_cfg):
    from efpn.study import training_key

    key = {
        name: training_key(tiny_cfg(**PRESETS[name]))
        for name in ("efpn", "fused", "joint", "joint_fused")
    }
    assert key["fused"] == key["efpn"]  # the merge is inference only...
    # ...except in joint training, where it decides whether the original head learns
    # small RoIs
    assert len({key["efpn"], key["joint"], key["joint_fused"]}) == 3


def _data(root, names, classes=("a", "b")):
    from efpn.data.records import DetectionData, ImageRecord

    recs = [
        ImageRecord(n, 10, 10, np.array([[1.0, 1, 5, 5]]), np.array([0]), image_id=i + 1)
        for i, n in enumerate(names)
    ]
    return DetectionData(root, list(classes), recs, source=str(root))


def test_folds_partition_train_and_val_deterministically(tmp_path):
    train = _data(tmp_path, [f"t{i}.png" for i in range(8)])
    val = _data(tmp_path, [f"v{i}.png" for i in range(3)])
    seen = []
    for k in range(3):
        tr, va = fold_data(train, val, k, 3)
        names_tr = {r.file_name for r in tr.images}
        names_va = {r.file_name for r in va.images}
        assert not names_tr & names_va and len(names_tr | names_va) == 11
        assert len({r.image_id for r in tr.images + va.images}) == 11
        seen += sorted(names_va)
        again = fold_data(train, val, k, 3)[1]
        assert sorted(r.file_name for r in again.images) == sorted(names_va)
    assert sorted(seen) == sorted([f"t{i}.png" for i in range(8)] + [f"v{i}.png" for i in range(3)])
    with pytest.raises(ValueError, match="classes"):
        fold_data(train, _data(tmp_path, ["x.png"], classes=("a", "c")), 0, 2)


def test_premise_message_says_whether_2x_helps():
    from efpn.engine.premise import premise_message

    line, holds = premise_message({"AP_small": 0.20}, {"AP_small": 0.25}, 256)
    assert holds and "+5.0 points" in line and "512 px (2x)" in line
    line, holds = premise_message({"AP_small": 0.20}, {"AP_small": 0.19}, 256)
    assert not holds and "does NOT hold" in line


class _Oracle(torch.nn.Module):
    """Returns the ground truth of each image as its detections."""

    def __init__(self, boxes, min_size, max_size):
        super().__init__()
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        self.transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3)
        self.boxes = boxes

    def forward(self, images):
        return [
            {
                "boxes": self.boxes.clone(),
                "scores": torch.ones(len(self.boxes)),
                "labels": torch.ones(len(self.boxes), dtype=torch.long),
            }
            for _ in images
        ]


def test_size_reference_model_bins_objects_by_the_pixels_the_model_sees(tmp_path):
    from efpn.data.records import DetectionData, ImageRecord
    from efpn.engine.evaluate import evaluate_model

    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "a.png")
    boxes = np.array([[10.0, 10.0, 50.0, 50.0]])  # 40 px in the file: COCO medium
    data = DetectionData(tmp_path, ["x"], [ImageRecord("a.png", 200, 200, boxes, np.array([0]), 1)])
    oracle = _Oracle(torch.tensor(boxes, dtype=torch.float32), 100, 100)  # the model sees 0.5x
    src = evaluate_model(oracle, data, quiet=True, size_reference="source")
    assert src["AP_medium"] == pytest.approx(1.0) and src["AP_small"] == -1
    mod = evaluate_model(oracle, data, quiet=True, size_reference="model", scale=2.0)
    assert mod["AP_small"] == pytest.approx(1.0) and mod["AP_medium"] == -1  # 20 px at 1x
    # the written results stay in the image files' pixels
    assert mod["_results"][0]["bbox"] == pytest.approx([10.0, 10.0, 40.0, 40.0])


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    from conftest import write_tiny_config
    from efpn.cli import main

    root = tmp_path_factory.mktemp("study")
    cfg = write_tiny_config(root, **{"distill.teacher_mode": "upsample_teacher"})
    args = ["study", "--config", str(cfg), "--seeds", "2", "--out", str(root / "s"), "--quiet"]
    assert main([*args, "--arm", "efpn", "--arm", "gated"]) == 0
    return root, args


def test_study_pairs_every_arm_with_its_own_stage1(study_run):
    root, _ = study_run
    out = root / "s"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == ["seed0", "seed1"] and summary["complete"] is True
    assert set(summary["rows"]) == {"fpn_1x", "fpn_2x", "efpn", "gated"}
    for run in summary["runs"]:
        premise = json.loads((out / run / "premise.json").read_text())
        assert {"holds", "delta_AP_small", "fpn_1x", "fpn_2x", "message"} <= set(premise)
        assert (out / run / "stage1" / "best.pt").exists()
        for arm in ("efpn",):
            assert (out / run / arm / "stage3" / "best.pt").exists()
            assert not (out / run / arm / "stage1").exists()  # stage 1 is shared
        # an inference-only arm evaluates efpn's checkpoint instead of training again
        gated = json.loads((out / run / "gated" / "metrics.json").read_text())
        assert gated["checkpoint_of"] == "efpn" and not (out / run / "gated" / "stage2").exists()
    rows, paired = summary["rows"], summary["paired"]
    for m in ("AP_small", "AP", "f1_small"):
        assert len(rows["efpn"][m]["values"]) == 2
        diff = np.subtract(rows["efpn"][m]["values"], rows["fpn_1x"][m]["values"])
        assert paired["efpn"][m]["values"] == pytest.approx(diff.tolist())
        ci = paired["efpn"][m]["ci95"]
        assert ci[0] <= paired["efpn"][m]["mean"] <= ci[1]
        # ablations against the full method
        diff = np.subtract(rows["gated"][m]["values"], rows["efpn"][m]["values"])
        assert summary["paired_efpn"]["gated"][m]["values"] == pytest.approx(diff.tolist())
    assert set(summary["paired_efpn"]) == {"gated"}
    # the two seeds trained different baselines
    s0 = torch.load(out / "seed0" / "stage1" / "best.pt", weights_only=True)["model"]
    s1 = torch.load(out / "seed1" / "stage1" / "best.pt", weights_only=True)["model"]
    assert any(not torch.equal(s0[k], s1[k]) for k in s0 if s0[k].is_floating_point())
    assert (out / "paired.png").exists() and "Paired difference" in (out / "summary.md").read_text()


def test_study_resumes_without_training_again(study_run, monkeypatch):
    from efpn.cli import main
    from efpn.engine import train as train_mod

    root, args = study_run
    before = json.loads((root / "s" / "summary.json").read_text())

    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_mod.Trainer, "run_stage", refuse)
    # a study written before a recipe key existed resumes (the key at its default)
    settings = json.loads((root / "s" / "study.json").read_text())
    del settings["config"]["data"]["val_fraction"]
    (root / "s" / "study.json").write_text(json.dumps(settings))
    assert main([*args, "--arm", "efpn", "--arm", "gated"]) == 0
    after = json.loads((root / "s" / "summary.json").read_text())
    assert after["rows"] == before["rows"]
    # another arm's overrides under a used name, or another recipe, are refused
    assert main([*args, "--arm", "gated", "model.merge=duplicate"]) == 2
    other = root / "other.yaml"
    other.write_text((root / "cfg.yaml").read_text().replace("epochs: 1", "epochs: 2", 1))
    assert main(["study", "--config", str(other), "--seeds", "1", "--out", str(root / "s")]) == 2


def test_study_evaluates_every_row_on_a_held_out_test_set(study_run, monkeypatch, capsys):
    from conftest import write_tiny_config
    from efpn.cli import main
    from efpn.config import load_config
    from efpn.engine import train as train_mod
    from efpn.engine.evaluate import evaluate_model
    from efpn.engine.train import load_data, model_from_checkpoint

    root, args = study_run
    (root / "t").mkdir()
    test_cfg = write_tiny_config(
        root / "t", **{"data.synth_seed": 5, "data.synth_train": 0, "data.synth_val": 3}
    )

    def refuse(*a, **k):
        raise AssertionError("--test trained a run again")

    monkeypatch.setattr(train_mod.Trainer, "run_stage", refuse)
    assert main([*args, "--arm", "efpn", "--arm", "gated", "--test", str(test_cfg)]) == 0
    out = root / "s"
    summary = json.loads((out / "summary.json").read_text())
    test = summary["test"]
    assert test["source"] == str(test_cfg) and test["runs"] == ["seed0", "seed1"]
    assert set(test["rows"]) == {"fpn_1x", "fpn_2x", "efpn", "gated"}
    # the val rows are unchanged; the test rows are independent evaluations of the same
    # checkpoints on the other split
    data = load_data(load_config(test_cfg), root)[1]
    assert len(data.images) == 3
    cfg = load_config(root / "cfg.yaml")
    kw = dict(score_thresh=cfg.eval_score_thresh, size_reference=cfg.eval_size_reference)
    for i, run in enumerate(("seed0",)):  # one run is enough to check the wiring
        fpn, _ = model_from_checkpoint(out / run / "stage1" / "best.pt")
        for row, scale in (("fpn_1x", 1.0), ("fpn_2x", 2.0)):
            ref = evaluate_model(fpn, data, quiet=True, scale=scale, **kw)
            assert test["rows"][row]["AP"]["values"][i] == pytest.approx(ref["AP"])
        for row, merge in (("efpn", "exclusive"), ("gated", "gated")):
            model, _ = model_from_checkpoint(out / run / "efpn" / "stage3" / "best.pt", merge=merge)
            ref = evaluate_model(model, data, quiet=True, **kw)
            got = json.loads((out / run / "test.json").read_text())["rows"][row]
            assert got["AP"] == pytest.approx(ref["AP"]) and got["AR_small"] == pytest.approx(
                ref["AR_small"]
            )
    diff = np.subtract(test["rows"]["efpn"]["AP"]["values"], test["rows"]["fpn_1x"]["AP"]["values"])
    assert test["paired"]["efpn"]["AP"]["values"] == pytest.approx(diff.tolist())
    text = (out / "summary.md").read_text()
    assert "Held-out test set" in text and (out / "paired_test.png").exists()
    assert test["held_out"] is True
    # the study's own val split again with AP over one class (data.eval_classes): run,
    # but labelled as a second evaluation on val images, not as a held-out set
    val = load_data(cfg, root)[1]
    (root / "v").mkdir()
    again = write_tiny_config(
        root / "v",
        **{"distill.teacher_mode": "upsample_teacher", "data.eval_classes": val.classes[0]},
    )
    assert main([*args, "--arm", "efpn", "--arm", "gated", "--test", str(again)]) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["rows"] == summary["rows"]  # the val rows stay as they were
    assert second["test"]["held_out"] is False and second["test"]["source"] == str(again)
    val.eval_classes = [val.classes[0]]
    fpn, _ = model_from_checkpoint(out / "seed1" / "stage1" / "best.pt")
    ref = evaluate_model(fpn, val, quiet=True, **kw)
    assert second["test"]["rows"]["fpn_1x"]["AP"]["values"][1] == pytest.approx(ref["AP"])
    text = (out / "summary.md").read_text()
    assert "Second evaluation on" in text and "not held out" in text
    assert "Held-out test set" not in text
    # a "test set" holding training images is refused in one line
    train_json = load_data(cfg, root)[0].source
    leak = root / "leak"
    leak.mkdir()
    leaky = write_tiny_config(
        leak, **{"data.format": "coco", "data.train": train_json, "data.val": train_json}
    )
    capsys.readouterr()
    assert main([*args, "--arm", "efpn", "--test", str(leaky)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must not be trained on" in err
    # a test set of other classes is one line
    u = root / "u"
    u.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(u / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 10], "iscrowd": 0}
        ],
        "categories": [{"id": 1, "name": "zebra"}],
    }
    (u / "ann.json").write_text(json.dumps(coco))
    other = write_tiny_config(
        u,
        **{
            "data.format": "coco",
            "data.train": str(u / "ann.json"),
            "data.val": str(u / "ann.json"),
        },
    )
    capsys.readouterr()
    assert main([*args, "--arm", "efpn", "--test", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(other) in err


def _record_stages(monkeypatch) -> list:
    """``(run folder name, stage, init)`` of every ``Trainer.run_stage`` call, as it runs."""
    from efpn.engine import train as train_mod

    calls = []
    original = train_mod.Trainer.run_stage

    def spy(self, stage, resume=False, init=None):
        calls.append((self.out.name, stage, None if init is None else Path(init)))
        return original(self, stage, resume=resume, init=init)

    monkeypatch.setattr(train_mod.Trainer, "run_stage", spy)
    return calls


def test_fpn_longer_trains_the_runs_fpn_on_with_efpns_budget(study_run, monkeypatch):
    from efpn import study as study_mod
    from efpn.cli import main
    from efpn.config import load_config
    from efpn.engine.evaluate import evaluate_model
    from efpn.engine.train import load_data, model_from_checkpoint

    root, args = study_run
    out = root / "s"
    calls = _record_stages(monkeypatch)
    evaluated = []
    evaluate = study_mod._evaluate

    def spy(checkpoint, data, cfg, **kw):
        evaluated.append((Path(checkpoint), kw.get("scale", 1.0)))
        return evaluate(checkpoint, data, cfg, **kw)

    monkeypatch.setattr(study_mod, "_evaluate", spy)
    assert main([*args, "--arm", "efpn", "--arm", "fpn_longer"]) == 0
    # only the new arm trains, stage 1 only, from its run's FPN
    assert calls == [
        ("fpn_longer", 1, out / run / "stage1" / "best.pt") for run in ("seed0", "seed1")
    ]
    cfg = load_config(root / "cfg.yaml")
    for run in ("seed0", "seed1"):
        arm = load_config(out / run / "fpn_longer" / "config.yaml")
        epochs = cfg.stage2.optim.epochs + cfg.stage3.optim.epochs
        assert arm.stage1.optim.epochs == epochs and arm.stage1.optim.lr == cfg.stage3.optim.lr
        assert arm.data.scale_jitter == [] and arm.model == cfg.model
        base = torch.load(out / run / "stage1" / "best.pt", weights_only=True)["model"]
        longer = torch.load(out / run / "fpn_longer" / "stage1" / "best.pt", weights_only=True)
        assert set(longer["model"]) == set(base)  # an FPN, trained on
        assert any(not torch.equal(base[k], longer["model"][k]) for k in base)
    summary = json.loads((out / "summary.json").read_text())
    model, _ = model_from_checkpoint(out / "seed1" / "fpn_longer" / "stage1" / "best.pt")
    ref = evaluate_model(
        model,
        load_data(cfg, root)[1],
        quiet=True,
        score_thresh=cfg.eval_score_thresh,
        size_reference=cfg.eval_size_reference,
    )
    assert summary["rows"]["fpn_longer"]["AP"]["values"][1] == pytest.approx(ref["AP"])
    assert summary["paired_efpn"]["fpn_longer"]["AP"]["values"][1] == pytest.approx(
        ref["AP"] - summary["rows"]["efpn"]["AP"]["values"][1]
    )
    # the baseline FPN also at 2x input: is it still a teacher for arms that start from it
    # (the tiny models' metrics are all 0 here, so the call itself is checked)
    at_2x = [c for c in evaluated if c[1] == 2]
    assert at_2x == [
        (out / run / "fpn_longer" / "stage1" / "best.pt", 2) for run in ("seed0", "seed1")
    ]
    row = json.loads((out / "seed1" / "fpn_longer" / "metrics_2x.json").read_text())
    assert summary["rows_2x"]["fpn_longer"]["AR_small"]["values"][1] == row["AR_small"]
    assert summary["premise_baselines"]["fpn_longer"]["AP"]["values"][1] == pytest.approx(
        row["AP"] - ref["AP"]
    )
    assert "| fpn_longer@2x |" in (out / "summary.md").read_text()
    # and on a --test set (resumed: nothing trains again)
    from conftest import write_tiny_config

    (root / "t2").mkdir()
    test_cfg = write_tiny_config(
        root / "t2", **{"data.synth_seed": 6, "data.synth_train": 0, "data.synth_val": 2}
    )
    evaluated.clear()
    assert main([*args, "--arm", "efpn", "--arm", "fpn_longer", "--test", str(test_cfg)]) == 0
    assert [c for c in evaluated if c[1] == 2 and "fpn_longer" in c[0].parts] == at_2x
    test = json.loads((out / "summary.json").read_text())["test"]
    record = json.loads((out / "seed1" / "test.json").read_text())["rows"]
    assert test["rows_2x"]["fpn_longer"]["AP"]["values"][1] == record["fpn_longer@2x"]["AP"]
    assert "premise_baselines" in test
    assert set(summary["rows"]) == {"fpn_1x", "fpn_2x", "efpn", "fpn_longer"}
    with pytest.raises(ValueError, match="takes no key=value"):
        parse_arms([["fpn_longer", "stage1.optim.lr=0.1"]], cfg)
    # twice the budget: as many epochs after stage 1 as efpn_longer trains
    x2 = parse_arms([["fpn_longer_x2"]], cfg)[0]
    assert x2.baseline and x2.overrides["stage1.optim.epochs"] == 2 * epochs
    assert x2.overrides["stage1.optim.lr"] == cfg.stage3.optim.lr
    # multi-scale: the same budget, but the recipe's scale jitter is kept, so the FPN
    # stays a teacher at 2S; its EFPN arms start from it
    ms = parse_arms([["fpn_longer_ms"]], cfg)[0]
    longer = parse_arms([["fpn_longer"]], cfg)[0]
    assert ms.baseline and longer.overrides["data.scale_jitter"] == []
    assert "data.scale_jitter" not in ms.overrides
    assert {k: v for k, v in longer.overrides.items() if k != "data.scale_jitter"} == ms.overrides
    arms = parse_arms([["fpn_longer_ms"], ["fused_longer_ms"]], cfg)
    assert arms[1].start == "fpn_longer_ms" and arms[1].overrides == {"model.merge": "fused"}


def test_efpn_longer_adds_the_extension_to_fpn_longers_fpn(study_run, monkeypatch):
    from efpn.cli import main
    from efpn.config import load_config

    root, args = study_run
    out = root / "s"
    calls = _record_stages(monkeypatch)
    arms = ["--arm", "efpn", "--arm", "fpn_longer", "--arm", "efpn_longer", "--arm", "fused_longer"]
    assert main([*args, *arms]) == 0
    # stages 2-3 start from fpn_longer's FPN, not the run's; fused_longer only evaluates
    mine = [c for c in calls if c[0] in ("efpn_longer", "fused_longer")]
    assert mine == [
        call
        for run in ("seed0", "seed1")
        for call in (
            ("efpn_longer", 2, out / run / "fpn_longer" / "stage1" / "best.pt"),
            ("efpn_longer", 3, None),
        )
    ]
    cfg = load_config(root / "cfg.yaml")
    for run in ("seed0", "seed1"):
        longer = torch.load(out / run / "fpn_longer" / "stage1" / "best.pt", weights_only=True)
        own = torch.load(out / run / "stage1" / "best.pt", weights_only=True)["model"]
        efpn = torch.load(out / run / "efpn_longer" / "stage3" / "best.pt", weights_only=True)
        body = [k for k in longer["model"] if k.startswith("backbone.body.")]
        assert body and all(torch.equal(efpn["model"][k], longer["model"][k]) for k in body)
        assert any(not torch.equal(efpn["model"][k], own[k]) for k in body)
        assert any(k.startswith("backbone.extension.") for k in efpn["model"])
        fused = json.loads((out / run / "fused_longer" / "metrics.json").read_text())
        assert fused["checkpoint_of"] == "efpn_longer"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["starts"] == {"efpn_longer": "fpn_longer", "fused_longer": "fpn_longer"}
    rows = summary["rows"]
    for arm in ("efpn_longer", "fused_longer"):
        diff = np.subtract(rows[arm]["AP"]["values"], rows["fpn_longer"]["AP"]["values"])
        assert summary["paired_start"][arm]["AP"]["values"] == pytest.approx(diff.tolist())
    md = (out / "summary.md").read_text()
    assert "efpn_longer: fpn_longer" in md
    # the equal-training control: efpn and fpn_longer both train stages 2+3's epochs on
    # from stage 1; the arms on fpn_longer's FPN are paired with it in paired_start only
    e = cfg.stage2.optim.epochs + cfg.stage3.optim.epochs
    assert summary["epochs_after_stage1"] == {
        "efpn": e,
        "fpn_longer": e,
        "efpn_longer": 2 * e,
        "fused_longer": 2 * e,
    }
    control = summary["paired_baselines"]["fpn_longer"]
    assert list(control) == ["efpn"]
    diff = np.subtract(rows["efpn"]["AP"]["values"], rows["fpn_longer"]["AP"]["values"])
    assert control["efpn"]["AP"]["values"] == pytest.approx(diff.tolist())
    assert f"fpn_longer, the FPN trained on for {e} epoch(s) after stage 1 (as many as efpn)" in md
    x2 = parse_arms([["fpn_longer_x2"], ["mine", "start=fpn_longer_x2"], ["efpn"]], cfg)
    assert epochs_after_stage1(cfg, x2) == {"fpn_longer_x2": 2 * e, "mine": 3 * e, "efpn": e}
    # a start needs its baseline arm before it, and only a baseline arm
    with pytest.raises(ValueError, match="start=fpn_longer needs the baseline arm"):
        parse_arms([["efpn_longer"]], cfg)
    with pytest.raises(ValueError, match="start=efpn needs the baseline arm"):
        parse_arms([["efpn"], ["mine", "start=efpn", "distill.lam=0.5"]], cfg)
    arm = parse_arms([["fpn_longer"], ["mine", "start=fpn_longer", "distill.lam=0.5"]], cfg)[1]
    assert arm.start == "fpn_longer" and arm.overrides == {"distill.lam": 0.5}


def test_coco_ap_counts_only_the_evaluated_classes(tmp_path):
    from efpn.data.records import DetectionData, ImageRecord
    from efpn.engine.evaluate import evaluate_model

    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "a.png")
    boxes = np.array([[10.0, 10.0, 30.0, 30.0], [50.0, 50.0, 70.0, 70.0]])
    rec = ImageRecord("a.png", 100, 100, boxes, np.array([0, 1]), 1)
    oracle = _Oracle(torch.tensor(boxes[:1], dtype=torch.float32), 100, 100)  # finds x only
    both = DetectionData(tmp_path, ["x", "other"], [rec])
    assert evaluate_model(oracle, both, quiet=True)["AP"] == pytest.approx(0.5)
    only_x = DetectionData(tmp_path, ["x", "other"], [rec], eval_classes=["x"])
    assert evaluate_model(oracle, only_x, quiet=True)["AP"] == pytest.approx(1.0)


def test_study_and_demo_take_recipe_overrides(tmp_path, capsys):
    from conftest import write_tiny_config
    from efpn.cli import main

    cfg = write_tiny_config(tmp_path)
    argv = ["study", "--config", str(cfg), "--seeds", "1", "--out", str(tmp_path / "s")]
    assert main([*argv, "--set", "stage1.optim.lr=fast"]) == 2
    assert "stage1.optim.lr: expected a number" in capsys.readouterr().err
    assert (
        main(["demo", "--config", str(cfg), "--out", str(tmp_path / "d"), "stage1.optim.epochs=0"])
        == 2
    )
    assert "stage1.optim.epochs must be 1 or more" in capsys.readouterr().err


def test_premise_message_names_native_factors_for_fixed_scale_models():
    from efpn.engine.premise import premise_message

    line, holds = premise_message({"AP_small": 0.033}, {"AP_small": 0.031}, 512, 0.5)
    assert "at 0.5x native (1x), 0.031 at 1x native (2x)" in line and not holds


def test_eval_classes_key_sets_and_checks_the_evaluated_classes(tiny_cfg, tmp_path):
    from efpn.data.records import DataError
    from efpn.engine.train import load_data

    train, val = load_data(tiny_cfg(), tmp_path)
    assert train.eval_classes is None and val.eval_classes is None
    name = val.classes[1]
    train, val = load_data(tiny_cfg(**{"data.eval_classes": f" {name} ,"}), tmp_path)
    assert train.eval_classes == val.eval_classes == [name]
    with pytest.raises(DataError, match="no class 'nosuch'") as err:
        load_data(tiny_cfg(**{"data.eval_classes": f"{name},nosuch"}), tmp_path)
    assert len(str(err.value).splitlines()) == 1 and "train.json" in str(err.value)
    with pytest.raises(DataError, match="names no class"):
        load_data(tiny_cfg(**{"data.eval_classes": " , "}), tmp_path)


def test_paired_plot_adds_a_row_for_arms_paired_with_their_start_fpn(tmp_path):
    from efpn.study import METRICS, summarize
    from efpn.viz import plot_paired

    def row(base):
        return {m: base + 0.01 * i for i, m in enumerate(METRICS)}

    results = {
        f"seed{k}": {
            "fpn_1x": row(0.30 + k / 100),
            "fpn_2x": row(0.50),
            "fpn_longer_ms": row(0.40 + k / 50),
            "efpn_longer_ms": row(0.45 + k / 40),
        }
        for k in range(3)
    }
    runs = list(results)
    plain = summarize(results, runs, ["fpn_longer_ms"])
    started = summarize(
        results, runs, ["fpn_longer_ms", "efpn_longer_ms"], {"efpn_longer_ms": "fpn_longer_ms"}
    )
    a = Image.open(plot_paired(plain, tmp_path / "a.png"))
    b = Image.open(plot_paired(started, tmp_path / "b.png"))
    assert a.width == b.width and b.height > 1.8 * a.height
