"""capret_utils.train.config: one definition per setting, parameters written once, overrides reach every field."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields, replace

import papermill
import pytest

from capret_utils import train
from capret_utils.common import repo_root
from capret_utils.data import loader as D
from capret_utils.data.boxes import CROP_CONTEXT
from capret_utils.evaluation.metrics import DEFAULT_KS
from capret_utils.x2vlm import PRESETS, RANDOM_INIT_PRESETS

NOTEBOOK_ONLY = {"captions_path", "data_root", "run_dir", "smoke", "overrides", "select_fraction", "bad_annotations",
                 "fresh_run", "nproc", "encoder"}  # run info: where the data and the run live, how it is launched;
# encoder: a peer encoder instead of X2-VLM (capret_utils.train.peers.run_peer_finetune)


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


# ---------------------------------------------------------------------------------------------- recipes
def test_demo_recipe_is_todays_defaults_and_keeps_the_demo_step_count():
    default = train.TrainConfig()
    assert all(getattr(default, k) == v for k, v in train.RECIPES["demo"].items())
    assert set(train.RECIPES["demo"]) == set(train.RECIPES["x2vlm"])
    for params in ({}, {"model": "demo"}, {"model": "demo", "recipe": "demo"}, {"model": "tiny"}):
        resolved = train.resolve_params(params, "")
        assert resolved.recipe == "demo"
        assert resolved.config == train.TrainConfig(**params)
    # epochs count passes over the items: the demo benchmark's 2014 training items in micro-batches of 64 give 32
    # per epoch, so the demo's 30 epochs are its 960 steps (as 192 passes over its 324 identities were before)
    assert train.total_steps_for(default, train.batches_per_epoch(default, 2014)) == 960
    assert train.total_steps_for(replace(default, grad_accum=2), train.batches_per_epoch(default, 2014)) == 480
    assert train.batches_per_epoch(default, 64) == 1 and train.batches_per_epoch(default, 65) == 2


def test_x2vlm_recipe_resolves_the_official_values_for_pretrained_models(tmp_path):
    official = dict(image_res=384, lr=3e-5, weight_decay=0.01, head_lr_mult=2.0, schedule="linear", warmup=0.1,
                    epochs=10, batch_size=20, w_itc=1.0, w_itm=1.0, w_box=0.0, w_category=0.0,
                    category_recolour=0, crop_scale=(0.5, 1.0), crop_ratio_relative=False, erase_prob=0.0,
                    margin=0.15, arcface_scale=30.0, w_arcface=1.0, finetune_mode="full", tta_contexts=())
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / train.INFO_FILE).write_text("{}")
    for model in ("base", "large", "x2vlm_base_1b.th", str(folder)):
        resolved = train.resolve_params({"model": model}, "")
        assert resolved.recipe == "x2vlm" and resolved.config.recipe == "auto"
        cfg = resolved.config
        assert {k: getattr(cfg, k) for k in official} == official, model
        assert cfg.weights().box == 0 and cfg.weights().category == 0 and cfg.mode == "full"
    # an explicit recipe wins over auto; demo on base is today's behaviour (LoRA, demo values)
    demo_base = train.config_from_params({"model": "base", "recipe": "demo"}, "")
    assert demo_base == train.TrainConfig(model="base", recipe="demo") and demo_base.mode == "lora"
    assert train.resolve_params({"model": "demo", "recipe": "x2vlm"}, "").config.lr == 3e-5
    with pytest.raises(ValueError, match="recipe must be auto"):
        train.config_from_params({"recipe": "coco"}, "")


def test_a_parameter_the_user_sets_always_wins_and_params_record_the_source():
    resolved = train.resolve_params({"model": "base", "lr": 1e-4, "batch_size": 32, "finetune_mode": "lora",
                                     "smoke": False}, "{w_box: 1.0, erase_prob: 0.2}")
    cfg, sources = resolved.config, resolved.sources
    assert (cfg.lr, cfg.batch_size, cfg.mode, cfg.erase_prob) == (1e-4, 32, "lora", 0.2)
    assert cfg.w_box == 1.0  # equal to the demo default, kept because overrides name it
    assert cfg.schedule == "linear" and cfg.weight_decay == 0.01  # not set: the recipe's
    assert sources["lr"] == sources["w_box"] == sources["model"] == sources["erase_prob"] == "user"
    assert sources["schedule"] == sources["epochs"] == "recipe" and sources["seed"] == "default"
    params = resolved.params()
    assert params["recipe_effective"] == "x2vlm" and set(params["param_sources"]) == set(train.config_fields())
    assert {k: params[k] for k in train.config_fields()} == asdict(cfg)
    json.dumps(params)  # params.json-ready
    assert "recipe x2vlm" in resolved.describe() and "lr" in resolved.describe().splitlines()[1]
    # applying the recipe again with the same user-set names changes nothing
    assert train.apply_recipe(cfg, user_set={"w_box"}).config == cfg
    base = train.config_from_params({"model": "base"}, "")
    assert train.apply_recipe(base).config == base


def test_notebook_03_exposes_recipe_accumulation_and_checkpointing():
    params = papermill.inspect_notebook(str(repo_root() / "notebooks" / "03_finetune.ipynb"))
    for name in ("recipe", "grad_accum", "gradient_checkpointing", "epochs"):
        assert params[name]["default"] == repr(getattr(train.TrainConfig(), name)).replace("'", '"'), name
    source = "\n".join(c.source for c in __import__("nbformat").read(
        str(repo_root() / "notebooks" / "03_finetune.ipynb"), as_version=4).cells)
    assert "train.resolve_params(globals(), overrides)" in source and "param_sources" in source
    assert "train.plan_memory(cfg)" in source and "train.check_fits(cfg, plan)" in source


def test_crop_tta_is_an_evaluation_setting_that_never_changes_the_trajectory():
    """Test-time augmentation is evaluation only: off in both recipes, free to change on resume, validated."""
    assert train.TrainConfig().tta_contexts == () and train.RECIPES["x2vlm"]["tta_contexts"] == ()
    assert train.TrainConfig().trajectory_digest() == train.TrainConfig(tta_contexts=(0.0,)).trajectory_digest()
    cfg = train.config_from_params({}, "{tta_contexts: [0.0, 0.1]}")
    assert cfg.tta_contexts == (0.0, 0.1)
    with pytest.raises(ValueError, match="tta_contexts"):
        train.TrainConfig(tta_contexts=(-0.1,)).validate()
