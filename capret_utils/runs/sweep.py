"""Papermill sweeps: a YAML grid of notebook parameters run into ``runs/<name>/``, joined into ``summary.csv``.

A sweep file has four keys::

    notebook: notebooks/03_finetune.ipynb   # relative to the repository root (or absolute)
    name: margin_sweep                      # runs go to runs/<name>/ next to the YAML file
    parameters: {max_steps: 300}            # fixed values for every run
    grid: {margin: [0.05, 0.15], use_captions: [none, template]}   # cartesian product

Every parameter name is checked against the notebook's ``parameters`` cell before anything runs (papermill
itself only warns about unknown names and silently keeps the default), and values are checked against the
declared types. Each run goes to ``runs/<name>/<readable-slug>-<short-hash>/`` where ``params.json`` is written
first, then the executed notebook ``notebook.ipynb`` and the notebook's own ``metrics.json``; ``status.json``
records ``ok`` or ``failed`` with the error, and a failed run does not stop the sweep. Re-running a sweep skips
finished runs. ``summary.csv`` joins params and (flattened) metrics of every run.

CLI: ``python -m capret_utils.runs.sweep runs/<name>.yaml [--dry-run] [--retry-failed] [--max-runs N]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml

from capret_utils import runs
from capret_utils.common import repo_root, write_json
from capret_utils.runs import shutdown

STATUS_FILE = "status.json"
NOTEBOOK_FILE = "notebook.ipynb"
SUMMARY_FILE = "summary.csv"
_PY_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


class SweepConfigError(ValueError):
    """The sweep file is malformed or names parameters the notebook does not have."""


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file."""

    notebook: Path
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    out_dir: Path = Path("runs")

    @property
    def sweep_dir(self) -> Path:
        return self.out_dir / self.name


@dataclass(frozen=True)
class RunPlan:
    """One point of the grid."""

    params: dict[str, Any]
    run_dir: Path


def load_spec(path: str | Path, out_dir: str | Path | None = None) -> SweepSpec:
    """Read and check the shape of a sweep YAML (names are checked against the notebook by :func:`check`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SweepConfigError(f"{path}: expected a mapping with keys notebook, name, parameters, grid")
    unknown = set(raw) - {"notebook", "name", "parameters", "grid"}
    if unknown:
        raise SweepConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: notebook, name, "
                               "parameters, grid")
    for key in ("notebook", "name"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise SweepConfigError(f"{path}: field '{key}' must be a non-empty string")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", raw["name"]):
        raise SweepConfigError(f"{path}: field 'name' must be a folder name (letters, digits, _ . -)")
    parameters = raw.get("parameters") or {}
    grid = raw.get("grid") or {}
    if not isinstance(parameters, dict):
        raise SweepConfigError(f"{path}: field 'parameters' must be a mapping name -> value")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepConfigError(f"{path}: field 'grid' must map each name to a non-empty list of values")
    both = set(parameters) & set(grid)
    if both:
        raise SweepConfigError(f"{path}: {sorted(both)} appear in both 'parameters' and 'grid'")
    notebook = Path(raw["notebook"])
    if not notebook.is_absolute():
        notebook = repo_root() / notebook
    if not notebook.is_file():
        raise SweepConfigError(f"{path}: field 'notebook': {notebook} does not exist")
    return SweepSpec(notebook=notebook, name=raw["name"], parameters=dict(parameters), grid=dict(grid),
                     out_dir=Path(out_dir) if out_dir is not None else path.resolve().parent)


def notebook_parameters(notebook: str | Path) -> dict[str, dict[str, Any]]:
    """The notebook's declared parameters (papermill's parser of the ``parameters`` cell)."""
    import papermill

    return dict(papermill.inspect_notebook(str(notebook)))


def check(spec: SweepSpec) -> None:
    """Refuse unknown parameter names (listing the valid ones) and values of the wrong type."""
    declared = notebook_parameters(spec.notebook)
    valid = sorted(declared)
    given = list(spec.parameters) + list(spec.grid)
    bad = [n for n in given if n not in declared]
    if bad:
        raise SweepConfigError(
            f"sweep '{spec.name}': unknown parameter(s) {bad} for {spec.notebook.name}; valid names: {valid}")
    if "run_dir" in given:
        raise SweepConfigError(f"sweep '{spec.name}': 'run_dir' is set by the sweep itself")
    for name in given:
        values = spec.grid.get(name, [spec.parameters.get(name)])
        typ = declared[name].get("inferred_type_name")
        allowed = _PY_TYPES.get(str(typ))
        for value in values:
            ok = allowed is None or (isinstance(value, allowed) and not (typ in ("int", "float")
                                                                       and isinstance(value, bool)))
            if not ok:
                raise SweepConfigError(f"sweep '{spec.name}': parameter '{name}' is declared {typ} in "
                                       f"{spec.notebook.name}, got {value!r} ({type(value).__name__})")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def slug(params: Mapping[str, Any], varying: list[str]) -> str:
    """Readable folder name from the grid values plus a short hash of all parameters."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    readable = "_".join(f"{k}{_fmt(params[k])}" for k in varying)[:80] or "run"
    return f"{readable}-{digest}"


def plan(spec: SweepSpec) -> list[RunPlan]:
    """The runs of a sweep, in grid order."""
    names = list(spec.grid)
    out = []
    for combo in itertools.product(*(spec.grid[n] for n in names)) if names else [()]:
        params = dict(spec.parameters)
        params.update(dict(zip(names, combo)))
        out.append(RunPlan(params=params, run_dir=spec.sweep_dir / slug(params, names)))
    return out


def read_status(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(run_dir: Path) -> bool:
    status = read_status(run_dir)
    return bool(status and status.get("status") == "ok" and (Path(run_dir) / runs.METRICS_FILE).is_file())


def run_notebook(notebook: Path, run_dir: Path, params: Mapping[str, Any], kernel_name: str | None = None,
                 execution_timeout: int | None = None, log_output: bool = False) -> dict[str, Any]:
    """Execute ``notebook`` into ``run_dir`` with ``params`` (plus ``run_dir``); never raises for a notebook error.

    Writes ``params.json`` first, then ``notebook.ipynb`` (the executed copy) and ``status.json`` (``ok`` or
    ``failed`` with the error type, message, failing cell and duration); returns the status record. A run that
    finishes without writing ``metrics.json`` counts as failed.
    """
    import papermill

    notebook, run_dir = Path(notebook), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_params(run_dir, params, notebook=notebook.name)
    (run_dir / runs.METRICS_FILE).unlink(missing_ok=True)
    started = time.time()
    status: dict[str, Any] = {"status": "running", "started": _dt.datetime.now().isoformat(timespec="seconds"),
                              "notebook": notebook.name, "params": dict(params)}
    write_json(run_dir / STATUS_FILE, status)
    parameters = dict(params, run_dir=str(run_dir.resolve()))
    try:
        papermill.execute_notebook(str(notebook), str(run_dir / NOTEBOOK_FILE), parameters=parameters,
                                   kernel_name=kernel_name, cwd=str(run_dir), progress_bar=False,
                                   log_output=log_output, execution_timeout=execution_timeout)
        if not (run_dir / runs.METRICS_FILE).is_file():
            raise RuntimeError(f"the notebook finished without writing {runs.METRICS_FILE}")
        status.update(status="ok")
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded and the caller decides
        status.update(status="failed", error_type=getattr(exc, "ename", type(exc).__name__),
                      error=str(getattr(exc, "evalue", exc))[:2000],
                      cell_index=getattr(exc, "cell_index", None),
                      traceback=traceback.format_exc(limit=5)[-4000:])
    except BaseException as exc:  # SIGTERM (runs.shutdown) or Ctrl-C: record it, then stop the caller too
        status.update(status="failed", error_type=type(exc).__name__, error="interrupted",
                      duration_s=round(time.time() - started, 2))
        write_json(run_dir / STATUS_FILE, status)
        raise
    status["duration_s"] = round(time.time() - started, 2)
    write_json(run_dir / STATUS_FILE, status)
    return status


def execute(spec: SweepSpec, run: RunPlan, kernel_name: str | None = None,
            execution_timeout: int | None = None) -> dict[str, Any]:
    """Run one grid point (see :func:`run_notebook`)."""
    return run_notebook(spec.notebook, run.run_dir, run.params, kernel_name=kernel_name,
                        execution_timeout=execution_timeout)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    else:
        out[prefix] = value


def summarize(spec: SweepSpec) -> pd.DataFrame:
    """Join params, status and flattened metrics of every planned run into ``summary.csv``."""
    rows = []
    for run in plan(spec):
        row: dict[str, Any] = {"run": run.run_dir.name}
        row.update({f"param.{k}": v for k, v in run.params.items()})
        status = read_status(run.run_dir) or {"status": "not run"}
        row["status"] = status.get("status")
        row["error"] = status.get("error")
        row["duration_s"] = status.get("duration_s")
        metrics_path = run.run_dir / runs.METRICS_FILE
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())
            metrics.pop("_meta", None)
            flat: dict[str, Any] = {}
            _flatten("", metrics, flat)
            row.update({f"metric.{k}": v for k, v in flat.items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(spec.sweep_dir / SUMMARY_FILE, index=False)
    return table


def run_sweep(spec: SweepSpec, retry_failed: bool = False, max_runs: int | None = None,
              kernel_name: str | None = None, execution_timeout: int | None = None,
              dry_run: bool = False) -> pd.DataFrame:
    """Check, then run every unfinished grid point (failed ones only with ``retry_failed``); write the summary."""
    from tqdm.auto import tqdm

    check(spec)
    todo = []
    for run in plan(spec):
        status = read_status(run.run_dir)
        if is_finished(run.run_dir):
            continue
        if status and status.get("status") == "failed" and not retry_failed:
            continue
        todo.append(run)
    if max_runs is not None:
        todo = todo[:max_runs]
    if dry_run:
        for run in todo:
            print(f"would run {run.run_dir}: {run.params}")
        return summarize(spec)
    for run in tqdm(todo, desc=f"sweep {spec.name}", unit="run"):
        status = execute(spec, run, kernel_name=kernel_name, execution_timeout=execution_timeout)
        if status["status"] != "ok":
            print(f"run {run.run_dir.name} failed: {status.get('error_type')}: {status.get('error')}",
                  file=sys.stderr)
    return summarize(spec)


def load_summary(path: str | Path) -> pd.DataFrame:
    """Read a ``summary.csv`` (or the sweep folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    return pd.read_csv(path)


def find_summaries(spec: str, runs_dir: str | os.PathLike | None = None) -> list[Path]:
    """``spec`` = a summary.csv, a sweep folder, ``""`` (every ``runs/*/summary.csv``) or ``"none"``."""
    if str(spec).strip().lower() == "none":
        return []
    if str(spec).strip():
        path = Path(spec).expanduser()
        path = path / SUMMARY_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"sweep_summary {spec!r}: {path} does not exist (a summary.csv written by "
                                    f"python -m capret_utils.runs.sweep, or its folder)")
        return [path]
    root = Path(runs_dir) if runs_dir else repo_root() / "runs"
    return sorted(root.glob(f"*/{SUMMARY_FILE}"))


SWEEP_METRIC_PREFIXES = ("metric.select.finetuned.", "metric.finetuned.", "metric.headline.finetuned.",
                         "metric.headline.zero_shot.")
"""Which metrics a sweep plot shows, first match wins: notebook 03's select-split metrics (sweeps tune on select,
never on test), older runs' fine-tuned metrics, then notebook 04's headline."""


def long_form(summary: pd.DataFrame, metric_prefix: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Finished runs of a sweep summary in long form (one row per run and metric) and the varying parameters
    (those with more than one value). ``metric_prefix`` None: notebook 03's ``metric.finetuned.``, else 04's
    ``metric.headline.finetuned.`` / ``metric.headline.zero_shot.``, whichever the summary has."""
    ok = summary[summary.get("status", pd.Series("ok", index=summary.index)) == "ok"]
    params = [c for c in ok.columns if c.startswith("param.")]
    varying = [c for c in params if ok[c].astype(str).nunique() > 1]
    varying.sort(key=lambda c: not pd.api.types.is_numeric_dtype(ok[c]))  # a numeric parameter goes on the x axis
    if metric_prefix is None:
        metric_prefix = next((p for p in SWEEP_METRIC_PREFIXES if any(c.startswith(p) for c in ok.columns)),
                             SWEEP_METRIC_PREFIXES[0])
    mcols = [c for c in ok.columns if c.startswith(metric_prefix)]
    long = ok.melt(id_vars=params, value_vars=mcols, var_name="metric", value_name="value")
    long["metric"] = long["metric"].str.removeprefix(metric_prefix)
    return long, varying


def main(argv: list[str] | None = None) -> int:
    shutdown.exit_cleanly_on_sigterm()  # a killed run takes its notebook kernels with it
    parser = argparse.ArgumentParser(prog="python -m capret_utils.runs.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="sweep YAML (keys: notebook, name, parameters, grid)")
    parser.add_argument("--out-dir", default=None, help="parent of runs/<name>/ (default: the YAML's folder)")
    parser.add_argument("--dry-run", action="store_true", help="check and list the runs without executing")
    parser.add_argument("--retry-failed", action="store_true", help="run failed grid points again")
    parser.add_argument("--max-runs", type=int, default=None, help="execute at most this many runs")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    parser.add_argument("--execution-timeout", type=int, default=None, help="per-cell timeout, seconds")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.out_dir)
        table = run_sweep(spec, retry_failed=args.retry_failed, max_runs=args.max_runs, kernel_name=args.kernel,
                          execution_timeout=args.execution_timeout, dry_run=args.dry_run)
    except SweepConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = table["status"].value_counts().to_dict()
    print(json.dumps({"sweep": spec.name, "summary": str(spec.sweep_dir / SUMMARY_FILE), "runs": counts}))
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
