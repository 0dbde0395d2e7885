"""capret_utils.viz.plots: the tables behind the figures (hand-computed cases), the figures' content, save_figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from _items_fixture import make_items  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from capret_utils.data import df2  # noqa: E402
from capret_utils.evaluation import analysis  # noqa: E402
from capret_utils.viz import plots


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return make_items(tmp_path_factory.mktemp("plot-items"), n_pairs=3)


def _tiny() -> pd.DataFrame:
    """4 user items (occlusion 1, 1, 2, 3) and 1 shop item (occlusion 3) in 2 pairs; boxes easy to check."""
    return pd.DataFrame({
        "key": [f"validation/{i:06d}/item1" for i in range(1, 6)],
        "source": ["user", "user", "user", "user", "shop"],
        "pair_id": [1, 1, 2, 2, 1],
        "image_id": [1, 1, 2, 3, 4],
        "style": [1, 0, 1, 1, 1],
        "occlusion": [1, 1, 2, 3, 3],
        "scale": [1, 2, 3, 3, 2],
        "x1": [0, 10, 0, 0, 0], "y1": [0, 0, 0, 0, 0], "x2": [50, 30, 100, 100, 25], "y2": [50, 20, 100, 50, 100],
        "width": [100, 100, 100, 100, 100], "height": [100, 100, 100, 100, 100],
    })


def test_attribute_table_hand_computed():
    table = plots.attribute_table(_tiny(), "occlusion").set_index(["source", "code"])
    assert table.loc[("user", 1), "count"] == 2 and table.loc[("user", 1), "percent"] == 50.0
    assert table.loc[("user", 2), "percent"] == 25.0 and table.loc[("user", 3), "percent"] == 25.0
    assert table.loc[("shop", 3), "percent"] == 100.0 and table.loc[("shop", 1), "count"] == 0
    assert table.loc[("user", 3), "label"] == "heavy"
    with pytest.raises(ValueError, match="unknown attribute"):
        plots.attribute_table(_tiny(), "colour")


def test_items_per_pair_hand_computed():
    table = plots.items_per_pair(_tiny()).set_index("pair_id")
    assert table.loc[1, "user_items"] == 2 and table.loc[1, "user_images"] == 1
    assert table.loc[1, "shop_items"] == 1 and table.loc[2, "shop_items"] == 0
    assert table.loc[2, "user_items"] == 2 and table.loc[2, "user_images"] == 2


def test_box_table_hand_computed():
    boxes = plots.box_table(_tiny())
    assert boxes["rel_width"].tolist() == pytest.approx([0.5, 0.2, 1.0, 1.0, 0.25])
    assert boxes["area_ratio"].tolist() == pytest.approx([0.25, 0.04, 1.0, 0.5, 0.25])
    assert boxes["sqrt_area"].tolist() == pytest.approx(np.sqrt([0.25, 0.04, 1.0, 0.5, 0.25]))


def _bar_heights(ax) -> list[float]:
    return [p.get_height() for c in ax.containers for p in c]


def test_category_counts_bars_sum_to_items(items):
    before = plt.get_fignums()
    fig = plots.category_counts(items)
    assert isinstance(fig, Figure) and plt.get_fignums() == before  # not registered with pyplot
    ax = fig.axes[0]
    widths = [p.get_width() for c in ax.containers for p in c]
    assert sum(widths) == len(items)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["short sleeve top", "shorts", "trousers", "skirt"]  # category-id order


def test_attribute_distributions_match_table(items):
    fig = plots.attribute_distributions(items)
    assert [ax.get_title() for ax in fig.axes[:4]] == ["scale", "occlusion", "zoom-in", "viewpoint"]
    for ax, attribute in zip(fig.axes[:4], plots.ATTRIBUTE_LABELS):
        table = plots.attribute_table(items, attribute)
        expected = [table[(table.source == s) & (table.code == c)]["percent"].item()
                    for s in ("user", "shop") for c in (1, 2, 3)]
        assert _bar_heights(ax) == pytest.approx(expected)


def test_pair_statistics_counts(items):
    fig = plots.pair_statistics(items)
    left, right = fig.axes[:2]
    assert sum(_bar_heights(left)) == 2 * items["pair_id"].nunique()  # every pair counted once per source
    queries = df2.item_retrieval_set(items).queries
    assert sum(_bar_heights(right)) == len(queries)
    assert f"{len(queries):,} queries" in right.get_title()


def test_box_sizes_figure(items):
    fig = plots.box_sizes(items)
    assert len(fig.axes) >= 2
    cuts = sorted(line.get_ydata()[0] for line in fig.axes[1].lines if line.get_linestyle() == "--")
    assert cuts == pytest.approx(list(plots.SCALE_THRESHOLDS))


def test_pair_examples_draws_query_and_positive_boxes(items):
    fig = plots.pair_examples(items, n_queries=2, n_gallery=2, seed=0)
    grid = fig.axes
    assert len(grid) == 2 * 3
    by_key = items.set_index("key")
    for row in range(2):
        q_ax = grid[row * 3]
        key = q_ax.get_title().split("\n")[0].removeprefix("QUERY ")
        query = by_key.loc[key]
        assert query.source == "user" and query["style"] > 0
        img = q_ax.images[0].get_array()
        factor = img.shape[1] / query.width
        red = [p for p in q_ax.patches if isinstance(p, Rectangle) and p.get_linewidth() > 2]
        assert len(red) == 1
        assert red[0].get_xy() == pytest.approx((query.x1 * factor, query.y1 * factor))
        assert red[0].get_width() == pytest.approx((query.x2 - query.x1) * factor)
        for g_ax in grid[row * 3 + 1: row * 3 + 3]:
            if not g_ax.images:
                continue
            g_key = g_ax.get_title().split("\n")[0].removeprefix("positive ")
            g = by_key.loc[g_key]
            assert (g.source, g.pair_id, g["style"]) == ("shop", query.pair_id, query["style"])
    # same seed -> same examples; another seed may pick others but stays valid
    again = plots.pair_examples(items, n_queries=2, n_gallery=2, seed=0)
    assert [a.get_title() for a in again.axes] == [a.get_title() for a in grid]


def test_pair_examples_without_queries(items):
    shop_only = items[items.source == "shop"]
    fig = plots.pair_examples(shop_only)
    assert "no query" in fig.axes[0].texts[0].get_text()


def test_save_figure_writes_png(tmp_path, items):
    fig = plots.category_counts(items)
    path = plots.save_figure(fig, tmp_path, "categories")
    assert path == tmp_path / "figures" / "categories.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 300
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["categories.png"]  # no temp file left
    with pytest.raises(ValueError, match="plain file stem"):
        plots.save_figure(fig, tmp_path, "../escape")


def test_counts_table_adds_released_reference(items):
    report = df2.ReleaseReport(split_dir="/x/validation", split="validation", counts=df2.split_counts(items),
                               expected=df2.ReleaseCounts(images=12, source="synthetic"), problems=[],
                               differences=[])
    table = plots.counts_table(report).set_index("quantity")
    assert table.loc["images", "match"] == True  # noqa: E712
    assert table.loc["images", "released_deepfashion2"] == 32153
    assert table.loc["queries", "released_deepfashion2"] == 12377
    assert table.loc["gallery", "found"] == int((items.source == "shop").sum())
    real = df2.ReleaseReport("/x/validation", "validation", df2.split_counts(items), df2.RELEASED["validation"],
                             [], [])
    real_table = plots.counts_table(real).set_index("quantity")
    assert "released_deepfashion2" not in real_table.columns
    assert real_table.loc["images", "expected"] == 32153 and real_table.loc["images", "match"] == False  # noqa: E712


def test_inline_gives_a_png_for_notebooks(items):
    image = plots.inline(plots.box_sizes(items))
    assert image.format == "png"
    assert image.data[:8] == b"\x89PNG\r\n\x1a\n" and len(image.data) > 5000


def test_caption_figures_count_words_and_filter_outcomes():
    records = pd.DataFrame({
        "key": ["k1", "k2"], "method": ["dialogue", "dialogue"],
        "caption": ["a red skirt", "a navy short sleeve top"],
        "dialogue": [[{"reason": None}, {"reason": "not an answer"}], [{"reason": None}]],
    })
    fig = plots.caption_length_figure(records)
    from capret_utils.captions import caption_lengths

    assert sorted(caption_lengths(records)["words"]) == [3, 5]
    assert fig.axes[0].get_xlabel() == "words per caption" and fig.axes[0].get_title() == "Caption length"
    fig = plots.answer_filter_figure(records)
    counts = sorted(int(p.get_height()) for p in fig.axes[0].patches if p.get_height() > 0)
    assert counts == [1, 2]  # round 1: 2 kept; round 2: 1 filtered
    empty = plots.answer_filter_figure(records.assign(dialogue=None))
    assert "no dialogues" in [t.get_text() for t in empty.axes[0].texts]
    plt.close("all")


# --------------------------------------------------------------------------------------------- retrieval (04)


@pytest.fixture(scope="module")
def retrieval_run(items):
    """Two variants scored by the real evaluator on seeded embeddings of the fixture items."""
    from capret_utils.evaluation import analysis, metrics

    queries, gallery = metrics.item_sets(items)
    rng = np.random.default_rng(1)
    results = []
    for name in ("fine-tuned/crop", "zero-shot/crop"):
        q = rng.normal(size=(len(queries), 8)).astype(np.float32)
        g = rng.normal(size=(len(gallery), 8)).astype(np.float32)
        res = analysis.score_items(q, g, queries, gallery, device="cpu")
        results.append(analysis.VariantResult(name, name.split("/")[0], analysis.VARIANTS["crop"],
                                              dict(res.metrics), res.per_query))
    return analysis.variant_table(results), analysis.per_query_table(results)


def _bar_widths(ax) -> list[float]:
    return sorted(round(p.get_width(), 6) for p in ax.patches if isinstance(p, Rectangle) and p.get_width() > 0)


def test_variant_metrics_bars_show_the_table(retrieval_run):
    table, _ = retrieval_run
    fig = plots.variant_metrics(table, ("top1", "mAP"))
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes[:2]] == ["top1", "mAP"]
    assert _bar_widths(axes[0]) == sorted(round(v, 6) for v in table["top1"] if v > 0)
    assert _bar_widths(axes[1]) == sorted(round(v, 6) for v in table["mAP"])


def test_breakdown_figures(retrieval_run, items):

    _, per_query = retrieval_run
    bd = analysis.breakdowns(per_query, items, ("occlusion", "category_name"))
    fig = plots.breakdown_heatmap(bd, "hit1")
    heat_axes = [ax for ax in fig.get_axes() if ax.get_title()]
    assert [ax.get_title() for ax in heat_axes] == ["occlusion", "category_name"]
    # the heat map cells hold the breakdown values
    mesh = heat_axes[0].collections[0]
    occ = bd[bd["attribute"] == "occlusion"].pivot_table(index="variant", columns="label", values="hit1", sort=False)
    np.testing.assert_allclose(np.sort(np.ravel(mesh.get_array())), np.sort(occ.to_numpy().ravel()))
    fig = plots.breakdown_bars(bd, "occlusion", "hit1")
    assert fig.get_axes()[0].get_xlabel() == "occlusion"


def test_category_error_share_figure(retrieval_run):
    table, _ = retrieval_run
    fig = plots.category_error_share(table)
    ax = fig.get_axes()[0]
    assert _bar_widths(ax) == sorted(round(v, 6) for v in table["right_category_wrong_item"] if v > 0)
    assert any("errors:" in t.get_text() for t in ax.get_yticklabels())


def test_error_gallery_draws_query_top5_and_match(retrieval_run, items, tmp_path):

    _, per_query = retrieval_run
    examples = analysis.error_examples(per_query, "zero-shot/crop", n=2, seed=0)
    assert len(examples) == 2
    fig = plots.error_gallery(examples, items)
    axes = np.asarray(fig.get_axes()).reshape(2, 7)
    for r, ex in enumerate(examples.itertuples()):
        assert ex.query_key in axes[r, 0].get_title()
        for c, key in enumerate(ex.top_keys):
            assert key in axes[r, 1 + c].get_title()
        assert "TRUE MATCH" in axes[r, 6].get_title() and f"rank {ex.first_hit_rank}" in axes[r, 6].get_title()
    assert plots.save_figure(fig, tmp_path, "errors").is_file()
    empty = plots.error_gallery(examples.iloc[0:0], items)
    assert "no top-1 failure" in empty.get_axes()[0].texts[0].get_text()


def test_sweep_metric_lines(tmp_path):
    from capret_utils.runs import sweep

    summary = pd.DataFrame({"param.margin": [0.05, 0.2, 0.05, 0.2], "param.use_captions": ["none", "none",
                            "dialogue", "dialogue"], "status": "ok",
                            "metric.finetuned.top1": [0.1, 0.2, 0.3, 0.4], "metric.finetuned.mAP": [0.2, 0.3, 0.4, 0.5]})
    long, varying = sweep.long_form(summary)
    fig = plots.sweep_metric(long, varying)
    ax = fig.get_axes()[0]
    assert ax.get_xlabel() == "margin" and len(ax.get_lines()) >= 2
    ys = sorted(float(y) for line in ax.get_lines() for y in line.get_ydata() if np.isfinite(y))
    assert ys == [0.1, 0.2, 0.3, 0.4]
    none = plots.sweep_metric(long.iloc[0:0], [])
    assert "no finished runs" in none.get_axes()[0].texts[0].get_text()


def test_variant_metrics_hatches_exactly_the_oracle_rows_and_draws_intervals():
    table = pd.DataFrame({
        "name": ["fine-tuned/crop", "fine-tuned/crop+template-late", "zero-shot/crop", "zero-shot/crop+itm"],
        "model": ["fine-tuned", "fine-tuned", "zero-shot", "zero-shot"],
        "oracle": [False, True, False, True], "top1": [0.8, 0.9, 0.1, 0.05], "top1_lo": [0.7, 0.85, 0.05, 0.01],
        "top1_hi": [0.85, 0.95, 0.15, 0.1], "top10": [0.9, 0.95, 0.3, 0.2], "mAP": [0.8, 0.9, 0.1, 0.1]})
    fig = plots.variant_metrics(table)
    ax = fig.axes[0]
    hatched = {int(round(p.get_y() + p.get_height() / 2)): bool(p.get_hatch()) for p in ax.patches
               if p.get_width() > 0}
    assert hatched == {0: False, 1: True, 2: False, 3: True}
    assert [t.get_text() for t in ax.get_yticklabels()][1].endswith("[oracle]")
    assert len(ax.collections) >= 1  # the interval bars
