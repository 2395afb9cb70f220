from pathlib import Path

import pytest
import yaml

from raysegbg.config import Config, load_config, save_config, to_dict
from raysegbg.errors import RaysegbgError


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=3", "optim.lr=1e-2", "model.decoder_channels=[8,4]"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == pytest.approx(0.01)
    assert cfg.model.decoder_channels == (8, 4)
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # int -> float is lossless


def test_yaml_file_then_set(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "train:\n  epochs: 7\nmethod:\n  name: baseline\n  baseline:\n    dice_weight: 0\n"
    )
    cfg = load_config(f, ["train.epochs=9"])
    assert cfg.train.epochs == 9 and cfg.method.baseline.dice_weight == 0.0


def test_saved_config_reloads_identically(tmp_path: Path):
    cfg = load_config(None, ["train.seed=5", "data.path=/x"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epochz=3", "unknown config key 'train.epochz': valid keys are train.epochs"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.epochs=three", "config key 'train.epochs' expects int, got 'three'"),
        ("train.epochs=2.5", "expects int"),
        ("data.augment=1", "expects bool"),
        ("method.name=nope", "unknown method 'nope': choose one of baseline"),
        ("optim.schedule=step", "optim.schedule='step' is not one of"),
        ("train.batch_size=7", "must be divisible by the number of workers"),
        ("train.epochs", "is not key=value"),
    ],
)
def test_bad_config_is_one_clear_line(override, expected):
    with pytest.raises(RaysegbgError) as err:
        load_config(None, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_frozen():
    with pytest.raises(AttributeError):
        Config().train.epochs = 3  # type: ignore[misc]
