import pytest
import torch

from efpn.distill import (
    box_mask,
    distillation_loss,
    fbb_loss,
    fbb_terms,
    freeze_all_but_new_modules,
    teacher_student_pair,
)
from efpn.models import efpn_resnet18_fpn, resnet_efpn_backbone


def test_fbb_loss_hand_computed_with_straddling_box():
    # 1 image, 2 channels, 4x4 map, stride 4 -> 16x16 image.
    student = torch.zeros(1, 2, 4, 4)
    target = torch.zeros(1, 2, 4, 4)
    target[0, 0] = torch.arange(16.0).view(4, 4)  # channel 0: 0..15
    target[0, 1] = 1.0  # channel 1: ones
    # Box x 3..9, y 5..7 straddles cells: cols floor(3/4)=0 .. ceil(9/4)=3 -> cols 0,1,2;
    # rows floor(5/4)=1 .. ceil(7/4)=2 -> row 1 only.
    boxes = [torch.tensor([[3.0, 5.0, 9.0, 7.0]])]
    mask = box_mask(boxes, (4, 4), 4)
    assert mask[0].nonzero().tolist() == [[1, 0], [1, 1], [1, 2]]
    glob = (sum(range(16)) + 16) / 32  # mean over 2*4*4 elements
    pos = ((4 + 5 + 6) + 3 * 1) / 6  # 3 cells x 2 channels
    g, p = fbb_terms(student, target, boxes, stride=4)
    assert g.item() == pytest.approx(glob)
    assert p.item() == pytest.approx(pos)
    assert fbb_loss(student, target, boxes, 4, lam=1.0).item() == pytest.approx(glob + pos)
    assert fbb_loss(student, target, boxes, 4, lam=0.5).item() == pytest.approx(glob + 0.5 * pos)
    assert fbb_loss(student, target, boxes, 4, lam=0.0).item() == pytest.approx(glob)


def test_fbb_no_boxes_and_shape_mismatch():
    s, t = torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3)
    g, p = fbb_terms(s, t, [torch.zeros(0, 4), torch.zeros(0, 4)], stride=2)
    assert g.item() == 1.0 and p.item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        fbb_terms(s, torch.zeros(2, 1, 4, 3), [torch.zeros(0, 4)] * 2, 2)


@pytest.mark.parametrize("mode", ["upsample_teacher", "downsample_student"])
@pytest.mark.parametrize("hw", [(64, 64), (96, 160), (70, 90)])
def test_teacher_and_student_maps_line_up(mode, hw):
    bb = resnet_efpn_backbone("resnet18").eval()
    images = torch.rand(1, 3, *hw)
    boxes = [torch.tensor([[4.0, 4.0, 20.0, 18.0]])]
    teacher_in, student_in, sboxes = teacher_student_pair(images, boxes, mode)
    with torch.no_grad():
        t, _, _ = bb.forward_pyramid(teacher_in)
        s = bb.forward_all(student_in)
    assert s["p2x"].shape == t["0"].shape
    assert s["p3x"].shape == t["1"].shape
    if mode == "downsample_student":
        assert torch.equal(sboxes[0], boxes[0] / 2)
    terms = distillation_loss(bb, images, boxes, mode=mode)
    assert set(terms) == {"loss_distill", "glob_p3", "pos_p3", "glob_p2", "pos_p2"}
    expected = terms["glob_p2"] + terms["pos_p2"] + terms["glob_p3"] + terms["pos_p3"]
    assert torch.allclose(terms["loss_distill"], expected)
    no_ftt = distillation_loss(bb, images, boxes, mode=mode, ftt_loss=False, lam=0.0)
    assert torch.allclose(no_ftt["loss_distill"], no_ftt["glob_p2"])


def test_stage2_only_new_modules_receive_gradients():
    model = efpn_resnet18_fpn(num_classes=3, trainable_backbone_layers=5)
    trainable = freeze_all_but_new_modules(model)
    assert trainable and all(n.startswith("backbone.extension.") for n in trainable)
    images = torch.rand(2, 3, 64, 64)
    boxes = [torch.tensor([[8.0, 8.0, 20.0, 20.0]]), torch.tensor([[30.0, 30.0, 40.0, 44.0]])]
    distillation_loss(model.backbone, images, boxes)["loss_distill"].backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone.extension."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def _checkerboard(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((yy + xx) % 2).float().expand(3, size, size).clone()


def test_source_teacher_equals_an_independent_resize_of_the_source_to_2s():
    import torch.nn.functional as F

    from efpn.distill import source_teacher_batch
    from efpn.models import efpn_resnet18_fpn

    model = efpn_resnet18_fpn(num_classes=3, min_size=64, max_size=64, out_channels=16)
    model.train()
    tr = model.transform
    sources = [torch.rand(3, 100, 100), torch.rand(3, 300, 150)]  # up- and downsampled
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 20.0, 20.0]]), "labels": torch.tensor([1])}] * 2
    image_list, _ = tr(sources, [dict(t) for t in targets])
    teacher = source_teacher_batch(
        sources,
        image_list.image_sizes,
        image_list.tensors.shape,
        mean=tr.image_mean,
        std=tr.image_std,
    )
    n, _, h, w = image_list.tensors.shape
    assert teacher.shape == (n, 3, 2 * h, 2 * w)
    mean = torch.tensor(tr.image_mean)[:, None, None]
    std = torch.tensor(tr.image_std)[:, None, None]
    for i, src in enumerate(sources):
        sh, sw = image_list.image_sizes[i]
        assert (2 * sh, 2 * sw) != tuple(src.shape[-2:])
        want = F.interpolate(
            src[None], size=(2 * sh, 2 * sw), mode="bilinear", antialias=2 * sh < src.shape[1]
        )[0]
        torch.testing.assert_close(teacher[i, :, : 2 * sh, : 2 * sw], (want - mean) / std)
        assert teacher[i, :, 2 * sh :, :].abs().sum() == 0  # padding stays zero
        assert teacher[i, :, :, 2 * sw :].abs().sum() == 0


def test_one_pixel_pattern_of_a_2s_source_survives_in_the_teacher_not_the_student():
    from efpn.distill import source_teacher_batch
    from efpn.models import efpn_resnet18_fpn

    s = 64
    model = efpn_resnet18_fpn(num_classes=3, min_size=s, max_size=s, out_channels=16)
    tr = model.transform
    source = _checkerboard(2 * s)
    image_list, _ = tr([source], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long()}])
    assert image_list.image_sizes[0] == (s, s)
    student = image_list.tensors[0] * torch.tensor(tr.image_std)[:, None, None]
    teacher = (
        source_teacher_batch(
            [source],
            image_list.image_sizes,
            image_list.tensors.shape,
            mean=tr.image_mean,
            std=tr.image_std,
        )[0]
        * torch.tensor(tr.image_std)[:, None, None]
    )
    assert student.std(dim=(1, 2)).max() < 1e-4  # the 1x view averages the pattern away
    assert teacher.std(dim=(1, 2)).min() > 0.45  # the 2x view keeps it, pixel for pixel
    torch.testing.assert_close(teacher[0], (source[0] - tr.image_mean[0]) * 1.0, atol=1e-5, rtol=0)
    # the old behaviour, an upsampled student batch, would have lost it too
    up, _, _ = teacher_student_pair(image_list.tensors, [torch.zeros(0, 4)], "upsample_teacher")
    assert up[0].std(dim=(1, 2)).max() < 1e-3


def test_stage2_loss_uses_the_source_pixels_in_upsample_teacher_mode(tiny_cfg, monkeypatch):
    import efpn.distill as distill_mod
    from efpn.engine import train as train_mod

    cfg = tiny_cfg(**{"distill.teacher_mode": "upsample_teacher"})
    model = train_mod.build_model(cfg, 3, extended=True).train()
    seen = {}
    original = distill_mod.teacher_student_pair

    def spy(images, boxes, mode, teacher_images=None):
        seen["teacher"] = teacher_images
        return original(images, boxes, mode, teacher_images=teacher_images)

    monkeypatch.setattr(distill_mod, "teacher_student_pair", spy)
    source = _checkerboard(2 * cfg.model.min_size)
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0]]), "labels": torch.tensor([1])}
    losses = train_mod.StageLoss(model, 2, cfg)([source], [target])
    assert torch.isfinite(losses["loss"])
    assert seen["teacher"] is not None
    assert seen["teacher"][0].std(dim=(1, 2)).min() > 0.45 / 0.23  # normalised by std
