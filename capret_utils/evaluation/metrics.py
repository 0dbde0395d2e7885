"""Retrieval quality: top-k accuracy (hit@k), full-ranking mAP and the per-query table (the exact ranking engines
themselves live in :mod:`capret_utils.evaluation.ranking`).

This module owns the *embedding-level* metrics used by the fine-tuning loop and the retrieval notebook.
The official DeepFashion2 detection-style protocol lives in :mod:`capret_utils.evaluation.df2_eval`.

Definitions (for one query q; "relevant" = shares an identity label with q, see below)
--------------------------------------------------------------------------------------
* Scores are cosine similarities ``s(q, g) = <q, g>`` of L2-normalised float32 embeddings.
* **Ranking and ties.** The gallery is ranked by score, descending. Ties are broken *pessimistically*:
  among gallery items with exactly equal scores, irrelevant items come first, then relevant ones; inside
  each of those groups the lower gallery index comes first. So a collapsed model (all scores equal) gets
  the worst possible numbers, never the best. The rank of a relevant item g is therefore
  ``#{g' : s' > s} + #{irrelevant g' : s' == s} + #{relevant g' : s' == s, g' < g} + 1``.
* ``R`` = number of relevant items in the whole gallery.
* **hit@k** (DeepFashion2's "top-k retrieval accuracy", torchmetrics ``RetrievalHitRate``) = 1 if a relevant
  item is among the first k, else 0. Reported as ``top{k}``, averaged over queries with R > 0.
* **AP** over the FULL ranking = ``(1/R) * sum_{i=1..R} i / r_i`` where ``r_1 < ... < r_R`` are the ranks of
  the R relevant items (the mean of precision@rank over relevant items; equals PML's
  ``mean_average_precision`` with ``k=None`` and torchmetrics ``RetrievalMAP(top_k=None)``). ``mAP`` is the
  mean over queries with R > 0.
* **Queries with R = 0** have no defined AP or hit: they are EXCLUDED from every average and counted in
  ``n_no_positive`` (PML's "lone query" rule, torchmetrics ``empty_target_action="skip"``).
* :func:`evaluate_ranking` scores a given, possibly truncated, ranked list of length L (e.g. from an ANN
  index): hit@k for k > L equals hit@L, and AP is truncated at L but still divided by R (``mAP@L``).

Relevance labels
----------------
``query_labels`` / ``gallery_labels`` are identity labels: either one int per row (a negative value means
"no identity", e.g. a style-0 gallery item, which is never relevant), or, for image-level retrieval where an
image holds several identities, one sequence of ints per row. A gallery row is relevant to a query row when
they share at least one non-negative label. :func:`item_sets` / :func:`image_sets` build the official
query/gallery sets and labels from the items table; :func:`evaluate_items` / :func:`evaluate_images` wrap it.

How the exact full-ranking mAP stays cheap (CPU engine "numpy")
----------------------------------------------------------------
Full-ranking AP needs every relevant item's rank, i.e. ``#{g : s(q, g) >= s(q, p)}`` for each relevant p,
which needs all scores of q. A separate pass after a FAISS search would cost a second matmul, so there is
one fused, exact pass per chunk of queries, tiled over the gallery (tile width a multiple of 2040 columns):

* an OpenBLAS matmul (numpy) computes a (chunk x tile) score block;
* FAISS's heap (``float_minheap_array_t.addn``) keeps each row's ``K + 8`` best entries;
* for every relevant item's score p, ``#{s >= p}`` is accumulated with one vectorised compare per relevant
  item over row blocks small enough to stay in cache (rows sorted by R so a block compares up to its first
  row's R); the booleans are counted eight at a time as uint64 byte lanes.

The relevant items' scores must be known before the tiles are scanned: they are computed first (one dot
product each) and written over the same entries of every tile, so each (query, gallery) pair has exactly
one float32 score in the whole evaluation, used for the list and the ranks alike. (Different BLAS calls
may round a dot product differently in the last bit; within one evaluation there is no such ambiguity.)
The kept lists are re-sorted with the tie rule; where a tie at the K-th place reaches past the kept
entries, the chunk's tiles are replayed (same calls, same values) for those rows and sorted exactly.
With ``num_threads`` > 1, each worker thread runs whole chunks on its own (numpy's BLAS is held to one
thread with ``threadpoolctl`` and FAISS's OpenMP to one thread per worker), so there is no barrier per
tile; without threadpoolctl a single worker uses multi-threaded BLAS. Memory is O(threads x chunk x tile)
(about 16 MB each by default), never queries x gallery. The "torch" engine (used on
CUDA, and testable on CPU) computes a (chunk x gallery) block with one matmul (``block_mb``), gathers the
relevant scores from it, counts with ``(S >= p).sum(1)`` and takes the lists from ``torch.topk`` with the
same exact tie fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from capret_utils.evaluation.ranking import (  # noqa: F401 - EvalConfig re-exported: metrics.EvalConfig
    EvalConfig,
    rank_numpy,
    rank_torch,
    relevant_ranks,
    resolve_engine,
)
from capret_utils.evaluation.retrieval import Reranker, prepare_embeddings

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 15, 20)


# ----------------------------------------------------------------------------------------------------------
# configuration and results
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RetrievalResult:
    """Outcome of an evaluation.

    ``metrics``: ``top{k}`` for each k, ``mAP``, ``n_queries`` (all), ``n_evaluated`` (R > 0),
    ``n_no_positive`` (R = 0, excluded), ``n_gallery``, ``mean_relevant`` (mean R over evaluated queries),
    ``list_length`` and, for truncated rankings, ``map_at`` (L).
    ``per_query``: one row per query, in input order (see :func:`per_query_table`).
    ``indices`` / ``scores``: the top lists (queries x list_length; gallery row indices, -1 = none).
    ``rank_indptr`` / ``rank_values``: CSR of every query's relevant-item ranks, ascending (ranks beyond a
    truncated list are absent); :attr:`relevant_ranks` gives them as a list of arrays.
    """

    metrics: dict[str, Any]
    per_query: pd.DataFrame
    indices: np.ndarray
    scores: np.ndarray
    rank_indptr: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(1, np.int64))
    rank_values: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))

    @property
    def relevant_ranks(self) -> list[np.ndarray]:
        """Ranks (1-based, ascending) of each query's relevant gallery items."""
        return np.split(self.rank_values, self.rank_indptr[1:-1]) if len(self.rank_indptr) > 1 else []


# ----------------------------------------------------------------------------------------------------------
# labels -> relevance (CSR of relevant gallery indices per query)
# ----------------------------------------------------------------------------------------------------------
def _label_pairs(labels: Any, n: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row, label) pairs with label >= 0, from 1-D int labels or a sequence of int sequences."""
    if isinstance(labels, pd.Series):
        labels = labels.to_numpy()
    if isinstance(labels, np.ndarray) and labels.dtype != object:
        if labels.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D int array or a sequence of int sequences, "
                             f"got an array of shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{name}: labels must be integers (identity ids), got dtype {labels.dtype}")
        if len(labels) != n:
            raise ValueError(f"{name}: {len(labels)} labels for {n} embedding rows")
        rows = np.flatnonzero(labels >= 0)
        return rows.astype(np.int64), labels[rows].astype(np.int64)
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"{name}: {len(labels)} labels for {n} embedding rows")
    rows_list: list[int] = []
    labs_list: list[int] = []
    for i, lab in enumerate(labels):
        if isinstance(lab, (int, np.integer)):
            lab = [lab]
        elif lab is None or (isinstance(lab, float) and math.isnan(lab)):
            lab = []
        for v in lab:
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"{name}[{i}]: labels must be integers (identity ids), got {v!r}")
            if v >= 0:
                rows_list.append(i)
                labs_list.append(int(v))
    return np.asarray(rows_list, dtype=np.int64), np.asarray(labs_list, dtype=np.int64)


def relevance_csr(query_labels: Any, gallery_labels: Any, n_queries: int | None = None,
                  n_gallery: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Relevant gallery rows per query as CSR ``(indptr, indices)``; indices ascending within a query.

    A gallery row is relevant to a query row when they share at least one non-negative label.
    """
    nq = len(query_labels) if n_queries is None else n_queries
    ng = len(gallery_labels) if n_gallery is None else n_gallery
    q_rows, q_labs = _label_pairs(query_labels, nq, "query_labels")
    g_rows, g_labs = _label_pairs(gallery_labels, ng, "gallery_labels")
    # join on label: for each (query, label) all gallery rows with that label
    g_order = np.lexsort((g_rows, g_labs))
    g_labs_s, g_rows_s = g_labs[g_order], g_rows[g_order]
    lo = np.searchsorted(g_labs_s, q_labs, side="left")
    hi = np.searchsorted(g_labs_s, q_labs, side="right")
    cnt = hi - lo
    total = int(cnt.sum())
    pq = np.repeat(q_rows, cnt)
    starts = np.repeat(lo - np.concatenate(([0], np.cumsum(cnt)[:-1])), cnt)
    pg = g_rows_s[np.arange(total, dtype=np.int64) + starts] if total else np.zeros(0, np.int64)
    if total:  # unique (query, gallery) pairs: a gallery image may share several labels with a query
        key = pq * np.int64(ng) + pg
        key = np.unique(key)
        pq, pg = key // ng, key % ng
    indptr = np.zeros(nq + 1, dtype=np.int64)
    np.cumsum(np.bincount(pq, minlength=nq), out=indptr[1:])
    return indptr, pg.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------------------
def _summarise(indptr: np.ndarray, ranks_csr: np.ndarray, found_mask: np.ndarray | None, n_gallery: int,
               ks: Sequence[int], list_length: int, truncated: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics and per-query columns from sorted relevant ranks (CSR; ``found_mask`` drops unseen ones)."""
    nq = len(indptr) - 1
    R = np.diff(indptr)
    qid = np.repeat(np.arange(nq, dtype=np.int64), R)
    if found_mask is not None:
        qid_f, ranks_f = qid[found_mask], ranks_csr[found_mask]
    else:
        qid_f, ranks_f = qid, ranks_csr
    # position i (1-based) of each found relevant item among the query's relevant items (ranks ascending)
    cnt_f = np.bincount(qid_f, minlength=nq)
    start_f = np.concatenate(([0], np.cumsum(cnt_f)[:-1]))
    i = np.arange(len(qid_f)) - start_f[qid_f] + 1
    ap_sum = np.bincount(qid_f, weights=i / ranks_f, minlength=nq)
    evaluated = R > 0
    ap = np.full(nq, np.nan)
    ap[evaluated] = ap_sum[evaluated] / R[evaluated]
    first = np.full(nq, -1, dtype=np.int64)
    has = cnt_f > 0
    first[has] = ranks_f[start_f[has]]
    n_eval = int(evaluated.sum())
    metrics: dict[str, Any] = {}
    cols: dict[str, Any] = {"n_relevant": R, "first_hit_rank": first, "ap": ap, "evaluated": evaluated}
    for k in ks:
        hit = has & (first <= k)
        metrics[f"top{k}"] = float(hit[evaluated].mean()) if n_eval else float("nan")
        cols[f"hit@{k}"] = hit
    metrics["mAP"] = float(np.nanmean(ap)) if n_eval else float("nan")
    metrics.update({"n_queries": int(nq), "n_evaluated": n_eval, "n_no_positive": int(nq - n_eval),
                    "n_gallery": int(n_gallery),
                    "mean_relevant": float(R[evaluated].mean()) if n_eval else float("nan"),
                    "list_length": int(list_length)})
    if truncated:
        metrics["map_at"] = int(list_length)
    return metrics, cols


def per_query_table(cols: dict[str, Any], top_idx: np.ndarray, top_scores: np.ndarray,
                    indptr: np.ndarray, indices: np.ndarray, query_keys: Sequence[str] | None,
                    gallery_keys: Sequence[str] | None, ks: Sequence[int]) -> pd.DataFrame:
    """The per-query DataFrame (input order).

    Columns: ``query`` (row index), ``query_key`` (when keys are given), ``n_relevant`` (R),
    ``first_hit_rank`` (Int64; <NA> when no relevant item was ranked), ``ap`` (NaN when R = 0),
    ``hit@k`` for each k (nullable boolean, <NA> when R = 0, so ``.mean()`` skips those queries like the
    metrics do), ``top_indices`` / ``top_scores`` / ``top_relevant`` (arrays, one per row: the top list),
    ``top_keys`` (when gallery keys are given).
    """
    nq = top_idx.shape[0]
    evaluated = cols["evaluated"]
    data: dict[str, Any] = {"query": np.arange(nq)}
    if query_keys is not None:
        data["query_key"] = np.asarray(query_keys, dtype=object)
    data["n_relevant"] = cols["n_relevant"]
    first = pd.array(np.where(cols["first_hit_rank"] > 0, cols["first_hit_rank"], 0), dtype="Int64")
    first[cols["first_hit_rank"] <= 0] = pd.NA
    data["first_hit_rank"] = first
    data["ap"] = cols["ap"]
    for k in ks:
        h = pd.array(cols[f"hit@{k}"], dtype="boolean")
        h[~evaluated] = pd.NA
        data[f"hit@{k}"] = h
    # relevance of the listed items
    qid = np.repeat(np.arange(nq, dtype=np.int64), np.diff(indptr))
    ng_key = np.int64(max(int(top_idx.max(initial=0)), int(indices.max(initial=0))) + 1)
    rel_keys = np.sort(qid * ng_key + indices)
    lst_keys = np.arange(nq, dtype=np.int64)[:, None] * ng_key + top_idx
    pos = np.searchsorted(rel_keys, lst_keys)
    pos = np.minimum(pos, max(len(rel_keys) - 1, 0))
    top_rel = (rel_keys[pos] == lst_keys) & (top_idx >= 0) if len(rel_keys) else np.zeros_like(top_idx, bool)
    data["top_indices"] = list(top_idx)
    data["top_scores"] = list(top_scores)
    data["top_relevant"] = list(top_rel)
    if gallery_keys is not None:
        gk = np.asarray(gallery_keys, dtype=object)
        keys = np.where(top_idx >= 0, gk[np.clip(top_idx, 0, len(gk) - 1)], None)
        data["top_keys"] = list(keys)
    return pd.DataFrame(data)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


def _check_keys(keys: Sequence[str] | None, n: int, name: str) -> Sequence[str] | None:
    if keys is None:
        return None
    if len(keys) != n:
        raise ValueError(f"{name}: {len(keys)} keys for {n} embedding rows")
    return keys


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------
def evaluate(query_emb: Any, gallery_emb: Any, query_labels: Any, gallery_labels: Any, *,
             ks: Sequence[int] = DEFAULT_KS, list_length: int = 0, query_keys: Sequence[str] | None = None,
             gallery_keys: Sequence[str] | None = None, rerank: Reranker | None = None, rerank_k: int = 0,
             config: EvalConfig = EvalConfig()) -> RetrievalResult:
    """Exact retrieval metrics (hit@k for ``ks`` and full-ranking mAP) plus the per-query table.

    ``query_emb`` (nq, d) and ``gallery_emb`` (ng, d): float embeddings (numpy or torch), L2-normalised or
    normalised here (``config.normalize``). Labels: see the module docstring. ``list_length``: length of
    the stored top lists (0 = max(ks)). ``rerank``: optional :data:`capret_utils.evaluation.retrieval.Reranker`
    applied to the first ``rerank_k`` (>= list_length) items of every ranking; the re-scored items are
    re-sorted (stable) and keep their places ahead of the untouched rest, so mAP stays a full-ranking mAP.
    """
    ks = _check_ks(ks)
    Q = prepare_embeddings(query_emb, "query_emb", normalize=config.normalize, tol=config.norm_tol)
    G = prepare_embeddings(gallery_emb, "gallery_emb", dim=Q.shape[1], normalize=config.normalize,
                           tol=config.norm_tol)
    nq, ng = Q.shape[0], G.shape[0]
    query_keys = _check_keys(query_keys, nq, "query_keys")
    gallery_keys = _check_keys(gallery_keys, ng, "gallery_keys")
    indptr, indices = relevance_csr(query_labels, gallery_labels, nq, ng)
    L = int(list_length) if list_length else max(ks)
    L = min(L, ng)
    K = max(L, int(rerank_k) if rerank is not None else 0)
    K = min(K, ng)
    engine, device = resolve_engine(config)
    if engine == "numpy":
        ranked = rank_numpy(Q, G, indptr, indices, K, config)
    else:
        ranked = rank_torch(Q, G, indptr, indices, K, config, device)
    ranks, order = relevant_ranks(indptr, indices, ranked.pos_scores, ranked.pos_count_ge)
    top_idx, top_scores = ranked.top_idx, ranked.top_scores
    if rerank is not None and K > 0:
        top_idx, top_scores, ranks = _apply_rerank(rerank, top_idx, top_scores, indptr, indices, order,
                                                   ranks, config)
    metrics, cols = _summarise(indptr, ranks, None, ng, ks, L, truncated=False)
    if rerank is not None:
        metrics["rerank_k"] = int(K)
    per_query = per_query_table(cols, top_idx[:, :L], top_scores[:, :L], indptr, indices, query_keys,
                                gallery_keys, ks)
    return RetrievalResult(metrics, per_query, top_idx[:, :L], top_scores[:, :L], indptr, ranks)


def _apply_rerank(rerank: Reranker, top_idx: np.ndarray, top_scores: np.ndarray, indptr: np.ndarray,
                  indices: np.ndarray, order: np.ndarray, ranks: np.ndarray,
                  config: EvalConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from capret_utils.evaluation.retrieval import apply_reranker

    nq, K = top_idx.shape
    new_idx, new_scores, perm = apply_reranker(rerank, top_idx, top_scores, batch=max(1, config.query_batch))
    # new rank of every relevant item that sat in the re-scored head of the ranking
    # position of original rank r (1..K) after re-ranking = inverse permutation
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(K), perm.shape), axis=1)
    qid = np.repeat(np.arange(nq, dtype=np.int64), np.diff(indptr))
    q_sorted = qid[order]
    head = ranks <= K
    new_ranks = ranks.copy()
    new_ranks[head] = inv[q_sorted[head], ranks[head] - 1] + 1
    # keep ascending order within each query
    resort = np.lexsort((new_ranks, q_sorted))
    return new_idx, new_scores, new_ranks[resort]


def evaluate_ranking(indices: Any, query_labels: Any, gallery_labels: Any, *, n_gallery: int | None = None,
                     scores: Any = None, ks: Sequence[int] = DEFAULT_KS,
                     query_keys: Sequence[str] | None = None,
                     gallery_keys: Sequence[str] | None = None) -> RetrievalResult:
    """Metrics of a given ranked list per query (e.g. from an IVF/HNSW index or an external ranker).

    ``indices`` (nq, L): gallery rows in rank order, -1 for empty slots. hit@k for k > L equals hit@L;
    ``mAP`` is AP truncated at L divided by R (``metrics["map_at"] = L``); it equals the full-ranking mAP
    only when L = n_gallery. Relevance comes from the labels as in :func:`evaluate`.
    """
    ks = _check_ks(ks)
    idx = np.asarray(indices)
    if idx.ndim != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be a 2-D int array (queries x list length), got {idx.dtype} "
                         f"{idx.shape}")
    idx = idx.astype(np.int64)
    nq, L = idx.shape
    ng = int(n_gallery) if n_gallery is not None else len(gallery_labels)
    if idx.size and (idx.max() >= ng or idx.min() < -1):
        raise ValueError(f"indices must lie in [-1, {ng - 1}] (n_gallery={ng})")
    if scores is None:
        sc = np.where(idx >= 0, -np.arange(L, dtype=np.float32)[None, :], -np.inf).astype(np.float32)
    else:
        sc = np.asarray(scores, dtype=np.float32)
        if sc.shape != idx.shape:
            raise ValueError(f"scores shape {sc.shape} != indices shape {idx.shape}")
    query_keys = _check_keys(query_keys, nq, "query_keys")
    gallery_keys = _check_keys(gallery_keys, ng, "gallery_keys")
    indptr, rel = relevance_csr(query_labels, gallery_labels, nq, ng)
    # position of each relevant item in the list (first occurrence), else not found
    rows = np.repeat(np.arange(nq, dtype=np.int64), L)
    flat = idx.ravel()
    ok = flat >= 0
    lk = rows[ok] * ng + flat[ok]
    lpos = np.tile(np.arange(L, dtype=np.int64), nq)[ok]
    o = np.lexsort((lpos, lk))
    lk, lpos = lk[o], lpos[o]
    first_occ = np.ones(len(lk), bool)
    first_occ[1:] = lk[1:] != lk[:-1]
    lk, lpos = lk[first_occ], lpos[first_occ]
    qid = np.repeat(np.arange(nq, dtype=np.int64), np.diff(indptr))
    rk = qid * ng + rel
    p = np.searchsorted(lk, rk)
    p = np.minimum(p, max(len(lk) - 1, 0))
    found = (lk[p] == rk) if len(lk) else np.zeros(len(rk), bool)
    rank = np.where(found, lpos[p] + 1 if len(lk) else 0, np.iinfo(np.int64).max)
    o2 = np.lexsort((rank, qid))
    rank, found = rank[o2], found[o2]
    metrics, cols = _summarise(indptr, rank, found, ng, ks, L, truncated=L < ng)
    per_query = per_query_table(cols, idx, sc, indptr, rel, query_keys, gallery_keys, ks)
    seen_indptr = np.zeros(nq + 1, dtype=np.int64)
    np.cumsum(np.bincount(qid[o2][found], minlength=nq), out=seen_indptr[1:])
    return RetrievalResult(metrics, per_query, idx, sc, seen_indptr, rank[found])


# ----------------------------------------------------------------------------------------------------------
# items-table wrappers
# ----------------------------------------------------------------------------------------------------------
_ID_COLS = ("pair_id", "style")


def _require(df: pd.DataFrame, cols: Sequence[str], name: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"{name} lacks column(s) {missing}; it must be a slice of the items table "
                       f"(capret_utils.data.df2.load_items)")


def item_sets(items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Official item-level retrieval sets: (queries = user items with style > 0, gallery = all shop items).

    Both keep the items-table columns and order, with a fresh 0..n-1 index (= embedding row order).
    """
    _require(items, ("source", "style", "pair_id"), "items")
    queries = items[(items["source"] == "user") & (items["style"] > 0)].reset_index(drop=True)
    gallery = items[items["source"] == "shop"].reset_index(drop=True)
    return queries, gallery


def item_labels(queries: pd.DataFrame, gallery: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Compact identity ids for item-level relevance: same (pair_id, style) with style > 0; style 0 -> -1."""
    _require(queries, _ID_COLS, "queries")
    _require(gallery, _ID_COLS, "gallery")
    both = pd.concat([queries[list(_ID_COLS)], gallery[list(_ID_COLS)]], ignore_index=True)
    codes = pd.MultiIndex.from_frame(both.astype("int64")).factorize()[0] if len(both) else np.zeros(0, int)
    codes = np.where(both["style"].to_numpy() > 0, codes, -1).astype(np.int64)
    return codes[:len(queries)], codes[len(queries):]


def image_sets(items: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Image-level sets: (query images = user images with >= 1 style>0 item, gallery = all shop images).

    One row per image, sorted by (split, image_id), columns ``key`` (``"{split}/{image_id:06d}"``),
    ``split``, ``image_id``, ``path``, ``source``, ``pair_id``, ``n_items`` and ``identities`` (sorted
    list of (pair_id, style) tuples with style > 0).
    """
    _require(items, ("split", "image_id", "path", "source", "pair_id", "style"), "items")
    df = items[["split", "image_id", "path", "source", "pair_id", "style"]].copy()
    df["ident"] = list(zip(df["pair_id"].astype(int), df["style"].astype(int)))
    df.loc[df["style"] <= 0, "ident"] = None
    g = df.groupby(["split", "image_id"], sort=True)
    imgs = g.agg(path=("path", "first"), source=("source", "first"), pair_id=("pair_id", "first"),
                 n_items=("style", "size"),
                 identities=("ident", lambda s: sorted(x for x in s if x is not None))).reset_index()
    imgs.insert(0, "key", [f"{s}/{int(i):06d}" for s, i in zip(imgs["split"], imgs["image_id"])])
    queries = imgs[(imgs["source"] == "user") & (imgs["identities"].map(len) > 0)].reset_index(drop=True)
    gallery = imgs[imgs["source"] == "shop"].reset_index(drop=True)
    return queries, gallery


def image_labels(query_images: pd.DataFrame, gallery_images: pd.DataFrame) -> tuple[list[list[int]],
                                                                                      list[list[int]]]:
    """Multi-label identity ids (compact ints) for image-level relevance from the ``identities`` column."""
    _require(query_images, ("identities",), "query_images")
    _require(gallery_images, ("identities",), "gallery_images")
    ids: dict[tuple[int, int], int] = {}

    def conv(col: pd.Series) -> list[list[int]]:
        return [[ids.setdefault((int(p), int(s)), len(ids)) for p, s in row if int(s) > 0] for row in col]

    return conv(query_images["identities"]), conv(gallery_images["identities"])


def evaluate_items(query_emb: Any, gallery_emb: Any, queries: pd.DataFrame, gallery: pd.DataFrame, *,
                   ks: Sequence[int] = DEFAULT_KS, list_length: int = 0, rerank: Reranker | None = None,
                   rerank_k: int = 0, config: EvalConfig = EvalConfig()) -> RetrievalResult:
    """Item-level evaluation: rows of ``queries`` / ``gallery`` (items-table slices, e.g. from
    :func:`item_sets`) align with the embedding rows. Relevant = same ``pair_id`` and same ``style`` > 0.
    The per-query table gets the query items' ``key`` as ``query_key`` and gallery keys as ``top_keys``.
    """
    ql, gl = item_labels(queries, gallery)
    return evaluate(query_emb, gallery_emb, ql, gl, ks=ks, list_length=list_length,
                    query_keys=_keys(queries), gallery_keys=_keys(gallery), rerank=rerank,
                    rerank_k=rerank_k, config=config)


def evaluate_images(query_emb: Any, gallery_emb: Any, query_images: pd.DataFrame,
                    gallery_images: pd.DataFrame, *, ks: Sequence[int] = DEFAULT_KS, list_length: int = 0,
                    rerank: Reranker | None = None, rerank_k: int = 0,
                    config: EvalConfig = EvalConfig()) -> RetrievalResult:
    """Image-level evaluation on :func:`image_sets` frames: relevant = the two images share any identity."""
    ql, gl = image_labels(query_images, gallery_images)
    return evaluate(query_emb, gallery_emb, ql, gl, ks=ks, list_length=list_length,
                    query_keys=_keys(query_images), gallery_keys=_keys(gallery_images), rerank=rerank,
                    rerank_k=rerank_k, config=config)


def _keys(df: pd.DataFrame) -> list[str] | None:
    return df["key"].astype(str).tolist() if "key" in df.columns else None


def attach_columns(per_query: pd.DataFrame, queries: pd.DataFrame,
                   columns: Sequence[str] = ("category_name", "scale", "occlusion", "zoom_in", "viewpoint",
                                             "pair_id", "style")) -> pd.DataFrame:
    """The per-query table joined (by row) with query attributes, for breakdowns such as
    ``table.groupby("occlusion")["hit@1"].mean()``."""
    cols = [c for c in columns if c in queries.columns and c not in per_query.columns]
    if len(queries) != len(per_query):
        raise ValueError(f"{len(queries)} query rows for a per-query table of {len(per_query)} rows")
    return pd.concat([per_query.reset_index(drop=True), queries[cols].reset_index(drop=True)], axis=1)

