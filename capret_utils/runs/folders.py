"""Run folders: every notebook run writes ``params.json`` (with the git SHA) and ``metrics.json``.

Writes are atomic (temp file + rename) so a killed run never leaves a torn JSON file.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from capret_utils.common import read_json, repo_root, write_json

PARAMS_FILE = "params.json"
METRICS_FILE = "metrics.json"


def git_sha(root: str | os.PathLike | None = None) -> str | None:
    """The checkout's HEAD commit (with ``-dirty`` when tracked files changed), or None outside git."""
    root = Path(root or repo_root())
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


def environment_info() -> dict[str, Any]:
    """Versions that matter for reproducing a run."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("torch", "transformers", "peft", "faiss", "numpy", "pandas"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            info[mod] = None
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001
        info["cuda"] = None
    return info


def write_params(run_dir: str | os.PathLike, params: Mapping[str, Any], notebook: str | None = None) -> Path:
    """Write ``params.json``: the parameters plus git SHA, notebook name, time and versions."""
    record = {
        "params": dict(params),
        "notebook": notebook,
        "git_sha": git_sha(),
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": environment_info(),
    }
    return write_json(Path(run_dir) / PARAMS_FILE, record)


def write_metrics(run_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics.json`` (the metrics plus the git SHA under ``_meta``)."""
    record = dict(metrics)
    record["_meta"] = {"git_sha": git_sha(), "written": _dt.datetime.now().isoformat(timespec="seconds")}
    return write_json(Path(run_dir) / METRICS_FILE, record)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(run_dir) / METRICS_FILE)


def parameter_names(notebook: str | os.PathLike) -> list[str]:
    """The names a notebook's ``parameters`` cell assigns, in order (``notebook``: a path, or a name under
    ``<repo>/notebooks`` such as ``"03_finetune"``)."""
    import ast

    import nbformat

    path = Path(notebook)
    if not path.suffix:
        path = repo_root() / "notebooks" / f"{notebook}.ipynb"
    nb = nbformat.read(path, as_version=4)
    cell = next((c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        raise ValueError(f"{path} has no cell tagged 'parameters'")
    names = []
    for node in ast.parse(cell.source).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def notebook_parameters(namespace: Mapping[str, Any], notebook: str | os.PathLike) -> dict[str, Any]:
    """The current values (from ``namespace``, e.g. ``globals()``) of every name in ``notebook``'s parameters cell:
    what a run folder's digest is computed from (:func:`capret_utils.runs.paths.run_dir`)."""
    return {n: namespace[n] for n in parameter_names(notebook) if n in namespace}
