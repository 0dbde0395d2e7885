"""capret_utils.runs.sweep: name/type checks before running, run folders, failure recording, skip-finished, summary."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from capret_utils.runs import sweep

PARAMS_CELL = """\
margin: float = 0.15  # ArcFace angular margin, radians
use_captions: str = "none"  # none | template | dialogue
fail: bool = False  # raise inside the notebook (to test failure recording)
run_dir: str = ""  # run folder (set by the sweep)
"""
BODY = """\
from capret_utils import runs
from capret_utils.runs import paths
out = paths.run_dir(run_dir, "toy")
runs.write_params(out, dict(margin=margin, use_captions=use_captions, fail=fail), notebook="toy")
if fail:
    raise ValueError("asked to fail")
runs.write_metrics(out, {"finetuned": {"top1": round(1.0 - margin, 3)}, "captions": use_captions})
"""


@pytest.fixture()
def toy_notebook(tmp_path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("Toy notebook for sweep tests."),
                nbformat.v4.new_code_cell(PARAMS_CELL, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(BODY)]
    path = tmp_path / "toy.ipynb"
    nbformat.write(nb, path)
    return path


def _write_spec(tmp_path: Path, notebook: Path, **overrides) -> Path:
    spec = {"notebook": str(notebook), "name": "toy_sweep", "parameters": {"use_captions": "template"},
            "grid": {"margin": [0.1, 0.3]}}
    spec.update(overrides)
    path = tmp_path / "toy_sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_misspelled_parameter_is_refused_with_valid_names(tmp_path, toy_notebook):
    spec = sweep.load_spec(_write_spec(tmp_path, toy_notebook, grid={"margn": [0.1]}))
    with pytest.raises(sweep.SweepConfigError) as err:
        sweep.check(spec)
    msg = str(err.value)
    assert "margn" in msg and "margin" in msg and "use_captions" in msg
    assert not spec.sweep_dir.exists(), "nothing may run before the check"
    assert sweep.main([str(_write_spec(tmp_path, toy_notebook, grid={"margn": [0.1]}))]) == 2


def test_wrong_type_is_refused(tmp_path, toy_notebook):
    spec = sweep.load_spec(_write_spec(tmp_path, toy_notebook, grid={"margin": ["wide"]}))
    with pytest.raises(sweep.SweepConfigError, match="declared float"):
        sweep.check(spec)
    spec = sweep.load_spec(_write_spec(tmp_path, toy_notebook, grid={"fail": [1]}))
    with pytest.raises(sweep.SweepConfigError, match="declared bool"):
        sweep.check(spec)


def test_malformed_spec_names_the_field(tmp_path, toy_notebook):
    with pytest.raises(sweep.SweepConfigError, match="'grid'"):
        sweep.load_spec(_write_spec(tmp_path, toy_notebook, grid={"margin": 0.1}))
    with pytest.raises(sweep.SweepConfigError, match="'notebook'"):
        sweep.load_spec(_write_spec(tmp_path, tmp_path / "missing.ipynb"))
    with pytest.raises(sweep.SweepConfigError, match="both"):
        sweep.load_spec(_write_spec(tmp_path, toy_notebook, parameters={"margin": 0.2}))


def test_plan_slugs_are_readable_and_unique(tmp_path, toy_notebook):
    spec = sweep.load_spec(_write_spec(tmp_path, toy_notebook, grid={"margin": [0.05, 0.35],
                                                                   "use_captions": ["none", "dialogue"]},
                                       parameters={}))
    runs_ = sweep.plan(spec)
    names = [r.run_dir.name for r in runs_]
    assert len(set(names)) == 4
    assert names[0].startswith("margin0.05_use_captionsnone-")
    assert all(r.run_dir.parent == tmp_path / "toy_sweep" for r in runs_)


@pytest.mark.notebook
def test_sweep_runs_records_failures_skips_finished_and_summarises(tmp_path, toy_notebook):
    spec_path = _write_spec(tmp_path, toy_notebook, grid={"margin": [0.1, 0.3], "fail": [False, True]})
    spec = sweep.load_spec(spec_path)
    table = sweep.run_sweep(spec)
    assert len(table) == 4
    assert sorted(table["status"]) == ["failed", "failed", "ok", "ok"]
    failed = table[table["status"] == "failed"]
    assert failed["error"].str.contains("asked to fail").all()
    ok = table[table["status"] == "ok"].sort_values("param.margin")
    assert ok["metric.finetuned.top1"].tolist() == [0.9, 0.7]
    summary = pd.read_csv(tmp_path / "toy_sweep" / "summary.csv")
    assert {"param.margin", "param.fail", "param.use_captions", "metric.finetuned.top1", "status"} <= set(summary)
    for run in sweep.plan(spec):
        assert (run.run_dir / "params.json").is_file()
        assert (run.run_dir / "notebook.ipynb").is_file()
        params = json.loads((run.run_dir / "params.json").read_text())["params"]
        assert params["margin"] == run.params["margin"]

    # a second invocation runs nothing: finished runs are skipped, failed ones only with retry_failed
    mtimes = {r.run_dir: (r.run_dir / "status.json").stat().st_mtime_ns for r in sweep.plan(spec)}
    sweep.run_sweep(spec)
    assert {r.run_dir: (r.run_dir / "status.json").stat().st_mtime_ns for r in sweep.plan(spec)} == mtimes

    # deleting one finished run's metrics makes only that run execute again
    target = next(r for r in sweep.plan(spec) if r.params["fail"] is False)
    (target.run_dir / "metrics.json").unlink()
    sweep.run_sweep(spec)
    after = {r.run_dir: (r.run_dir / "status.json").stat().st_mtime_ns for r in sweep.plan(spec)}
    changed = [d for d in after if after[d] != mtimes[d]]
    assert changed == [target.run_dir]
    assert (target.run_dir / "metrics.json").is_file()
    assert sweep.load_summary(tmp_path / "toy_sweep").shape[0] == 4
