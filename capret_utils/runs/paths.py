"""Where things live: the repository root, the data root and run folders.

No notebook computes a path by hand. The data root is, in order: the notebook's ``data_root`` parameter,
the ``CAPRET_DATA`` environment variable, or the embedded default, a synthetic DeepFashion2-format
benchmark under ``<repo>/data/`` that is generated on first use (``capret_utils.data.synth``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from capret_utils.common import repo_root  # noqa: F401 - re-exported: paths.repo_root() in notebooks
from capret_utils.data import synth
from capret_utils.data.df2 import SPLITS

ENV_DATA = "CAPRET_DATA"


def default_data_root(smoke: bool = False) -> Path:
    """Folder of the embedded synthetic benchmark (demo size, or the tiny smoke size)."""
    return repo_root() / "data" / ("synthetic-smoke" if smoke else "synthetic")


def data_root(data_root: str | os.PathLike | None = None, smoke: bool = False) -> Path:
    """Resolve the DeepFashion2-format data root.

    ``data_root`` (a notebook parameter) wins when non-empty, then ``$CAPRET_DATA``, then the synthetic
    default, which is generated here on first use. An explicit root must exist and hold at least one split
    folder (``train/`` or ``validation/``); otherwise a ``FileNotFoundError`` says what is missing.
    """
    explicit = str(data_root or "").strip() or os.environ.get(ENV_DATA, "").strip()
    if explicit:
        root = Path(explicit).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} does not exist (from data_root / ${ENV_DATA})")
        if not any((root / s).is_dir() for s in SPLITS):
            raise FileNotFoundError(
                f"data root {root} holds no split folder: expected {root}/validation/image and "
                f"{root}/validation/annos (and/or train/) in the DeepFashion2 layout"
            )
        return root
    root = default_data_root(smoke)
    synth.ensure_benchmark(root, synth.SynthConfig.smoke() if smoke else synth.SynthConfig.demo())
    return root


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """``<root>/<split>`` with a clear error when it is missing."""
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(f"split folder {path} does not exist (split={split!r})")
    return path


RUN_DIGEST_IGNORED = ("run_dir", "fresh_run", "launch_app", "progress")
"""Parameters that do not change a run's results, left out of the run-folder digest."""


def params_digest(params: Mapping[str, Any]) -> str:
    """12 hex digits identifying a notebook run's parameters (:data:`RUN_DIGEST_IGNORED` left out)."""
    kept = {k: v for k, v in params.items() if k not in RUN_DIGEST_IGNORED}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_dir(run_dir: str | os.PathLike | None = None, notebook: str = "run",
            params: Mapping[str, Any] | None = None, fresh: bool = False) -> Path:
    """Create and return a run folder: the given ``run_dir``; else, with ``params``, the resumable
    ``runs/scratch/<notebook>-<digest of params>`` (the same command finds its earlier folder again: notebook 03
    resumes its training, notebook 04 reuses its embeddings); else, or with ``fresh``, a new
    ``runs/scratch/<notebook>-<timestamp>``."""
    if str(run_dir or "").strip():
        path = Path(run_dir).expanduser()
        if not path.is_absolute():
            path = Path.cwd() / path
    elif params is not None and not fresh:
        path = repo_root() / "runs" / "scratch" / f"{notebook}-{params_digest(params)}"
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = repo_root() / "runs" / "scratch" / f"{notebook}-{stamp}"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
