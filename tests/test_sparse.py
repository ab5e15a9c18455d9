"""The windowed (sparse) extended level equals the dense one where it is read."""

import pytest
import torch

from efpn.models import efpn_fpn
from efpn.models.sparse import plan_windows, read_pieces, roi_cells, window_coverage


def _model(sr_module="ftt", **kw):
    sr_kwargs = {"width": 16} if sr_module != "nearest" else {}
    torch.manual_seed(0)
    return efpn_fpn(
        "resnet18",
        num_classes=5,
        out_channels=32,
        representation_size=64,
        sr_module=sr_module,
        sr_kwargs=sr_kwargs,
        small_roi_size=48,
        min_size=160,
        max_size=224,
        anchor_sizes=(16, 32, 64, 128, 256),
        **kw,
    ).eval()


@pytest.mark.parametrize("sr_module", ["ftt", "espcn", "nearest"])
@pytest.mark.parametrize("ftt_input", ["output", "inner"])
def test_windows_equal_dense_p2x(sr_module, ftt_input):
    model = _model(sr_module, ftt_input=ftt_input, ext_out_width=8 if sr_module == "ftt" else None)
    bb = model.backbone
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        dense = bb(x)["p2x"]
        pyramid, stem, inners = bb.forward_pyramid(x)
        # interior, touching every border, one cell wide, and the whole map
        windows = [[(10, 21, 30, 47), (0, 5, 0, 80)], [(60, 64, 70, 80), (0, 64, 0, 80)]]
        sparse = bb.forward_p2x_windows(pyramid, stem, inners, windows)
    for i, ws in enumerate(windows):
        for y0, y1, x0, x1 in ws:
            torch.testing.assert_close(
                sparse[i, :, y0:y1, x0:x1], dense[i, :, y0:y1, x0:x1], rtol=1e-5, atol=1e-5
            )
    # outside the windows nothing was computed
    assert sparse[0, :, 30:, 0:20].abs().sum() == 0


def test_banded_p2x_equals_dense():
    model = _model("ftt")
    bb = model.backbone
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        dense = bb(x)["p2x"]
        pyramid, stem, inners = bb.forward_pyramid(x)
        full = [[(0, 64, 0, 80)], [(0, 64, 0, 80)]]
        for rows in (7, 32, 64):  # odd bands, two bands, one band (the dense shortcut)
            banded = bb.forward_p2x_windows(pyramid, stem, inners, full, band_rows=rows)
            torch.testing.assert_close(banded, dense, rtol=1e-5, atol=1e-5)
        part = bb.forward_p2x_windows(pyramid, stem, inners, [[(5, 40, 3, 30)], []], band_rows=6)
    torch.testing.assert_close(
        part[0, :, 5:40, 3:30], dense[0, :, 5:40, 3:30], rtol=1e-5, atol=1e-5
    )
    assert part[0, :, 40:].abs().sum() == 0 and part[1].abs().sum() == 0
    with pytest.raises(ValueError, match="band_rows"):
        bb.forward_p2x_windows(pyramid, stem, inners, full, band_rows=0)


def test_p2x_computed_only_where_read():
    model = _model("ftt")
    bb = model.backbone
    x = torch.randn(2, 3, 128, 160)
    # cells read: interior, on the top-left corner, on the bottom border, two spans in a row
    reads = [
        torch.tensor([[10, 14, 20, 26], [0, 3, 0, 4], [60, 64, 50, 80], [12, 15, 60, 66]]),
        torch.zeros((0, 4), dtype=torch.int64),
    ]
    full = [[(0, 64, 0, 80)], [(0, 64, 0, 80)]]
    with torch.no_grad():
        dense = bb(x)["p2x"]
        pyramid, stem, inners = bb.forward_pyramid(x)
        for rows in (None, 5):
            out = bb.forward_p2x_windows(pyramid, stem, inners, full, band_rows=rows, reads=reads)
            read = torch.zeros(64, 80, dtype=torch.bool)
            for y0, y1, x0, x1 in reads[0].tolist():
                read[y0:y1, x0:x1] = True
                torch.testing.assert_close(
                    out[0, :, y0:y1, x0:x1], dense[0, :, y0:y1, x0:x1], rtol=1e-5, atol=1e-5
                )
            computed = out[0].abs().sum(0) != 0
            assert read.float().mean() <= bb.last_computed[0] < 0.6
            assert bb.last_computed[1] == 0.0
            assert computed.float().mean() <= bb.last_computed[0] + 1e-9
            assert not computed[:, 5:19].any() and out[1].abs().sum() == 0  # a column gap
            if rows:  # bands with no cell read are skipped
                assert not computed[15:60].any()


@pytest.mark.parametrize("sr_per_piece", [True, False])
def test_sr_per_piece_or_per_window_equal_dense(sr_per_piece):
    model = _model("ftt")
    ext = model.backbone.extension
    x = torch.randn(1, 3, 128, 160)
    reads = torch.tensor([[10, 14, 20, 26], [0, 3, 0, 4], [60, 64, 50, 80], [12, 15, 60, 66]])
    with torch.no_grad():
        dense = model.backbone(x)["p2x"]
        pyramid, stem, inners = model.backbone.forward_pyramid(x)
        out = torch.zeros_like(dense)
        tiles = ext.window_tiles(
            model.backbone.body.layer1,
            stem,
            pyramid["0"],
            pyramid["1"],
            (0, 64, 0, 80),
            band_rows=6,
            reads=reads,
            sr_per_piece=sr_per_piece,
        )
        for r, c, tile in tiles:
            out[..., r : r + tile.shape[-2], c : c + tile.shape[-1]] = tile
    for y0, y1, x0, x1 in reads.tolist():
        torch.testing.assert_close(
            out[..., y0:y1, x0:x1], dense[..., y0:y1, x0:x1], rtol=1e-5, atol=1e-5
        )
    # the costs that choose between the two are the multiply-adds per input cell
    from torch.utils.flop_counter import FlopCounterMode

    content, texture = ext.sr.cell_costs()
    p3, p2 = torch.randn(1, 32, 4, 5), torch.randn(1, 32, 8, 10)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        c = ext.sr.content(p3)
    assert fc.get_total_flops() == 2 * content * 4 * 5
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        ext.sr.texture(p2, c)
    assert fc.get_total_flops() == 2 * texture * 8 * 10


def test_read_pieces_trim_rows_and_merge_close_columns():
    reads = torch.tensor([[5, 9, 10, 14], [7, 12, 16, 20], [6, 8, 40, 44], [30, 31, 0, 80]])
    assert read_pieces(reads, (0, 20, 0, 60), gap=0) == [
        ((5, 12), (10, 14)),
        ((5, 12), (16, 20)),
        ((5, 12), (40, 44)),
    ]
    assert read_pieces(reads, (0, 20, 0, 60), gap=2) == [((5, 12), (10, 20)), ((5, 12), (40, 44))]
    assert read_pieces(reads, (8, 10, 12, 42), gap=0) == [((8, 10), (12, 14)), ((8, 10), (16, 20))]
    assert read_pieces(reads, (13, 29, 0, 80)) == []


def test_roi_cells_cover_what_roi_align_reads():
    from torchvision.ops import roi_align

    torch.manual_seed(1)
    h, w = 40, 50
    feat = torch.randn(1, 3, h, w)
    boxes = torch.tensor([[3.3, 5.0, 17.9, 12.2], [0.0, 0.0, 6.0, 9.0], [80.0, 60.0, 99.9, 79.9]])
    cells = roi_cells(boxes, (h, w), margin=0)
    for box, (y0, y1, x0, x1) in zip(boxes, cells.tolist(), strict=True):
        masked = torch.zeros_like(feat)
        masked[..., y0:y1, x0:x1] = feat[..., y0:y1, x0:x1]
        args = dict(output_size=7, spatial_scale=0.5, sampling_ratio=2, aligned=True)
        torch.testing.assert_close(
            roi_align(masked, [box[None]], **args), roi_align(feat, [box[None]], **args)
        )


def test_plan_windows_groups_and_falls_back():
    size = (200, 200)
    near = torch.tensor([[20.0, 20.0, 40.0, 40.0], [44.0, 20.0, 60.0, 36.0]])
    far = torch.tensor([[300.0, 300.0, 320.0, 316.0]])
    ws = plan_windows(torch.cat([near, far]), size, halo=8)
    assert len(ws) == 2  # the two near boxes share a window
    for cells in roi_cells(torch.cat([near, far]), size).tolist():
        assert any(
            w[0] <= cells[0] and cells[1] <= w[1] and w[2] <= cells[2] and cells[3] <= w[3]
            for w in ws
        )
    assert window_coverage(ws, size, 8) < 0.2
    everywhere = torch.tensor(
        [[x, y, x + 20.0, y + 20.0] for x in range(0, 400, 40) for y in range(0, 400, 40)]
    )
    assert plan_windows(everywhere, size, halo=8) == [(0, 200, 0, 200)]
    assert plan_windows(torch.zeros((0, 4)), size) == []


@pytest.mark.parametrize("merge", ["exclusive", "duplicate"])
def test_sparse_and_dense_detections_match(merge):
    model = _model(
        merge=merge, box_score_thresh=0.0, rpn_post_nms_top_n_test=12, box_detections_per_img=50
    )
    model.transform.min_size, model.transform.max_size = (384,), 480
    torch.manual_seed(3)
    images = [torch.rand(3, 300, 380), torch.rand(3, 340, 260)]
    for img in images:  # a few small bright "objects"
        for _ in range(4):
            y, x = torch.randint(0, img.shape[1] - 12, ()), torch.randint(0, img.shape[2] - 12, ())
            img[:, y : y + 10, x : x + 12] = torch.rand(3, 1, 1)
    out = {}
    with torch.no_grad():
        for mode in ("dense", "banded", "sparse"):
            model.p2x_mode, model.p2x_band_rows = mode, 16
            out[mode] = model(images)
            coverage = model.last_p2x_coverage
    assert any(c < 0.9 for c in coverage), coverage  # sparse computed less than the map
    for mode in ("banded", "sparse"):
        for d, s in zip(out["dense"], out[mode], strict=True):
            assert d["boxes"].shape[0] > 0
            assert torch.equal(d["labels"], s["labels"])
            torch.testing.assert_close(s["boxes"], d["boxes"], rtol=0, atol=1e-4)
            torch.testing.assert_close(s["scores"], d["scores"], rtol=0, atol=1e-5)


def test_p2x_mode_auto_is_sparse_on_cpu_banded_elsewhere():
    model = _model()
    assert model.p2x_mode == "auto" and model.p2x_band_rows is None
    assert model.p2x_plan(torch.device("cpu")) == ("sparse", 32)
    assert model.p2x_plan(torch.device("cuda")) == ("banded", 128)
    model.p2x_band_rows = 0
    assert model.p2x_plan(torch.device("cpu")) == ("sparse", None)  # one pass
    with pytest.raises(ValueError, match="p2x_mode"):
        _model(p2x_mode="fast")
