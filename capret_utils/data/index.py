"""The lean, cached items index: what training, evaluation and captioning read instead of re-parsing every JSON.

:func:`load_index` returns the items table of a split folder (same rows and columns as
:func:`~capret_utils.data.df2.load_items`) without the two heavy per-item fields, ``landmarks`` and
``segmentation`` (Python lists: about 0.9 GB at 173 k items, and DataLoader workers that fork touch and copy such
objects). Strings are pandas' Arrow-backed ``str`` columns (no Python object per value), numbers numpy columns. ``heavy=True`` adds the two fields back, read from the cache's Arrow file (notebook 01's
FiftyOne dataset is their only user).

The first call parses the split with :func:`~capret_utils.data.df2.load_items` (progress bar from 4,000 files,
two worker processes) and stores the result under ``<cache_dir>/<split>-<digest>.parquet`` (+ ``.heavy.parquet`` and
``.json`` with the reader's ``attrs``: skipped files, clamped boxes). The digest covers the listing of ``annos/``
and ``image/`` (names, sizes, modification times), the reader mode (``errors``) and :data:`INDEX_VERSION`, so an
edited, added or removed file rebuilds the index and a second start reads it in about a second.

``cache_dir``: the argument, else ``$CAPRET_CACHE/index``, else ``<repo>/.cache/index``; ``cache=False`` parses
every time (nothing written).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd

from capret_utils.common import atomic_path, repo_root
from capret_utils.data.df2_reader import ErrorMode, ReadConfig, load_items

INDEX_VERSION = 2
"""Bump when the lean table's columns or types change (old cache files are then ignored)."""

HEAVY_COLUMNS = ("landmarks", "segmentation")
ENV_CACHE = "CAPRET_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where index files live: ``cache_dir``, else ``$CAPRET_CACHE/index``, else ``<repo>/.cache/index``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE, "").strip()
    return (Path(env).expanduser() if env else repo_root() / ".cache") / "index"


def listing_digest(split_dir: str | os.PathLike, errors: str = "raise") -> str:
    """A digest of a split folder's ``annos/`` and ``image/`` listings (name, size, mtime of every file), the reader
    mode and :data:`INDEX_VERSION`: it changes whenever a file the index was built from changes."""
    split_dir = Path(split_dir)
    h = hashlib.sha256(f"v{INDEX_VERSION}|{errors}|{split_dir.resolve()}".encode())
    for sub in ("annos", "image"):
        folder = split_dir / sub
        if not folder.is_dir():
            h.update(f"|no {sub}".encode())
            continue
        entries = []
        with os.scandir(folder) as it:
            for e in it:
                st = e.stat()
                entries.append(f"{e.name}:{st.st_size}:{st.st_mtime_ns}")
        entries.sort()
        h.update(f"|{sub}:{len(entries)}|".encode())
        h.update("\n".join(entries).encode())
    return h.hexdigest()[:20]


def lean(items: pd.DataFrame) -> pd.DataFrame:
    """The items table without the heavy fields (attrs kept)."""
    out = items.drop(columns=[c for c in HEAVY_COLUMNS if c in items.columns])
    out.attrs = dict(items.attrs)
    return out


def _paths(root: Path, split: str, digest: str) -> tuple[Path, Path, Path]:
    stem = root / f"{split}-{digest}"
    return stem.with_suffix(".parquet"), Path(f"{stem}.heavy.parquet"), stem.with_suffix(".json")


def _write(items: pd.DataFrame, table: Path, heavy: Path, meta: Path, seconds: float) -> None:
    table.parent.mkdir(parents=True, exist_ok=True)
    cols = [c for c in HEAVY_COLUMNS if c in items.columns]
    with atomic_path(heavy) as tmp:
        items[["key", *cols]].to_parquet(tmp, index=False)
    with atomic_path(table) as tmp:
        lean(items).to_parquet(tmp, index=False)
    attrs = {k: v for k, v in items.attrs.items()}
    with atomic_path(meta) as tmp:
        tmp.write_text(json.dumps({"attrs": attrs, "rows": len(items), "parse_seconds": round(seconds, 2),
                                   "index_version": INDEX_VERSION}, default=str))


def load_index(split_dir: str | os.PathLike, errors: ErrorMode = "raise", heavy: bool = False,
               cache: bool = True, cache_dir: str | os.PathLike | None = None,
               config: ReadConfig | None = None) -> pd.DataFrame:
    """The items table of ``split_dir`` from the index cache (parsed and stored on first use; see the module
    docstring). ``errors`` is the reader's mode: ``"raise"`` stops at the first bad annotation naming the file and
    the field; ``"skip"`` leaves bad files/items out and lists them in ``df.attrs["skipped"]`` (a cached index
    keeps that list). ``heavy`` adds ``landmarks`` and ``segmentation``. ``df.attrs["index"]`` says whether the
    cache was hit and how long loading took."""
    split_dir = Path(split_dir).expanduser().resolve()
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder {split_dir} does not exist")
    t0 = time.perf_counter()
    if not cache:
        items = load_items(split_dir, errors=errors, config=config)
        out = items if heavy else lean(items)
        out.attrs["index"] = {"cached": False, "hit": False, "seconds": round(time.perf_counter() - t0, 2)}
        return out
    digest = listing_digest(split_dir, errors)
    table, heavy_file, meta = _paths(cache_root(cache_dir), split_dir.name, digest)
    hit = table.is_file() and meta.is_file() and (heavy_file.is_file() or not heavy)
    if hit:
        items = pd.read_parquet(table)
        info: dict[str, Any] = json.loads(meta.read_text())
        items.attrs.update(info.get("attrs", {}))
        if heavy:
            extra = pd.read_parquet(heavy_file)
            for col in HEAVY_COLUMNS:
                if col in extra.columns:
                    items[col] = [_as_list(v) for v in extra[col].to_numpy()]
    else:
        full = load_items(split_dir, errors=errors, config=config)
        _write(full, table, heavy_file, meta, time.perf_counter() - t0)
        items = full if heavy else lean(full)
    items.attrs["index"] = {"cached": True, "hit": hit, "file": str(table),
                            "seconds": round(time.perf_counter() - t0, 2)}
    return items


def _as_list(value: Any) -> Any:
    """Arrow list values come back as numpy arrays (of arrays); the reader's table holds plain lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_as_list(v) for v in value]
    return value
