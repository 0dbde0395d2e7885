"""Nearest-neighbour search over gallery embeddings with FAISS, plus an optional re-ranking hook.

This module owns the gallery index: an exact inner-product index (``faiss.IndexFlatIP``) over
L2-normalised float32 embeddings, so scores are cosine similarities; on the GPU (faiss-gpu,
``StandardGpuResources`` + ``index_cpu_to_gpu``) when one is present, else on the CPU. Queries are searched
in chunks of ``IndexConfig.query_batch`` rows so memory stays bounded. For galleries in the millions an
approximate index can be chosen with ``IndexConfig(kind="ivf")`` (``faiss.IndexIVFFlat``) or
``kind="hnsw"`` (``faiss.IndexHNSWFlat``, CPU only), both with the inner-product metric; their recall
against the exact index is measured by ``tests/test_retrieval.py``. No home-made ANN.

Conventions
-----------
* Input: (n, d) float arrays (numpy, or torch tensors on any device). Non-finite values raise. Rows whose
  norm differs from 1 by more than ``norm_tol`` are L2-normalised (``normalize="normalize"``, the default:
  cosine similarity is what the index means) or rejected (``normalize="error"``). All-zero rows always raise.
* Results: ``indices`` (nq, k) int64 gallery rows, ``scores`` (nq, k) float32, best first. Equal scores are
  ordered by gallery index (lower first). For the exact index on the CPU this also decides which of
  several items tied at the k-th place are returned (the lower indices): FAISS's heap does not, so rows
  where a tie reaches the end of the list are recomputed exactly with numpy. Empty slots (an approximate
  index that found fewer than k) have index -1 and score -inf. k larger than the gallery is clamped.
* Re-ranking: a :data:`Reranker` receives ``(query_rows (b,), candidates (b, k'))`` and returns new scores
  (b, k'); candidates are re-sorted by the new scores (stable: equal new scores keep the first-stage order).
  It is the hook for ITM re-ranking with X2-VLM.

``OPENBLAS_CORETYPE=Haswell`` makes faiss-cpu about 2x faster on AVX2 machines; it must be set before
faiss is imported (the Makefile and the test configuration set it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

Reranker = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``rerank(query_rows, candidates) -> scores``: query_rows (b,) int64 query row numbers, candidates (b, k)
int64 gallery rows (-1 = empty slot), returns (b, k) float scores (higher = better)."""

KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexConfig:
    """How the gallery index is built and searched."""

    kind: str = "flat"  # "flat" (exact), "ivf" (IndexIVFFlat) or "hnsw" (IndexHNSWFlat, CPU only)
    nlist: int = 0  # IVF cells; 0 = auto (about 4*sqrt(n), at most n // 39)
    nprobe: int = 16  # IVF cells visited per query
    M: int = 32  # HNSW neighbours per node
    ef_construction: int = 200  # HNSW build-time beam width
    ef_search: int = 128  # HNSW search-time beam width (raised to k when smaller)
    use_gpu: bool | str = "auto"  # "auto" = GPU when faiss sees one; True = require; False = CPU
    gpu_device: int = 0  # CUDA device number for faiss-gpu
    query_batch: int = 16384  # queries per search call (bounds the k-NN working memory)
    normalize: str = "normalize"  # non-unit-norm rows: "normalize" them or raise ("error")
    norm_tol: float = 1e-3  # allowed | ||x|| - 1 |
    seed: int = 0  # IVF training sample seed
    progress: bool = False  # tqdm bar over query batches


@dataclass
class SearchResult:
    """Top-k gallery rows and scores per query (best first)."""

    indices: np.ndarray  # (nq, k) int64, -1 = empty
    scores: np.ndarray  # (nq, k) float32, -inf where empty


@dataclass
class GalleryIndex:
    """A built FAISS index and what it was built from (keep the GPU resources alive with it)."""

    index: Any
    config: IndexConfig
    dim: int
    ntotal: int
    on_gpu: bool
    gpu_resources: Any = None
    keep_alive: list = field(default_factory=list, repr=False)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, any device / dtype
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def prepare_embeddings(x: Any, name: str = "embeddings", *, dim: int | None = None,
                       normalize: str = "normalize", tol: float = 1e-3) -> np.ndarray:
    """Validate embeddings and return them as C-contiguous, L2-normalised float32 (n, d).

    Raises ``ValueError`` naming ``name`` for: not 2-D, no columns, a dimension different from ``dim``,
    NaN/inf values, all-zero rows, or (``normalize="error"``) rows whose norm is not 1 within ``tol``.
    """
    if normalize not in ("normalize", "error"):
        raise ValueError(f"normalize must be 'normalize' or 'error', got {normalize!r}")
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (rows x dim), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: embeddings have dimension 0")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: dimension {arr.shape[1]} does not match the other side's {dim}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a float array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(f"{name}: {len(bad)} row(s) hold NaN or inf values (first: row {bad[0]})")
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr).astype(np.float64))  # float32 sums: ~1e-6 relative
    zero = norms < 1e-12
    if zero.any():
        raise ValueError(f"{name}: {int(zero.sum())} row(s) are all zeros and cannot be L2-normalised "
                         f"(first: row {np.flatnonzero(zero)[0]})")
    off = np.abs(norms - 1.0) > tol
    if off.any():
        if normalize == "error":
            raise ValueError(f"{name}: {int(off.sum())} row(s) are not L2-normalised (|norm - 1| > {tol}; "
                             f"first: row {np.flatnonzero(off)[0]} with norm {norms[off][0]:.6g}); "
                             f"normalise them or use normalize='normalize'")
        arr = np.ascontiguousarray(arr / norms[:, None].astype(np.float32), dtype=np.float32)
    return arr


def _faiss():
    import faiss

    return faiss


def gpu_available() -> bool:
    """True when the installed FAISS is a GPU build and sees at least one GPU."""
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def _auto_nlist(n: int) -> int:
    return int(max(1, min(int(round(4 * np.sqrt(n))), n // 39)))


def build_index(gallery_emb: Any, config: IndexConfig = IndexConfig()) -> GalleryIndex:
    """Build a FAISS inner-product index over the (normalised) gallery embeddings."""
    if config.kind not in KINDS:
        raise ValueError(f"IndexConfig.kind must be one of {KINDS}, got {config.kind!r}")
    faiss = _faiss()
    G = prepare_embeddings(gallery_emb, "gallery_emb", normalize=config.normalize, tol=config.norm_tol)
    n, d = G.shape
    if n == 0:
        raise ValueError("gallery_emb: the gallery is empty")
    want_gpu = config.use_gpu
    if want_gpu not in (True, False, "auto"):
        raise ValueError(f"IndexConfig.use_gpu must be True, False or 'auto', got {want_gpu!r}")
    have_gpu = gpu_available()
    if want_gpu is True and not have_gpu:
        raise RuntimeError("IndexConfig(use_gpu=True) but FAISS sees no GPU (install faiss-gpu-cu12 and "
                           "check CUDA), or use use_gpu='auto' to fall back to the CPU")
    if want_gpu is True and config.kind == "hnsw":
        raise ValueError("FAISS has no GPU HNSW index: use kind='flat' or 'ivf' on the GPU, or use_gpu='auto'")
    use_gpu = have_gpu and want_gpu is not False and config.kind != "hnsw"
    if config.kind == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(G)
    elif config.kind == "ivf":
        nlist = config.nlist or _auto_nlist(n)
        if nlist > n:
            raise ValueError(f"IndexConfig.nlist={nlist} exceeds the gallery size {n}")
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(config.seed)
        max_train = 256 * nlist
        train = G if n <= max_train else G[np.sort(rng.choice(n, max_train, replace=False))]
        index.cp.seed = int(config.seed)
        index.train(train)
        index.add(G)
        index.nprobe = int(config.nprobe)
    else:
        index = faiss.IndexHNSWFlat(d, int(config.M), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(config.ef_construction)
        index.hnsw.efSearch = int(config.ef_search)
        index.add(G)
    keep = [quantizer] if config.kind == "ivf" else []  # the IVF index borrows its quantizer
    res = None
    if use_gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, int(config.gpu_device), index)
        if config.kind == "ivf":
            index.nprobe = int(config.nprobe)
    return GalleryIndex(index=index, config=config, dim=d, ntotal=n, on_gpu=use_gpu, gpu_resources=res,
                        keep_alive=keep)


def _sort_rows(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by (score desc, index asc); empty slots (-1) last with score -inf."""
    empty = I < 0
    D = np.where(empty, -np.inf, D).astype(np.float32)
    key_idx = np.where(empty, np.iinfo(np.int64).max, I)
    order = np.lexsort((key_idx, -D.astype(np.float64)), axis=-1)
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


_TIE_MARGIN = 8  # extra neighbours fetched to detect ties crossing the k-th place


def _exact_rows(index: GalleryIndex, Qr: np.ndarray, k: int, D: np.ndarray, I: np.ndarray,
                rows: np.ndarray) -> None:
    """Top-k by (score desc, index asc) for a few rows, from the vectors stored in the flat index."""
    faiss = _faiss()
    xb = faiss.rev_swig_ptr(index.index.get_xb(), index.ntotal * index.dim).reshape(index.ntotal, index.dim)
    for r, q in zip(rows, Qr):
        sc = xb @ q
        kth = np.partition(sc, sc.size - k)[sc.size - k]
        cand = np.flatnonzero(sc >= kth)
        o = np.lexsort((cand, -sc[cand].astype(np.float64)))[:k]
        I[r], D[r] = cand[o], sc[cand[o]]


def apply_reranker(rerank: Reranker, indices: np.ndarray, scores: np.ndarray, *, batch: int = 4096,
                   query_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-score every row's candidates with ``rerank`` and re-sort them (stable).

    Returns ``(indices, scores, perm)``: the re-sorted candidates, their new scores, and ``perm`` with
    ``new[i, j] = old[i, perm[i, j]]``. Empty candidates (-1) get score -inf and stay last.
    """
    nq, k = indices.shape
    rows_all = np.arange(nq, dtype=np.int64) if query_rows is None else np.asarray(query_rows, np.int64)
    out_i = np.empty_like(indices)
    out_s = np.empty((nq, k), dtype=np.float32)
    perm = np.empty((nq, k), dtype=np.int64)
    for s in range(0, nq, batch):
        cand = indices[s:s + batch]
        new = np.asarray(_to_numpy(rerank(rows_all[s:s + batch], cand)), dtype=np.float64)
        if new.shape != cand.shape:
            raise ValueError(f"rerank returned scores of shape {new.shape} for candidates of shape "
                             f"{cand.shape}")
        empty = cand < 0
        if not np.isfinite(new[~empty]).all():
            raise ValueError("rerank returned NaN or inf scores for real candidates")
        new = np.where(empty, -np.inf, new)
        pos = np.broadcast_to(np.arange(k), cand.shape)
        order = np.lexsort((pos, -new), axis=-1)
        perm[s:s + batch] = order
        out_i[s:s + batch] = np.take_along_axis(cand, order, axis=1)
        out_s[s:s + batch] = np.take_along_axis(new, order, axis=1)
    return out_i, out_s, perm


def search(index: GalleryIndex, query_emb: Any, k: int, *, rerank: Reranker | None = None,
           rerank_k: int = 0) -> SearchResult:
    """Top-k gallery rows for every query row, in chunks of ``index.config.query_batch`` queries.

    With ``rerank``, the first ``max(k, rerank_k)`` candidates are re-scored and re-sorted and the first k
    are returned with the re-ranker's scores.
    """
    cfg = index.config
    Q = prepare_embeddings(query_emb, "query_emb", dim=index.dim, normalize=cfg.normalize, tol=cfg.norm_tol)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(int(k), index.ntotal)
    kr = min(max(k, int(rerank_k)), index.ntotal) if rerank is not None else k
    if index.on_gpu and kr > 2048:
        raise ValueError(f"faiss-gpu returns at most 2048 neighbours per query, asked for {kr}; use a CPU "
                         f"index (use_gpu=False) or capret_utils.evaluation.metrics for full rankings")
    if cfg.kind == "hnsw":
        index.index.hnsw.efSearch = max(int(cfg.ef_search), kr)
    nq = Q.shape[0]
    I_out = np.empty((nq, k), dtype=np.int64)
    D_out = np.empty((nq, k), dtype=np.float32)
    starts = range(0, nq, max(1, int(cfg.query_batch)))
    if cfg.progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="faiss search", unit="batch")
    exact_ties = cfg.kind == "flat" and not index.on_gpu
    extra = _TIE_MARGIN if exact_ties and kr < index.ntotal else 0
    for s in starts:
        e = min(nq, s + max(1, int(cfg.query_batch)))
        D, I = index.index.search(Q[s:e], kr + extra)
        D, I = _sort_rows(D, I.astype(np.int64))
        if extra:
            cut = np.flatnonzero(D[:, kr - 1] == D[:, -1])  # a tie class may continue past the list
            if len(cut):
                D, I = D[:, :kr].copy(), I[:, :kr].copy()
                _exact_rows(index, Q[s:e][cut], kr, D, I, cut)
            D, I = D[:, :kr], I[:, :kr]
        if rerank is not None:
            I, D, _ = apply_reranker(rerank, I, D, query_rows=np.arange(s, e, dtype=np.int64))
        I_out[s:e], D_out[s:e] = I[:, :k], D[:, :k]
    return SearchResult(indices=I_out, scores=D_out)


def exact_search(query_emb: Any, gallery_emb: Any, k: int, config: IndexConfig = IndexConfig(), *,
                 rerank: Reranker | None = None, rerank_k: int = 0) -> SearchResult:
    """Build an index from ``gallery_emb`` (``config.kind``, "flat" by default) and search it."""
    return search(build_index(gallery_emb, config), query_emb, k, rerank=rerank, rerank_k=rerank_k)


def recall_at_k(approx: SearchResult | np.ndarray, exact: SearchResult | np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the approximate top-k (the usual ANN recall@k)."""
    a = approx.indices if isinstance(approx, SearchResult) else np.asarray(approx)
    e = exact.indices if isinstance(exact, SearchResult) else np.asarray(exact)
    a, e = a[:, :k], e[:, :k]
    hits = sum(len(np.intersect1d(ar[ar >= 0], er[er >= 0])) for ar, er in zip(a, e))
    denom = int((e >= 0).sum())
    return float(hits / denom) if denom else float("nan")
