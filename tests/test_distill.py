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
