"""capret_utils.train.config: one definition per setting, parameters written once, overrides reach every field."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields

import papermill
import pytest

from capret_utils import train
from capret_utils.common import repo_root
from capret_utils.data import loader as D
from capret_utils.data.boxes import CROP_CONTEXT
from capret_utils.evaluation.metrics import DEFAULT_KS
from capret_utils.x2vlm import PRESETS, RANDOM_INIT_PRESETS

NOTEBOOK_ONLY = {"captions_path", "data_root", "run_dir", "smoke", "overrides", "select_fraction"}


def test_every_field_is_documented_in_the_args_docstring():
    doc = train.TrainConfig.__doc__
    args = doc.split("Args:", 1)[1]
    documented = set(re.findall(r"^ {8}(\w+):", args, flags=re.M))
    assert documented == set(train.config_fields())


def test_notebook_03_parameters_are_fields_or_run_info():
    params = papermill.inspect_notebook(str(repo_root() / "notebooks" / "03_finetune.ipynb"))
    names = set(params)
    assert names - NOTEBOOK_ONLY <= set(train.config_fields()), sorted(names - NOTEBOOK_ONLY - set(train.config_fields()))
    assert "margin" in names and "overrides" in names
    source = "\n".join(c.source for c in __import__("nbformat").read(
        str(repo_root() / "notebooks" / "03_finetune.ipynb"), as_version=4).cells)
    assert "TrainConfig(" not in source, "notebook 03 builds its config from the parameters cell, not by hand"


def test_one_default_per_setting():
    assert train.TrainConfig().context == D.DataConfig().context == CROP_CONTEXT
    assert train.EVAL_KS == DEFAULT_KS
    assert set(RANDOM_INIT_PRESETS) <= set(PRESETS) and train.RANDOM_INIT_PRESETS == RANDOM_INIT_PRESETS


def test_config_from_params_takes_fields_then_overrides(tmp_path):
    ns = {"margin": 0.3, "lr": 1e-3, "smoke": True, "data_root": "x", "unrelated": object()}
    cfg = train.config_from_params(ns, "{erase_prob: 0.25, lr: 5e-4, crop_scale: [0.8, 1.0]}")
    assert (cfg.margin, cfg.lr, cfg.erase_prob, cfg.crop_scale) == (0.3, 5e-4, 0.25, (0.8, 1.0))
    assert train.config_from_params(ns, '{"context": 0.1}').context == 0.1          # JSON
    path = tmp_path / "o.yaml"
    path.write_text("w_box: 0\nschedule: linear\n")
    cfg = train.config_from_params(ns, str(path))
    assert (cfg.w_box, cfg.schedule) == (0, "linear")
    assert train.config_from_params(ns, {"seed": 3}).seed == 3
    assert train.config_from_params({}, "") == train.TrainConfig()


def test_overrides_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['erase'\]"):
        train.config_from_params({}, "{erase: 0.3}")
    with pytest.raises(ValueError, match="expected a mapping"):
        train.config_from_params({}, "[1, 2]")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        train.config_from_params({}, str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="schedule must be cosine"):
        train.config_from_params({}, "{schedule: step}")


def test_from_dict_round_trips_json():
    cfg = train.TrainConfig(margin=0.2, crop_scale=(0.7, 1.0), model="tiny")
    again = train.TrainConfig.from_dict(json.loads(json.dumps(asdict(cfg))))
    assert again == cfg and isinstance(again.crop_scale, tuple)
    assert [f.name for f in fields(train.TrainConfig)] == train.config_fields()
