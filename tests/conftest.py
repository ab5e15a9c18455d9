import random
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def shared_data():
    """Path of a folder of ../shared/data; skips the test, saying why, when it is absent."""

    def get(name: str) -> Path:
        path = SHARED_DATA / name
        if not path.exists():
            pytest.skip(
                f"real data {path} is absent (it lives in ../shared/data next to the checkout)"
            )
        return path

    return get


def tiny_detector(**kwargs):
    """A seeded, untrained EFPN small enough to export and slice in seconds."""
    from efpn.models import efpn_fpn

    torch.manual_seed(0)
    settings = dict(
        num_classes=4,
        out_channels=32,
        min_size=128,
        max_size=192,
        small_roi_size=24,
        sr_kwargs={"width": 16},
        anchor_sizes=(16, 32, 64, 128, 256),
        representation_size=64,
    )
    return efpn_fpn("resnet18", **{**settings, **kwargs}).eval()


# A recipe small enough to train stages 1-3 in seconds on a CPU.
TINY = {
    "name": "tiny",
    "data": {"format": "synth", "synth_train": 4, "synth_val": 2, "synth_size": 96},
    "model": {
        "backbone": "resnet18",
        "min_size": 96,
        "max_size": 96,
        "small_roi_size": 24,
        "anchor_sizes": [16, 32, 64, 128, 256],
        "sr_width": 16,
        "rpn_batch_size_per_image": 32,
        "box_batch_size_per_image": 32,
    },
    "stage1": {"optim": {"epochs": 1, "batch_size": 2, "lr": 0.01, "warmup_iters": 1}},
    "stage2": {"optim": {"epochs": 1, "batch_size": 2, "lr": 0.001, "warmup_iters": 1}},
    "stage3": {
        "ohem_batch_size_per_image": 16,
        "optim": {"epochs": 1, "batch_size": 2, "lr": 0.001, "warmup_iters": 1},
    },
    "checkpoint_every": 1,
}


def write_tiny_config(folder: Path, **overrides) -> Path:
    """Write the tiny recipe, with dotted-key overrides, as ``folder/cfg.yaml``."""
    import copy

    import yaml

    d = copy.deepcopy(TINY)
    for key, value in overrides.items():
        node = d
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture
def tiny_cfg(tmp_path):
    """``tiny_cfg(**{"stage1.optim.epochs": 2})`` -> the tiny :class:`efpn.config.Config`."""
    from efpn.config import load_config

    return lambda **overrides: load_config(write_tiny_config(tmp_path, **overrides))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny run trained through stages 1-3: ``(run folder, its val data)``."""
    from efpn.config import load_config
    from efpn.engine.train import Trainer

    root = tmp_path_factory.mktemp("cli")
    cfg = load_config(write_tiny_config(root))
    trainer = Trainer(cfg, root / "run", quiet=True)
    trainer.run([1, 2, 3])
    return root / "run", trainer.val_data
