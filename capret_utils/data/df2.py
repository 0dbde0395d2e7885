"""DeepFashion2 on disk ⇄ the items table: reading and validating a split, retrieval sets, official JSON formats.

This module owns everything that touches the DeepFashion2 file layout (``<split>/image/NNNNNN.jpg`` +
``<split>/annos/NNNNNN.json``, schema in ``docs/deepfashion2.md`` §1):

* :func:`load_items` reads a split folder into the **items table** (one row per garment item, columns
  :data:`COLUMNS`), validating every field. Bad input raises :class:`DeepFashion2FormatError` naming the file,
  the field and the reason; with ``errors="skip"`` the bad item (or the whole file, for file-level problems) is
  skipped and listed in ``df.attrs["skipped"]``. Nothing is dropped silently.
* :func:`item_retrieval_set` / :func:`image_retrieval_set` build the official consumer-to-shop retrieval sets
  (queries = user items with ``style > 0``, gallery = every shop item) with their relevance structure.
* :func:`write_query_gt` / :func:`read_query_gt`, :func:`write_gallery_gt` / :func:`read_gallery_gt`,
  :func:`write_results` / :func:`read_results` export and import the official ``query`` / ``gallery`` / results
  JSON files (§3.2) with validation.
* :func:`check_release` compares a downloaded split's layout and counts with the released numbers (§2.2).

Tolerances (documented in the README): a box may reach up to ``ReadConfig.box_tolerance_px`` (2 px) past an
image border — annotation tools round corners onto or one pixel past the edge — and is then clamped to the image
and counted in ``df.attrs["clamped"]``; a box further out is an error. Landmarks outside the image are kept
unchanged (real annotators extrapolate points of truncated garments) and counted per item in
``df.attrs["landmarks_outside"]``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

# --------------------------------------------------------------------------------------------------- schema

CATEGORY_NAMES: dict[int, str] = {
    1: "short sleeve top",
    2: "long sleeve top",
    3: "short sleeve outwear",
    4: "long sleeve outwear",
    5: "vest",
    6: "sling",
    7: "shorts",
    8: "trousers",
    9: "skirt",
    10: "short sleeve dress",
    11: "long sleeve dress",
    12: "vest dress",
    13: "sling dress",
}
"""DeepFashion2 category id → the spaced lowercase name used in ``annos/*.json`` (docs §1.3)."""

LANDMARK_COUNTS: dict[int, int] = {1: 25, 2: 33, 3: 31, 4: 39, 5: 15, 6: 15, 7: 10, 8: 14, 9: 8, 10: 29,
                                   11: 37, 12: 19, 13: 19}
"""Category id → number of landmarks (the ``landmarks`` list holds 3× as many values: x, y, v)."""

SOURCES = ("user", "shop")
CAPTION_MODES = ("none", "template", "dialogue")  # an item's text: category name | template caption | dialogue caption
SPLITS = ("train", "validation", "test")  # split folders a root may hold; real DeepFashion2 has no public test annotations
ATTRIBUTE_FIELDS = ("scale", "occlusion", "zoom_in", "viewpoint")
ATTRIBUTE_LABELS: dict[str, dict[int, str]] = {
    "scale": {1: "small", 2: "moderate", 3: "large"},
    "occlusion": {1: "slight", 2: "medium", 3: "heavy"},
    "zoom_in": {1: "no", 2: "medium", 3: "large"},
    "viewpoint": {1: "not worn", 2: "frontal", 3: "side or back"},
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

COLUMNS: tuple[str, ...] = (
    "key", "split", "image_id", "path", "width", "height", "source", "pair_id", "item", "category_id",
    "category_name", "style", "x1", "y1", "x2", "y2", "scale", "occlusion", "zoom_in", "viewpoint",
    "landmarks", "segmentation",
)
"""The items table's columns, in order."""

_ITEM_RE = re.compile(r"^item(\d+)$")
_STEM_RE = re.compile(r"^\d{6,}$")
ErrorMode = Literal["raise", "skip"]


class DeepFashion2FormatError(ValueError):
    """A DeepFashion2 file breaks the format: ``.file`` (path), ``.field`` (e.g. ``item2.bounding_box``), ``.reason``."""

    def __init__(self, file: str | os.PathLike, field: str, reason: str) -> None:
        self.file = str(file)
        self.field = field
        self.reason = reason
        super().__init__(f"{self.file}: field {field!r}: {reason}")

    def as_record(self) -> dict[str, str]:
        return {"file": self.file, "field": self.field, "reason": self.reason}

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.file, self.field, self.reason))


@dataclass(frozen=True)
class ReadConfig:
    """How :func:`load_items` reads a split.

    ``check_images``: ``"header"`` (default) opens every image and reads format + size from its header (fast;
    catches missing, non-image and wrongly named files — the table needs the sizes anyway); ``"full"`` also
    decodes every image (JPEGs at 1/8 scale through libjpeg's DCT scaling, which still reads the whole
    entropy-coded stream and so catches truncated or corrupt files; roughly 10-30x slower than ``"header"``).
    ``box_tolerance_px``: how far past the image border a box corner may lie and still be clamped (not rejected).
    ``workers``: worker processes (0 = automatic: 1 below 4,000 files, else 2; forked, so Linux only —
    elsewhere the split is read in-process).
    ``progress``: tqdm bar (None = only for 4,000 files or more).
    """

    check_images: Literal["header", "full"] = "header"
    box_tolerance_px: float = 2.0
    workers: int = 0
    progress: bool | None = None


# ------------------------------------------------------------------------------------------ field checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


_NUM_TYPES = {int, float}


def _all_numbers(values: list) -> bool:
    """True when every value is a finite int/float (not bool); C-level scans, no per-value Python call."""
    types = set(map(type, values))
    if not types <= _NUM_TYPES:
        return False
    return float not in types or math.isfinite(sum(values))  # nan/inf anywhere make the sum non-finite


def _int_field(obj: Mapping[str, Any], name: str, where: str, file: str, lo: int | None = None,
               hi: int | None = None) -> int:
    if name not in obj:
        raise DeepFashion2FormatError(file, f"{where}{name}", "missing")
    v = obj[name]
    if not _is_int(v):
        raise DeepFashion2FormatError(file, f"{where}{name}", f"must be an integer, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise DeepFashion2FormatError(file, f"{where}{name}", f"must be in {rng}, got {v}")
    return v


@dataclass
class _Stats:
    clamped: int = 0
    landmarks_outside: int = 0


def _parse_item(item: Any, name: str, file: str, width: int, height: int, tol: float,
                stats: _Stats) -> tuple:
    """Validate one ``itemN`` object; returns the per-item column values (category_id .. segmentation)."""
    where = f"{name}."
    if not isinstance(item, dict):
        raise DeepFashion2FormatError(file, name, f"must be a JSON object, got {type(item).__name__}")
    cat = _int_field(item, "category_id", where, file, 1, 13)
    if "category_name" not in item:
        raise DeepFashion2FormatError(file, f"{where}category_name", "missing")
    cname = item["category_name"]
    if cname != CATEGORY_NAMES[cat]:
        raise DeepFashion2FormatError(
            file, f"{where}category_name",
            f"{cname!r} does not match category_id {cat} (expected {CATEGORY_NAMES[cat]!r})")
    style = _int_field(item, "style", where, file, 0)
    attrs = [_int_field(item, a, where, file, 1, 3) for a in ATTRIBUTE_FIELDS]

    # bounding box: [x1, y1, x2, y2] absolute pixels, x2 > x1, y2 > y1, inside the image (± tolerance)
    box = item.get("bounding_box")
    if box is None:
        raise DeepFashion2FormatError(file, f"{where}bounding_box", "missing")
    if not isinstance(box, list) or len(box) != 4 or not _all_numbers(box):
        raise DeepFashion2FormatError(file, f"{where}bounding_box",
                                      f"must be a list of 4 finite numbers [x1, y1, x2, y2], got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x2 > x1 and y2 > y1):
        raise DeepFashion2FormatError(file, f"{where}bounding_box",
                                      f"needs x2 > x1 and y2 > y1, got {box!r}")
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise DeepFashion2FormatError(
            file, f"{where}bounding_box",
            f"{box!r} lies outside the {width}x{height} image by more than {tol:g} px")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        x1, y1 = max(x1, 0.0), max(y1, 0.0)
        x2, y2 = min(x2, float(width)), min(y2, float(height))
        if not (x2 > x1 and y2 > y1):
            raise DeepFashion2FormatError(file, f"{where}bounding_box",
                                          f"{box!r} has no area inside the {width}x{height} image")
        stats.clamped += 1

    # landmarks: flat [x, y, v] * n(category), v in {0, 1, 2}
    lms = item.get("landmarks")
    if lms is None:
        raise DeepFashion2FormatError(file, f"{where}landmarks", "missing")
    n_expected = 3 * LANDMARK_COUNTS[cat]
    if not isinstance(lms, list) or len(lms) != n_expected:
        got = len(lms) if isinstance(lms, list) else type(lms).__name__
        raise DeepFashion2FormatError(
            file, f"{where}landmarks",
            f"category {cat} ({CATEGORY_NAMES[cat]}) needs {LANDMARK_COUNTS[cat]} landmarks = {n_expected} "
            f"values [x, y, v, ...], got {got}")
    if not _all_numbers(lms):
        raise DeepFashion2FormatError(file, f"{where}landmarks", "values must be finite numbers")
    vis = lms[2::3]
    if not set(vis) <= {0, 1, 2}:
        bad = next(n for n, v in enumerate(vis) if v not in (0, 1, 2))
        raise DeepFashion2FormatError(file, f"{where}landmarks",
                                      f"visibility of landmark {bad + 1} must be 0, 1 or 2, got {vis[bad]!r}")
    xs, ys = lms[0::3], lms[1::3]
    if min(xs) < 0 or max(xs) > width or min(ys) < 0 or max(ys) > height:  # rare: look point by point
        if any(v and not (0 <= x <= width and 0 <= y <= height) for x, y, v in zip(xs, ys, vis)):
            stats.landmarks_outside += 1

    # segmentation: one or more polygons [x1, y1, x2, y2, ...] with >= 3 points
    seg = item.get("segmentation")
    if seg is None:
        raise DeepFashion2FormatError(file, f"{where}segmentation", "missing")
    if not isinstance(seg, list) or not seg:
        raise DeepFashion2FormatError(file, f"{where}segmentation", "must be a non-empty list of polygons")
    for j, poly in enumerate(seg):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not _all_numbers(poly):
            raise DeepFashion2FormatError(
                file, f"{where}segmentation",
                f"polygon {j} must be a flat list of an even number (>= 6) of finite numbers")
    return (cat, CATEGORY_NAMES[cat], style, x1, y1, x2, y2, *attrs, lms, seg)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT/JPG/DAC)


def _jpeg_header_size(buf: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's SOF segment within ``buf``; None when not found there (caller uses PIL).

    Walks the marker segments from SOI: the frame header of every JPEG process (baseline, progressive,
    lossless, arithmetic) holds precision, height, width right after its length.
    """
    if buf[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(buf)
    while i + 4 <= n:
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            h = int.from_bytes(buf[i + 5:i + 7], "big")
            w = int.from_bytes(buf[i + 7:i + 9], "big")
            return (w, h) if w > 0 and h > 0 else None
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    return None


def _image_size(path: str, check: str) -> tuple[int, int]:
    """Width and height from the image header; ``check == "full"`` also decodes the pixels.

    The header path reads the first 64 KiB and parses the JPEG frame header directly (about 10x faster than
    ``PIL.Image.open``, which parses every table in Python); anything else (PNG, JPEGs with a frame header past
    64 KiB of EXIF, broken files) goes through Pillow, which also produces the error message.
    """
    if check != "full":
        with open(path, "rb") as fh:
            size = _jpeg_header_size(fh.read(65536))
        if size is not None:
            return size
    from PIL import Image

    with Image.open(path) as im:
        if im.format not in ("JPEG", "PNG", "MPO"):
            raise OSError(f"unsupported image format {im.format}")
        size = im.size
        if check == "full":
            if im.format in ("JPEG", "MPO"):
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
    return int(size[0]), int(size[1])


@dataclass
class _FileJob:
    image_id: int
    anno: str | None
    image: str | None


@dataclass
class _ChunkResult:
    rows: list[tuple] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    clamped: int = 0
    landmarks_outside: int = 0


def _read_file(job: _FileJob, split: str, cfg: ReadConfig, errors: str, out: _ChunkResult) -> None:
    """Read one annotation + image pair into ``out`` (raises in ``errors="raise"`` mode)."""
    if job.anno is None:
        raise DeepFashion2FormatError(job.image, "annotation",
                                      f"image has no annotation file annos/{Path(job.image).stem}.json")
    file = job.anno
    try:
        with open(file, "rb") as fh:
            data = json.loads(fh.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeepFashion2FormatError(file, "<json>", f"not parseable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DeepFashion2FormatError(file, "<json>", f"top level must be a JSON object, got {type(data).__name__}")
    if job.image is None:
        raise DeepFashion2FormatError(file, "image", f"no image file image/{Path(file).stem}.jpg for this annotation")
    try:
        width, height = _image_size(job.image, cfg.check_images)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise DeepFashion2FormatError(file, "image", f"{job.image} is not a decodable image: {exc}") from None
    if "source" not in data:
        raise DeepFashion2FormatError(file, "source", "missing")
    source = data["source"]
    if source not in SOURCES:
        raise DeepFashion2FormatError(file, "source", f"must be 'user' or 'shop', got {source!r}")
    pair_id = _int_field(data, "pair_id", "", file)
    items = []
    for k in data:
        if k.startswith("item"):
            m = _ITEM_RE.match(k)
            if not m:
                raise DeepFashion2FormatError(file, k, "item keys must be 'item' followed by a number")
            items.append((int(m.group(1)), k))
    if not items:
        raise DeepFashion2FormatError(file, "item*", "no 'itemN' entries: every annotation needs at least one item")
    items.sort()
    stats = _Stats()
    prefix = f"{split}/{job.image_id:06d}/"
    for _, name in items:
        try:
            values = _parse_item(data[name], name, file, width, height, cfg.box_tolerance_px, stats)
        except DeepFashion2FormatError as exc:
            if errors == "raise":
                raise
            rec = exc.as_record()
            rec.update(level="item", key=prefix + name)
            out.skipped.append(rec)
            continue
        out.rows.append((prefix + name, split, job.image_id, job.image, width, height, source, pair_id, name,
                         *values))
    out.clamped += stats.clamped
    out.landmarks_outside += stats.landmarks_outside


def _read_chunk(jobs: Sequence[_FileJob], split: str, cfg: ReadConfig, errors: str,
                progress: Any = None) -> _ChunkResult:
    out = _ChunkResult()
    for job in jobs:
        try:
            _read_file(job, split, cfg, errors, out)
        except DeepFashion2FormatError as exc:
            if errors == "raise":
                raise
            rec = exc.as_record()
            rec.update(level="file", key=None)
            out.skipped.append(rec)
        if progress is not None:
            progress.update(1)
    return out


def _scan(folder: Path, exts: tuple[str, ...], problems: list[DeepFashion2FormatError],
          what: str) -> dict[int, str]:
    """Map image id → path for ``NNNNNN<ext>`` files; bad names / duplicate ids become problems."""
    found: dict[int, str] = {}
    with os.scandir(folder) as it:
        for entry in it:
            name = entry.name
            if name.startswith("."):
                continue  # hidden files (.DS_Store, editor swap files) are not data
            stem, ext = os.path.splitext(name)
            if ext.lower() not in exts or not _STEM_RE.match(stem):
                problems.append(DeepFashion2FormatError(
                    entry.path, "file name", f"{what} files must be named NNNNNN{exts[0]} (six or more digits)"))
                continue
            iid = int(stem)
            if iid in found:
                problems.append(DeepFashion2FormatError(
                    entry.path, "file name", f"image id {iid} also has {found[iid]}"))
                continue
            found[iid] = entry.path
    return found


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in COLUMNS})


def _rows_to_frame(rows: list[tuple]) -> pd.DataFrame:
    if not rows:
        return _empty_table()
    rows.sort(key=lambda r: (r[2], int(r[8][4:])))
    cols = list(zip(*rows))
    data: dict[str, Any] = {}
    for name, values in zip(COLUMNS, cols):
        if name in ("landmarks", "segmentation"):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            data[name] = arr
        elif name in ("x1", "y1", "x2", "y2"):
            data[name] = np.asarray(values, dtype=np.float64)
        elif name in ("image_id", "width", "height", "pair_id", "category_id", "style", *ATTRIBUTE_FIELDS):
            data[name] = np.asarray(values, dtype=np.int64)
        else:
            data[name] = list(values)
    return pd.DataFrame(data, columns=list(COLUMNS))


def load_items(split_dir: str | os.PathLike, errors: ErrorMode = "raise", config: ReadConfig | None = None,
               *, check_images: Literal["header", "full"] | None = None) -> pd.DataFrame:
    """Read a DeepFashion2 split folder (``image/`` + ``annos/``) into the items table.

    Every field is validated (see the module docstring). With ``errors="raise"`` the first problem raises
    :class:`DeepFashion2FormatError`; with ``errors="skip"`` problems are collected in ``df.attrs["skipped"]``
    (list of dicts with ``file``, ``field``, ``reason``, ``level`` = ``"item"`` or ``"file"`` and the item
    ``key`` for item-level skips). ``df.attrs`` also holds ``clamped`` (items whose box was clamped into the
    image), ``landmarks_outside`` (items with a labelled landmark outside the image), ``n_files`` and
    ``split``. ``check_images`` overrides ``config.check_images``.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    cfg = config or ReadConfig()
    if check_images is not None:
        cfg = ReadConfig(check_images=check_images, box_tolerance_px=cfg.box_tolerance_px,
                         workers=cfg.workers, progress=cfg.progress)
    if cfg.check_images not in ("header", "full"):
        raise ValueError(f"check_images must be 'header' or 'full', got {cfg.check_images!r}")
    split_path = Path(split_dir).expanduser().resolve()
    if not split_path.is_dir():
        raise FileNotFoundError(f"split folder {split_path} does not exist")
    split = split_path.name
    for sub in ("annos", "image"):
        if not (split_path / sub).is_dir():
            raise DeepFashion2FormatError(split_path / sub, sub,
                                          "folder missing: a DeepFashion2 split holds image/ and annos/")
    problems: list[DeepFashion2FormatError] = []
    annos = _scan(split_path / "annos", (".json",), problems, "annotation")
    images = _scan(split_path / "image", IMAGE_EXTENSIONS, problems, "image")
    if problems and errors == "raise":
        raise problems[0]
    ids = sorted(set(annos) | set(images))
    jobs = [_FileJob(i, annos.get(i), images.get(i)) for i in ids]

    workers = cfg.workers or (1 if len(jobs) < 4000 else min(2, os.cpu_count() or 1))
    if sys.platform != "linux":  # fork is only the safe default start method on Linux
        workers = 1
    show = cfg.progress if cfg.progress is not None else len(jobs) >= 4000
    result = _ChunkResult()
    if workers <= 1:
        bar = _progress(len(jobs), show, split)
        try:
            result = _read_chunk(jobs, split, cfg, errors, bar)
        finally:
            if bar is not None:
                bar.close()
    else:
        result = _read_parallel(jobs, split, cfg, errors, workers, show)

    df = _rows_to_frame(result.rows)
    skipped = [{**p.as_record(), "level": "file", "key": None} for p in problems] + result.skipped
    df.attrs.update(split=split, n_files=len(jobs), skipped=skipped, clamped=result.clamped,
                    landmarks_outside=result.landmarks_outside)
    return df


def _progress(total: int, show: bool, split: str):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"reading {split}", unit="file", leave=False)


def _read_parallel(jobs: list[_FileJob], split: str, cfg: ReadConfig, errors: str, workers: int,
                   show: bool) -> _ChunkResult:
    import multiprocessing as mp

    n_chunks = max(workers * 4, 1)
    size = math.ceil(len(jobs) / n_chunks)
    chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    # fork: spawn / forkserver would re-import the caller's __main__ (breaks `python -c`, stdin and unguarded
    # scripts). The forked workers only run json/PIL/pure-Python code, so no inherited lock is touched.
    ctx = mp.get_context("fork")
    out = _ChunkResult()
    bar = _progress(len(jobs), show, split)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(_read_chunk, c, split, cfg, errors) for c in chunks]
            try:
                for fut, chunk in zip(futures, chunks):
                    part = fut.result()  # re-raises the first DeepFashion2FormatError in file order ("raise")
                    out.rows.extend(part.rows)
                    out.skipped.extend(part.skipped)
                    out.clamped += part.clamped
                    out.landmarks_outside += part.landmarks_outside
                    if bar is not None:
                        bar.update(len(chunk))
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        if bar is not None:
            bar.close()
    return out


# ------------------------------------------------------------------------------------------ retrieval sets


def identity_key(pair_id: int, style: int) -> str | None:
    """The identity of an item, ``"<pair_id>:<style>"``; ``None`` for ``style == 0`` (never a positive)."""
    return f"{int(pair_id)}:{int(style)}" if int(style) > 0 else None


def _identities(frame: pd.DataFrame) -> list[str | None]:
    return [identity_key(p, s) for p, s in zip(frame["pair_id"].to_numpy(), frame["style"].to_numpy())]


def _identity_column(frame: pd.DataFrame) -> pd.Series:
    # object dtype keeps None as None (a pandas string column would turn it into NaN)
    return pd.Series(_identities(frame), index=frame.index, dtype=object)


def item_queries(items: pd.DataFrame) -> pd.DataFrame:
    """Item-level queries: user items with ``style > 0`` (official protocol), with an ``identity`` column."""
    q = items[(items["source"] == "user") & (items["style"] > 0)].reset_index(drop=True)
    q["identity"] = _identity_column(q)
    return q


def item_gallery(items: pd.DataFrame) -> pd.DataFrame:
    """Item-level gallery: every shop item, style 0 included (``identity`` is None for style 0)."""
    g = items[items["source"] == "shop"].reset_index(drop=True)
    g["identity"] = _identity_column(g)
    return g


@dataclass(frozen=True)
class RetrievalSet:
    """Queries, gallery and which gallery rows are relevant to each query.

    ``level`` is ``"item"`` (rows = items) or ``"image"`` (rows = images). ``queries`` and ``gallery`` carry a
    ``key`` column (items-table key, or ``"<split>/<image_id:06d>"`` for images) and, per row, ``identity``
    (item level: ``"pair:style"``) or ``identities`` (image level: tuple of ``"pair:style"``). ``positives[i]``
    is the sorted int array of gallery row indices relevant to query row ``i``; ``queries["n_positives"]``
    holds its length.
    """

    level: str
    queries: pd.DataFrame
    gallery: pd.DataFrame
    positives: list[np.ndarray]

    def relevance(self):
        """Sparse boolean query × gallery matrix (``scipy.sparse.csr_matrix``)."""
        from scipy import sparse

        indptr = np.zeros(len(self.positives) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(p) for p in self.positives])
        indices = (np.concatenate(self.positives) if self.positives else np.zeros(0)).astype(np.int64)
        data = np.ones(len(indices), dtype=bool)
        return sparse.csr_matrix((data, indices, indptr), shape=(len(self.queries), len(self.gallery)))

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Integer identity labels (item level only): query labels, gallery labels (-1 for style 0)."""
        if self.level != "item":
            raise ValueError("labels() is defined for item-level sets; image-level rows may hold several identities")
        ids = sorted({i for i in self.gallery["identity"] if i is not None} | set(self.queries["identity"]))
        code = {k: n for n, k in enumerate(ids)}
        q = np.asarray([code[i] for i in self.queries["identity"]], dtype=np.int64)
        g = np.asarray([code[i] if i is not None else -1 for i in self.gallery["identity"]], dtype=np.int64)
        return q, g


def _positives_from_index(query_ids: Iterable[Iterable[str]], gallery_ids: Iterable[Iterable[str]]
                          ) -> list[np.ndarray]:
    index: dict[str, list[int]] = {}
    for g, ids in enumerate(gallery_ids):
        for ident in ids:
            index.setdefault(ident, []).append(g)
    out = []
    for ids in query_ids:
        hits: set[int] = set()
        for ident in ids:
            hits.update(index.get(ident, ()))
        out.append(np.asarray(sorted(hits), dtype=np.int64))
    return out


def item_retrieval_set(items: pd.DataFrame) -> RetrievalSet:
    """Official item-level sets: queries = user items with style > 0, gallery = all shop items.

    A gallery item is relevant to a query when ``pair_id`` and ``style`` are equal (style > 0).
    """
    q, g = item_queries(items), item_gallery(items)
    pos = _positives_from_index(([i] for i in q["identity"]), ([i] if i is not None else [] for i in g["identity"]))
    q["n_positives"] = np.asarray([len(p) for p in pos], dtype=np.int64)
    return RetrievalSet("item", q, g, pos)


def _image_table(items: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (split, image_id), grp in items.groupby(["split", "image_id"], sort=True):
        ids = sorted({k for k in _identities(grp) if k is not None})
        first = grp.iloc[0]
        rows.append({"key": f"{split}/{int(image_id):06d}", "split": split, "image_id": int(image_id),
                     "path": first["path"], "width": int(first["width"]), "height": int(first["height"]),
                     "source": first["source"], "pair_id": int(first["pair_id"]), "n_items": len(grp),
                     "item_keys": tuple(grp["key"]), "identities": tuple(ids)})
    cols = ["key", "split", "image_id", "path", "width", "height", "source", "pair_id", "n_items", "item_keys",
            "identities"]
    return pd.DataFrame(rows, columns=cols)


def image_retrieval_set(items: pd.DataFrame) -> RetrievalSet:
    """Image-level sets: queries = user images with >= 1 style > 0 item, gallery = all shop images.

    A gallery image is relevant when it shares any ``(pair_id, style > 0)`` identity with the query image.
    """
    images = _image_table(items)
    q = images[(images["source"] == "user") & (images["identities"].map(len) > 0)].reset_index(drop=True)
    g = images[images["source"] == "shop"].reset_index(drop=True)
    pos = _positives_from_index(q["identities"], g["identities"])
    q["n_positives"] = np.asarray([len(p) for p in pos], dtype=np.int64)
    return RetrievalSet("image", q, g, pos)


# ------------------------------------------------------------------------------- official JSON formats

QUERY_GT_COLUMNS = ("query_image_id", "pair_id", "style", "cls", "x1", "y1", "x2", "y2")
GALLERY_GT_COLUMNS = ("gallery_image_id", "pair_id", "style", "x1", "y1", "x2", "y2")
RESULT_FIELDS = ("query_image_id", "query_bbox", "query_cls", "query_score", "gallery_image_id", "gallery_bbox")


def _json_number(v: float) -> int | float:
    """Integral floats are written as JSON ints (the official files use int boxes)."""
    fv = float(v)
    return int(fv) if fv.is_integer() else fv


def query_gt_frame(items: pd.DataFrame, include_style0: bool = False) -> pd.DataFrame:
    """The official query ground truth of an items table: user items (style > 0 unless ``include_style0``).

    The released ``val_query.json`` is believed to hold style > 0 records only (12,377 records); the 2019 file
    also held style-0 records, which absorb detections in the official matcher (docs §3.3, §8).
    """
    sel = items["source"] == "user"
    if not include_style0:
        sel &= items["style"] > 0
    u = items[sel]
    return pd.DataFrame({"query_image_id": u["image_id"].to_numpy(np.int64), "pair_id": u["pair_id"].to_numpy(np.int64),
                         "style": u["style"].to_numpy(np.int64), "cls": u["category_id"].to_numpy(np.int64),
                         **{c: u[c].to_numpy(np.float64) for c in ("x1", "y1", "x2", "y2")}})


def gallery_gt_frame(items: pd.DataFrame, include_style0: bool = True) -> pd.DataFrame:
    """The official gallery ground truth: every shop item (the released ``val_gallery.json`` has all 36,961)."""
    sel = items["source"] == "shop"
    if not include_style0:
        sel &= items["style"] > 0
    s = items[sel]
    return pd.DataFrame({"gallery_image_id": s["image_id"].to_numpy(np.int64),
                         "pair_id": s["pair_id"].to_numpy(np.int64), "style": s["style"].to_numpy(np.int64),
                         **{c: s[c].to_numpy(np.float64) for c in ("x1", "y1", "x2", "y2")}})


def _gt_records(frame: pd.DataFrame, id_field: str, with_cls: bool) -> list[dict[str, Any]]:
    recs = []
    cols = [frame[c].tolist() for c in (id_field, "pair_id", "style", "x1", "y1", "x2", "y2")]
    cls = frame["cls"].tolist() if with_cls else None
    for n, (iid, pid, sty, x1, y1, x2, y2) in enumerate(zip(*cols)):
        rec: dict[str, Any] = {id_field: int(iid), "style": int(sty), "pair_id": int(pid),
                               "bbox": [_json_number(x1), _json_number(y1), _json_number(x2), _json_number(y2)]}
        if with_cls:
            rec["cls"] = int(cls[n])
        recs.append(rec)
    return recs


def _write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    from capret_utils.common import write_text_atomic

    return write_text_atomic(path, json.dumps(data, separators=(", ", ": ")))


def write_query_gt(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a :func:`query_gt_frame` as the official query GT list
    ``[{query_image_id, style, cls, pair_id, bbox: [x1, y1, x2, y2]}, ...]``."""
    return _write_json_atomic(path, _gt_records(frame, "query_image_id", with_cls=True))


def write_gallery_gt(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a :func:`gallery_gt_frame` as the official gallery GT list ``[{gallery_image_id, style, pair_id, bbox}]``."""
    return _write_json_atomic(path, _gt_records(frame, "gallery_image_id", with_cls=False))


def write_official_gt(items: pd.DataFrame, out_dir: str | os.PathLike, include_style0_queries: bool = False,
                      query_name: str = "val_query.json", gallery_name: str = "val_gallery.json"
                      ) -> tuple[Path, Path]:
    """Export an items table's query and gallery GT in the official format; returns the two paths."""
    out = Path(out_dir)
    return (write_query_gt(query_gt_frame(items, include_style0_queries), out / query_name),
            write_gallery_gt(gallery_gt_frame(items), out / gallery_name))


def _load_json_list(path: str | os.PathLike) -> tuple[str, list]:
    file = str(path)
    try:
        with open(file, "rb") as fh:
            data = json.loads(fh.read())
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeepFashion2FormatError(file, "<json>", f"not parseable JSON: {exc}") from None
    if not isinstance(data, list):
        raise DeepFashion2FormatError(file, "<json>", f"top level must be a list of records, got {type(data).__name__}")
    return file, data


def _check_box(v: Any, file: str, where: str) -> list[float]:
    if not isinstance(v, list) or len(v) != 4 or not _all_numbers(v):
        raise DeepFashion2FormatError(file, where, f"must be [x1, y1, x2, y2] (4 finite numbers), got {v!r}")
    if not (v[2] > v[0] and v[3] > v[1]):
        raise DeepFashion2FormatError(file, where, f"needs x2 > x1 and y2 > y1, got {v!r}")
    return v


def _read_gt(path: str | os.PathLike, id_field: str, with_cls: bool) -> pd.DataFrame:
    file, data = _load_json_list(path)
    n = len(data)
    ids = np.empty(n, np.int64)
    pids = np.empty(n, np.int64)
    styles = np.empty(n, np.int64)
    cls = np.empty(n, np.int64)
    boxes = np.empty((n, 4), np.float64)
    for i, rec in enumerate(data):
        where = f"[{i}]."
        if not isinstance(rec, dict):
            raise DeepFashion2FormatError(file, f"[{i}]", "each record must be a JSON object")
        ids[i] = _int_field(rec, id_field, where, file, 1)
        pids[i] = _int_field(rec, "pair_id", where, file)
        styles[i] = _int_field(rec, "style", where, file, 0)
        if with_cls:
            cls[i] = _int_field(rec, "cls", where, file, 1, 13)
        if "bbox" not in rec:
            raise DeepFashion2FormatError(file, f"{where}bbox", "missing")
        boxes[i] = _check_box(rec["bbox"], file, f"{where}bbox")
    cols: dict[str, Any] = {id_field: ids, "pair_id": pids, "style": styles}
    if with_cls:
        cols["cls"] = cls
    cols.update(x1=boxes[:, 0], y1=boxes[:, 1], x2=boxes[:, 2], y2=boxes[:, 3])
    return pd.DataFrame(cols)


def read_query_gt(path: str | os.PathLike) -> pd.DataFrame:
    """Import an official query GT file (e.g. ``val_query.json``) as a frame with :data:`QUERY_GT_COLUMNS`."""
    return _read_gt(path, "query_image_id", with_cls=True)


def read_gallery_gt(path: str | os.PathLike) -> pd.DataFrame:
    """Import an official gallery GT file (e.g. ``val_gallery.json``) as a frame with :data:`GALLERY_GT_COLUMNS`."""
    return _read_gt(path, "gallery_image_id", with_cls=False)


def results_records(queries: pd.DataFrame, gallery: pd.DataFrame, ranking: np.ndarray,
                    scores: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Official results records for the GT-box setting from a ranking.

    ``queries`` / ``gallery``: item-level frames (e.g. from :func:`item_retrieval_set`); ``ranking``: int array
    (n_queries × K) of gallery row indices, best first. Each record uses the query's GT box and class and
    ``query_score`` = ``scores[i]`` (default 1.0); the gallery entries are the ranked items' image ids and boxes.
    """
    ranking = np.asarray(ranking)
    if ranking.ndim != 2 or ranking.shape[0] != len(queries):
        raise ValueError(f"ranking must be (n_queries={len(queries)}, K), got shape {ranking.shape}")
    if ranking.size and (ranking.min() < 0 or ranking.max() >= len(gallery)):
        raise ValueError("ranking holds indices outside the gallery")
    g_ids = gallery["image_id"].to_numpy(np.int64)
    g_box = gallery[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
    q_box = queries[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
    recs = []
    for i, (iid, cat) in enumerate(zip(queries["image_id"].tolist(), queries["category_id"].tolist())):
        r = ranking[i]
        recs.append({
            "query_image_id": int(iid),
            "query_bbox": [_json_number(v) for v in q_box[i]],
            "query_cls": int(cat),
            "query_score": float(scores[i]) if scores is not None else 1.0,
            "gallery_image_id": [int(v) for v in g_ids[r]],
            "gallery_bbox": [[_json_number(v) for v in b] for b in g_box[r]],
        })
    return recs


def write_results(records: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write results records (official submission format) after validating them."""
    _validate_results(list(records), str(path), min_k=1)
    return _write_json_atomic(path, [{k: r[k] for k in RESULT_FIELDS} for r in records])


def _validate_results(data: list, file: str, min_k: int) -> None:
    k_seen: int | None = None
    for i, rec in enumerate(data):
        where = f"[{i}]."
        if not isinstance(rec, Mapping):
            raise DeepFashion2FormatError(file, f"[{i}]", "each record must be a JSON object")
        for f in RESULT_FIELDS:
            if f not in rec:
                raise DeepFashion2FormatError(file, f"{where}{f}", "missing")
        _int_field(rec, "query_image_id", where, file, 1)
        _int_field(rec, "query_cls", where, file, 1, 13)
        _check_box(rec["query_bbox"], file, f"{where}query_bbox")
        if not _is_num(rec["query_score"]):
            raise DeepFashion2FormatError(file, f"{where}query_score", f"must be a finite number, got {rec['query_score']!r}")
        gids, gboxes = rec["gallery_image_id"], rec["gallery_bbox"]
        if not isinstance(gids, list) or not all(_is_int(v) and v >= 1 for v in gids):
            raise DeepFashion2FormatError(file, f"{where}gallery_image_id", "must be a list of positive integer image ids")
        if not isinstance(gboxes, list) or len(gboxes) != len(gids):
            raise DeepFashion2FormatError(file, f"{where}gallery_bbox",
                                          f"must be a list of {len(gids)} boxes (one per gallery_image_id)")
        for j, b in enumerate(gboxes):
            _check_box(b, file, f"{where}gallery_bbox[{j}]")
        if len(gids) < min_k:
            raise DeepFashion2FormatError(file, f"{where}gallery_image_id",
                                          f"holds {len(gids)} entries, at least {min_k} are required")
        if k_seen is None:
            k_seen = len(gids)
        elif len(gids) != k_seen:
            raise DeepFashion2FormatError(file, f"{where}gallery_image_id",
                                          f"holds {len(gids)} entries but earlier records hold {k_seen}: the official "
                                          "script needs equal-length lists")


def read_results(path: str | os.PathLike, min_k: int = 1) -> list[dict[str, Any]]:
    """Import and validate an official results file. ``min_k=20`` enforces what the official script needs."""
    file, data = _load_json_list(path)
    _validate_results(data, file, min_k)
    return [{k: rec[k] for k in RESULT_FIELDS} for rec in data]


# ------------------------------------------------------------------------------------- release check


@dataclass(frozen=True)
class ReleaseCounts:
    """Counts that describe one split; ``None`` = unknown / not checked. ``source`` says where they come from."""

    images: int | None = None
    user_images: int | None = None
    shop_images: int | None = None
    items: int | None = None
    user_items: int | None = None
    shop_items: int | None = None
    queries: int | None = None
    gallery: int | None = None
    pair_ids: int | None = None
    style0_items: int | None = None
    user_id_range: tuple[int, int] | None = None
    shop_id_range: tuple[int, int] | None = None
    source: str = ""


RELEASED: dict[str, ReleaseCounts] = {
    "validation": ReleaseCounts(
        images=32153, user_images=10844, shop_images=21309, items=52490, user_items=15529, shop_items=36961,
        queries=12377, gallery=36961, pair_ids=2279, style0_items=16240, user_id_range=(1, 10844),
        shop_id_range=(10845, 32153),
        source="CodaLab 2019 challenge page (images, queries, gallery) and a third-party count of the release "
               "(items, user/shop items, pair ids, style 0); docs/deepfashion2.md §2.2"),
    "train": ReleaseCounts(
        images=191961, items=312186, user_items=83628, shop_items=228558, pair_ids=14555, style0_items=94408,
        source="CodaLab 2019 challenge page (images, items) and a third-party count (the rest); docs §2.2"),
    "test": ReleaseCounts(
        images=62629, user_images=20681, shop_images=41948, user_id_range=(1, 20681), shop_id_range=(20682, 62629),
        source="DeepFashion2 README and CodaLab page (no annotations are published for test); docs §1.1, §2.2"),
}
"""Released DeepFashion2 numbers per split (docs/deepfashion2.md §1.1, §2.2)."""


@dataclass
class ReleaseReport:
    """Result of :func:`check_release`: what was found, what was expected, and every difference."""

    split_dir: str
    split: str
    counts: dict[str, Any]
    expected: ReleaseCounts | None
    problems: list[str]
    differences: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.differences

    def to_frame(self) -> pd.DataFrame:
        """One row per checked quantity: expected, found, match."""
        exp = asdict(self.expected) if self.expected else {}
        exp["image_files"] = exp.get("images")  # every image of a split has a file
        rows = []
        for name, found in self.counts.items():
            e = exp.get(name)
            if isinstance(e, list):
                e = tuple(e)
            rows.append({"quantity": name, "expected": e, "found": found,
                         "match": None if e is None else e == found})
        return pd.DataFrame(rows)

    def __str__(self) -> str:
        head = f"{self.split_dir}: " + ("matches the expected counts" if self.ok else "DIFFERS from the expected counts")
        lines = [head]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  {d['quantity']}: expected {d['expected']}, found {d['found']}" for d in self.differences]
        if self.expected and self.expected.source:
            lines.append(f"  (expected numbers: {self.expected.source})")
        return "\n".join(lines)


def split_counts(items: pd.DataFrame) -> dict[str, Any]:
    """The :class:`ReleaseCounts` quantities of an items table (image counts from images that have items)."""
    img = items.drop_duplicates("image_id")[["image_id", "source"]]
    user = img[img["source"] == "user"]["image_id"]
    shop = img[img["source"] == "shop"]["image_id"]
    return {
        "images": int(len(img)), "user_images": int(len(user)), "shop_images": int(len(shop)),
        "items": int(len(items)), "user_items": int((items["source"] == "user").sum()),
        "shop_items": int((items["source"] == "shop").sum()),
        "queries": int(((items["source"] == "user") & (items["style"] > 0)).sum()),
        "gallery": int((items["source"] == "shop").sum()),
        "pair_ids": int(items["pair_id"].nunique()), "style0_items": int((items["style"] == 0).sum()),
        "user_id_range": (int(user.min()), int(user.max())) if len(user) else None,
        "shop_id_range": (int(shop.min()), int(shop.max())) if len(shop) else None,
    }


def expected_counts_for(split_dir: str | os.PathLike) -> ReleaseCounts | None:
    """Expected counts of a split: the synthetic benchmark's own (``../synth.json``) or the released ones."""
    split_dir = Path(split_dir)
    marker = split_dir.parent / "synth.json"
    if marker.is_file():
        try:
            counts = json.loads(marker.read_text()).get("counts", {}).get(split_dir.name)
        except (OSError, json.JSONDecodeError):
            counts = None
        if counts:
            known = {f for f in ReleaseCounts.__dataclass_fields__ if f != "source"}
            vals = {k: (tuple(v) if isinstance(v, list) else v) for k, v in counts.items() if k in known}
            return ReleaseCounts(**vals, source=f"{marker} (synthetic benchmark)")
    return RELEASED.get(split_dir.name)


def check_release(split_dir: str | os.PathLike, items: pd.DataFrame | None = None,
                  expected: ReleaseCounts | None = None) -> ReleaseReport:
    """Check a downloaded split's folder layout and counts against the released numbers.

    ``expected`` defaults to :func:`expected_counts_for` (released numbers by split name, or the synthetic
    benchmark's ``synth.json``). ``items`` may be passed to avoid re-reading; otherwise the split is read with
    ``errors="skip"`` and every skipped file/item is reported as a problem. Never raises for bad data: every
    difference lands in the report (``.ok``, ``.problems``, ``.differences``, ``.to_frame()``).
    """
    split_path = Path(split_dir).expanduser().resolve()
    exp = expected if expected is not None else expected_counts_for(split_path)
    problems: list[str] = []
    counts: dict[str, Any] = {}
    if not split_path.is_dir():
        return ReleaseReport(str(split_path), split_path.name, counts, exp, [f"{split_path} does not exist"], [])
    image_dir, anno_dir = split_path / "image", split_path / "annos"
    n_img = n_anno = 0
    if image_dir.is_dir():
        n_img = sum(1 for e in os.scandir(image_dir) if e.name.lower().endswith(IMAGE_EXTENSIONS))
    else:
        problems.append(f"missing folder {image_dir}")
    if anno_dir.is_dir():
        n_anno = sum(1 for e in os.scandir(anno_dir) if e.name.endswith(".json"))
    elif split_path.name != "test":
        problems.append(f"missing folder {anno_dir}")
    counts["image_files"] = n_img
    counts["annotation_files"] = n_anno
    if items is None and anno_dir.is_dir() and image_dir.is_dir():
        items = load_items(split_path, errors="skip")
    if items is not None:
        skipped = items.attrs.get("skipped", [])
        if skipped:
            by_field = Counter(s["field"].split(".")[-1] for s in skipped)
            problems.append(f"{len(skipped)} files/items failed validation and were skipped "
                            f"(by field: {dict(sorted(by_field.items()))}); see load_items(..., errors='skip')"
                            ".attrs['skipped']")
        counts.update(split_counts(items))
    elif n_img:
        counts["images"] = n_img
    differences = []
    if exp is not None:
        for name, want in asdict(exp).items():
            if name == "source" or want is None or name not in counts:
                continue
            want = tuple(want) if isinstance(want, list) else want
            if counts[name] != want:
                differences.append({"quantity": name, "expected": want, "found": counts[name]})
        if exp.images is not None and n_img != exp.images:
            differences.append({"quantity": "image_files", "expected": exp.images, "found": n_img})
    return ReleaseReport(str(split_path), split_path.name, counts, exp, problems, differences)
