"""The exact ranking engines behind :func:`capret_utils.evaluation.metrics.evaluate`: blocked scoring on numpy
(BLAS) or torch, the top-K lists and, for every relevant gallery item, how many gallery items score at least as
high (ties count against the model), from which ranks, hit@k and AP follow exactly."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EvalConfig:
    """Knobs of the exact evaluator (the defaults suit a 2-core CPU and a CUDA GPU alike)."""

    device: str = "auto"  # "auto" (CUDA if torch sees one, else CPU), "cpu", "cuda", "cuda:N"
    engine: str = "auto"  # "auto" (torch on CUDA, numpy+faiss on CPU), "numpy", "torch"
    query_batch: int = 256  # queries per chunk (numpy engine); the torch engine derives it from block_mb
    gallery_tile: int = 16320  # gallery columns per score tile (numpy engine; rounded to a multiple of 2040)
    count_rows: int = 4  # numpy engine: rows per counting block (block scores stay in cache across slots)
    block_mb: int = 1024  # torch engine: MB of one (chunk x gallery) float32 score block
    num_threads: int = 0  # numpy engine worker threads, each running whole chunks (0 = all usable cores)
    normalize: str = "normalize"  # non-unit-norm input: "normalize" it, or raise ("error")
    norm_tol: float = 1e-3  # allowed | ||x|| - 1 | before normalisation/error applies
    progress: bool = True  # tqdm progress bar over query chunks



# ----------------------------------------------------------------------------------------------------------
# the exact ranking engines
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _Ranked:
    top_idx: np.ndarray  # (nq, K) int64, -1 pad
    top_scores: np.ndarray  # (nq, K) float32
    pos_scores: np.ndarray  # aligned with rel indices (CSR)
    pos_count_ge: np.ndarray  # #{g : s(q, g) >= score of that relevant item}


def _num_threads(requested: int) -> int:
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def resolve_engine(config: EvalConfig) -> tuple[str, str]:
    """(engine, torch device string) from the config."""
    device = config.device
    engine = config.engine
    if engine not in ("auto", "numpy", "torch"):
        raise ValueError(f"EvalConfig.engine must be 'auto', 'numpy' or 'torch', got {engine!r}")
    if device == "auto":
        device = "cpu"
        if engine != "numpy":
            try:
                import torch

                if torch.cuda.is_available():
                    device = "cuda"
            except ImportError:  # pragma: no cover - torch is a core dependency
                pass
    if engine == "auto":
        engine = "torch" if device.startswith("cuda") else "numpy"
    if engine == "numpy" and device != "cpu":
        raise ValueError(f"the numpy engine runs on the CPU only, got device={device!r}")
    return engine, device


def _padded_positives(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """(len(rows), width) matrix of each row's relevant gallery indices, -1 padded."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    out = np.full((len(rows), max(width, 1)), -1, dtype=np.int64)
    if counts.sum():
        r = np.repeat(np.arange(len(rows)), counts)
        j = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        out[r, j] = indices[np.repeat(starts, counts) + j]
    return out


_LANE_WORDS = 255  # uint64 words summed at once: each of the 8 byte lanes then holds at most 255
_TILE_UNIT = 8 * _LANE_WORDS  # tile widths are multiples of this many columns


def _count_ge_rows(S: np.ndarray, P: np.ndarray, R: np.ndarray, counts: np.ndarray, b3: np.ndarray,
                   width: int) -> None:
    """counts[r, j] += #{c < width : S[r, c] >= P[r, j]} for every row r and slot j < R[r].

    Rows come sorted by R (descending) and P is +inf beyond R[r], so each row block compares only up to
    its first row's R. Works block by block (``b3.shape[0]`` rows) so the block's scores stay in cache
    across its slots. The booleans (``b3``, last axis a multiple of 2040 and kept False beyond ``width``)
    are counted 8 at a time: viewed as uint64 words, 255 words are summed per byte lane without overflow,
    then the lanes' bytes are summed.
    """
    rb, m_alloc, t = b3.shape
    words = b3.view(np.uint64).reshape(rb, m_alloc, t // _TILE_UNIT, _LANE_WORDS)
    for a in range(0, S.shape[0], rb):
        nb = min(rb, S.shape[0] - a)
        mb = int(R[a])
        if mb == 0:
            break
        Sb, Pb, bb = S[a:a + nb, :width], P[a:a + nb], b3[:nb]
        for j in range(mb):
            np.greater_equal(Sb, Pb[:, j:j + 1], out=bb[:, j, :width])
        lanes = np.add.reduce(words[:nb, :mb], axis=3)  # (nb, mb, groups) uint64, bytes <= 255
        counts[a:a + nb, :mb] += lanes.view(np.uint8).reshape(nb, mb, -1).sum(axis=2, dtype=np.uint16)


_KEEP_MARGIN = 8  # extra list entries kept beyond K; only makes the exact tie fallback rarer


def _blas_single_thread():
    """Context limiting numpy's BLAS to one thread (threadpoolctl), or None when that is not possible."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=1, user_api="blas")


def rank_numpy(Q: np.ndarray, G: np.ndarray, indptr: np.ndarray, indices: np.ndarray, K: int,
                config: EvalConfig) -> _Ranked:
    """CPU engine. With several threads, each runs whole query chunks on its own (single-threaded BLAS,
    FAISS heap and counting), pulling the next chunk when done: no barrier per tile. Without threadpoolctl
    (needed to keep BLAS single-threaded per worker) one worker runs with multi-threaded BLAS."""
    import threading

    import faiss
    from faiss import swig_ptr

    nq, ng = Q.shape[0], G.shape[0]
    R = np.diff(indptr)
    order = np.argsort(-R, kind="stable")  # most relevant items first: slot j covers a row prefix
    top_idx = np.full((nq, K), -1, dtype=np.int64)
    top_scores = np.full((nq, K), -np.inf, dtype=np.float32)
    pos_scores = np.zeros(len(indices), dtype=np.float32)
    pos_count = np.zeros(len(indices), dtype=np.int64)
    c = max(1, int(config.query_batch))
    units = max(1, min(31, round(int(config.gallery_tile) / _TILE_UNIT)))  # uint16 counts: t < 65536
    t = min(units, -(-ng // _TILE_UNIT)) * _TILE_UNIT
    rb = max(1, int(config.count_rows))
    kk = min(ng, K + _KEEP_MARGIN)
    G_T = G.T
    starts = list(range(0, nq, c))
    limiter = _blas_single_thread() if _num_threads(config.num_threads) > 1 else None
    workers = max(1, min(_num_threads(config.num_threads), len(starts))) if limiter is not None else 1
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts), desc="exact ranking", unit="chunk")
    lock = threading.Lock()
    next_chunk = iter(starts)

    def tiles(Qc: np.ndarray, PI: np.ndarray, P: np.ndarray, buf: np.ndarray):
        """The chunk's scores tile by tile; each row's relevant columns carry that row's P values."""
        n = Qc.shape[0]
        rr, jj = np.nonzero(PI >= 0)
        cols = PI[rr, jj]
        for t0 in range(0, ng, t):
            t1 = min(ng, t0 + t)
            w = t1 - t0
            S = buf.reshape(-1)[:n * w].reshape(n, w)  # C-contiguous for faiss
            np.matmul(Qc, G_T[:, t0:t1], out=S)
            sel = (cols >= t0) & (cols < t1)
            S[rr[sel], cols[sel] - t0] = P[rr[sel], jj[sel]]
            yield t0, w, S

    def run_chunk(s: int, buf: np.ndarray) -> None:
        rows = order[s:s + c]
        n = len(rows)
        Qc = np.ascontiguousarray(Q[rows])
        Rc = R[rows]
        m = int(Rc[0]) if n else 0
        PI = _padded_positives(indptr, indices, rows, m)  # (n, max(m,1)), -1 padded
        valid = PI >= 0
        # relevant items' scores: one dot product each; the tiles are overwritten with these values so
        # every (query, gallery) pair has exactly one score in the whole evaluation
        P = np.einsum("rd,rjd->rj", Qc, G[np.maximum(PI, 0)]).astype(np.float32)
        P[~valid] = np.inf  # +inf pads never count
        counts = np.zeros(PI.shape, dtype=np.int64)
        D = np.empty((n, kk), dtype=np.float32)
        I = np.empty((n, kk), dtype=np.int64)
        heap = faiss.float_minheap_array_t()
        heap.nh, heap.k = n, kk
        heap.val, heap.ids = swig_ptr(D), swig_ptr(I)
        heap.heapify()
        b3 = np.zeros((rb, max(m, 1), t), dtype=bool)
        for t0, w, S in tiles(Qc, PI, P, buf):
            heap.addn(w, swig_ptr(S), t0, 0, n)
            if m:
                if w != t:  # last, narrower tile: clear the padding the word counts read
                    b3[:, :, w:] = False
                _count_ge_rows(S, P, Rc, counts, b3, w)
        heap.reorder()
        flagged = _finish_lists(D, I, PI, K, ng, top_idx, top_scores, rows)
        if len(flagged):  # ties cut the kept list: replay the same tiles (same values) for those rows
            full = np.empty((len(flagged), ng), dtype=np.float32)
            for t0, w, S in tiles(Qc, PI, P, buf):
                full[:, t0:t0 + w] = S[flagged]
            _exact_heads(full, PI[flagged], K, top_idx, top_scores, rows[flagged])
        if m:  # scatter relevant scores / counts back to CSR positions
            rr, jj = np.nonzero(valid)
            pos = indptr[rows][rr] + jj
            pos_scores[pos] = P[rr, jj]
            pos_count[pos] = counts[rr, jj]

    def worker() -> None:
        if workers > 1:
            faiss.omp_set_num_threads(1)  # this thread's OpenMP regions (the heap) stay single-threaded
        buf = np.empty((min(c, nq), t), dtype=np.float32)
        while True:
            with lock:
                s = next(next_chunk, None)
            if s is None:
                return
            run_chunk(s, buf)
            if bar is not None:
                with lock:
                    bar.update(1)

    try:
        if workers == 1:
            worker()
        else:
            with ThreadPoolExecutor(workers) as pool:
                for f in [pool.submit(worker) for _ in range(workers)]:
                    f.result()
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
        if bar is not None:
            bar.close()
    return _Ranked(top_idx, top_scores, pos_scores, pos_count)


def _finish_lists(D: np.ndarray, I: np.ndarray, PI: np.ndarray, K: int, ng: int, top_idx: np.ndarray,
                  top_scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Sort each kept list by (score desc, irrelevant first, index asc) and store its first K entries.

    The kept list holds the kk highest scores, but which members of a tie class at its lowest score were
    kept is up to the heap. The first K are exact unless the K-th score equals that lowest kept score
    (and the gallery is larger than the list): those rows are returned (local indices) for the fallback.
    """
    is_pos = (I[:, :, None] == PI[:, None, :]).any(axis=2) & (I >= 0)
    missing = I < 0
    key_idx = np.where(missing, np.iinfo(np.int64).max, I)
    order = np.lexsort((key_idx, is_pos, -D.astype(np.float64)), axis=-1)
    Ds = np.take_along_axis(D, order, axis=1)
    Is = np.take_along_axis(I, order, axis=1)
    Ds = np.where(Is < 0, -np.inf, Ds)
    k = min(K, Ds.shape[1])
    top_idx[rows, :k] = Is[:, :k]
    top_scores[rows, :k] = Ds[:, :k]
    if Ds.shape[1] >= ng or k == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(Ds[:, k - 1] == Ds[:, -1])


def _exact_heads(full: np.ndarray, PI: np.ndarray, K: int, top_idx: np.ndarray, top_scores: np.ndarray,
                 rows: np.ndarray) -> None:
    """First K of the pessimistic order from complete score rows (the rare tie fallback)."""
    k = min(K, full.shape[1])
    for r in range(full.shape[0]):
        row = full[r]
        kth = np.partition(row, row.size - k)[row.size - k]  # the k-th largest score
        cand = np.flatnonzero(row >= kth)
        rel = np.isin(cand, PI[r][PI[r] >= 0])
        o = np.lexsort((cand, rel, -row[cand].astype(np.float64)))[:k]
        top_idx[rows[r], :k] = cand[o]
        top_scores[rows[r], :k] = row[cand[o]]


def rank_torch(Q: np.ndarray, G: np.ndarray, indptr: np.ndarray, indices: np.ndarray, K: int,
                config: EvalConfig, device: str) -> _Ranked:
    import torch

    nq, ng = Q.shape[0], G.shape[0]
    dev = torch.device(device)
    R = np.diff(indptr)
    order = np.argsort(-R, kind="stable")
    top_idx = np.full((nq, K), -1, dtype=np.int64)
    top_scores = np.full((nq, K), -np.inf, dtype=np.float32)
    pos_scores = np.zeros(len(indices), dtype=np.float32)
    pos_count = np.zeros(len(indices), dtype=np.int64)
    c = max(1, min(nq, int(config.block_mb) * 2**20 // (4 * max(ng, 1))))
    Gt = torch.from_numpy(G).to(dev)
    chunks = range(0, nq, c)
    if config.progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="exact ranking (torch)", unit="chunk", total=len(chunks))
    with torch.no_grad():
        for s in chunks:
            rows = order[s:s + c]
            Rc = R[rows]
            m = int(Rc[0]) if len(rows) else 0
            kk = min(ng, K + _KEEP_MARGIN)
            Qc = torch.from_numpy(np.ascontiguousarray(Q[rows])).to(dev)
            S = Qc @ Gt.T  # (n, ng) float32: the scores, one value per pair
            PI_np = _padded_positives(indptr, indices, rows, m)
            PI = torch.from_numpy(PI_np).to(dev)
            valid = PI >= 0
            P = torch.gather(S, 1, PI.clamp(min=0))
            P = torch.where(valid, P, torch.full_like(P, float("inf")))
            counts = torch.zeros(PI.shape, dtype=torch.int64, device=dev)
            for j in range(m):
                n_j = int((Rc > j).sum())
                counts[:n_j, j] = (S[:n_j] >= P[:n_j, j:j + 1]).sum(dim=1)
            vals, idx = torch.topk(S, kk, dim=1, largest=True, sorted=True)
            D, I = vals.cpu().numpy(), idx.cpu().numpy().astype(np.int64)
            flagged = _finish_lists(D, I, PI_np, K, ng, top_idx, top_scores, rows)
            if len(flagged):
                full = S[torch.from_numpy(flagged).to(dev)].cpu().numpy()
                _exact_heads(full, PI_np[flagged], K, top_idx, top_scores, rows[flagged])
            if m:
                rr, jj = np.nonzero(valid.cpu().numpy())
                pos = indptr[rows][rr] + jj
                pos_scores[pos] = P.cpu().numpy()[rr, jj]
                pos_count[pos] = counts.cpu().numpy()[rr, jj]
            del S
    return _Ranked(top_idx, top_scores, pos_scores, pos_count)


def relevant_ranks(indptr: np.ndarray, indices: np.ndarray, scores: np.ndarray,
                    count_ge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pessimistic ranks of every relevant item, sorted ascending within each query.

    Returns ``(ranks, order)``: ``ranks`` in CSR layout (same indptr), ``order`` maps each rank position to
    its entry of ``indices``. rank = count_ge(score) - #{relevant items tied with it at a higher index}.
    """
    nq = len(indptr) - 1
    qid = np.repeat(np.arange(nq, dtype=np.int64), np.diff(indptr))
    order = np.lexsort((indices, -scores.astype(np.float64), qid))
    q_s, sc_s = qid[order], scores[order]
    n = len(order)
    if n == 0:
        return np.zeros(0, np.int64), order
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (q_s[1:] != q_s[:-1]) | (sc_s[1:] != sc_s[:-1])
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_len = np.diff(np.append(run_start, n))
    pos_in_run = np.arange(n) - run_start[run_id]
    tied_after = run_len[run_id] - 1 - pos_in_run
    ranks = count_ge[order] - tied_after
    return ranks.astype(np.int64), order

