"""capret_utils.evaluation.retrieval: FAISS exact/ANN search, input checks, tie order, re-ranking, GPU fallback."""

from __future__ import annotations

import numpy as np
import pytest

from capret_utils.evaluation import retrieval as R


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def naive_topk(Q, G, k):
    """Reference: full score matrix, sort by (score desc, index asc)."""
    S = Q @ G.T
    idx = np.array([sorted(range(len(G)), key=lambda g: (-float(S[q, g]), g))[:k] for q in range(len(Q))])
    return idx, np.take_along_axis(S, idx, 1)


# ------------------------------------------------------------------------------------------------ inputs
def test_prepare_embeddings_checks_and_normalises():
    rng = np.random.default_rng(0)
    x = unit(rng, 5, 4)
    np.testing.assert_array_equal(R.prepare_embeddings(x), x)
    np.testing.assert_allclose(R.prepare_embeddings(3 * x.astype(np.float64)), x, atol=1e-6)
    assert R.prepare_embeddings(3 * x).dtype == np.float32
    with pytest.raises(ValueError, match=r"q: expected a 2-D array"):
        R.prepare_embeddings(x[0], "q")
    with pytest.raises(ValueError, match=r"g: dimension 4 does not match the other side's 8"):
        R.prepare_embeddings(x, "g", dim=8)
    bad = x.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match=r"1 row\(s\) hold NaN or inf values \(first: row 3\)"):
        R.prepare_embeddings(bad)
    zero = x.copy()
    zero[2] = 0
    with pytest.raises(ValueError, match=r"all zeros.*first: row 2"):
        R.prepare_embeddings(zero)
    with pytest.raises(ValueError, match=r"not L2-normalised.*first: row 0"):
        R.prepare_embeddings(2 * x, normalize="error")
    assert R.prepare_embeddings(x * (1 + 5e-4), normalize="error").shape == (5, 4)  # within tol
    with pytest.raises(ValueError, match="normalize must be"):
        R.prepare_embeddings(x, normalize="maybe")


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    Q, G = unit(rng, 4, 8), unit(rng, 30, 8)
    a = R.exact_search(torch.from_numpy(Q), torch.from_numpy(G).double(), 5)
    b = R.exact_search(Q, G, 5)
    np.testing.assert_array_equal(a.indices, b.indices)


# ------------------------------------------------------------------------------------------------ exact
@pytest.mark.parametrize("batch", [3, 1000])
def test_flat_search_matches_naive(batch):
    rng = np.random.default_rng(2)
    Q, G = unit(rng, 25, 16), unit(rng, 300, 16)
    res = R.exact_search(Q, G, 10, R.IndexConfig(query_batch=batch))
    idx, sc = naive_topk(Q, G, 10)
    np.testing.assert_array_equal(res.indices, idx)
    np.testing.assert_allclose(res.scores, sc, atol=1e-6)
    assert res.indices.dtype == np.int64 and res.scores.dtype == np.float32


def test_ties_are_ordered_by_gallery_index():
    # 12 identical gallery rows and 3 better ones: ties must come out by ascending index, lowest kept
    G = np.tile(np.array([[0.6, 0.8]], np.float32), (15, 1))
    G[[4, 9, 13]] = [1.0, 0.0]
    Q = np.array([[1.0, 0.0]] * 30, np.float32)  # >= 20 queries: FAISS takes its BLAS path
    res = R.exact_search(Q, G, 7)
    assert res.indices[0].tolist() == [4, 9, 13, 0, 1, 2, 3]
    assert (res.indices == res.indices[0]).all()
    one = R.exact_search(Q[:1], G, 7)  # the single-query (non-BLAS) path too
    assert one.indices[0].tolist() == [4, 9, 13, 0, 1, 2, 3]


def test_k_is_clamped_to_gallery_size_and_validated():
    rng = np.random.default_rng(3)
    res = R.exact_search(unit(rng, 2, 4), unit(rng, 3, 4), 10)
    assert res.indices.shape == (2, 3) and sorted(res.indices[0]) == [0, 1, 2]
    index = R.build_index(unit(rng, 3, 4))
    with pytest.raises(ValueError, match="k must be >= 1"):
        R.search(index, unit(rng, 2, 4), 0)
    with pytest.raises(ValueError, match="query_emb: dimension 5 does not match the other side's 4"):
        R.search(index, unit(rng, 2, 5), 1)
    with pytest.raises(ValueError, match="kind must be one of"):
        R.build_index(unit(rng, 3, 4), R.IndexConfig(kind="lsh"))


# ------------------------------------------------------------------------------------------------ rerank
def test_rerank_hook_rescores_and_resorts():
    rng = np.random.default_rng(4)
    Q, G = unit(rng, 9, 8), unit(rng, 50, 8)
    seen = []

    def by_index(qrows, cand):  # prefers low gallery indices; records what it was given
        seen.append((qrows.copy(), cand.copy()))
        return -cand.astype(float)

    index = R.build_index(G, R.IndexConfig(query_batch=4))
    res = R.search(index, Q, 3, rerank=by_index, rerank_k=8)
    first = R.search(index, Q, 8)
    assert [q.tolist() for q, _ in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    np.testing.assert_array_equal(np.vstack([c for _, c in seen]), first.indices)
    np.testing.assert_array_equal(res.indices, np.sort(first.indices, axis=1)[:, :3])
    np.testing.assert_array_equal(res.scores, -res.indices.astype(np.float32))


def test_rerank_ties_keep_first_stage_order_and_bad_output_raises():
    rng = np.random.default_rng(5)
    Q, G = unit(rng, 3, 8), unit(rng, 20, 8)
    index = R.build_index(G)
    base = R.search(index, Q, 5)
    same = R.search(index, Q, 5, rerank=lambda q, c: np.zeros(c.shape))
    np.testing.assert_array_equal(same.indices, base.indices)
    with pytest.raises(ValueError, match="rerank returned scores of shape"):
        R.search(index, Q, 5, rerank=lambda q, c: np.zeros((len(q), 2)))
    with pytest.raises(ValueError, match="NaN or inf"):
        R.search(index, Q, 5, rerank=lambda q, c: np.full(c.shape, np.nan))


# ------------------------------------------------------------------------------------------------ ANN
def _clustered(rng, n, d, centers):
    """Unit vectors around random centres (a gallery with structure, like real embeddings)."""
    c = unit(rng, centers, d)
    x = c[rng.integers(0, centers, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("config, bound", [
    (R.IndexConfig(kind="ivf", nlist=64, nprobe=8), 0.90),
    (R.IndexConfig(kind="ivf", nprobe=64), 0.999),  # auto nlist, every list probed: exact
    (R.IndexConfig(kind="hnsw", M=16, ef_search=64), 0.95),
])
def test_ann_recall_against_exact(config, bound):
    rng = np.random.default_rng(6)
    G = _clustered(rng, 6000, 32, 40)
    Q = _clustered(np.random.default_rng(7), 300, 32, 40)
    exact = R.exact_search(Q, G, 10)
    approx = R.exact_search(Q, G, 10, config)
    recall = R.recall_at_k(approx, exact, 10)
    assert recall >= bound, f"{config.kind} recall@10 = {recall:.3f} < {bound}"
    assert approx.indices.shape == (300, 10)


def test_ivf_small_nprobe_may_return_empty_slots_as_minus_one():
    rng = np.random.default_rng(8)
    G = _clustered(rng, 400, 16, 8)
    res = R.exact_search(unit(rng, 20, 16), G, 100, R.IndexConfig(kind="ivf", nlist=10, nprobe=1))
    empty = res.indices < 0
    assert empty.any()
    assert np.isneginf(res.scores[empty]).all()
    # empty slots sit at the end of each row
    assert all((row[row < 0].size == 0) or (row[-1] < 0) for row in res.indices)


def test_recall_at_k_hand_case():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    approx = np.array([[3, 9, 1], [-1, -1, 4]])
    assert R.recall_at_k(approx, exact, 3) == pytest.approx(3 / 6)


# ------------------------------------------------------------------------------------------------ GPU
def test_gpu_requests_without_a_gpu():
    rng = np.random.default_rng(9)
    G = unit(rng, 50, 8)
    if R.gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="FAISS sees no GPU"):
        R.build_index(G, R.IndexConfig(use_gpu=True))
    auto = R.build_index(G, R.IndexConfig(use_gpu="auto"))  # CPU fallback
    assert not auto.on_gpu
    with pytest.raises(ValueError, match="use_gpu must be"):
        R.build_index(G, R.IndexConfig(use_gpu="yes"))


@pytest.mark.gpu
def test_gpu_flat_and_ivf_match_cpu():
    if not R.gpu_available():
        pytest.skip("faiss-gpu with a visible GPU is needed")
    rng = np.random.default_rng(10)
    G, Q = unit(rng, 5000, 64), unit(rng, 200, 64)
    cpu = R.exact_search(Q, G, 10, R.IndexConfig(use_gpu=False))
    gpu = R.exact_search(Q, G, 10, R.IndexConfig(use_gpu=True))
    assert R.build_index(G, R.IndexConfig(use_gpu=True)).on_gpu
    np.testing.assert_array_equal(gpu.indices, cpu.indices)
    np.testing.assert_allclose(gpu.scores, cpu.scores, atol=1e-4)
    ivf = R.exact_search(Q, G, 10, R.IndexConfig(kind="ivf", nprobe=32, use_gpu=True))
    assert R.recall_at_k(ivf, cpu, 10) > 0.5
    with pytest.raises(ValueError, match="no GPU HNSW"):
        R.build_index(G, R.IndexConfig(kind="hnsw", use_gpu=True))
