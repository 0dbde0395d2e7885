"""The official DeepFashion2 consumer-to-shop top-k protocol, vectorised, plus results-file writers.

This module owns the detection-style evaluation of ``deepfashion2_retrieval_test.py`` (switchablenorms/
DeepFashion2, ``deepfashion2_api/PythonAPI``) exactly as ``docs/deepfashion2.md`` §3.3 restates it:

1. Every box is converted from corners ``[x1, y1, x2, y2]`` to ``[x, y, w, h]``; IoU is the standard box IoU
   (pycocotools ``iou`` with iscrowd = 0: ``w = min(x+w) - max(x)``, no +1, 0 when there is no overlap).
2. ``N`` = number of query-GT records with ``style > 0``; it is the denominator for every k.
3. For each consumer image in the query GT: each detection of that image (results record with that
   ``query_image_id``) is assigned to the image's GT record with the highest IoU (argmax over the image's GT
   records in file order, first on ties, **no minimum IoU**; style-0 GT records take part and can absorb
   detections). For each GT record with style > 0, among the detections assigned to it **with
   ``query_cls`` equal to its ``cls``**, the one with the highest ``query_score`` (first in the results file
   on ties) is the only one scored; none means a miss.
4. The query succeeds at k when, at some rank t < k, ``gallery_image_id[t]`` is an image holding a
   gallery-GT record with the query's ``pair_id`` and ``style`` and ``IoU(gallery_bbox[t], that record's
   box) >= 0.5`` for one such record. The gallery item's category is not checked.
5. ``top-k = successes_k / N`` for k in (1, 5, 10, 15, 20).

Lists of any length L >= 1 are accepted (the official script needs exactly 20 for every record; the 2019
challenge used 10): for k > L, top-k equals top-L, because there are no further entries to hit. Records
may even have different lengths.

CLI: ``python -m capret_utils.evaluation.df2_eval RESULTS.json QUERY_GT.json GALLERY_GT.json`` prints
``{"top1": ..., "top5": ..., "top10": ..., "top15": ..., "top20": ...}``.

Writers (:func:`results_records`, :func:`gt_box_results`, :func:`detection_results`) turn our rankings into
the official results format: in the GT-box setting one record per GT query box (score 1, GT class), whose
gallery entries are the ranked gallery items' image ids and boxes; in the detected setting one record per
detection with its own box, class and score.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from capret_utils.evaluation.metrics import DEFAULT_KS

IOU_THRESHOLD = 0.5

_RESULT_FIELDS = ("query_image_id", "query_bbox", "query_cls", "query_score", "gallery_image_id",
                  "gallery_bbox")
_QUERY_FIELDS = ("query_image_id", "bbox", "cls", "style", "pair_id")
_GALLERY_FIELDS = ("gallery_image_id", "bbox", "style", "pair_id")


@dataclass
class Df2EvalResult:
    """``metrics``: ``top{k}`` plus counts (``n_queries`` = N, ``n_matched`` = queries with a scored
    detection, ``n_results``, ``list_length`` = longest list). ``per_query``: one row per GT query
    (style > 0), in query-GT file order."""

    metrics: dict[str, Any]
    per_query: pd.DataFrame


# ----------------------------------------------------------------------------------------------------------
# parsing with clear errors
# ----------------------------------------------------------------------------------------------------------
def load_json(path: str | os.PathLike, what: str) -> list[dict]:
    """Read a JSON list of records, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"{what} file {path} must hold a JSON list of records, got {type(data).__name__}")
    return data


def _field_error(what: str, i: int, field: str, problem: str) -> ValueError:
    return ValueError(f"{what}[{i}].{field}: {problem}")


def _check_records(records: Sequence[Any], fields: Sequence[str], what: str) -> None:
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise ValueError(f"{what}[{i}]: expected a JSON object, got {type(rec).__name__}")
        for f in fields:
            if f not in rec:
                raise _field_error(what, i, f, "missing")


def _int_column(records: Sequence[dict], field: str, what: str) -> np.ndarray:
    vals = [r[field] for r in records]
    try:
        arr = np.asarray(vals, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v != int(v):
                raise _field_error(what, i, field, f"expected an integer, got {v!r}")
        raise ValueError(f"{what}.{field}: expected integers")
    return arr.astype(np.int64)


def _float_column(records: Sequence[dict], field: str, what: str) -> np.ndarray:
    vals = [r[field] for r in records]
    try:
        arr = np.asarray(vals, dtype=np.float64)
        ok = arr.ndim == 1 and np.all(np.isfinite(arr))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        for i, v in enumerate(vals):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise _field_error(what, i, field, f"expected a finite number, got {v!r}")
        raise ValueError(f"{what}.{field}: expected finite numbers")
    return arr


def _box_column(records: Sequence[dict], field: str, what: str) -> np.ndarray:
    vals = [r[field] for r in records]
    try:
        arr = np.asarray(vals, dtype=np.float64)
        ok = arr.ndim == 2 and arr.shape[1] == 4 and np.all(np.isfinite(arr))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        for i, v in enumerate(vals):
            b = np.asarray(v, dtype=object)
            if b.shape != (4,) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                          and np.isfinite(x) for x in b):
                raise _field_error(what, i, field, f"expected [x1, y1, x2, y2] numbers, got {v!r}")
        raise ValueError(f"{what}.{field}: expected [x1, y1, x2, y2] boxes")
    return arr.reshape(len(vals), 4)


def corners_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """[x1, y1, x2, y2] -> [x, y, w, h] in float64 (as the official script converts before IoU)."""
    b = np.asarray(boxes, dtype=np.float64)
    out = b.copy()
    out[..., 2] = b[..., 2] - b[..., 0]
    out[..., 3] = b[..., 3] - b[..., 1]
    return out


def iou_xywh(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Element-wise (broadcast) box IoU of [x, y, w, h] boxes, pycocotools arithmetic with iscrowd = 0."""
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    ok = (w > 0) & (h > 0)
    inter = np.where(ok, w * h, 0.0)
    union = d[..., 2] * d[..., 3] + g[..., 2] * g[..., 3] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, inter / np.where(ok, union, 1.0), 0.0)


@dataclass
class _Results:
    img: np.ndarray
    box: np.ndarray  # xywh
    cls: np.ndarray
    score: np.ndarray
    gal_img: np.ndarray  # (m, L), -1 pad
    gal_box: np.ndarray  # (m, L, 4) xywh
    length: np.ndarray  # (m,)


def _parse_results(results: Sequence[dict], what: str = "results") -> _Results:
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"{what}: expected a list of records, got {type(results).__name__}")
    _check_records(results, _RESULT_FIELDS, what)
    m = len(results)
    img = _int_column(results, "query_image_id", what) if m else np.zeros(0, np.int64)
    box = _box_column(results, "query_bbox", what) if m else np.zeros((0, 4))
    cls = _int_column(results, "query_cls", what) if m else np.zeros(0, np.int64)
    score = _float_column(results, "query_score", what) if m else np.zeros(0)
    ids = [r["gallery_image_id"] for r in results]
    bxs = [r["gallery_bbox"] for r in results]
    lengths = np.fromiter((len(x) if isinstance(x, (list, tuple)) else -1 for x in ids), np.int64, m)
    blen = np.fromiter((len(x) if isinstance(x, (list, tuple)) else -1 for x in bxs), np.int64, m)
    for i in np.flatnonzero((lengths < 1) | (blen != lengths)):
        if lengths[i] < 1:
            raise _field_error(what, int(i), "gallery_image_id", "expected a non-empty list of image ids")
        raise _field_error(what, int(i), "gallery_bbox",
                           f"has {blen[i]} boxes for {lengths[i]} gallery_image_id entries")
    L = int(lengths.max()) if m else 0
    gal_img = np.full((m, L), -1, dtype=np.int64)
    gal_box = np.zeros((m, L, 4), dtype=np.float64)
    if m and (lengths == L).all():
        try:
            gi = np.asarray(ids, dtype=np.float64)
            gb = np.asarray(bxs, dtype=np.float64)
            fast = gi.shape == (m, L) and gb.shape == (m, L, 4) and np.isfinite(gb).all() \
                and np.isfinite(gi).all() and (gi == np.round(gi)).all()
        except (TypeError, ValueError):
            fast = False
        if fast:
            gal_img[:] = gi.astype(np.int64)
            gal_box[:] = gb
        else:
            _fill_ragged(ids, bxs, gal_img, gal_box, what)
    elif m:
        _fill_ragged(ids, bxs, gal_img, gal_box, what)
    return _Results(img, corners_to_xywh(box), cls, score, gal_img, corners_to_xywh(gal_box), lengths)


def _fill_ragged(ids: list, bxs: list, gal_img: np.ndarray, gal_box: np.ndarray, what: str) -> None:
    for i, (gi, gb) in enumerate(zip(ids, bxs)):
        for t, v in enumerate(gi):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v != int(v):
                raise _field_error(what, i, f"gallery_image_id[{t}]", f"expected an integer, got {v!r}")
        try:
            b = np.asarray(gb, dtype=np.float64)
        except (TypeError, ValueError):
            b = None
        if b is None or b.shape != (len(gi), 4) or not np.isfinite(b).all():
            raise _field_error(what, i, "gallery_bbox", "expected a list of [x1, y1, x2, y2] number boxes")
        gal_img[i, :len(gi)] = np.asarray(gi, dtype=np.int64)
        gal_box[i, :len(gi)] = b


# ----------------------------------------------------------------------------------------------------------
# the evaluator
# ----------------------------------------------------------------------------------------------------------
def _segment_first_argmax(values: np.ndarray, seg_starts: np.ndarray) -> np.ndarray:
    """Index (into ``values``) of the first maximum of each non-empty segment."""
    seg_max = np.maximum.reduceat(values, seg_starts)
    seg_id = np.repeat(np.arange(len(seg_starts)), np.diff(np.append(seg_starts, len(values))))
    is_max = values == seg_max[seg_id]
    cand = np.flatnonzero(is_max)
    first = np.ones(len(cand), bool)
    first[1:] = seg_id[cand[1:]] != seg_id[cand[:-1]]
    return cand[first]


def _pack(*cols: np.ndarray) -> np.ndarray:
    """Collision-free int64 key of several non-negative int columns (via factorising when large)."""
    key = np.zeros(len(cols[0]), dtype=np.int64)
    for c in cols:
        c = np.asarray(c, dtype=np.int64)
        span = int(c.max()) + 1 if len(c) else 1
        if c.min(initial=0) < 0 or (int(key.max(initial=0)) + 1) * span >= 2**62:
            raise ValueError("identifiers must be non-negative and small enough to pack into int64")
        key = key * span + c
    return key


def evaluate_df2(results: Sequence[dict], query_gt: Sequence[dict], gallery_gt: Sequence[dict],
                 ks: Sequence[int] = DEFAULT_KS) -> Df2EvalResult:
    """Score a results list against query / gallery ground truth with the official protocol (module doc).

    Inputs are the parsed JSON lists (``json.load``). Returns metrics ``top{k}`` and the per-query table.
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    _check_records(query_gt, _QUERY_FIELDS, "query_gt")
    _check_records(gallery_gt, _GALLERY_FIELDS, "gallery_gt")
    res = _parse_results(results)
    nqg = len(query_gt)
    q_img = _int_column(query_gt, "query_image_id", "query_gt") if nqg else np.zeros(0, np.int64)
    q_box = corners_to_xywh(_box_column(query_gt, "bbox", "query_gt")) if nqg else np.zeros((0, 4))
    q_cls = _int_column(query_gt, "cls", "query_gt") if nqg else np.zeros(0, np.int64)
    q_style = _int_column(query_gt, "style", "query_gt") if nqg else np.zeros(0, np.int64)
    q_pair = _int_column(query_gt, "pair_id", "query_gt") if nqg else np.zeros(0, np.int64)
    ngg = len(gallery_gt)
    g_img = _int_column(gallery_gt, "gallery_image_id", "gallery_gt") if ngg else np.zeros(0, np.int64)
    g_box = corners_to_xywh(_box_column(gallery_gt, "bbox", "gallery_gt")) if ngg else np.zeros((0, 4))
    g_style = _int_column(gallery_gt, "style", "gallery_gt") if ngg else np.zeros(0, np.int64)
    g_pair = _int_column(gallery_gt, "pair_id", "gallery_gt") if ngg else np.zeros(0, np.int64)

    is_query = q_style > 0
    N = int(is_query.sum())
    chosen = np.full(nqg, -1, dtype=np.int64)  # results record scored for each GT record
    chosen_iou = np.full(nqg, np.nan)

    # --- 3.2: assign every detection to the highest-IoU GT record of its image (file order, first on ties)
    gt_order = np.argsort(q_img, kind="stable")
    gt_img_sorted = q_img[gt_order]
    lo = np.searchsorted(gt_img_sorted, res.img, side="left")
    hi = np.searchsorted(gt_img_sorted, res.img, side="right")
    cnt = hi - lo
    dets = np.flatnonzero(cnt > 0)  # detections in images of the query GT
    if len(dets):
        c = cnt[dets]
        pair_det = np.repeat(dets, c)
        offs = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        pair_gt = gt_order[np.repeat(lo[dets], c) + offs]
        ious = iou_xywh(res.box[pair_det], q_box[pair_gt])
        seg_starts = np.concatenate(([0], np.cumsum(c)[:-1]))
        best = _segment_first_argmax(ious, seg_starts)
        det_gt = pair_gt[best]  # assigned GT record per detection in `dets`
        det_iou = ious[best]
        # --- 3.3: per GT query, same-class assigned detections; highest score, first in file on ties
        keep = (res.cls[dets] == q_cls[det_gt]) & is_query[det_gt]
        kd, kg, ki = dets[keep], det_gt[keep], det_iou[keep]
        if len(kd):
            o = np.lexsort((kd, -res.score[kd], kg))
            kd, kg, ki = kd[o], kg[o], ki[o]
            first = np.ones(len(kg), bool)
            first[1:] = kg[1:] != kg[:-1]
            chosen[kg[first]] = kd[first]
            chosen_iou[kg[first]] = ki[first]

    # --- 3.4/3.5: hits along the chosen lists
    L = res.gal_img.shape[1] if len(res.img) else 0
    first_hit = np.full(nqg, -1, dtype=np.int64)  # 1-based rank of the first correct entry
    qsel = np.flatnonzero(chosen >= 0)
    if len(qsel) and L and ngg:
        span_style = int(max(g_style.max(initial=0), q_style.max(initial=0))) + 1
        span_pair = int(max(g_pair.max(initial=0), q_pair.max(initial=0))) + 1
        if min(g_pair.min(initial=0), q_pair.min(initial=0), g_style.min(initial=0)) < 0:
            raise ValueError("pair_id and style must be non-negative")

        def ident(pair: np.ndarray, style: np.ndarray) -> np.ndarray:
            return pair.astype(np.int64) * span_style + style

        g_key_img = g_img
        g_id = ident(g_pair, g_style)
        # sort gallery GT by (image, identity)
        go = np.lexsort((np.arange(ngg), g_id, g_key_img))
        s_img, s_id, s_box = g_key_img[go], g_id[go], g_box[go]
        comb_span = span_pair * span_style
        if (int(max(s_img.max(initial=0), res.gal_img.max(initial=0))) + 1) * comb_span >= 2**62:
            raise ValueError("image ids / pair ids too large to index")
        s_key = s_img * comb_span + s_id
        d = chosen[qsel]
        ent_img = res.gal_img[d]  # (nsel, L)
        ent_box = res.gal_box[d]  # (nsel, L, 4)
        q_id = ident(q_pair[qsel], q_style[qsel])
        ent_key = np.where(ent_img >= 0, ent_img * comb_span + q_id[:, None], -1).ravel()
        elo = np.searchsorted(s_key, ent_key, side="left")
        ehi = np.searchsorted(s_key, ent_key, side="right")
        ecnt = np.where(ent_key >= 0, ehi - elo, 0)
        hit = np.zeros(ent_key.shape, dtype=bool)
        has = np.flatnonzero(ecnt > 0)
        if len(has):
            c = ecnt[has]
            pe = np.repeat(has, c)
            offs = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
            pg = np.repeat(elo[has], c) + offs
            ok = iou_xywh(ent_box.reshape(-1, 4)[pe], s_box[pg]) >= IOU_THRESHOLD
            hit[pe[ok]] = True
        hit = hit.reshape(len(qsel), L)
        any_hit = hit.any(axis=1)
        fh = np.where(any_hit, hit.argmax(axis=1) + 1, -1)
        first_hit[qsel] = fh

    metrics: dict[str, Any] = {}
    for k in ks:
        succ = int(((first_hit > 0) & (first_hit <= k) & is_query).sum())
        metrics[f"top{k}"] = succ / N if N else float("nan")
    metrics.update({"n_queries": N, "n_matched": int((chosen[is_query] >= 0).sum()),
                    "n_results": int(len(res.img)), "list_length": int(L)})

    qi = np.flatnonzero(is_query)
    fh = pd.array(np.where(first_hit[qi] > 0, first_hit[qi], 0), dtype="Int64")
    fh[first_hit[qi] <= 0] = pd.NA
    table = {"gt_index": qi, "query_image_id": q_img[qi], "pair_id": q_pair[qi], "style": q_style[qi],
             "cls": q_cls[qi], "result_index": chosen[qi],
             "result_score": np.where(chosen[qi] >= 0, res.score[np.maximum(chosen[qi], 0)]
                                      if len(res.score) else np.nan, np.nan),
             "result_iou": chosen_iou[qi], "first_hit_rank": fh}
    for k in ks:
        table[f"hit@{k}"] = (first_hit[qi] > 0) & (first_hit[qi] <= k)
    return Df2EvalResult(metrics, pd.DataFrame(table))


def evaluate_files(results_path: str | os.PathLike, query_gt_path: str | os.PathLike,
                   gallery_gt_path: str | os.PathLike, ks: Sequence[int] = DEFAULT_KS) -> Df2EvalResult:
    """:func:`evaluate_df2` on the three JSON files."""
    return evaluate_df2(load_json(results_path, "results"), load_json(query_gt_path, "query GT"),
                        load_json(gallery_gt_path, "gallery GT"), ks)


# ----------------------------------------------------------------------------------------------------------
# writers: our rankings -> the official results format
# ----------------------------------------------------------------------------------------------------------
_BOX_COLS = ["x1", "y1", "x2", "y2"]


def results_records(queries: pd.DataFrame, gallery: pd.DataFrame, indices: Any, *,
                    score_column: str | None = None, cls_column: str = "category_id") -> list[dict]:
    """Official results records: one per ``queries`` row, gallery entries = ``gallery`` rows ``indices``.

    ``queries`` needs ``image_id``, ``x1 y1 x2 y2`` and ``cls_column``; ``gallery`` needs ``image_id`` and
    ``x1 y1 x2 y2``. ``indices`` (n_queries, L) are gallery row positions in rank order (-1 entries are
    dropped; every record must keep at least one). ``score_column`` None = score 1 (GT-box setting).
    """
    for name, df, cols in (("queries", queries, ["image_id", *_BOX_COLS, cls_column]
                            + ([score_column] if score_column else [])),
                           ("gallery", gallery, ["image_id", *_BOX_COLS])):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise KeyError(f"{name} lacks column(s) {missing}")
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[0] != len(queries):
        raise ValueError(f"indices must have shape (len(queries)={len(queries)}, L), got {idx.shape}")
    idx = idx.astype(np.int64)
    if idx.size and idx.max() >= len(gallery):
        raise ValueError(f"indices refer to gallery row {idx.max()} but the gallery has {len(gallery)} rows")
    g_img = gallery["image_id"].to_numpy(np.int64)
    g_box = gallery[_BOX_COLS].to_numpy(np.float64)
    q_img = queries["image_id"].to_numpy(np.int64)
    q_box = queries[_BOX_COLS].to_numpy(np.float64)
    q_cls = queries[cls_column].to_numpy(np.int64)
    q_score = queries[score_column].to_numpy(np.float64) if score_column else np.ones(len(queries))
    out = []
    for i in range(len(queries)):
        row = idx[i][idx[i] >= 0]
        if not len(row):
            raise ValueError(f"query row {i} has no gallery entry (all indices are -1)")
        out.append({"query_image_id": int(q_img[i]), "query_bbox": [float(v) for v in q_box[i]],
                    "query_cls": int(q_cls[i]), "query_score": float(q_score[i]),
                    "gallery_image_id": g_img[row].tolist(), "gallery_bbox": g_box[row].tolist()})
    return out


def gt_box_results(queries: pd.DataFrame, gallery: pd.DataFrame, indices: Any) -> list[dict]:
    """GT-box setting: one record per GT query item (score 1, its ``category_id``) ranking GT shop items."""
    return results_records(queries, gallery, indices, score_column=None, cls_column="category_id")


def detection_results(query_dets: pd.DataFrame, gallery_dets: pd.DataFrame, indices: Any, *,
                      score_column: str = "score", cls_column: str = "category_id") -> list[dict]:
    """Detected setting: one record per query detection (its box, class, score) ranking gallery detections."""
    return results_records(query_dets, gallery_dets, indices, score_column=score_column,
                           cls_column=cls_column)


def write_results(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write a results list as compact JSON (atomic: temp file + rename)."""
    from capret_utils.common import write_text_atomic

    return write_text_atomic(path, json.dumps(records, separators=(",", ":")))


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m capret_utils.evaluation.df2_eval",
        description="DeepFashion2 consumer-to-shop top-k accuracy (official protocol, any list length >= 1; "
                    "top-k for k beyond a list's length equals top-length).")
    parser.add_argument("results", help="results JSON (list of query_image_id/query_bbox/query_cls/"
                                        "query_score/gallery_image_id/gallery_bbox records)")
    parser.add_argument("query_gt", help="query ground truth JSON (e.g. val_query.json)")
    parser.add_argument("gallery_gt", help="gallery ground truth JSON (e.g. val_gallery.json)")
    args = parser.parse_args(argv)
    try:
        out = evaluate_files(args.results, args.query_gt, args.gallery_gt)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({f"top{k}": out.metrics[f"top{k}"] for k in DEFAULT_KS}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
