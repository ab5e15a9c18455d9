import json
import pickle
import re
import warnings

import pytest
import torch

from efpn.engine.checkpoint import load_checkpoint, save_checkpoint
from efpn.engine.train import Trainer, advance_schedule, model_from_checkpoint
from efpn.models.heads import ohem_select


def test_three_stages_end_to_end(tmp_path, tiny_cfg):
    trainer = Trainer(tiny_cfg(), tmp_path / "run", quiet=True)
    metrics = trainer.run([1, 2, 3])
    for s in (1, 2, 3):
        d = tmp_path / "run" / f"stage{s}"
        assert (
            (d / "best.pt").exists()
            and (d / "last.pt").exists()
            and (d / "metrics.csv").exists()
            and (d / "losses.png").exists()
        )
    header = (tmp_path / "run" / "stage2" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"glob_p2", "pos_p2", "glob_p3", "pos_p3"} <= set(header)
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(ev["tt100k"]) == {"overall", "small", "medium", "large"}
    assert 0 <= metrics["AP_small"] <= 1 or metrics["AP_small"] == -1
    assert (tmp_path / "run" / "config.yaml").exists() and (
        tmp_path / "run" / "accuracy_recall.png"
    ).exists()
    model, ckpt = model_from_checkpoint(tmp_path / "run" / "stage3" / "best.pt")
    assert model.extended and ckpt["classes"] and ckpt["stage"] == 3


def test_resume_is_exact(tmp_path, tiny_cfg):
    cfg = tiny_cfg(**{"stage1.optim.epochs": 2, "data.synth_train": 6})
    full = Trainer(cfg, tmp_path / "full", quiet=True)
    full.run_stage(1)
    part = Trainer(cfg, tmp_path / "part", quiet=True, stop_after_steps=4)
    part.run_stage(1)  # interrupted mid epoch 2 (3 steps per epoch)
    assert load_checkpoint(tmp_path / "part" / "stage1" / "last.pt")["step"] == 4
    Trainer(cfg, tmp_path / "part", quiet=True).run_stage(1, resume=True)
    a = load_checkpoint(tmp_path / "full" / "stage1" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "stage1" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stage2_leaves_frozen_parts_unchanged(tmp_path, tiny_cfg):
    trainer = Trainer(tiny_cfg(), tmp_path / "run", quiet=True)
    trainer.run_stage(1)
    before = load_checkpoint(tmp_path / "run" / "stage1" / "best.pt")["model"]
    # --resume on a stage that has not started yet must still start from stage 1's best.
    trainer.run_stage(2, resume=True)
    after = load_checkpoint(tmp_path / "run" / "stage2" / "last.pt")["model"]
    changed_new = False
    for k, v in after.items():
        if k.startswith("backbone.extension."):
            changed_new = True
            continue
        if k.startswith("roi_heads.small_"):
            continue
        assert torch.equal(before[k], v), k
    assert changed_new


@pytest.fixture(scope="module")
def fused_stage2_run(tmp_path_factory):
    """A tiny run with the fused merge trained through stages 1-2."""
    from conftest import write_tiny_config
    from efpn.config import load_config

    root = tmp_path_factory.mktemp("fused")
    cfg = load_config(write_tiny_config(root, **{"model.merge": "fused"}))
    trainer = Trainer(cfg, root / "run", quiet=True)
    trainer.run_stage(1)
    trainer.run_stage(2)
    return root / "run"


@pytest.mark.parametrize("train_all", [False, True])
def test_stage3_trains_the_p2_head_or_with_train_all_every_layer(
    tmp_path, tiny_cfg, monkeypatch, fused_stage2_run, train_all
):
    import shutil

    from efpn.models.heads import EFPNRoIHeads, small_roi_mask

    cfg = tiny_cfg(**{"stage3.train_all": train_all, "model.merge": "fused"})
    shutil.copytree(fused_stage2_run, tmp_path / "run")
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    seen_small = []
    original_predict = EFPNRoIHeads.original_predict

    def recording(self, features, boxes, image_shapes):
        if self.training:
            seen_small.append(any(small_roi_mask(b, self.small_roi_size).any() for b in boxes))
        return original_predict(self, features, boxes, image_shapes)

    monkeypatch.setattr(EFPNRoIHeads, "original_predict", recording)
    trainer.run_stage(3)
    before = load_checkpoint(tmp_path / "run" / "stage2" / "best.pt")["model"]
    after = load_checkpoint(tmp_path / "run" / "stage3" / "last.pt")["model"]
    moved = {k for k, v in after.items() if v.is_floating_point() and not torch.equal(before[k], v)}
    others = ("backbone.body.", "backbone.fpn.", "rpn.", "roi_heads.box_predictor.")
    assert any(k.startswith("roi_heads.small_box_predictor.") for k in moved)
    assert any(k.startswith(others) for k in moved) == train_all
    if train_all:
        for prefix in others:  # every part of the detector learns
            assert any(k.startswith(prefix) for k in moved), prefix
    # with train_all and the fused merge, the original head also learns small RoIs, which
    # it scores at inference; otherwise it never sees them in training
    assert seen_small and any(seen_small) == train_all


def test_train_all_is_refused_before_stage_3(tiny_cfg):
    with pytest.raises(ValueError, match=r"stage2.train_all applies to stage 3 only"):
        tiny_cfg(**{"stage2.train_all": True})


def test_ohem_keeps_hardest_by_rule():
    labels = torch.tensor([1, 2, 0, 0, 0, 1, -1, 0])
    cls = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.7, 0.3, 5.0, 0.05])
    box = torch.tensor([0.9, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0])
    keep = ohem_select(cls, box, labels, batch_size=4, positive_fraction=0.5)
    # positives ranked by cls+box: idx0 (1.0) > idx1 (0.5) > idx5 (0.4); 2 kept
    # negatives by cls: idx2 (0.9) > idx4 (0.7); the ignored RoI (-1) is never chosen
    assert keep.tolist() == [0, 1, 2, 4]
    keep = ohem_select(cls, box, labels, batch_size=6, positive_fraction=0.25)
    assert keep.tolist() == [0, 2, 4, 3, 7]


def test_checkpoint_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Evil()}, path)
    with pytest.raises(ValueError, match="not a safe") as err:
        load_checkpoint(path)
    # one line with the reason, and never torch's advice to load with weights_only=False
    message = str(err.value)
    assert "\n" not in message and "weights_only=False" not in message
    assert "weights_only` set to `False" not in message and "print" in message
    (tmp_path / "junk.pt").write_text("garbage")
    with pytest.raises(ValueError, match="junk.pt: not a safe") as err:
        load_checkpoint(tmp_path / "junk.pt")
    assert "\n" not in str(err.value) and "False" not in str(err.value)
    ok = save_checkpoint({"a": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint(ok)["a"], torch.ones(2))
    assert not list(tmp_path.glob(".ok.pt.*"))  # the temporary file was renamed away
    assert pickle  # pickle protocol is what weights_only guards against


def test_nan_loss_skipped_then_aborts(tmp_path, monkeypatch, tiny_cfg):
    cfg = tiny_cfg(**{"stage1.optim.max_bad_steps": 2, "data.synth_train": 6})
    from efpn.engine import train as train_mod

    original = train_mod.StageLoss.forward

    def nan_forward(self, images, targets):
        out = original(self, images, targets)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_mod.StageLoss, "forward", nan_forward)
    with pytest.raises(RuntimeError, match="2 non-finite losses in a row"):
        Trainer(cfg, tmp_path / "nan", quiet=True).run_stage(1)


def test_scale_jitter_trains_stage1_at_the_drawn_sizes_and_tests_at_min_size(tiny_cfg):
    from efpn.engine.train import build_model

    cfg = tiny_cfg()
    cfg.data.scale_jitter = [64, 96]
    cfg.model.max_size = 1000
    image = torch.rand(3, 120, 150)
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1])}
    torch.manual_seed(0)
    baseline = build_model(cfg, 3, extended=False).train()
    sides = {min(baseline.transform([image], [dict(target)])[0].image_sizes[0]) for _ in range(20)}
    assert sides == {64, 96, cfg.model.min_size}
    baseline.eval()
    assert min(baseline.transform([image])[0].image_sizes[0]) == cfg.model.min_size
    # stages 2-3 train the extension at the test scale S (the teacher sees 2S)
    extended = build_model(cfg, 3, extended=True).train()
    sides = {min(extended.transform([image], [dict(target)])[0].image_sizes[0]) for _ in range(10)}
    assert sides == {cfg.model.min_size}


def _ohem_model(**kw):
    from efpn.models import efpn_resnet18_fpn

    torch.manual_seed(0)
    model = efpn_resnet18_fpn(
        num_classes=3,
        out_channels=16,
        representation_size=32,
        sr_kwargs={"width": 8},
        small_roi_size=24,
        anchor_sizes=(8, 16, 32, 64, 128),
        **kw,
    )
    model.roi_heads.ohem = True
    model.roi_heads.ohem_batch_size_per_image = 16
    return model.train()


def test_ohem_loss_is_finite_for_an_image_without_boxes():
    model = _ohem_model(min_size=96, max_size=96)
    images = [torch.rand(3, 96, 96), torch.rand(3, 96, 96)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 22.0, 20.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # negative image
    ]
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_box_reg_small"]) and torch.isfinite(
        losses["loss_classifier_small"]
    )
    sum(losses.values()).backward()
    grads = [p.grad for p in model.roi_heads.small_box_head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_ohem_handles_an_image_with_boxes_but_no_small_proposal(monkeypatch):
    model = _ohem_model(min_size=96, max_size=96)
    heads = model.roi_heads
    # the RPN proposes only large boxes and the one object is large: no small RoI at all
    big = torch.tensor([[0.0, 0.0, 90.0, 90.0], [5.0, 5.0, 80.0, 70.0]])
    orig = type(model.rpn).forward
    monkeypatch.setattr(
        type(model.rpn), "forward", lambda self, *a, **k: ([big.clone()], orig(self, *a, **k)[1])
    )
    target = {"boxes": torch.tensor([[2.0, 2.0, 88.0, 85.0]]), "labels": torch.tensor([2])}
    losses = model([torch.rand(3, 96, 96)], [target])
    assert heads.ohem and torch.isfinite(losses["loss_classifier_small"])


def test_ohem_two_passes_give_the_one_pass_loss_and_gradient():
    from efpn.models.heads import _per_roi_losses

    model = _ohem_model(min_size=96, max_size=96)
    heads = model.roi_heads
    torch.manual_seed(1)
    images = [torch.rand(3, 96, 96), torch.rand(3, 96, 96)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 22.0, 20.0], [40.0, 50.0, 52.0, 66.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[60.0, 8.0, 70.0, 18.0]]), "labels": torch.tensor([2])},
    ]
    xy = torch.rand(2, 300, 2) * 80
    wh = torch.rand(2, 300, 2) * 30 + 2
    proposals = [torch.cat([xy[i], xy[i] + wh[i]], 1) for i in range(2)]
    image_list, targets_t = model.transform(images, targets)
    sizes = image_list.image_sizes
    params = list(heads.small_box_head.parameters()) + list(model.backbone.extension.parameters())

    def grads():
        out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        model.zero_grad(set_to_none=True)
        return out

    # reference: every small RoI through the head with autograd, loss on the selected ones
    features = model.backbone(image_list.tensors)
    boxes, labels, regression = heads._label_all_small(proposals, targets_t)
    logits, deltas = heads.small_predict(features, boxes, sizes)
    cls, box = _per_roi_losses(logits, deltas, torch.cat(labels), torch.cat(regression))
    keep, offset = [], 0
    for lab in labels:
        sel = ohem_select(
            cls[offset : offset + lab.numel()].detach(),
            box[offset : offset + lab.numel()].detach(),
            lab,
            16,
            heads.ohem_positive_fraction,
        )
        keep.append(sel + offset)
        offset += lab.numel()
    keep = torch.cat(keep)
    assert 16 < keep.numel() < cls.numel()  # both images fill their batch; most RoIs are left out
    ref_cls, ref_box = cls[keep].sum() / keep.numel(), box[keep].sum() / keep.numel()
    (ref_cls + ref_box).backward()
    ref_grads = grads()

    features = model.backbone(image_list.tensors)
    losses = heads._training_losses(features, proposals, sizes, targets_t)
    (losses["loss_classifier_small"] + losses["loss_box_reg_small"]).backward()
    assert torch.allclose(losses["loss_classifier_small"], ref_cls, atol=1e-6)
    assert torch.allclose(losses["loss_box_reg_small"], ref_box, atol=1e-6)
    new_grads = grads()
    assert any(g.abs().sum() > 0 for g in ref_grads)
    for a, b in zip(new_grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_step_skipped_by_mixed_precision_advances_the_schedule_without_a_warning():
    # GradScaler skips optimizer.step() while it looks for a loss scale; the schedule
    # counts iterations, so it moves on and torch's call-order warning is not shown
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5**it)
    with pytest.warns(UserWarning, match="lr_scheduler"):  # what a bare step() would show
        torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([w], lr=1.0), lambda it: 1.0).step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        advance_schedule(sched)
    assert sched.get_last_lr() == [0.5]


def test_p2x_stride_is_known_for_small_inputs():
    from efpn.models import efpn_resnet18_fpn

    model = efpn_resnet18_fpn(num_classes=3, out_channels=16, min_size=40, max_size=400).eval()
    with torch.no_grad():
        for h, w in [(33, 200), (40, 61), (50, 50), (67, 90)]:
            out = model([torch.rand(3, h, w)])[0]
            assert out["boxes"].shape[-1] == 4


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("stage1.optim.lr", float("nan"), "stage1.optim.lr: expected a finite number"),
        ("stage2.optim.lr", -0.1, "stage2.optim.lr must be positive"),
        ("stage1.optim.epochs", 1.5, "stage1.optim.epochs: expected a whole number"),
        ("stage1.optim.epochs", "three", "stage1.optim.epochs: expected a whole number"),
        ("stage3.optim.epochs", 0, "stage3.optim.epochs must be 1 or more"),
        ("stage1.optim.batch_size", 0, "stage1.optim.batch_size must be 1 or more"),
        ("model.min_size", "big", "model.min_size: expected a whole number"),
        ("distill.teacher_mode", "other", "distill.teacher_mode must be"),
        ("name", "../../x", "name must be a plain folder name"),
        ("stage1.optim.lr2", 1, "unknown key 'stage1.optim.lr2'"),
    ],
)
def test_recipe_values_are_checked_when_loaded(tiny_cfg, key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        tiny_cfg(**{key: value})
    assert "cfg.yaml" in str(err.value) and "\n" not in str(err.value)


def test_recipe_accepts_exponent_strings_and_refuses_a_missing_gpu(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"stage1.optim.lr": "1e-3"})  # YAML 1.1 reads 1e-3 as a string
    assert cfg.stage1.optim.lr == pytest.approx(1e-3)
    if not torch.cuda.is_available():
        cfg.device = "cuda"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            Trainer(cfg, tmp_path / "run", quiet=True)


def test_ctrl_c_mid_step_resumes_exactly(tmp_path, tiny_cfg, monkeypatch):
    import os
    import signal

    from efpn.engine import train as train_mod

    cfg = tiny_cfg(**{"stage1.optim.epochs": 2, "data.synth_train": 6, "checkpoint_every": 0})
    full = Trainer(cfg, tmp_path / "full", quiet=True)
    full.run_stage(1)

    original = train_mod.StageLoss.forward
    calls = {"n": 0}

    def interrupting_forward(self, images, targets):
        out = original(self, images, targets)  # batch norm statistics already updated
        calls["n"] += 1
        if calls["n"] == 4:  # inside step 4, mid epoch 2 (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(train_mod.StageLoss, "forward", interrupting_forward)
    # whatever the caller had (a background job's shell ignores SIGINT) comes back
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "part", quiet=True).run_stage(1)
    monkeypatch.setattr(train_mod.StageLoss, "forward", original)
    assert load_checkpoint(tmp_path / "part" / "stage1" / "last.pt")["step"] == 4  # finished
    assert signal.getsignal(signal.SIGINT) is before
    Trainer(cfg, tmp_path / "part", quiet=True).run_stage(1, resume=True)
    a = load_checkpoint(tmp_path / "full" / "stage1" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "stage1" / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_every_recipe_key_is_documented():
    import dataclasses
    from pathlib import Path

    from efpn.config import Config

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            default = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
            if dataclasses.is_dataclass(default):
                yield from keys(type(default), "optim." if f.name == "optim" else "")
            else:
                yield prefix + f.name

    missing = sorted({k for k in keys(Config) if f"`{k}`" not in doc})
    assert not missing, f"docs/config.md does not document {missing}"
    from efpn.config_docs import key_help, render_markdown

    assert doc == render_markdown(), "docs/config.md is stale: efpn config docs > docs/config.md"
    helps = key_help()
    dotted = [
        f"{s}.{f}"
        for s in ("data", "model", "distill")
        for f in dataclasses.asdict(getattr(Config(), s))
    ]
    assert not [k for k in dotted if k not in helps]


def test_config_show_comments_every_key(tmp_path, capsys):
    from efpn.cli import main

    assert main(["config", "show", "stage1.optim.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "    epochs: 3  # epochs (a whole number, 1 or more)." in out
    assert "  min_size: 512  # the test scale S" in out
    body = [ln for ln in out.splitlines() if not ln.rstrip().endswith(":")]
    assert body and all("  # " in ln for ln in body)
    # ``--set KEY=VALUE`` (as in efpn study) and key=value arguments combine
    assert main(["config", "show", "--set", "model.min_size=200", "stage1.optim.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "  min_size: 200  # the test scale S" in out
    assert "    epochs: 3  # epochs (a whole number, 1 or more)." in out


def test_logs_without_a_terminal_are_timestamped_lines(tmp_path, tiny_cfg, capsys):
    cfg = tiny_cfg(**{"log_every": 1})
    Trainer(cfg, tmp_path / "run", quiet=False).run_stage(1)  # pytest's streams are no tty
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if "stage 1" in ln]
    assert any(
        re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] stage 1 epoch 1/1 step 1/2 loss", ln)
        for ln in lines
    )
    assert any("stage 1 epoch 1: AP" in ln for ln in lines)
    assert "\r" not in out.out + out.err
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert any("stage 1 epoch 1/1 step 1/2 loss" in ln for ln in log)
    assert all(re.match(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ", ln) for ln in log)
    # best.pt and the finished stage's last.pt keep no optimiser state
    for name in ("best.pt", "last.pt"):
        assert "optimizer" not in load_checkpoint(tmp_path / "run" / "stage1" / name)


def test_best_is_the_last_epoch_when_the_metric_never_moves(tmp_path, tiny_cfg, monkeypatch):
    from efpn.engine import train as train_mod

    real = train_mod.evaluate_model

    def flat(*a, **k):
        m = real(*a, **k)
        m["AP_small"] = 0.0
        return m

    monkeypatch.setattr(train_mod, "evaluate_model", flat)
    cfg = tiny_cfg(**{"stage1.optim.epochs": 2})
    Trainer(cfg, tmp_path / "run", quiet=True).run_stage(1)
    assert load_checkpoint(tmp_path / "run" / "stage1" / "best.pt")["epoch"] == 2


def test_training_resizes_balancing_crops_by_their_source(tiny_cfg, tmp_path, monkeypatch):
    from efpn.engine.train import Trainer
    from efpn.models.transform import ExportableTransform

    calls = []
    original = ExportableTransform.resize_by_source

    def counting(self, image, target):
        calls.append(tuple(int(v) for v in target["source_size"]))
        return original(self, image, target)

    monkeypatch.setattr(ExportableTransform, "resize_by_source", counting)
    cfg = tiny_cfg(**{"data.balance_per_class": 2, "data.balance_crop": 48})
    Trainer(cfg, tmp_path / "run", quiet=True).run_stage(1)
    assert calls and set(calls) == {(96, 96)}  # every crop, at its 96-px source's factor
