"""DeepFashion2 on disk ⇄ the items table: reading and validating a split, retrieval sets, official JSON formats.

The reader itself (schema, field checks, :func:`load_items`) lives in :mod:`capret_utils.data.df2_reader` and is
re-exported here, so ``df2.load_items`` and ``df2.CATEGORY_NAMES`` are the names to use.

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
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from capret_utils.data.df2_reader import (  # noqa: F401 - the reader's names are re-exported: df2.load_items
    ATTRIBUTE_FIELDS,
    ATTRIBUTE_LABELS,
    CAPTION_MODES,
    CATEGORY_NAMES,
    COLUMNS,
    IMAGE_EXTENSIONS,
    LANDMARK_COUNTS,
    SOURCES,
    SPLITS,
    DeepFashion2FormatError,
    ErrorMode,
    ReadConfig,
    _all_numbers,
    _int_field,
    _is_int,
    _is_num,
    load_items,
)

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
