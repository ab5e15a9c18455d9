"""``efpn predict``: batched inference on images of any size, drawings and COCO results."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..data.dataset import load_rgb
from ..data.formats import IMAGE_SUFFIXES, read_dataset
from ..viz import draw_detections
from .train import model_from_checkpoint

__all__ = ["predict"]


def _images(source: Path) -> list[Path]:
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such image or folder")
    return [source]


@torch.no_grad()
def predict(
    weights: str | Path,
    source: str | Path,
    out: str | Path,
    *,
    batch_size: int = 4,
    score_thresh: float = 0.5,
    compare: str | Path | None = None,
    device: str = "cpu",
    quiet: bool = False,
) -> Path:
    """Detect objects in ``source`` (an image or a folder) with a checkpoint.

    Writes ``out/<name>`` drawings and ``out/predictions.json`` (COCO results; image ids
    from ``compare`` when given, else 1..N in sorted order). With ``compare`` (a COCO
    ground-truth JSON), true positives are green, false positives blue and false
    negatives red, as the paper's Fig. 8.
    """
    model, ckpt = model_from_checkpoint(weights, device)
    classes, cat_ids = ckpt["classes"], ckpt["category_ids"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(source)
    paths = _images(source)
    gt_by_name = {}
    if compare is not None:
        gt = read_dataset(compare, "coco")
        for r in gt.images:
            gt_by_name[Path(r.file_name).name] = r
    results = []
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", disable=quiet):
        chunk = paths[start : start + batch_size]
        arrays = [load_rgb(p) for p in chunk]
        images = [torch.from_numpy(a).permute(2, 0, 1).float().div(255).to(device) for a in arrays]
        outputs = model(images)
        for k, (p, a, o) in enumerate(zip(chunk, arrays, outputs)):
            o = {key: v.cpu() for key, v in o.items()}
            r = gt_by_name.get(p.name)
            image_id = r.image_id if r is not None else start + k + 1
            for b, s, lab in zip(o["boxes"].tolist(), o["scores"].tolist(), o["labels"].tolist()):
                results.append(
                    {
                        "image_id": image_id,
                        "file_name": p.name,
                        "category_id": cat_ids[lab - 1],
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "score": s,
                    }
                )
            gt_target = None
            if r is not None:
                gt_target = {
                    "boxes": torch.as_tensor(r.boxes),
                    "labels": torch.as_tensor(r.labels) + 1,
                }
            drawn = draw_detections(
                Image.fromarray(a), o, classes, gt=gt_target, score_thresh=score_thresh
            )
            drawn.save(out / f"{p.stem}.png")
    path = out / "predictions.json"
    path.write_text(json.dumps(results))
    return path
