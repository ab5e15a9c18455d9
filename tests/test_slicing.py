"""Sliced inference: tiles, merging across tiles, memory on a huge image."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from efpn.slicing import merge_detections, nmm, predict_sliced, slice_windows


@pytest.mark.parametrize(
    "h, w, s, ov",
    [(1000, 1500, 512, 0.2), (512, 512, 512, 0.2), (300, 2000, 512, 0.5), (100, 90, 512, 0.2)],
)
def test_windows_cover_every_pixel_and_keep_the_edges(h, w, s, ov):
    wins = slice_windows(h, w, s, ov)
    cover = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in wins:
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert x1 - x0 == min(s, w) and y1 - y0 == min(s, h)  # no sliver tiles
        cover[y0:y1, x0:x1] = True
    assert cover.all()
    xs = sorted({x0 for x0, _, _, _ in wins})
    assert all(b - a <= s * (1 - ov) + 1e-9 for a, b in zip(xs, xs[1:]))  # overlap kept
    assert max(x1 for _, _, x1, _ in wins) == w and max(y1 for _, _, _, y1 in wins) == h


class IdDetector(torch.nn.Module):
    """Detects each object of a scene exactly: channel 1 holds object ids (k/255), and
    every id seen in a tile gives the bounding box of its pixels in that tile."""

    def __init__(self):
        super().__init__()
        from torchvision.models.detection.transform import GeneralizedRCNNTransform

        self.transform = GeneralizedRCNNTransform(10**6, 10**6, [0.0] * 3, [1.0] * 3)
        self.calls = []

    def forward(self, images):
        outs = []
        for im in images:
            self.calls.append(tuple(im.shape[-2:]))
            ids = (im[1] * 255).round().long()
            boxes = []
            for k in ids.unique().tolist():
                if k == 0:
                    continue
                ys, xs = torch.where(ids == k)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            outs.append(
                {
                    "boxes": b,
                    "scores": torch.full((len(b),), 0.9),
                    "labels": torch.ones(len(b), dtype=torch.long),
                }
            )
        return outs


def _scene(h, w, boxes):
    img = np.zeros((h, w, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes, start=1):
        img[y1:y2, x1:x2, 1] = k
        img[y1:y2, x1:x2, 0] = 200
    return img


def test_sliced_boxes_are_the_objects_in_image_coordinates():
    # tiles of 100 with overlap 0.2 start at 0, 80, 160, 200 (the last aligned to the edge)
    boxes = [(5, 5, 15, 15), (285, 185, 300, 200), (85, 10, 95, 20), (150, 120, 170, 135)]
    img = _scene(200, 300, boxes)
    model = IdDetector()
    out = predict_sliced(model, img, 100, 0.2, merge="nmm", batch_size=3)
    got = sorted(tuple(int(v) for v in b) for b in out["boxes"].tolist())
    assert got == sorted(boxes)  # the bottom-right corner object is found too
    assert all(c[0] <= 100 and c[1] <= 100 for c in model.calls)  # tiles, never the scene


def test_an_object_on_a_tile_border_gives_one_detection():
    # x 90..110 is seen whole by the tile starting at 80 and cut by the tile ending at 100
    img = _scene(100, 300, [(90, 40, 110, 60)])
    nms_out = predict_sliced(IdDetector(), img, 100, 0.2, merge="nms")
    nmm_out = predict_sliced(IdDetector(), img, 100, 0.2, merge="nmm")
    assert len(nms_out["boxes"]) == 2  # NMS keeps the cut half: IoU 0.5 is not above 0.5
    assert len(nmm_out["boxes"]) == 1
    assert nmm_out["boxes"][0].tolist() == [90.0, 40.0, 110.0, 60.0]


def test_nmm_merges_by_intersection_over_the_smaller_box_per_class():
    boxes = torch.tensor([[0.0, 0, 20, 20], [10, 0, 30, 20], [0, 0, 8, 8], [100, 100, 110, 110]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1, 1, 2, 1])
    out = nmm(boxes, scores, labels, 0.5)
    got = {
        tuple(b): (round(s, 2), lab)
        for b, s, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist())
    }
    assert got == {
        (0.0, 0.0, 30.0, 20.0): (0.9, 1),
        (0.0, 0.0, 8.0, 8.0): (0.7, 2),
        (100.0, 100.0, 110.0, 110.0): (0.6, 1),
    }
    with pytest.raises(ValueError, match="merge"):
        merge_detections([], "soft")


def test_full_image_pass_adds_objects_larger_than_a_tile():
    img = _scene(200, 200, [(20, 20, 180, 180)])
    model = IdDetector()
    tiles_only = predict_sliced(model, img, 64, 0.2, merge="nms")
    assert not any(b == [20.0, 20.0, 180.0, 180.0] for b in tiles_only["boxes"].tolist())
    both = predict_sliced(IdDetector(), img, 64, 0.2, merge="nmm", full_image=True)
    assert [20.0, 20.0, 180.0, 180.0] in both["boxes"].tolist()


def test_a_single_tile_equals_the_model_on_the_image():
    from efpn.models import efpn_resnet18_fpn

    torch.manual_seed(0)
    model = efpn_resnet18_fpn(
        num_classes=3, out_channels=16, min_size=128, max_size=128, box_score_thresh=0.0
    ).eval()
    img = (torch.rand(3, 120, 128) * 255).to(torch.uint8)
    with torch.no_grad():
        direct = model([img.float() / 255])[0]
    sliced = predict_sliced(model, img, 256, 0.2)
    torch.testing.assert_close(sliced["boxes"], direct["boxes"])
    torch.testing.assert_close(sliced["scores"], direct["scores"])


def test_a_6000px_image_stays_under_3_gb(tmp_path):
    script = textwrap.dedent(
        """
        import json, resource, sys, time
        import numpy as np, torch
        from efpn import predict_sliced
        from efpn.models import efpn_resnet18_fpn
        torch.set_num_threads(2)
        torch.manual_seed(0)
        model = efpn_resnet18_fpn(num_classes=3, out_channels=16, representation_size=64,
                                  sr_kwargs={"width": 8}, min_size=192, max_size=192,
                                  rpn_post_nms_top_n_test=100).eval()
        img = np.random.default_rng(0).integers(0, 255, (6000, 6000, 3), dtype=np.uint8)
        t = time.time()
        out = predict_sliced(model, img, 2048, 0.2, batch_size=4)  # 16 tiles
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        b = out["boxes"]
        print(json.dumps({"peak": peak, "n": len(b), "max_xy": b.max().item() if len(b) else 0, "s": time.time() - t}))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["peak"] < 3 * 1024**3, info
    assert info["max_xy"] <= 6000


def test_data_slice_clips_keeps_visible_boxes_and_marks_cut_ones_ignore(tmp_path, capsys):
    from efpn.cli import main
    from efpn.data import read_dataset

    img = np.zeros((100, 180, 3), np.uint8)
    img[:, :, 0] = np.arange(180, dtype=np.uint8)[None, :]
    Image.fromarray(img).save(tmp_path / "scene.png")
    gt = {
        "images": [{"id": 1, "file_name": "scene.png", "width": 180, "height": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [10, 10, 20, 20],
                "area": 400,
                "iscrowd": 0,
            },
            # x 90..110: tile [0,100) sees 10/20 of it (50%), tile [80,180) all of it
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [90, 40, 20, 10],
                "area": 200,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 1, "name": "car"}],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    args = ["data", "slice", str(tmp_path / "gt.json"), "--size", "100", "--overlap", "0.2"]
    args += ["--min-visible", "0.6", "--out", str(tmp_path / "tiles")]
    assert main(args) == 0
    tiles = read_dataset(tmp_path / "tiles" / "annotations.json", "coco")
    by = {r.file_name: r for r in tiles.images}
    assert set(by) == {"images/scene_0_0.png", "images/scene_80_0.png"}
    left, right = by["images/scene_0_0.png"], by["images/scene_80_0.png"]
    np.testing.assert_allclose(left.boxes, [[10, 10, 30, 30]])
    np.testing.assert_allclose(left.ignore, [[90, 40, 100, 50]])  # 50% visible: ignore
    np.testing.assert_allclose(right.boxes, [[10, 40, 30, 50]])  # whole, in tile pixels
    pixels = np.asarray(Image.open(tmp_path / "tiles" / "images" / "scene_80_0.png"))
    assert pixels[0, 0, 0] == 80 and pixels.shape == (100, 100, 3)  # the right crop
    out = capsys.readouterr().out
    assert "became ignore regions" in out
    # without a terminal, a timestamped line per image (huge scenes take minutes each)
    assert re.search(r"^\[[-0-9: ]+\] scene\.png: 2 tiles \(\d+ s\)$", out, re.M)
    assert main(args) == 2  # refuses to write into a non-empty --out
    assert main([*args, "--overwrite"]) == 0


def test_data_mosaic_pastes_images_and_shifts_their_boxes(tmp_path, capsys):
    from efpn.cli import main
    from efpn.data import read_dataset

    images, annotations = [], []
    sizes = [(40, 60), (50, 30), (30, 30), (20, 70), (25, 25)]  # (h, w); 5 images, 2x2 grid
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 10 * (i + 1), np.uint8)).save(tmp_path / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        annotations.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 2, 5, 6], "area": 30}
        )
    gt = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "car"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    args = ["data", "mosaic", str(tmp_path / "gt.json"), "--grid", "2x2", "--out"]
    assert main([*args, str(tmp_path / "m")]) == 0
    assert "5 image(s) -> 2 scene(s)" in capsys.readouterr().out
    scenes = read_dataset(tmp_path / "m" / "annotations.json", "coco")
    first, second = scenes.images
    # columns as wide as their widest image (60, 70), rows as high as their highest (50, 30)
    assert (first.width, first.height) == (130, 80) and (second.width, second.height) == (25, 25)
    np.testing.assert_allclose(
        first.boxes, [[1, 2, 6, 8], [61, 2, 66, 8], [1, 52, 6, 58], [61, 52, 66, 58]]
    )
    pixels = np.asarray(Image.open(tmp_path / "m" / first.file_name))
    assert pixels[0, 0, 0] == 10 and pixels[0, 60, 0] == 20 and pixels[50, 0, 0] == 30
    assert pixels[50, 60, 0] == 40 and pixels[45, 0, 0] == 0  # below image 0: black
    assert main([*args, str(tmp_path / "m")]) == 2  # a non-empty --out
    bad_grid = ["data", "mosaic", str(tmp_path / "gt.json"), "--grid", "two"]
    assert main([*bad_grid, "--out", str(tmp_path / "n")]) == 2
