"""The resumable caption store: ``captions.jsonl``, appended and fsync'ed per batch, torn last lines cut off.

Sharded: with several processes each rank appends to its own file, ``captions.rank{r}.jsonl`` next to
``captions.jsonl`` (:func:`shard_path`); readers (:func:`load_captions`, :func:`read_captions`,
:func:`merged_records`) merge ``captions.jsonl`` and every shard (:func:`store_shards`)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (
    Any,
    Mapping,
    Sequence,
)

import pandas as pd

try:  # POSIX advisory lock: one writer per store
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]



# ------------------------------------------------------------------------------------------ caption store

CAPTIONS_FILE = "captions.jsonl"


@dataclass
class StoreReport:
    """What a read of ``captions.jsonl`` found: complete records, a torn last line, duplicate keys."""

    path: str
    records: int = 0
    torn_last_line: bool = False
    torn_bytes: int = 0
    duplicate_keys: list[str] = field(default_factory=list)


def _parse_store(path: Path, data: bytes) -> tuple[list[dict[str, Any]], StoreReport, int]:
    """Parse the bytes of a store; returns the records, a report and the byte length of the complete part."""
    report = StoreReport(str(path))
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if end < len(data):
        report.torn_last_line, report.torn_bytes = True, len(data) - end
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}:{lineno}: corrupt line in the middle of the caption store ({exc}); "
                             f"only the last line may be torn") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        for fname in ("key", "caption", "method"):
            if not isinstance(obj.get(fname), str):
                raise ValueError(f"{path}:{lineno}: field {fname!r} = {obj.get(fname)!r} is missing or not a string")
        if obj["key"] in seen:
            report.duplicate_keys.append(obj["key"])
        seen.add(obj["key"])
        records.append(obj)
    report.records = len(records)
    return records, report, end


class CaptionStore:
    """``captions.jsonl``: one JSON object per item (``key``, ``caption``, ``method``, + ``dialogue`` …).

    Writes: :meth:`append_batch` writes a whole batch with one ``os.write`` on an ``O_APPEND`` descriptor, then
    ``fsync`` — every line is complete and ends in a newline. The first append takes an exclusive ``flock`` (a
    second writer gets a clear error) and cuts a torn last line left by a killed run, so a resumed run never
    glues its first line onto a fragment. Reads (:meth:`read`, :meth:`records`, :meth:`done_keys`) tolerate a
    torn last line and report it with a warning and in :meth:`report`; a corrupt line anywhere else raises.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.path = path / CAPTIONS_FILE if path.is_dir() else path
        self._fd: int | None = None
        self._done: set[str] = set()
        self.last_report: StoreReport | None = None

    # reading --------------------------------------------------------------------------------------------
    def records(self, warn: bool = True) -> list[dict[str, Any]]:
        """All complete records in file order (a torn last line is skipped and reported)."""
        data = self.path.read_bytes() if self.path.is_file() else b""
        records, report, _ = _parse_store(self.path, data)
        self.last_report = report
        if warn and report.torn_last_line:
            warnings.warn(f"{self.path}: torn last line ({report.torn_bytes} bytes, a run was killed while "
                          f"writing) ignored; it is cut off on the next append", RuntimeWarning, stacklevel=2)
        if warn and report.duplicate_keys:
            warnings.warn(f"{self.path}: {len(report.duplicate_keys)} duplicate key(s), the last record wins: "
                          f"{report.duplicate_keys[:5]}", RuntimeWarning, stacklevel=2)
        return records

    def report(self) -> StoreReport:
        """Scan the file and say what is in it (records, torn last line, duplicates)."""
        self.records(warn=False)
        assert self.last_report is not None
        return self.last_report

    def read(self) -> pd.DataFrame:
        """The records as a DataFrame (one row per key, the last record wins); ``df.attrs["report"]`` holds the
        :class:`StoreReport` as a dict."""
        records = self.records()
        df = pd.DataFrame.from_records(records, columns=None if records else ["key", "caption", "method"])
        if len(df):
            df = df.drop_duplicates("key", keep="last").reset_index(drop=True)
        df.attrs["report"] = asdict(self.last_report) if self.last_report else {}
        return df

    def done_keys(self) -> set[str]:
        """Keys already captioned."""
        if self._fd is not None:
            return set(self._done)
        return {r["key"] for r in self.records()}

    def methods(self) -> set[str]:
        return {r["method"] for r in self.records(warn=False)}

    # writing --------------------------------------------------------------------------------------------
    def repair(self) -> int:
        """Cut a torn last line; returns the number of bytes removed (0 when the file was clean)."""
        fd = self._fd
        own = fd is None
        if own:
            if not self.path.exists():
                return 0
            fd = os.open(self.path, os.O_RDWR)
        try:
            data = _read_all(fd)
            _, report, end = _parse_store(self.path, data)
            if report.torn_last_line:
                os.ftruncate(fd, end)
                os.fsync(fd)
                warnings.warn(f"{self.path}: cut a torn last line ({report.torn_bytes} bytes) left by an "
                              f"interrupted run", RuntimeWarning, stacklevel=2)
            return report.torn_bytes
        finally:
            if own:
                os.close(fd)

    def open(self) -> "CaptionStore":
        """Open for appending: lock, repair a torn tail, load the finished keys."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RuntimeError(f"{self.path} is being written by another process; wait for it or use "
                                   f"another run_dir") from None
        self._fd = fd
        try:
            self.repair()
            records, report, _ = _parse_store(self.path, _read_all(fd))
            self._done = {r["key"] for r in records}
            if created:
                _fsync_dir(self.path.parent)
        except BaseException:
            self.close()
            raise
        return self

    def append_batch(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Append complete records (one write + fsync for the whole batch); returns the number written.

        Every record needs string ``key``, ``caption`` and ``method``; a key already in the store (or twice in
        the batch) raises ``ValueError`` — the runner only passes keys that are not done.
        """
        if not records:
            return 0
        self.open()
        assert self._fd is not None
        lines, keys = [], set()
        for r in records:
            for fname in ("key", "caption", "method"):
                if not isinstance(r.get(fname), str):
                    raise ValueError(f"record for {r.get('key')!r}: field {fname!r} = {r.get(fname)!r} is not a string")
            if r["key"] in self._done or r["key"] in keys:
                raise ValueError(f"{self.path}: key {r['key']!r} is already in the caption store")
            keys.add(r["key"])
            lines.append(json.dumps(dict(r), ensure_ascii=False, separators=(",", ":")) + "\n")
        view = memoryview("".join(lines).encode("utf-8"))
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self._done |= keys
        return len(lines)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "CaptionStore":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ shards


def shard_path(path: str | os.PathLike, rank: int, world_size: int) -> Path:
    """The file rank ``rank`` of ``world_size`` appends to: the store itself for one process, else
    ``<stem>.rank<r><suffix>`` next to it (``captions.rank1.jsonl``)."""
    base = CaptionStore(path).path
    if world_size <= 1:
        return base
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must lie in [0, {world_size})")
    return base.with_name(f"{base.stem}.rank{int(rank)}{base.suffix}")


def store_shards(path: str | os.PathLike) -> list[Path]:
    """The existing files of a (possibly sharded) store: ``captions.jsonl`` first, then the rank files in rank
    order."""
    base = CaptionStore(path).path
    ranks = []
    for f in base.parent.glob(f"{base.stem}.rank*{base.suffix}"):
        tag = f.name[len(base.stem) + len(".rank"):len(f.name) - len(base.suffix)]
        if tag.isdigit():
            ranks.append((int(tag), f))
    return ([base] if base.is_file() else []) + [f for _, f in sorted(ranks)]


def merged_records(path: str | os.PathLike, warn: bool = True) -> list[dict[str, Any]]:
    """Every complete record of ``captions.jsonl`` and its rank files, file after file (:func:`store_shards`);
    a key in several files (a sharded run resumed on another number of ranks never writes one) is warned about."""
    records: list[dict[str, Any]] = []
    for f in store_shards(path):
        records.extend(CaptionStore(f).records(warn=warn))
    if warn:
        keys = [r["key"] for r in records]
        if len(set(keys)) < len(keys):
            dup = pd.Series(keys)[pd.Series(keys).duplicated()].tolist()
            warnings.warn(f"{CaptionStore(path).path}: {len(dup)} key(s) in more than one shard, the last record "
                          f"wins: {dup[:5]}", RuntimeWarning, stacklevel=2)
    return records


def read_captions(path: str | os.PathLike) -> pd.DataFrame:
    """All shards of a store as one DataFrame (one row per key, the last record wins), like
    :meth:`CaptionStore.read` for a single file."""
    records = merged_records(path)
    df = pd.DataFrame.from_records(records, columns=None if records else ["key", "caption", "method"])
    return df.drop_duplicates("key", keep="last").reset_index(drop=True) if len(df) else df


def load_captions(path: str | os.PathLike, method: str | None = None) -> dict[str, str]:
    """``{key: caption}`` from a ``captions.jsonl`` (or a run folder holding one) and its rank files.

    A torn last line is skipped with a warning; with duplicate keys the last record wins (warned). ``method``
    keeps only records of that method (``"template"`` / ``"dialogue"``). A missing store (no file, no shard)
    raises ``FileNotFoundError`` naming it.
    """
    return _captions_of(_existing_records(path), method)


def dialogue_source(path: str) -> str:
    """``"oracle"`` when any record of notebook 02's ``captions.jsonl`` at ``path`` was answered from the ground
    truth (the attribute answerer), else ``"pixel"`` (a VQA model that saw only the photo answered)."""
    return _source_of(merged_records(CaptionStore(path).path))


def load_dialogue_captions(path: str) -> tuple[dict[str, str] | None, str]:
    """``(load_captions(path), dialogue_source(path))`` from one read of the store; ``(None, "oracle")`` when
    ``path`` is empty (no dialogue captions)."""
    if not str(path).strip():
        return None, "oracle"
    records = _existing_records(path)
    return _captions_of(records, None), _source_of(records)


def _existing_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    store = CaptionStore(path)
    if not store_shards(store.path):
        raise FileNotFoundError(f"caption store {store.path} does not exist (run notebooks/02_captions.ipynb)")
    return merged_records(store.path)


def _captions_of(records: list[dict[str, Any]], method: str | None) -> dict[str, str]:
    return {r["key"]: r["caption"] for r in records if method is None or r["method"] == method}


def _source_of(records: list[dict[str, Any]]) -> str:
    answerers = {str(r.get("answerer", "")) for r in records if r.get("method") == "dialogue"}
    return "oracle" if not answerers or "attributes" in answerers else "pixel"
