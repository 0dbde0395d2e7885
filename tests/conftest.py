"""Shared test set-up: an isolated, offline environment and the tiny synthetic benchmark.

Environment variables are set before any test module imports fiftyone / transformers / faiss, so every test
(and every subprocess it starts) uses a temporary FiftyOne database, no hub access and no analytics.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="capret-tests-"))
os.environ.setdefault("FIFTYONE_DATABASE_DIR", str(_SESSION_TMP / "fiftyone-db"))
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_SESSION_TMP / "hf-home")
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp (see capret_utils/__init__.py)
os.environ.pop("CAPRET_DATA", None)  # tests never read a developer's real data by accident
try:  # faiss-cpu is 2x faster with the Haswell OpenBLAS kernels (AVX2 machines only)
    if "avx2" in Path("/proc/cpuinfo").read_text():
        os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")
except OSError:
    pass


def shared_data_dir() -> Path:
    """The read-only reference data next to the project (``../shared/data``)."""
    from capret_utils.common import repo_root

    return repo_root().parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"reference data folder {path} is not available")
    return path


@pytest.fixture(scope="session")
def smoke_root() -> Path:
    """The tiny synthetic DeepFashion2-format benchmark (generated once, under the repo's data/)."""
    from capret_utils.runs import paths

    return paths.data_root("", smoke=True)
