"""Every shipped recipe loads, and the aerial ones read ../shared/data when it is there."""

from importlib import resources
from pathlib import Path

import pytest

from efpn.config import load_config
from efpn.engine.train import load_data

RECIPES = sorted(Path(str(resources.files("efpn") / "configs")).glob("*.yaml"))


def test_the_package_ships_its_recipes():
    names = {p.name for p in RECIPES}
    assert {
        "demo.yaml",
        "demo_test.yaml",
        "aerial_cars_half.yaml",
        "aerial_cars_quarter.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads(path):
    # an unknown key, a wrong type or a value out of range would raise here
    cfg = load_config(path)
    assert cfg.name == path.stem or (path.stem == "synthsigns_s256" and cfg.name == "demo")


def test_quarter_recipe_is_the_half_recipe_at_half_the_scale(shared_data):
    shared_data("aerial_cars")
    half = load_config(Path(str(resources.files("efpn") / "configs" / "aerial_cars_half.yaml")))
    quarter = load_config(
        Path(str(resources.files("efpn") / "configs" / "aerial_cars_quarter.yaml"))
    )
    assert quarter.model.resize_scale == half.model.resize_scale / 2
    assert quarter.data.scale_jitter == half.data.scale_jitter
    assert quarter.distill.teacher_mode == "upsample_teacher"
    # recipe paths are relative to the checkout, as efpn's commands run from its root
    root = Path(__file__).resolve().parents[1]
    quarter.data.train = str(root / quarter.data.train)
    quarter.data.val = str(root / quarter.data.val)
    train, val = load_data(quarter)
    assert val.eval_classes == ["car"] and len(train.images) == 52 and len(val.images) == 13
