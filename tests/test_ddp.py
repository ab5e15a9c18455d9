import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from efpn.config import load_config
from efpn.engine.train import Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(root: Path) -> Path:
    """Four same-size images with one same-size box each, so every per-image loss term
    has the same normaliser and the global-batch mean equals the mean over ranks."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    images, anns = [], []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            root / "img" / f"{i}.png"
        )
        images.append({"id": i + 1, "file_name": f"img/{i}.png", "width": 64, "height": 64})
        x, y = 8 + 4 * i, 10 + 2 * i
        anns.append(
            {
                "id": i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [x, y, 16, 16],
                "area": 256,
                "iscrowd": 0,
            }
        )
    (root / "gt.json").write_text(
        json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "sign"}]}
        )
    )
    return root / "gt.json"


def test_two_process_gloo_matches_one_process(tmp_path):
    gt = _dataset(tmp_path / "data")
    base = {
        "data": {"format": "coco", "train": str(gt), "val": str(gt)},
        "model": {"backbone": "resnet18", "min_size": 64, "max_size": 64, "sr_width": 8},
        "distill": {"teacher_mode": "upsample_teacher"},
        "stage1": {"optim": {"epochs": 1, "batch_size": 2}},
        "stage2": {
            "optim": {
                "optimizer": "sgd",
                "lr": 0.05,
                "momentum": 0.0,
                "epochs": 1,
                "warmup_iters": 0,
                "clip_grad": 0,
                "schedule": "cosine",
            }
        },
        "checkpoint_every": 0,
    }
    # stage-1 weights to start from (untrained is fine: stage 2 only trains the extension)
    init = tmp_path / "init.pt"
    cfg1 = dict(base, stage2={"optim": dict(base["stage2"]["optim"], batch_size=4)})
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(cfg1))
    torch.manual_seed(0)
    t = Trainer(load_config(tmp_path / "one.yaml"), tmp_path / "seed_run", quiet=True)
    from efpn.engine.checkpoint import save_checkpoint
    from efpn.engine.train import build_model

    save_checkpoint(
        {"model": build_model(t.cfg, 2, extended=False).state_dict(), "extended": False}, init
    )

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    subprocess.run(
        [
            sys.executable,
            str(WORKER),
            str(tmp_path / "one.yaml"),
            str(tmp_path / "r1"),
            str(tmp_path / "one.pt"),
            str(init),
        ],
        check=True,
        env=env,
        timeout=300,
    )

    cfg2 = dict(base, stage2={"optim": dict(base["stage2"]["optim"], batch_size=2)})
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(cfg2))
    port = str(_free_port())
    procs = []
    for rank in range(2):
        e = dict(
            env,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    str(tmp_path / "two.yaml"),
                    str(tmp_path / "r2"),
                    str(tmp_path / "two.pt"),
                    str(init),
                ],
                env=e,
            )
        )
    for p in procs:
        assert p.wait(timeout=300) == 0
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one.keys() == two.keys() and len(one) > 0
    moved = False
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-6)
    torch.manual_seed(t.cfg.seed + 2)  # the trainer's seed for stage 2: the starting weights
    init_ext = build_model(t.cfg, 2, extended=True)
    for k, v in one.items():
        if not torch.equal(v, init_ext.state_dict()[k]):
            moved = True
    assert moved
