"""capret_utils.evaluation.analysis: variant table on hand-made rankings, breakdowns, the "right category, wrong item" share,
the official protocol on the same ranking, the real variant runner with a tiny model, FiftyOne failure views and
the shipped sweep files against the real notebooks."""

from __future__ import annotations

import uuid
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from _items_fixture import make_items

from capret_utils import common
from capret_utils.common import repo_root
from capret_utils.evaluation import analysis, metrics
from capret_utils.viz import variant_views
from capret_utils.runs import sweep


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    # 4 pairs: pairs 1 and 4 are both "short sleeve top" (a wrong item of the right category exists)
    return make_items(tmp_path_factory.mktemp("analysis-items"), n_pairs=4)


def _scores_from_orders(orders: list[list[int]], ng: int) -> tuple[np.ndarray, np.ndarray]:
    """Query/gallery embeddings whose cosine ranking of query i is exactly ``orders[i]`` (gallery rows, best
    first): gallery = identity basis, query i scores ``ng - position``."""
    g = np.eye(ng, dtype=np.float32)
    q = np.zeros((len(orders), ng), np.float32)
    for i, order in enumerate(orders):
        for pos, j in enumerate(order):
            q[i, j] = ng - pos
    return q, g


def _hand_case(items):
    queries, gallery = metrics.item_sets(items)
    ng = len(gallery)
    ident = list(zip(gallery["pair_id"], gallery["style"]))
    orders = []
    for _, row in queries.iterrows():
        pos = [j for j in range(ng) if ident[j] == (row["pair_id"], 1)]
        same_cat_wrong = [j for j in range(ng) if gallery["category_id"][j] == row["category_id"]
                          and j not in pos]
        other = [j for j in range(ng) if j not in pos and j not in same_cat_wrong]
        orders.append((pos, same_cat_wrong, other))
    return queries, gallery, orders


def test_variant_table_on_hand_made_rankings(items):
    queries, gallery, parts = _hand_case(items)
    ng = len(gallery)
    assert len(queries) == 8 and ng == 12  # 2 user items per pair; 2 style-1 + 1 style-0 shop items per pair
    # q0: positives at ranks 1, 2 -> AP 1, hit@1
    # q1: a right-category wrong item first, positives at 2, 3 -> AP (1/2 + 2/3) / 2, top-1 error, right category
    # q2: a wrong-category item first, positives at 2, 12 -> AP (1/2 + 2/12) / 2, top-1 error, wrong category
    # q3..q7: positives first -> AP 1
    orders = []
    for i, (pos, same, other) in enumerate(parts):
        if i == 1:
            assert same, "pair 1 has a right-category wrong item (pair 4)"
            order = [same[0]] + pos + [j for j in range(ng) if j != same[0] and j not in pos]
        elif i == 2:
            rest = [j for j in other if j not in pos]
            order = [rest[0], pos[0]] + [j for j in range(ng) if j not in (rest[0], *pos)] + [pos[1]]
        else:
            order = pos + [j for j in range(ng) if j not in pos]
        assert sorted(order) == list(range(ng))
        orders.append(order)
    q, g = _scores_from_orders(orders, ng)
    res = analysis.score_items(q, g, queries, gallery, device="cpu")
    pq = res.per_query
    ap = [1.0, (1 / 2 + 2 / 3) / 2, (1 / 2 + 2 / 12) / 2] + [1.0] * 5
    np.testing.assert_allclose(pq["ap"].to_numpy(float), ap)
    assert pq["first_hit_rank"].tolist() == [1, 2, 2, 1, 1, 1, 1, 1]
    assert pq["right_category"].tolist()[:3] == [True, True, False]
    assert pq["match_key"][1] == gallery["key"][parts[1][0][0]]
    assert pq["match_key"][2] == gallery["key"][parts[2][0][0]]

    variant = analysis.VARIANTS["crop"]
    result = analysis.VariantResult("fine-tuned/crop", "fine-tuned", variant, dict(res.metrics), pq)
    result.official = analysis.official_topk(queries, gallery, res.indices, items)
    row = analysis.variant_table([result]).iloc[0]
    assert row["top1"] == pytest.approx(6 / 8) and row["top5"] == 1.0 and row["top20"] == 1.0
    assert row["mAP"] == pytest.approx(np.mean(ap))
    assert row["right_category_wrong_item"] == pytest.approx(0.5) and row["n_top1_errors"] == 2
    assert row["n_queries"] == 8 and row["n_gallery"] == 12
    # GT boxes: the official protocol (IoU of GT boxes = 1) gives the same top-k as the exact metrics
    for k in analysis.OFFICIAL_KS:
        assert row[f"official_top{k}"] == pytest.approx(row[f"top{k}"]), k


def test_match_key_beyond_the_list_is_the_best_scored_positive(items):
    queries, gallery, parts = _hand_case(items)
    ng = len(gallery)
    orders = [[j for j in range(ng) if j not in pos] + pos for pos, _, _ in parts]
    q, g = _scores_from_orders(orders, ng)
    q = q.copy()
    res = metrics.evaluate_items(q, g, queries, gallery, ks=(1,), list_length=1,
                                 config=metrics.EvalConfig(progress=False, device="cpu"))
    keys = analysis._match_keys(res, queries, gallery, q, g, "item")
    # the positives sit at the end: the better scored of the two is the first of `pos` in the order
    assert keys == [gallery["key"][pos[0]] for pos, _, _ in parts]


def test_category_error_share_hand_made():
    pq = pd.DataFrame({"hit@1": pd.array([True, False, False, False, None], dtype="boolean"),
                       "right_category": [False, True, True, False, True]})
    share, n = analysis.category_error_share(pq)
    assert n == 3 and share == pytest.approx(2 / 3)  # the <NA> query (no positive) does not count
    share, n = analysis.category_error_share(pq.iloc[:1])
    assert n == 0 and np.isnan(share)


def test_breakdown_means_and_labels(items):
    queries, gallery = metrics.item_sets(items)
    pq = pd.DataFrame({"variant": "v", "level": "item", "query_key": queries["key"],
                       "n_relevant": 2, "hit@1": pd.array([i % 2 == 0 for i in range(len(queries))], "boolean"),
                       "hit@10": pd.array([True] * len(queries), "boolean"),
                       "ap": np.linspace(0, 1, len(queries))})
    bd = analysis.breakdown(pq, items, "occlusion")
    joined = pq.assign(occ=queries["occlusion"].to_numpy())
    for value, group in joined.groupby("occ"):
        row = bd[bd["value"] == value].iloc[0]
        assert row["n"] == len(group)
        assert row["hit1"] == pytest.approx(group["hit@1"].astype(float).mean())
        assert row["ap"] == pytest.approx(group["ap"].mean())
        assert row["label"] == {1: "slight", 2: "medium", 3: "heavy"}[value]
    both = analysis.breakdowns(pq, items)
    assert set(both["attribute"]) == set(analysis.BREAKDOWN_ATTRIBUTES)
    # queries without a positive are left out
    pq2 = pq.assign(n_relevant=[0] + [2] * (len(pq) - 1))
    assert analysis.breakdown(pq2, items, "scale")["n"].sum() == len(pq) - 1


def test_select_variants():
    assert [v.name for v in analysis.select_variants("all")] == list(analysis.VARIANTS)
    no_dialogue = [v.name for v in analysis.select_variants("all", have_dialogue=False)]
    assert "crop+dialogue-late" not in no_dialogue and "crop+template-cross" in no_dialogue
    assert [v.name for v in analysis.select_variants(" crop, image,crop ")] == ["crop", "image"]
    with pytest.raises(ValueError, match="valid"):
        analysis.select_variants("crop,crops")
    with pytest.raises(ValueError, match="captions_path"):
        analysis.select_variants("crop+dialogue-cross", have_dialogue=False)


def test_headline_and_metrics_dict():
    table = pd.DataFrame([
        {"name": "fine-tuned/crop", "model": "fine-tuned", "variant": "crop", "level": "item", "top1": 0.5,
         "top5": 0.7, "top10": 0.8, "top20": 0.9, "mAP": 0.6, "official_top1": float("nan")},
        {"name": "zero-shot/crop", "model": "zero-shot", "variant": "crop", "level": "item", "top1": 0.1,
         "top5": 0.2, "top10": 0.3, "top20": 0.4, "mAP": 0.15, "official_top1": 0.1}])
    head = analysis.zero_shot_vs_finetuned(table)
    assert head["finetuned_minus_zero_shot"]["mAP"] == pytest.approx(0.45)
    assert head["best_variant"]["name"] == "fine-tuned/crop"
    out = common.jsonable(analysis.metrics_dict(table, head))
    assert out["variants"]["fine-tuned/crop"]["official_top1"] is None
    assert out["variants"]["zero-shot/crop"]["top1"] == 0.1


def test_sweep_long_and_summary_discovery(tmp_path):
    folder = tmp_path / "runs" / "margins"
    folder.mkdir(parents=True)
    pd.DataFrame({"run": ["a", "b", "c"], "param.margin": [0.05, 0.2, 0.35], "param.use_captions": "none",
                  "status": ["ok", "ok", "failed"], "metric.finetuned.top1": [0.1, 0.3, None],
                  "metric.finetuned.mAP": [0.2, 0.4, None], "metric.zero_shot.top1": [0.0, 0.0, None]}
                 ).to_csv(folder / "summary.csv", index=False)
    assert sweep.find_summaries("", tmp_path / "runs") == [folder / "summary.csv"]
    assert sweep.find_summaries(str(folder)) == [folder / "summary.csv"]
    assert sweep.find_summaries("none") == []
    with pytest.raises(FileNotFoundError, match="sweep_summary"):
        sweep.find_summaries(str(tmp_path / "nope.csv"))
    long, varying = sweep.long_form(sweep.load_summary(folder))
    assert varying == ["param.margin"]  # use_captions does not vary; the failed run is dropped
    assert sorted(long["metric"].unique()) == ["mAP", "top1"]
    assert long[long["metric"] == "top1"]["value"].tolist() == [0.1, 0.3]


@pytest.mark.parametrize("name", ["margin_sweep", "ablation"])
def test_shipped_sweeps_pass_the_name_check(name):
    spec = sweep.load_spec(repo_root() / "runs" / f"{name}.yaml")
    sweep.check(spec)  # raises SweepConfigError on a misspelled or mistyped parameter
    runs = sweep.plan(spec)
    assert len(runs) >= 4
    assert len({r.run_dir for r in runs}) == len(runs)
    assert all(r.params.get("data_root", "") == "" for r in runs)  # the synthetic benchmark


# ------------------------------------------------------------------------------------ the real runner


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, smoke_root):
    """A capret checkpoint of the tiny preset (random init, seed 3) written by train.save_finetuned, as 03 would."""
    from capret_utils import train

    cfg = train.TrainConfig(model="tiny", seed=3, device="cpu")
    bundle = analysis.fresh_bundle("tiny", 3, [], device="cpu")
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    train.save_finetuned(bundle, path, info={"config": asdict(cfg)})
    return path, bundle


def test_zero_shot_rebuilds_the_initial_weights(tiny_checkpoint):
    import torch

    path, original = tiny_checkpoint
    models = analysis.load_models(str(path), "ignored", 0, [], device="cpu")
    assert list(models) == ["fine-tuned", "zero-shot"]
    zs = models["zero-shot"].model.state_dict()
    for name, value in original.model.state_dict().items():
        torch.testing.assert_close(zs[name], value, msg=name)
    assert models["zero-shot"].tokenizer is models["fine-tuned"].tokenizer
    assert analysis.fingerprint(models["zero-shot"]) == analysis.fingerprint(original)


@pytest.mark.slow
def test_every_variant_runs_with_a_tiny_model(tiny_checkpoint, smoke_root, tmp_path):
    from capret_utils.captions import template_captions
    from capret_utils.data import df2
    from capret_utils.runs import paths

    items = df2.load_items(paths.split_dir(smoke_root, "validation"))
    # a stand-in dialogue store: real captions for every item (the template text, reworded)
    dialogue = {k: f"a photo of {v}" for k, v in template_captions(items).items()}
    data = analysis.RetrievalData.build(items, dialogue)
    models = {"zero-shot": analysis.load_models(str(tiny_checkpoint[0]), "", 0, [], device="cpu")["zero-shot"]}
    cfg = analysis.AnalysisConfig(boxes="predicted", rerank_k=3, batch_size=16, progress=False, device="cpu")
    results = analysis.run_all(list(analysis.VARIANTS.values()), models, data, cfg, run_dir=tmp_path)
    table = analysis.variant_table(results)
    assert table["variant"].tolist() == list(analysis.VARIANTS)
    assert table[["top1", "top10", "mAP"]].notna().all().all()
    item_rows = table[table["level"] == "item"]
    assert item_rows["official_top1"].notna().all() and table[table["level"] == "image"]["official_top1"].isna().all()
    assert (item_rows["n_queries"] == len(data.queries)).all()
    pq = analysis.per_query_table(results)
    assert len(pq) == len(item_rows) * len(data.queries) + len(data.query_images)
    itm = pq[pq["variant"] == "zero-shot/crop+itm"]
    assert all(len(k) == 20 or len(k) == len(data.gallery) for k in itm["top_keys"])
    path = analysis.write_parquet(pq, tmp_path)
    back = pd.read_parquet(path)
    assert back["top_keys"].map(len).tolist() == pq["top_keys"].map(len).tolist()
    # predicted boxes and embeddings were cached: a second run recomputes nothing (same numbers, no new files)
    cached = sorted(p.name for p in (tmp_path / "embeddings").iterdir())
    assert any("-boxes-q" in c for c in cached) and any("predcrop-dialogue-cross" in c for c in cached)
    again = analysis.variant_table(analysis.run_all([analysis.VARIANTS["crop"]], models, data, cfg,
                                                    run_dir=tmp_path))
    assert again.iloc[0]["mAP"] == pytest.approx(table.set_index("variant").loc["crop", "mAP"])
    assert sorted(p.name for p in (tmp_path / "embeddings").iterdir()) == cached
    # the error-gallery data of a variant with failures
    worst = table.sort_values("top1").iloc[0]["name"]
    ex = analysis.error_examples(pq, worst, n=2)
    assert len(ex) <= 2 and all(len(k) <= 5 for k in ex["top_keys"])


# ------------------------------------------------------------------------------------ FiftyOne


@pytest.mark.fiftyone
def test_failure_views_hold_exactly_the_failures(items):
    from capret_utils.viz import fo as cfo

    queries, gallery, parts = _hand_case(items)
    ng = len(gallery)
    # variant A: every query finds its match first; variant B: queries 0 and 5 have their positives last
    good = [pos + [j for j in range(ng) if j not in pos] for pos, _, _ in parts]
    bad = [([j for j in range(ng) if j not in pos] + pos) if i in (0, 5) else good[i]
           for i, (pos, _, _) in enumerate(parts)]
    results = []
    for name, orders in (("fine-tuned/crop", good), ("zero-shot/crop", bad)):
        q, g = _scores_from_orders(orders, ng)
        res = analysis.score_items(q, g, queries, gallery, device="cpu")
        results.append(analysis.VariantResult(name, name.split("/")[0], analysis.VARIANTS["crop"],
                                               dict(res.metrics), res.per_query))
    table = analysis.variant_table(results)
    pq = analysis.per_query_table(results)
    name = f"capret-test-analysis-{uuid.uuid4().hex[:8]}"
    ds = cfo.build_dataset(items, name, cfo.BuildConfig(persistent=False))
    try:
        views = variant_views.write_fiftyone(ds, pq, table, k=10, worst=3,
                                             compare=variant_views.default_comparisons(table))
        bad_keys = {queries["key"][0], queries["key"][5]}
        fail_b = cfo.failure_view_name("zero-shot/crop", 10)
        assert views[fail_b] == 2 and views[cfo.failure_view_name("fine-tuned/crop", 10)] == 0
        got = set(ds.load_saved_view(fail_b).values("items.key"))
        assert got == bad_keys
        worst = ds.load_saved_view(cfo.worst_ap_view_name("zero-shot/crop"))
        assert len(worst) == 3 and set(worst.values("items.key")[:2]) == bad_keys
        cmp = cfo.comparison_view_name("fine-tuned/crop", "zero-shot/crop", 10)
        assert views[cmp] == 2 and set(ds.load_saved_view(cmp).values("items.key")) == bad_keys
        assert views[cfo.comparison_view_name("zero-shot/crop", "fine-tuned/crop", 10)] == 0
        # the per-query attributes are on the query detections
        from fiftyone import ViewField as F

        patch = ds.load_saved_view("query-items").match(F("items.key") == queries["key"][0]).first()
        det = patch["items"]
        assert det["zero_shot_crop_first_hit_rank"] == ng - 1 and det["zero_shot_crop_hit_at_10"] is False
        assert det["fine_tuned_crop_topk_keys"][:2] == [gallery["key"][j] for j in parts[0][0]]
        assert det["fine_tuned_crop_variant"] == "fine-tuned/crop"
        # a second run with other results (names swapped): its views are saved current, the older generated view
        # (query-items) is refreshed
        swapped = pq.assign(variant=pq["variant"].map({"fine-tuned/crop": "zero-shot/crop",
                                                       "zero-shot/crop": "fine-tuned/crop"}))
        views = variant_views.write_fiftyone(ds, swapped, table, k=10, worst=3)
        fail_a = cfo.failure_view_name("fine-tuned/crop", 10)
        assert views[fail_a] == 2 and set(ds.load_saved_view(fail_a).values("items.key")) == bad_keys
        assert views[fail_b] == 0 and len(ds.load_saved_view(fail_b)) == 0
        patch = ds.load_saved_view("query-items").match(F("items.key") == queries["key"][0]).first()
        assert patch["items"]["fine_tuned_crop_hit_at_10"] is False
    finally:
        cfo.delete_dataset(name)


def test_text_sources_label_every_variant():
    src = {"template": "oracle", "dialogue": "pixel", "rerank": "pixel"}
    labels = {name: analysis.text_source(v, src) for name, v in analysis.VARIANTS.items()}
    assert labels == {"image": "none", "crop": "none", "crop+template-late": "oracle",
                      "crop+template-cross": "oracle", "crop+dialogue-late": "pixel", "crop+dialogue-cross": "pixel",
                      "crop+itm": "pixel", "crop+template-gallery": "gallery-only",
                      "crop+dialogue-gallery": "gallery-only"}
    assert set(labels.values()) <= set(analysis.TEXT_SOURCES)
    assert analysis.text_source(analysis.VARIANTS["crop+dialogue-late"], {"dialogue": "oracle"}) == "oracle"


def test_best_variant_never_is_an_oracle_row():
    rows = [("fine-tuned/crop", "crop", 0.5, 0.6, "none"), ("fine-tuned/crop+template-late", "crop+template-late",
                                                           0.9, 0.95, "oracle"),
            ("fine-tuned/crop+template-gallery", "crop+template-gallery", 0.55, 0.65, "gallery-only")]
    table = pd.DataFrame([{"name": n, "model": "fine-tuned", "variant": v, "level": "item", "top1": t, "top5": t,
                           "top10": t, "top20": t, "mAP": m, "text_source": s, "oracle": s == "oracle"}
                          for n, v, t, m, s in rows])
    head = analysis.zero_shot_vs_finetuned(table)
    assert head["best_variant"]["name"] == "fine-tuned/crop+template-gallery"
    assert head["best_oracle_upper_bound"]["name"] == "fine-tuned/crop+template-late"


def test_variant_table_intervals_and_paired_comparison(items):
    queries, gallery, parts = _hand_case(items)
    ng = len(gallery)
    good = [pos + [j for j in range(ng) if j not in pos] for pos, _, _ in parts]
    bad = [[j for j in range(ng) if j not in pos] + pos for pos, _, _ in parts]
    mixed = [good[i] if i % 2 == 0 else bad[i] for i in range(len(parts))]
    results = []
    for name, orders, text in (("crop", mixed, "none"), ("crop+template-gallery", good, "template")):
        q, g = _scores_from_orders(orders, ng)
        res = analysis.score_items(q, g, queries, gallery, device="cpu")
        v = analysis.VARIANTS[name]
        results.append(analysis.VariantResult(f"fine-tuned/{name}", "fine-tuned", v, dict(res.metrics),
                                              res.per_query, text_source=analysis.text_source(v, {})))
    table = analysis.variant_table(results).set_index("name")
    base, gal = table.loc["fine-tuned/crop"], table.loc["fine-tuned/crop+template-gallery"]
    assert base["top1_lo"] <= base["top1"] <= base["top1_hi"] and gal["mAP_lo"] <= gal["mAP"] <= gal["mAP_hi"]
    assert gal["text_source"] == "gallery-only" and not gal["oracle"]
    # the gallery-only variant wins the 4 odd queries, loses none: exact McNemar p = 2 / 2**4
    assert (gal["won"], gal["lost"]) == (4, 0) and gal["p_top1"] == pytest.approx(0.125)
    assert gal["delta_mAP"] == pytest.approx(gal["mAP"] - base["mAP"])
    assert gal["baseline"] == "fine-tuned/crop" and pd.isna(base.get("baseline"))


def test_variants_that_cannot_run_are_listed_with_their_reason():
    from capret_utils.evaluation import analysis as A

    skipped = A.skipped_variants("all", have_dialogue=False)
    assert {s["variant"] for s in skipped} == {n for n, v in A.VARIANTS.items() if v.text == "dialogue"}
    assert all("captions_path" in s["reason"] for s in skipped)
    assert A.skipped_variants("all", have_dialogue=True) == [] and A.skipped_variants("crop", False) == []
