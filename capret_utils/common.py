"""Plumbing every stage shares: the repository root, atomic file writes, JSON conversion, the device resolver and
the deterministic-algorithms switch of CPU training.

This module imports nothing from ``capret_utils`` (it sits below every stage package), so any stage can use it
without creating an import cycle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

if TYPE_CHECKING:
    import torch


def repo_root() -> Path:
    """The checkout this package is installed from (``pip install -e .``)."""
    return Path(__file__).resolve().parent.parent


def resolve_device(device: str = "auto") -> "torch.device":
    """``"auto"`` -> CUDA when torch sees a GPU, else CPU; any other torch device string is checked and returned.

    Raises ``RuntimeError`` when a CUDA device is asked for and torch sees none.
    """
    import torch

    if device in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA GPU")
    return dev


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside the block when ``enabled``; the previous
    setting is restored afterwards. CPU training under it is bitwise repeatable at one thread count (notebook 03's
    fine-tuning and notebook 02's pixel answerer)."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def jsonable(value: Any) -> Any:
    """Convert numpy / torch / Path values into plain JSON types; NaN and inf become None."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    elif hasattr(value, "tolist"):
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, rename it onto ``path`` (readers
    never see a torn file). ``with atomic_path(out) as tmp: frame.to_csv(tmp)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; when the block ends without error it replaces ``target``
    (a half-built folder is never seen under the final name; on error the temporary folder is removed).
    ``with atomic_dir(out / "tiny-clip") as tmp: model.save_pretrained(tmp)``."""
    import shutil
    import tempfile

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically."""
    return write_text_atomic(path, json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def read_param_file(path: str | os.PathLike, allowed: Iterable[str], allowed_text: str) -> dict[str, Any]:
    """The mapping in a YAML / JSON parameter file (the CLIs' ``--params``); a missing file, a parse error, a
    non-mapping or a name outside ``allowed`` raises naming the file (and the name; ``allowed_text`` says what is
    allowed)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parameter file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not a YAML / JSON mapping ({err})") from err
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: expected a mapping of parameters, got {type(values).__name__}")
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{path}: unknown parameter(s) {unknown}; allowed: {allowed_text}")
    return dict(values)


def from_params(cls: type, params: Mapping[str, Any], **extra: Any) -> Any:
    """An instance of the dataclass ``cls`` from every field named in ``params`` (e.g. a notebook's ``globals()``
    after its parameters cell; other names are ignored) plus ``extra``: notebook parameters are written once."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in names}, **extra)
