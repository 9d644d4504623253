import dataclasses
import os

import pytest
import yaml

from conftest import CONFIGS, config_path
from xhrnet_tf.config import (ConfigError, config_from_dict, config_to_dict, load_config,
                              replace)

ALL_CONFIGS = sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_loads_and_round_trips(name):
    cfg = load_config(config_path(name))
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_config_header_says_how_to_run_it(name):
    with open(config_path(name), encoding="utf-8") as f:
        header = f.read().split("model:")[0]
    assert f"--config=configs/{name}" in header


def test_expected_variants():
    x30_384 = load_config(config_path("x30_384.yaml")).model
    assert x30_384.num_modules == (3, 8, 3)  # the paper's figure, not the official config bug
    assert x30_384.input_size == (384, 288)
    assert load_config(config_path("px30.yaml")).model.unit == "px"
    assert load_config(config_path("wnl18.yaml")).model.unit == "naive"
    # the latency ablation: X-HRNet-18's network with SUSA taken out of every unit
    dwonly, x18 = (load_config(config_path(n)).model for n in ("x18_dwonly.yaml", "x18.yaml"))
    assert dwonly.unit == "baseline" and dataclasses.replace(dwonly, unit="sx") == x18
    assert load_config(config_path("x18_384.yaml")).data.heatmap_sigma == 3.0


def _write(tmp_path, raw):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _raw_x18():
    with open(config_path("x18.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_unknown_key_names_file_and_key(tmp_path):
    raw = _raw_x18()
    raw["model"]["num_moduels"] = [2, 4, 2]
    path = _write(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model.*num_moduels"):
        load_config(path)


def test_unknown_section(tmp_path):
    raw = _raw_x18()
    raw["optimiser"] = {"lr": 1}
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optimiser"):
        load_config(_write(tmp_path, raw))


@pytest.mark.parametrize("section,key,value,pattern", [
    ("model", "stem_channels", "32", r"model\.stem_channels.*integer"),
    ("model", "unit", "sxx", r"model\.unit.*not one of"),
    ("train", "learning_rate", "fast", r"train\.learning_rate.*number"),
    ("eval", "flip_test", 1, r"eval\.flip_test.*true/false"),
    ("model", "input_size", [256], r"model\.input_size.*2 values"),
])
def test_wrong_type_is_named(tmp_path, section, key, value, pattern):
    raw = _raw_x18()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, raw))


@pytest.mark.parametrize("channels,pattern", [
    ([[40, 80], [40, 80], [40, 80, 160, 320]], r"num_channels\[1\].*3 branches"),
    ([[40, 80], [40, 96, 160], [40, 96, 160, 320]], r"num_channels\[1\].*keep their"),
    ([[40, 81], [40, 81, 160], [40, 81, 160, 320]], r"num_channels\[0\]\[1\].*multiple of 2"),
])
def test_inconsistent_channels_fail_at_load(tmp_path, channels, pattern):
    raw = _raw_x18()
    raw["model"]["num_channels"] = channels
    with pytest.raises(ConfigError, match=r"bad\.yaml.*" + pattern):
        load_config(_write(tmp_path, raw))


def test_input_larger_than_group_weights_fails(tmp_path):
    raw = _raw_x18()
    raw["model"]["input_size"] = [512, 384]
    with pytest.raises(ConfigError, match=r"input 512x384 is larger than this model supports"):
        load_config(_write(tmp_path, raw))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(path))


def test_replace_is_type_checked():
    cfg = load_config(config_path("x18.yaml"))
    assert replace(cfg, {"train.epochs": 3}).train.epochs == 3
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        replace(cfg, {"train.epoch": 3})
    with pytest.raises(ConfigError, match="train.epochs.*integer"):
        replace(cfg, {"train.epochs": "3"})
