"""capret_utils.evaluation.metrics against a naive loop reference, hand-worked cases, PML and torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from capret_utils.evaluation import metrics as M
from capret_utils.evaluation import ranking
from capret_utils.evaluation.retrieval import exact_search

KS = (1, 5, 10, 15, 20)
# exact-arithmetic data (below) is used as is: norm_tol=inf switches normalisation off
ENGINES = [
    pytest.param(M.EvalConfig(engine="numpy", query_batch=7, count_rows=3, num_threads=2, norm_tol=np.inf,
                              progress=False), id="numpy-small-chunks-2threads"),
    pytest.param(M.EvalConfig(engine="numpy", query_batch=1000, num_threads=1, norm_tol=np.inf,
                              progress=False), id="numpy-one-chunk"),
    pytest.param(M.EvalConfig(engine="torch", device="cpu", block_mb=1, norm_tol=np.inf, progress=False),
                 id="torch-cpu"),
]


# ------------------------------------------------------------------------------------------------ reference
def _relevant(ql, gl, q, g) -> bool:
    """Naive relevance: single labels (ints) or label lists; negative = no identity."""
    a = [ql[q]] if np.isscalar(ql[q]) else list(ql[q])
    b = [gl[g]] if np.isscalar(gl[g]) else list(gl[g])
    return any(x >= 0 and x in b for x in a)


def naive_eval(Q, G, ql, gl, ks=KS):
    """Loops over queries; full sort with the documented pessimistic tie rule."""
    S = Q.astype(np.float32) @ G.astype(np.float32).T
    out = {"ap": [], "first": [], "lists": [], "R": []}
    for q in range(len(Q)):
        rel = [_relevant(ql, gl, q, g) for g in range(len(G))]
        order = sorted(range(len(G)), key=lambda g: (-float(S[q, g]), rel[g], g))
        out["lists"].append(order)
        ranks = [i + 1 for i, g in enumerate(order) if rel[g]]
        out["R"].append(len(ranks))
        if not ranks:
            out["ap"].append(float("nan"))
            out["first"].append(None)
            continue
        out["ap"].append(sum((i + 1) / r for i, r in enumerate(ranks)) / len(ranks))
        out["first"].append(ranks[0])
    ev = [f is not None for f in out["first"]]
    metrics = {f"top{k}": float(np.mean([f <= k for f in out["first"] if f is not None])) for k in ks}
    metrics["mAP"] = float(np.nanmean(out["ap"]))
    metrics["n_no_positive"] = int(len(ev) - sum(ev))
    return metrics, out


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def int_embeddings(rng, n, d=16, lim=1000):
    """Integer-valued rows: every dot product is an integer below 2**24, so exact in float32 whatever the
    summation order (the engines and the naive reference then see identical scores; ties are rare)."""
    return rng.integers(-lim, lim + 1, (n, d)).astype(np.float32)


def tie_embeddings(rng, n, d=6):
    """Rows with four entries of +-1/2: unit norm and every dot product exact in float32 (many exact ties)."""
    x = np.zeros((n, d), np.float32)
    for i in range(n):
        cols = rng.choice(d, 4, replace=False)
        x[i, cols] = rng.choice([-0.5, 0.5], 4)
    return x


def assert_matches(res, ref_metrics, ref, ks=KS, check_lists=True):
    for k in ks:
        assert res.metrics[f"top{k}"] == pytest.approx(ref_metrics[f"top{k}"], abs=1e-12), k
    assert res.metrics["mAP"] == pytest.approx(ref_metrics["mAP"], abs=1e-12)
    assert res.metrics["n_no_positive"] == ref_metrics["n_no_positive"]
    pq = res.per_query
    np.testing.assert_allclose(pq["ap"].to_numpy(float), np.array(ref["ap"]), atol=1e-12)
    firsts = [None if pd.isna(v) else int(v) for v in pq["first_hit_rank"]]
    assert firsts == ref["first"]
    assert pq["n_relevant"].tolist() == ref["R"]
    if check_lists:
        L = res.indices.shape[1]
        assert res.indices.tolist() == [lst[:L] for lst in ref["lists"]]


# ------------------------------------------------------------------------------------------------ hand cases
def _gallery_with_cosines(cos):
    """Query [1, 0] and gallery rows with the given cosines to it."""
    cos = np.asarray(cos, np.float64)
    G = np.stack([cos, np.sqrt(1 - cos**2)], axis=1).astype(np.float32)
    return np.array([[1.0, 0.0]], np.float32), G


def test_torchmetrics_doc_example_ap():
    Q, G = _gallery_with_cosines([0.2, 0.3, 0.5])
    res = M.evaluate(Q, G, [7], [7, 1, 7], ks=(1, 2, 3), config=M.EvalConfig(progress=False))
    # ranking: 0.5 (rel), 0.3, 0.2 (rel) -> AP = (1/1 + 2/3) / 2
    assert res.metrics["mAP"] == pytest.approx(5 / 6)
    assert res.metrics["top1"] == 1.0
    assert res.indices.tolist() == [[2, 1, 0]]
    assert res.relevant_ranks[0].tolist() == [1, 3]


def test_query_without_relevant_items_is_excluded_and_counted():
    Q, G = _gallery_with_cosines([0.9, 0.1, 0.5])
    Q = np.vstack([Q, Q])
    res = M.evaluate(Q, G, [3, 99], [3, -1, -1], ks=(1, 2), config=M.EvalConfig(progress=False))
    assert res.metrics["n_queries"] == 2
    assert res.metrics["n_evaluated"] == 1
    assert res.metrics["n_no_positive"] == 1
    assert res.metrics["top1"] == 1.0 and res.metrics["mAP"] == 1.0
    row = res.per_query.iloc[1]
    assert row["n_relevant"] == 0 and math.isnan(row["ap"])
    assert pd.isna(row["first_hit_rank"]) and pd.isna(row["hit@1"])
    assert res.per_query["hit@1"].mean() == 1.0  # nullable booleans: the excluded query is skipped


def test_all_queries_without_relevant_items_give_nan():
    Q, G = _gallery_with_cosines([0.9, 0.1])
    res = M.evaluate(Q, G, [5], [1, 2], ks=(1,), config=M.EvalConfig(progress=False))
    assert math.isnan(res.metrics["mAP"]) and math.isnan(res.metrics["top1"])
    assert res.metrics["n_no_positive"] == 1


def test_more_relevant_items_than_k():
    # 8 gallery items, cosines descending with index; relevant: 1, 2, 4, 7 (R = 4 > k = 2)
    Q, G = _gallery_with_cosines(np.linspace(0.9, 0.2, 8))
    labels = [-1] * 8
    for g in (1, 2, 4, 7):
        labels[g] = 0
    res = M.evaluate(Q, G, [0], labels, ks=(1, 2, 3), config=M.EvalConfig(progress=False))
    assert res.metrics["top1"] == 0.0 and res.metrics["top2"] == 1.0 and res.metrics["top3"] == 1.0
    assert res.metrics["mAP"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5 + 4 / 8) / 4)
    assert res.per_query.loc[0, "first_hit_rank"] == 2


def test_ties_are_broken_pessimistically():
    # five identical gallery rows: every score ties; relevant items 1 and 3 rank after the three others
    G = np.tile(np.array([[0.6, 0.8]], np.float32), (5, 1))
    Q = np.array([[1.0, 0.0]], np.float32)
    res = M.evaluate(Q, G, [4], [-1, 4, -1, 4, -1], ks=(1, 3, 4, 5), list_length=5,
                     config=M.EvalConfig(progress=False))
    assert res.relevant_ranks[0].tolist() == [4, 5]
    assert res.metrics["mAP"] == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert res.metrics["top3"] == 0.0 and res.metrics["top4"] == 1.0
    assert res.indices.tolist() == [[0, 2, 4, 1, 3]]  # irrelevant first, then by gallery index
    assert res.per_query.loc[0, "top_relevant"].tolist() == [False, False, False, True, True]


def test_collapsed_embeddings_score_worst_not_best():
    rng = np.random.default_rng(0)
    G = np.ones((50, 4), np.float32) / 2
    Q = np.ones((10, 4), np.float32) / 2
    gl = rng.integers(0, 5, 50)
    ql = rng.integers(0, 5, 10)
    res = M.evaluate(Q, G, ql, gl, ks=(1,), config=M.EvalConfig(progress=False))
    ref, _ = naive_eval(Q, G, ql, gl, ks=(1,))
    assert res.metrics["top1"] == 0.0 == ref["top1"]
    assert res.metrics["mAP"] == pytest.approx(ref["mAP"])


# ------------------------------------------------------------------------------------------------ vs naive
@pytest.mark.parametrize("config", ENGINES)
@pytest.mark.parametrize("seed", [0, 1])
def test_random_data_matches_naive(config, seed):
    rng = np.random.default_rng(seed)
    nq, ng = 53, 301
    Q, G = int_embeddings(rng, nq), int_embeddings(rng, ng)
    ql = rng.integers(-1, 25, nq)
    gl = rng.integers(-1, 25, ng)
    ref_m, ref = naive_eval(Q, G, ql, gl)
    res = M.evaluate(Q, G, ql, gl, ks=KS, config=config)
    assert_matches(res, ref_m, ref)


@pytest.mark.parametrize("config", ENGINES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_ties_match_naive(config, seed):
    rng = np.random.default_rng(100 + seed)
    nq, ng = 40, 203
    Q, G = tie_embeddings(rng, nq), tie_embeddings(rng, ng)
    ql = rng.integers(-1, 12, nq)
    gl = rng.integers(-1, 12, ng)
    ref_m, ref = naive_eval(Q, G, ql, gl)
    res = M.evaluate(Q, G, ql, gl, ks=KS, config=config)
    assert_matches(res, ref_m, ref)


@pytest.mark.parametrize("ties", [False, True])
def test_several_gallery_tiles_match_naive(ties):
    """Galleries wider than one score tile (2040 columns here), a partial last tile, several chunks."""
    rng = np.random.default_rng(200 + ties)
    nq, ng = 23, 4500
    Q, G = (tie_embeddings(rng, nq), tie_embeddings(rng, ng)) if ties else \
        (int_embeddings(rng, nq), int_embeddings(rng, ng))
    ql = rng.integers(-1, 40, nq)
    gl = rng.integers(-1, 40, ng)
    ref_m, ref = naive_eval(Q, G, ql, gl)
    for cfg in (M.EvalConfig(engine="numpy", query_batch=5, gallery_tile=2040, count_rows=2, num_threads=2,
                             norm_tol=np.inf, progress=False),
                M.EvalConfig(engine="torch", device="cpu", block_mb=1, norm_tol=np.inf, progress=False)):
        assert_matches(M.evaluate(Q, G, ql, gl, ks=KS, config=cfg), ref_m, ref)


@pytest.mark.parametrize("config", ENGINES)
def test_multilabel_image_level_matches_naive(config):
    rng = np.random.default_rng(7)
    nq, ng = 37, 150
    Q, G = int_embeddings(rng, nq), int_embeddings(rng, ng)
    ql = [sorted(set(rng.integers(0, 30, rng.integers(1, 4)).tolist())) for _ in range(nq)]
    gl = [sorted(set(rng.integers(0, 30, rng.integers(0, 3)).tolist())) for _ in range(ng)]
    ref_m, ref = naive_eval(Q, G, ql, gl)
    res = M.evaluate(Q, G, ql, gl, ks=KS, config=config)
    assert_matches(res, ref_m, ref)


def test_top_lists_agree_with_faiss_flat_index():
    rng = np.random.default_rng(3)
    Q, G = unit(rng, 120, 32), unit(rng, 2000, 32)
    ql, gl = rng.integers(0, 50, 120), rng.integers(0, 50, 2000)
    res = M.evaluate(Q, G, ql, gl, ks=KS, config=M.EvalConfig(progress=False, query_batch=50,
                                                                 gallery_tile=256))
    ref = exact_search(Q, G, 20)
    # tie-free random data: the pessimistic order and FAISS's order coincide
    np.testing.assert_array_equal(res.indices, ref.indices)
    np.testing.assert_allclose(res.scores, ref.scores, atol=1e-6)


def test_scores_and_relevance_of_top_lists():
    rng = np.random.default_rng(4)
    Q, G = unit(rng, 20, 8), unit(rng, 90, 8)
    ql, gl = rng.integers(0, 6, 20), rng.integers(0, 6, 90)
    res = M.evaluate(Q, G, ql, gl, ks=(1, 5), list_length=7, config=M.EvalConfig(progress=False))
    S = Q @ G.T
    assert res.indices.shape == (20, 7)
    np.testing.assert_allclose(res.scores, np.take_along_axis(S, res.indices, 1), atol=1e-6)
    rel = np.stack(res.per_query["top_relevant"].to_numpy())
    np.testing.assert_array_equal(rel, gl[res.indices] == ql[:, None])


# ------------------------------------------------------------------------------------------------ libraries
def _dataset(seed, nq=40, ng=120, d=12, n_classes=12):
    rng = np.random.default_rng(seed)
    Q, G = unit(rng, nq, d), unit(rng, ng, d)
    ql = rng.integers(0, n_classes + 3, nq)  # some labels absent from the gallery: lone queries
    gl = rng.integers(0, n_classes, ng)
    return Q, G, ql, gl


def test_against_pytorch_metric_learning():
    torch = pytest.importorskip("torch")
    pml_acc = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    Q, G, ql, gl = _dataset(11)
    calc = pml_acc.AccuracyCalculator(include=("mean_average_precision", "precision_at_1"), k=None,
                                      knn_func=CustomKNN(CosineSimilarity()), device=torch.device("cpu"))
    got = calc.get_accuracy(torch.from_numpy(Q), torch.from_numpy(ql), torch.from_numpy(G),
                            torch.from_numpy(gl), ref_includes_query=False)
    res = M.evaluate(Q, G, ql, gl, ks=(1,), config=M.EvalConfig(progress=False))
    assert res.metrics["n_no_positive"] > 0  # lone queries exist and are excluded by both
    assert res.metrics["mAP"] == pytest.approx(got["mean_average_precision"], abs=1e-6)
    assert res.metrics["top1"] == pytest.approx(got["precision_at_1"], abs=1e-6)


def test_against_torchmetrics():
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.retrieval")
    Q, G, ql, gl = _dataset(12)
    S = torch.from_numpy(Q @ G.T)
    preds = ((S + 1) / 2 + 1e-6).flatten()  # torchmetrics >= 1.8 treats scores <= 0 as irrelevant
    target = torch.from_numpy(ql[:, None] == gl[None, :]).flatten()
    indexes = torch.arange(len(Q)).repeat_interleave(len(G))
    res = M.evaluate(Q, G, ql, gl, ks=KS, config=M.EvalConfig(progress=False))
    mAP = tm.RetrievalMAP(empty_target_action="skip")(preds, target, indexes=indexes)
    assert res.metrics["mAP"] == pytest.approx(float(mAP), abs=1e-6)
    for k in (1, 5, 10):
        hr = tm.RetrievalHitRate(top_k=k, empty_target_action="skip")(preds, target, indexes=indexes)
        assert res.metrics[f"top{k}"] == pytest.approx(float(hr), abs=1e-6)


# ------------------------------------------------------------------------------------------------ rankings
def test_evaluate_ranking_truncated_and_full():
    rng = np.random.default_rng(5)
    Q, G = unit(rng, 30, 8), unit(rng, 60, 8)
    ql, gl = rng.integers(0, 8, 30), rng.integers(-1, 8, 60)
    full = M.evaluate(Q, G, ql, gl, ks=(1, 5, 10), config=M.EvalConfig(progress=False))
    whole = exact_search(Q, G, 60)
    r_all = M.evaluate_ranking(whole.indices, ql, gl, scores=whole.scores, ks=(1, 5, 10))
    assert r_all.metrics["mAP"] == pytest.approx(full.metrics["mAP"], abs=1e-12)
    assert "map_at" not in r_all.metrics
    top5 = M.evaluate_ranking(whole.indices[:, :5], ql, gl, n_gallery=60, ks=(1, 5, 10))
    assert top5.metrics["map_at"] == 5
    assert top5.metrics["top1"] == full.metrics["top1"] and top5.metrics["top5"] == full.metrics["top5"]
    assert top5.metrics["top10"] == top5.metrics["top5"]  # k beyond the list length = top-L
    assert top5.metrics["mAP"] <= full.metrics["mAP"]
    # hand check of the truncated AP for query 0
    rel = (gl == ql[0])
    ranks = [i + 1 for i, g in enumerate(whole.indices[0, :5]) if rel[g]]
    ap = sum((i + 1) / r for i, r in enumerate(ranks)) / rel.sum() if rel.sum() else float("nan")
    assert top5.per_query.loc[0, "ap"] == pytest.approx(ap, nan_ok=True)


def test_evaluate_ranking_handles_empty_slots_and_duplicates():
    res = M.evaluate_ranking(np.array([[3, -1, 3, 1]]), [2], [-1, 2, -1, 2], n_gallery=4, ks=(1, 2, 4))
    # item 3 at rank 1, item 1 at rank 4 (first occurrences only)
    assert res.relevant_ranks[0].tolist() == [1, 4]
    assert res.metrics["mAP"] == pytest.approx((1 + 2 / 4) / 2)
    with pytest.raises(ValueError, match="indices must lie"):
        M.evaluate_ranking(np.array([[5]]), [0], [0, 0], n_gallery=2)


def test_rerank_hook_reorders_head_and_keeps_full_ranking():
    rng = np.random.default_rng(6)
    Q, G = unit(rng, 25, 8), unit(rng, 80, 8)
    ql, gl = rng.integers(0, 5, 25), rng.integers(0, 5, 80)
    calls = []

    def reverse(qrows, cand):  # re-scores by reversing the first-stage order
        calls.append((qrows.copy(), cand.copy()))
        return np.tile(np.arange(cand.shape[1], dtype=float), (len(qrows), 1))

    res = M.evaluate(Q, G, ql, gl, ks=(1, 5), list_length=5, rerank=reverse, rerank_k=10,
                     config=M.EvalConfig(progress=False, query_batch=8))
    assert sum(len(c[0]) for c in calls) == 25 and all(c[1].shape[1] == 10 for c in calls)
    # naive: ranking = reversed first 10, then the rest
    _, ref = naive_eval(Q, G, ql, gl)
    aps, firsts = [], []
    for q in range(25):
        order = ref["lists"][q][:10][::-1] + ref["lists"][q][10:]
        ranks = [i + 1 for i, g in enumerate(order) if gl[g] == ql[q]]
        aps.append(sum((i + 1) / r for i, r in enumerate(ranks)) / len(ranks) if ranks else np.nan)
        firsts.append(ranks[0] if ranks else None)
        assert res.indices[q].tolist() == order[:5]
    assert res.metrics["mAP"] == pytest.approx(np.nanmean(aps), abs=1e-12)
    assert res.metrics["rerank_k"] == 10
    identity = M.evaluate(Q, G, ql, gl, ks=(1, 5), rerank=lambda q, c: np.zeros(c.shape), rerank_k=10,
                          config=M.EvalConfig(progress=False))
    plain = M.evaluate(Q, G, ql, gl, ks=(1, 5), config=M.EvalConfig(progress=False))
    assert identity.metrics["mAP"] == pytest.approx(plain.metrics["mAP"], abs=1e-12)


# ------------------------------------------------------------------------------------------------ validation
def test_input_validation_messages():
    Q, G = unit(np.random.default_rng(0), 3, 4), unit(np.random.default_rng(1), 5, 4)
    cfg = M.EvalConfig(progress=False)
    with pytest.raises(ValueError, match="query_labels: 2 labels for 3"):
        M.evaluate(Q, G, [0, 1], [0] * 5, config=cfg)
    with pytest.raises(ValueError, match="gallery_emb: dimension 3 does not match"):
        M.evaluate(Q, G[:, :3], [0] * 3, [0] * 5, config=cfg)
    with pytest.raises(ValueError, match="labels must be integers"):
        M.evaluate(Q, G, np.array([0.5, 1, 2]), [0] * 5, config=cfg)
    bad = Q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="query_emb: 1 row"):
        M.evaluate(bad, G, [0] * 3, [0] * 5, config=cfg)
    with pytest.raises(ValueError, match="not L2-normalised"):
        M.evaluate(Q * 2, G, [0] * 3, [0] * 5, config=M.EvalConfig(progress=False, normalize="error"))
    scaled = M.evaluate(Q * 2, G, [0] * 3, [0] * 5, config=cfg)  # default: normalised
    assert scaled.metrics["mAP"] == pytest.approx(M.evaluate(Q, G, [0] * 3, [0] * 5, config=cfg).metrics["mAP"])
    with pytest.raises(ValueError, match="ks must be positive"):
        M.evaluate(Q, G, [0] * 3, [0] * 5, ks=(0,), config=cfg)
    with pytest.raises(ValueError, match="numpy engine runs on the CPU"):
        M.evaluate(Q, G, [0] * 3, [0] * 5, config=M.EvalConfig(engine="numpy", device="cuda"))


# ------------------------------------------------------------------------------------------------ items table
def _items_table() -> pd.DataFrame:
    """A hand-made items table: 3 user images, 3 shop images (preamble columns)."""
    rows = [
        # split, image_id, source, pair_id, item, category_id, style
        ("validation", 1, "user", 10, "item1", 1, 1),
        ("validation", 1, "user", 10, "item2", 8, 0),   # style 0: never a query
        ("validation", 2, "user", 11, "item1", 9, 2),
        ("validation", 2, "user", 11, "item2", 1, 1),
        ("validation", 3, "user", 12, "item1", 7, 0),   # user image with style 0 only: no image query
        ("validation", 4, "shop", 10, "item1", 1, 1),
        ("validation", 4, "shop", 10, "item2", 8, 0),   # style 0 gallery item: never relevant
        ("validation", 5, "shop", 11, "item1", 9, 2),
        ("validation", 6, "shop", 11, "item1", 1, 1),
        ("validation", 6, "shop", 11, "item2", 9, 2),
    ]
    df = pd.DataFrame(rows, columns=["split", "image_id", "source", "pair_id", "item", "category_id", "style"])
    df.insert(0, "key", [f"{s}/{i:06d}/{it}" for s, i, it in zip(df.split, df.image_id, df["item"])])
    df["path"] = [f"/data/validation/image/{i:06d}.jpg" for i in df.image_id]
    df["width"], df["height"] = 200, 300
    df["category_name"] = "x"
    df[["x1", "y1", "x2", "y2"]] = [10.0, 20.0, 110.0, 220.0]
    df["scale"], df["occlusion"], df["zoom_in"], df["viewpoint"] = 2, 1, 1, 2
    df["landmarks"] = [[] for _ in range(len(df))]
    df["segmentation"] = [[] for _ in range(len(df))]
    return df


def test_item_sets_and_labels():
    items = _items_table()
    queries, gallery = M.item_sets(items)
    assert queries["key"].tolist() == ["validation/000001/item1", "validation/000002/item1",
                                       "validation/000002/item2"]
    assert len(gallery) == 5 and (gallery["source"] == "shop").all()
    ql, gl = M.item_labels(queries, gallery)
    assert gl[1] == -1  # style-0 shop item
    assert ql[0] == gl[0]  # (10, 1)
    assert ql[1] == gl[2] == gl[4]  # (11, 2)
    assert ql[2] == gl[3]  # (11, 1)
    assert len({ql[0], ql[1], ql[2]}) == 3


def test_evaluate_items_and_images_against_naive():
    items = _items_table()
    rng = np.random.default_rng(9)
    queries, gallery = M.item_sets(items)
    Qe, Ge = unit(rng, len(queries), 6), unit(rng, len(gallery), 6)
    res = M.evaluate_items(Qe, Ge, queries, gallery, ks=(1, 2, 3), config=M.EvalConfig(progress=False))
    ql, gl = M.item_labels(queries, gallery)
    ref_m, ref = naive_eval(Qe, Ge, ql, gl, ks=(1, 2, 3))
    assert_matches(res, ref_m, ref, ks=(1, 2, 3))
    assert res.per_query["query_key"].tolist() == queries["key"].tolist()
    assert res.per_query.loc[0, "top_keys"][0] in set(gallery["key"])
    table = M.attach_columns(res.per_query, queries)
    assert {"occlusion", "category_name"} <= set(table.columns)

    qi, gi = M.image_sets(items)
    assert qi["key"].tolist() == ["validation/000001", "validation/000002"]
    assert gi["key"].tolist() == ["validation/000004", "validation/000005", "validation/000006"]
    assert qi.loc[1, "identities"] == [(11, 1), (11, 2)]
    assert gi.loc[0, "identities"] == [(10, 1)]
    Qi, Gi = unit(rng, len(qi), 6), unit(rng, len(gi), 6)
    res_i = M.evaluate_images(Qi, Gi, qi, gi, ks=(1, 2, 3), config=M.EvalConfig(progress=False))
    qli, gli = M.image_labels(qi, gi)
    ref_m, ref = naive_eval(Qi, Gi, qli, gli, ks=(1, 2, 3))
    assert_matches(res_i, ref_m, ref, ks=(1, 2, 3))
    assert res_i.per_query["n_relevant"].tolist() == [1, 2]  # image 1 -> shop 4; image 2 -> shops 5, 6


def test_relevance_csr_multi_label_dedups():
    indptr, idx = M.relevance_csr([[1, 2], [], [5]], [[2, 1], [1], [-1], [3, 5]])
    assert indptr.tolist() == [0, 2, 2, 3]
    assert idx.tolist() == [0, 1, 3]


def test_numpy_engine_without_threadpoolctl_runs_one_worker(monkeypatch):
    rng = np.random.default_rng(21)
    Q, G = int_embeddings(rng, 30), int_embeddings(rng, 200)
    ql, gl = rng.integers(-1, 10, 30), rng.integers(-1, 10, 200)
    monkeypatch.setattr(ranking, "_blas_single_thread", lambda: None)  # the engine lives in evaluation.ranking
    cfg = M.EvalConfig(engine="numpy", query_batch=4, num_threads=2, norm_tol=np.inf, progress=True)
    ref_m, ref = naive_eval(Q, G, ql, gl)
    assert_matches(M.evaluate(Q, G, ql, gl, config=cfg), ref_m, ref)


@pytest.mark.gpu
def test_torch_engine_on_cuda_matches_numpy_engine():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(22)
    for Q, G in ((int_embeddings(rng, 60), int_embeddings(rng, 3000)),
                 (tie_embeddings(rng, 60), tie_embeddings(rng, 3000))):
        ql, gl = rng.integers(-1, 30, 60), rng.integers(-1, 30, 3000)
        cpu = M.evaluate(Q, G, ql, gl, config=M.EvalConfig(engine="numpy", norm_tol=np.inf, progress=False))
        gpu = M.evaluate(Q, G, ql, gl, config=M.EvalConfig(device="cuda", norm_tol=np.inf, block_mb=1,
                                                             progress=False))
        assert gpu.metrics == cpu.metrics
        np.testing.assert_array_equal(gpu.indices, cpu.indices)
