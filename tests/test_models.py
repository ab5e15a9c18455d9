import itertools

import pytest
import torch
from torchvision.models import resnet50
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FasterRCNN, fasterrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from efpn.models import (
    FeatureTextureTransfer,
    SubPixelUpsample,
    efpn_resnet18_fpn,
    efpn_resnet50_fpn,
    load_baseline_state_dict,
    new_module_keys,
    pixel_shuffle_eq4,
    resnet_efpn_backbone,
    roi_level,
    small_roi_mask,
)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return resnet_efpn_backbone("resnet18", extended=True).eval()


@pytest.mark.parametrize("hw", [(128, 128), (96, 160), (101, 77)])
def test_pyramid_keys_order_strides_shapes(backbone, hw):
    h, w = hw
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, h, w))
    assert list(out) == ["p2x", "0", "1", "2", "3", "pool"]
    assert backbone.out_channels == 256
    # Conv output of stride-2 stages is ceil(in / 2); each level halves the previous.
    size = (h, w)
    expected = {}
    size = tuple((s + 1) // 2 for s in size)  # stem, stride 2
    expected["p2x"] = size
    for name in ["0", "1", "2", "3", "pool"]:
        size = tuple((s + 1) // 2 for s in size)
        expected[name] = size
    for name, t in out.items():
        assert t.shape[0] == 1 and t.shape[1] == 256
        assert tuple(t.shape[-2:]) == expected[name], name
    if h % 64 == 0 and w % 64 == 0:
        strides = {"p2x": 2, "0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
        for name, s in strides.items():
            assert out[name].shape[-2:] == (h // s, w // s)


def test_c2_prime_shares_layer1_parameters(backbone):
    layer1 = backbone.body.layer1
    # No copy of layer1 anywhere: every conv parameter object of the model appears once.
    ids = [id(p) for p in backbone.parameters()]
    assert len(ids) == len(set(ids))
    assert not any("layer1" in n for n, _ in backbone.extension.named_parameters())
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = backbone(x)
        layer1[0].conv1.weight.add_(0.5)
        after = backbone(x)
        layer1[0].conv1.weight.sub_(0.5)
    assert not torch.allclose(before["0"], after["0"])
    assert not torch.allclose(before["p2x"], after["p2x"])


def test_subpixel_matches_eq4_elementwise():
    torch.manual_seed(1)
    r, c, h, w = 2, 3, 4, 5
    f = torch.randn(1, c * r * r, h, w)
    out = pixel_shuffle_eq4(f, r)
    assert out.shape == (1, c, r * h, r * w)
    # Eq. (4) with F in H x W x C*r^2 layout: PS(F)[x, y, ch] = F[x//r, y//r, C*r*(y%r) + C*(x%r) + ch]
    for x, y, ch in itertools.product(range(r * h), range(r * w), range(c)):
        src = c * r * (y % r) + c * (x % r) + ch
        assert out[0, ch, x, y] == f[0, src, x // r, y // r]
    up = SubPixelUpsample(8, c, 2)
    z = torch.randn(2, 8, h, w)
    assert torch.equal(up(z), pixel_shuffle_eq4(up.conv(z), 2))


def test_ftt_follows_eq3():
    torch.manual_seed(0)
    ftt = FeatureTextureTransfer(16, content_blocks=2, texture_blocks=2).eval()
    assert len([m for m in ftt.content_extractor if m.__class__.__name__ == "ResidualBlock"]) == 2
    p2, p3 = torch.randn(1, 16, 8, 10), torch.randn(1, 16, 4, 5)
    content = ftt.upsample(ftt.content_extractor(p3))
    expected = ftt.texture_out(ftt.texture_extractor(torch.cat([p2, content], 1))) + content
    assert torch.allclose(ftt(p2, p3), expected)


def test_roi_level_eq2_extended_to_p2x():
    boxes = torch.tensor([[0, 0, 50, 50], [0, 0, 60, 60], [0, 0, 120, 120], [0, 0, 230, 230.0]])
    assert roi_level(boxes).tolist() == [1, 2, 3, 4]
    assert small_roi_mask(boxes, 56).tolist() == [True, False, False, False]


def _detector(**kw):
    torch.manual_seed(0)
    return efpn_resnet18_fpn(
        num_classes=4,
        min_size=128,
        max_size=128,
        box_score_thresh=0.0,
        rpn_post_nms_top_n_test=50,
        **kw,
    )


def test_routing_small_and_large_rois():
    model = _detector().eval()
    rh = model.roi_heads
    calls = {"small": [], "orig": []}
    rh.small_box_head.register_forward_hook(lambda m, i, o: calls["small"].append(o.shape[0]))
    rh.box_head.register_forward_hook(lambda m, i, o: calls["orig"].append(o.shape[0]))
    pooled = {}
    orig_pool = rh.pool_small

    def spy(p2x, boxes, shapes):
        pooled["p2x_shape"] = p2x.shape
        pooled["boxes"] = torch.cat(boxes)
        return orig_pool(p2x, boxes, shapes)

    rh.pool_small = spy
    img = torch.rand(3, 128, 128)
    with torch.no_grad():
        feats = model.backbone(model.transform([img])[0].tensors)
        props = [
            torch.tensor([[10.0, 10.0, 60.0, 60.0], [20.0, 20.0, 80.0, 80.0]])
        ]  # 50 px and 60 px
        dets, _ = rh(feats, props, [(128, 128)])
    assert calls["small"] == [1] and calls["orig"] == [1]
    assert torch.equal(pooled["boxes"], props[0][:1])
    assert pooled["p2x_shape"][-1] == 64  # pooled from the stride-2 map
    assert dets[0]["boxes"].shape[1] == 4


@pytest.mark.parametrize("merge", ["exclusive", "duplicate"])
def test_merge_modes_give_valid_detections(merge):
    model = _detector(merge=merge).eval()
    rh = model.roi_heads
    seen = []
    rh.box_head.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    img = torch.rand(3, 128, 128)
    with torch.no_grad():
        feats = model.backbone(model.transform([img])[0].tensors)
        props = [torch.tensor([[10.0, 10.0, 60.0, 60.0], [20.0, 20.0, 80.0, 80.0]])]
        dets, _ = rh(feats, props, [(128, 128)])
    assert seen == ([1] if merge == "exclusive" else [2])
    d = dets[0]
    assert d["boxes"].shape[0] == d["scores"].shape[0] == d["labels"].shape[0] > 0
    assert (d["boxes"][:, 2:] >= d["boxes"][:, :2]).all()
    assert ((d["labels"] >= 1) & (d["labels"] < 4)).all()
    assert ((d["scores"] >= 0) & (d["scores"] <= 1)).all()
    with torch.no_grad():
        full = model([img])[0]
    assert (full["boxes"] >= 0).all() and (full["boxes"] <= 128).all()


def test_forward_backward_two_tiny_images():
    model = _detector().train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 128, 100)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 22.0, 26.0], [40.0, 30.0, 100.0, 90.0]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[5.0, 5.0, 15.0, 13.0]]), "labels": torch.tensor([3])},
    ]
    losses = model(images, targets)
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_classifier_small",
        "loss_box_reg_small",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    ext_grad = model.backbone.extension.lateral.weight.grad
    small_grad = model.roi_heads.small_box_predictor.cls_score.weight.grad
    assert ext_grad is not None and ext_grad.abs().sum() > 0
    assert small_grad is not None and small_grad.abs().sum() > 0


def test_sr_module_variants_and_ftt_input():
    for sr in ["ftt", "espcn", "nearest"]:
        bb = resnet_efpn_backbone("resnet18", sr_module=sr).eval()
        with torch.no_grad():
            out = bb.forward_all(torch.rand(1, 3, 64, 64))
        assert out["p3x"].shape == out["0"].shape
    bb = resnet_efpn_backbone("resnet18", ftt_input="inner").eval()
    seen = {}
    bb.extension.sr.register_forward_hook(lambda m, i, o: seen.update(p2=i[0]))
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64)
        pyramid, _, inners = bb.forward_pyramid(x)
        bb(x)
    assert torch.equal(seen["p2"], inners[0])
    assert not torch.equal(seen["p2"], pyramid["0"])
    with pytest.raises(ValueError, match="sr_module"):
        resnet_efpn_backbone("resnet18", sr_module="bicubic")


def _torchvision_reference():
    torch.manual_seed(0)
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    return FasterRCNN(backbone, num_classes=91, min_size=160, max_size=160, box_score_thresh=0.0)


def test_torchvision_parity_identical_detections():
    ref = _torchvision_reference().eval()
    # Give the frozen BN real statistics so the check is not trivially on identity BN.
    g = torch.Generator().manual_seed(3)
    state = ref.state_dict()
    for k, v in state.items():
        if k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            state[k] = torch.randn(v.shape, generator=g) * 0.1
    ref.load_state_dict(state)
    ours = efpn_resnet50_fpn(
        extended=False, num_classes=91, min_size=160, max_size=160, box_score_thresh=0.0
    ).eval()
    ours.load_state_dict(state, strict=True)
    img = torch.rand(3, 150, 170)
    with torch.no_grad():
        a = ref([img])[0]
        b = ours([img])[0]
    assert a["boxes"].shape[0] > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[key], b[key]), key


def test_torchvision_builder_state_dict_keys_match():
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    ours = efpn_resnet50_fpn(extended=False, num_classes=91)
    tv_keys = {k for k in tv.state_dict() if not k.endswith("num_batches_tracked")}
    assert tv_keys == set(ours.state_dict())


def test_baseline_checkpoint_into_extended_model():
    torch.manual_seed(0)
    base = efpn_resnet18_fpn(extended=False, num_classes=4)
    ext = efpn_resnet18_fpn(extended=True, num_classes=4)
    state = base.state_dict()
    load_baseline_state_dict(ext, state)
    new = new_module_keys(ext)
    assert new and all(k.startswith(("backbone.extension.", "roi_heads.small_")) for k in new)
    for k, v in state.items():
        assert torch.equal(ext.state_dict()[k], v)
    assert torch.equal(ext.roi_heads.small_box_head.fc6.weight, base.roi_heads.box_head.fc6.weight)
    bad = dict(state)
    bad.pop("rpn.head.conv.0.0.weight")
    with pytest.raises(ValueError, match="rpn.head.conv"):
        load_baseline_state_dict(ext, bad, source="x.pt")
    bad = dict(state, **{"backbone.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        load_baseline_state_dict(ext, bad)


def test_rpn_on_p2x_option():
    model = _detector(rpn_on_p2x=True).eval()
    assert model.rpn.anchor_generator.sizes[0] == (16,)
    assert len(model.rpn.anchor_generator.sizes) == 6
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128)])
    assert out[0]["boxes"].ndim == 2


def test_resize_scale_scales_every_image_by_one_factor_and_maps_boxes_back():
    from efpn.models import efpn_resnet18_fpn
    from efpn.models.transform import ScaleTransform

    model = efpn_resnet18_fpn(
        num_classes=3, out_channels=16, min_size=200, max_size=1000, resize_scale=0.5
    )
    assert isinstance(model.transform, ScaleTransform)
    model.eval()
    for h, w in [(120, 300), (90, 64)]:  # different shorter sides, the same factor
        image_list, _ = model.transform([torch.rand(3, h, w)])
        assert image_list.image_sizes[0] == (h // 2, w // 2)
    # a scaled test (min_size x2, as `val --scale 2` does) doubles the factor
    model.transform.min_size = (400,)
    assert model.transform([torch.rand(3, 120, 300)])[0].image_sizes[0] == (120, 300)
    model.transform.min_size = (200,)
    # training: boxes follow the image; max_size bounds the longer side
    model.train()
    target = {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([1])}
    _, targets = model.transform([torch.rand(3, 120, 300)], [target])
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[5.0, 10.0, 25.0, 30.0]]))
    assert model.transform.factor(100, 4000) == 1000 / 4000
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 120, 300)])[0]
    assert out["boxes"].shape[-1] == 4
    if len(out["boxes"]):  # postprocess maps back to the input's pixels
        assert out["boxes"][:, 2].max() <= 300 + 1e-3


def test_gated_merge_keeps_each_head_where_the_box_is_of_its_size():
    from efpn.models import efpn_resnet18_fpn

    model = efpn_resnet18_fpn(num_classes=3, out_channels=16, small_roi_size=32, merge="gated")
    heads = model.roi_heads
    boxes = [
        torch.tensor(
            [[0.0, 0, 20, 20], [0, 0, 50, 50], [0, 0, 20, 20], [0, 0, 50, 50], [0, 0, 50, 50]]
        )
    ]
    source = torch.tensor(
        [1, 1, 2, 2, 0]
    )  # P'2 head small/large, original head small/large, large RoI
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3]]).repeat(5, 1))
    deltas = torch.zeros(5, 3 * 4)  # decoded boxes = the RoIs
    probs = torch.softmax(heads._gate(logits, deltas, boxes, source)[0], -1)
    kept = torch.tensor([[0.1, 0.6, 0.3]])
    dropped = torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(probs[[0, 3, 4]], kept.repeat(3, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs[[1, 2]], dropped.repeat(2, 1), atol=1e-6, rtol=0)
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 96)])[0]
    assert out["boxes"].shape[-1] == 4


def test_fused_merge_averages_both_heads_on_each_small_roi():
    from efpn.models import efpn_resnet18_fpn

    model = efpn_resnet18_fpn(num_classes=3, out_channels=16, small_roi_size=32, merge="fused")
    heads = model.roi_heads
    # one image: proposals [small A, large B, small C]; then A and C again (P'2 head)
    rois = torch.tensor(
        [[0.0, 0, 20, 20], [0, 0, 50, 50], [40, 40, 60, 60], [0, 0, 20, 20], [40, 40, 60, 60]]
    )
    source = torch.tensor([2, 0, 2, 1, 1])
    partner = torch.tensor([0, 1, 2, 0, 2])
    orig = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3]])
    p2 = torch.tensor([[0.1, 0.3, 0.6], [0.3, 0.6, 0.1]])
    logits = torch.log(torch.cat([orig, p2]))
    deltas = torch.zeros(5, 3 * 4)
    # the P'2 head widens C's class-1 box past 32 px; the original head keeps it at 20 px
    deltas[4, 4 + 2 : 4 + 4] = 2 * torch.log(torch.tensor(2.0)) * 5  # x2 after averaging
    fused, new_deltas = heads._gate(logits, deltas, [rois], source, partner)
    probs = torch.softmax(fused, -1)
    # A: the mean of both heads, the original's own row (small box) dropped
    torch.testing.assert_close(probs[3], (orig[0] + p2[0]) / 2, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs[0], torch.tensor([1.0, 0, 0]), atol=1e-6, rtol=0)
    # the large RoI is untouched
    torch.testing.assert_close(probs[1], orig[1], atol=1e-6, rtol=0)
    # C: mean deltas; class 1's fused box is 40 px (not small), so the original head's
    # row stands for class 1 (though its own box is small) and the fused row for class 2
    torch.testing.assert_close(new_deltas[4], (deltas[2] + deltas[4]) / 2)
    mean_c = (orig[2] + p2[1]) / 2
    assert probs[4, 1] == pytest.approx(0.0, abs=1e-6)
    assert probs[4, 2] == pytest.approx(float(mean_c[2]), abs=1e-6)
    assert probs[2, 1] == pytest.approx(float(orig[2, 1]), abs=1e-6)
    assert probs[2, 2] == pytest.approx(0.0, abs=1e-6)
    # exclusive routing would score A by the P'2 head alone: the fused score differs
    assert not torch.allclose(probs[3], p2[0])
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 96)])[0]
    assert out["boxes"].shape[-1] == 4
