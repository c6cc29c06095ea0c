"""DataConfig and its YAML presets (conf/data/*.yaml) agree."""

from dataclasses import fields
import pytest
import yaml
from omegaconf import OmegaConf

from minitron_megatron.config.data import DataConfig
from minitron_megatron.config.files import conf_dir

PRESETS = sorted((conf_dir() / "data").glob("*.yaml"))


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"stdlib", "custom"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_composes_onto_the_dataclass(preset):
    raw = yaml.safe_load(preset.read_text())
    assert set(raw) <= {f.name for f in fields(DataConfig)}
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), raw)  # type-checks every key
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and cfg.name == preset.stem
    assert cfg == DataConfig(**raw)


def test_stdlib_preset_is_the_default():
    raw = yaml.safe_load((PRESETS[0].parent / "stdlib.yaml").read_text())
    assert DataConfig(**raw) == DataConfig()
