"""capret_utils.runs.paths and capret_utils.runs.folders: path resolution, run folders, params/metrics files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from capret_utils import common, runs
from capret_utils.runs import paths


def test_repo_root_holds_the_package():
    assert (paths.repo_root() / "capret_utils" / "__init__.py").is_file()


def test_explicit_data_root_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        paths.data_root(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no split folder"):
        paths.data_root(tmp_path)
    (tmp_path / "validation").mkdir()
    assert paths.data_root(str(tmp_path)) == tmp_path.resolve()


def test_env_var_is_used_when_no_parameter(tmp_path, monkeypatch):
    (tmp_path / "train").mkdir()
    monkeypatch.setenv(paths.ENV_DATA, str(tmp_path))
    assert paths.data_root("") == tmp_path.resolve()
    other = tmp_path / "other"
    (other / "validation").mkdir(parents=True)
    assert paths.data_root(other) == other.resolve(), "the parameter wins over the environment"


def test_split_dir_names_the_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="split='train'"):
        paths.split_dir(tmp_path, "train")


def test_run_dir_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.run_dir("a/b", "x") == (tmp_path / "a" / "b").resolve()
    assert (tmp_path / "a" / "b").is_dir()
    auto = paths.run_dir("", "03_finetune")
    assert auto.parent == paths.repo_root() / "runs" / "scratch" and auto.name.startswith("03_finetune-")
    auto.rmdir()


def test_params_and_metrics_files(tmp_path):
    runs.write_params(tmp_path, {"margin": 0.15, "path": tmp_path, "arr": np.arange(3)}, notebook="03")
    rec = json.loads((tmp_path / "params.json").read_text())
    assert rec["params"] == {"margin": 0.15, "path": str(tmp_path), "arr": [0, 1, 2]}
    assert rec["notebook"] == "03"
    assert "git_sha" in rec and "environment" in rec
    runs.write_metrics(tmp_path, {"top1": np.float32(0.5), "bad": math.nan, "nested": {"k": np.int64(3)}})
    got = runs.read_metrics(tmp_path)
    assert got["top1"] == 0.5 and got["bad"] is None and got["nested"] == {"k": 3}
    assert "git_sha" in got["_meta"]
    assert not list(tmp_path.glob(".*.tmp-*")), "atomic writes leave no temp files"


def test_git_sha_is_a_commit():
    sha = runs.git_sha()
    if sha is None:
        pytest.skip("not a git checkout")
    assert len(sha.split("-")[0]) == 40


def test_atomic_path_publishes_on_success_and_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with common.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("a,b\n1,2\n")
        assert not target.exists()  # not published before the block ends
    assert target.read_text() == "a,b\n1,2\n"
    with pytest.raises(RuntimeError):
        with common.atomic_path(target) as tmp:
            tmp.write_text("torn")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "a,b\n1,2\n"  # the old file survives
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]  # no temp file left
    common.write_text_atomic(target, "x")
    assert target.read_text() == "x"


def test_run_dir_from_params_is_resumable(monkeypatch, tmp_path):
    monkeypatch.setattr(paths, "repo_root", lambda: tmp_path)
    params = {"margin": 0.15, "data_root": "/d", "run_dir": "", "launch_app": False}
    first = paths.run_dir("", "03_finetune", params=params)
    assert first.name == f"03_finetune-{paths.params_digest(params)}" and first.is_dir()
    # the same parameters find the same folder; ignored ones (run_dir, launch_app) do not matter
    assert paths.run_dir("", "03_finetune", params={**params, "launch_app": True}) == first
    assert paths.run_dir("", "03_finetune", params={**params, "margin": 0.2}) != first
    assert paths.run_dir("", "03_finetune", params=params, fresh=True) != first
    assert paths.run_dir(str(tmp_path / "given"), "03_finetune", params=params) == (tmp_path / "given").resolve()


def test_notebook_parameters_are_read_from_the_parameters_cell():
    names = runs.parameter_names("03_finetune")
    assert names[0] == "model" and {"margin", "num_workers", "fresh_run", "run_dir", "smoke"} <= set(names)
    values = runs.notebook_parameters({"margin": 0.2, "unrelated": 1}, "03_finetune")
    assert values == {"margin": 0.2}
