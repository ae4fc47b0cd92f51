"""The run-config schema: today's files round-trip, files written before the schema still load, and
damaged or newer files get one clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from enki_seg.run_config import SCHEMA_VERSION, RunConfig, RunConfigError

LEGACY = Path(__file__).parent / "data" / "run_config_v0_unet.json"


def test_a_config_written_before_the_schema_loads():
    config = RunConfig.load(LEGACY)  # written by train_unet.py before schema_version existed
    assert config.model.name == "unet" and config.model.size_multiple == 4
    assert config.model.config["depth"] == 2
    assert config.classes.number_classes == 2 and config.classes.name_list() == ["class_0", "class_1"]
    assert config.input.channels == 1 and config.input.dtype == "uint16"
    assert config.input.default_tile() == 64  # untiled 64x64 records
    assert config.normalization["method"] == "zscore"
    assert config.train["batch_size"] == 2 and config.augmentation["jitter"] == 0.1
    assert config.schema_version == SCHEMA_VERSION


def test_round_trip_keeps_every_section(tmp_path):
    config = RunConfig.load(LEGACY)
    config.extra["maskrcnn"] = {"anchor_scale": 2.0}
    config.save(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["maskrcnn"] == {"anchor_scale": 2.0}
    again = RunConfig.load(tmp_path / "config.json")
    assert again == config
    assert not list(tmp_path.glob(".*"))  # written atomically, nothing left beside it


def test_damaged_newer_and_missing_configs_say_what_to_do(tmp_path):
    with pytest.raises(RunConfigError, match="missing"):
        RunConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RunConfigError, match="cannot be read"):
        RunConfig.load(tmp_path / "config.json")
    data = json.loads(LEGACY.read_text())
    with pytest.raises(RunConfigError, match="newer than this code"):
        RunConfig.from_dict({**data, "schema_version": SCHEMA_VERSION + 1})
    del data["input"]
    with pytest.raises(RunConfigError, match="KeyError: 'input'"):
        RunConfig.from_dict(data)
