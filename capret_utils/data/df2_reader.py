"""The DeepFashion2 reader: the schema (categories, attributes, columns) and :func:`load_items`, which reads a split
folder into the items table validating every field (bad input names the file and the field, or is skipped and
listed with ``errors="skip"``). :mod:`capret_utils.data.df2` re-exports all of it."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

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
