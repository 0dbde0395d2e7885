"""Seaborn figures the notebooks show, built from the items table; ``save_figure`` writes them as PNG into a run.

Every figure function takes data and returns a ``matplotlib.figure.Figure`` made without pyplot (nothing
accumulates in pyplot's figure registry, and no backend is needed); the notebook saves it with
``save_figure(fig, run_dir, name)`` -> ``<run_dir>/figures/<name>.png`` and shows it with ``inline(fig)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from capret_utils.data.df2 import (
    ATTRIBUTE_LABELS,
    RELEASED,
    ReleaseReport,
    item_retrieval_set,
)

SOURCES = ("user", "shop")
SOURCE_COLOURS = {"user": "#d95f02", "shop": "#1b9e77"}
SCALE_THRESHOLDS = (0.10, 0.40)  # box / image area ratio separating scale 1 | 2 | 3 (DeepFashion2 issue #46)


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _sources(items: pd.DataFrame) -> list[str]:
    return [s for s in SOURCES if s in set(items["source"])]


def save_figure(fig: Figure, run_dir: str | os.PathLike, name: str, dpi: int = 120) -> Path:
    """Write ``fig`` to ``<run_dir>/figures/<name>.png`` (atomically) and return the path."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"figure name must be a plain file stem, got {name!r}")
    out = Path(run_dir) / "figures" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, out)
    return out


def inline(fig: Figure, dpi: int = 100):
    """The figure as an ``IPython.display.Image`` (PNG): shows in any notebook whatever matplotlib backend is active
    (figures made without pyplot have no inline display of their own)."""
    import io

    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    return Image(data=buffer.getvalue(), format="png")


# --------------------------------------------------------------------------------------------- tables


def attribute_table(items: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Share of items per attribute code within each source: columns ``source``, ``code``, ``label``, ``count``,
    ``percent`` (percent sums to 100 per source)."""
    if attribute not in ATTRIBUTE_LABELS:
        raise ValueError(f"unknown attribute {attribute!r}; one of {list(ATTRIBUTE_LABELS)}")
    labels = ATTRIBUTE_LABELS[attribute]
    rows = []
    for source in _sources(items):
        sub = items[items["source"] == source][attribute]
        total = len(sub)
        for code, label in labels.items():
            n = int((sub == code).sum())
            rows.append({"source": source, "code": code, "label": label, "count": n,
                         "percent": 100.0 * n / total if total else 0.0})
    return pd.DataFrame(rows, columns=["source", "code", "label", "count", "percent"])


def items_per_pair(items: pd.DataFrame) -> pd.DataFrame:
    """Per ``pair_id``: number of user items, shop items, user images and shop images."""
    grouped = items.groupby(["pair_id", "source"])
    n_items = grouped.size().unstack(fill_value=0)
    n_images = grouped["image_id"].nunique().unstack(fill_value=0)
    out = pd.DataFrame(index=n_items.index)
    for source in SOURCES:
        out[f"{source}_items"] = n_items[source] if source in n_items else 0
        out[f"{source}_images"] = n_images[source] if source in n_images else 0
    return out.reset_index()


def box_table(items: pd.DataFrame) -> pd.DataFrame:
    """Per item: relative box width / height, the box / image area ratio and its square root, with source and scale."""
    w = (items["x2"] - items["x1"]) / items["width"]
    h = (items["y2"] - items["y1"]) / items["height"]
    return pd.DataFrame({"key": items["key"], "source": items["source"], "scale": items["scale"],
                         "rel_width": w, "rel_height": h, "area_ratio": w * h, "sqrt_area": np.sqrt(w * h)})


def counts_table(report: ReleaseReport) -> pd.DataFrame:
    """``df2.check_release`` as a table (quantity, expected, found, match) plus the released DeepFashion2 number
    for reference when the expected numbers came from elsewhere (the synthetic benchmark's ``synth.json``)."""
    table = report.to_frame()
    released = RELEASED.get(report.split)
    if released is not None and report.expected is not released:
        table["released_deepfashion2"] = [getattr(released, q, None) for q in table["quantity"]]
    return table


# --------------------------------------------------------------------------------------------- figures


def category_counts(items: pd.DataFrame) -> Figure:
    """Items per category (in category-id order), user vs shop."""
    import seaborn as sns

    order = (items[["category_id", "category_name"]].drop_duplicates().sort_values("category_id")["category_name"])
    counts = items.groupby(["category_name", "source"]).size().rename("items").reset_index()
    fig, axes = _figure(8, 0.35 * len(order) + 1.5)
    ax = axes[0, 0]
    sns.barplot(data=counts, y="category_name", x="items", hue="source", order=list(order),
                hue_order=_sources(items), palette=SOURCE_COLOURS, ax=ax)
    ax.set(xlabel="items", ylabel="", title=f"Items per category ({len(items):,} items)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for container in ax.containers:
        ax.bar_label(container, fontsize=7, padding=2)
    return fig


def attribute_distributions(items: pd.DataFrame) -> Figure:
    """Scale, occlusion, zoom-in and viewpoint: percent of items per code, within user and within shop."""
    import seaborn as sns

    fig, axes = _figure(11, 6.5, 2, 2)
    for ax, attribute in zip(axes.flat, ATTRIBUTE_LABELS):
        table = attribute_table(items, attribute)
        sns.barplot(data=table, x="label", y="percent", hue="source", hue_order=_sources(items),
                    order=list(ATTRIBUTE_LABELS[attribute].values()), palette=SOURCE_COLOURS, ax=ax)
        ax.set(xlabel="", ylabel="% of items", title=attribute.replace("_", "-"), ylim=(0, 108))
        for container in ax.containers:
            ax.bar_label(container, fmt="%.0f", fontsize=7, padding=1)
    fig.suptitle("Item attributes by source")
    return fig


def pair_statistics(items: pd.DataFrame) -> Figure:
    """Items per pair (user / shop) and positives per query (shop items sharing ``pair_id`` and ``style > 0``)."""
    import seaborn as sns

    per_pair = items_per_pair(items)
    long = per_pair.melt(id_vars="pair_id", value_vars=["user_items", "shop_items"], var_name="source",
                         value_name="items")
    long["source"] = long["source"].str.replace("_items", "", regex=False)
    queries = item_retrieval_set(items).queries
    fig, axes = _figure(11, 3.8, 1, 2)
    sns.histplot(data=long, x="items", hue="source", hue_order=_sources(items), palette=SOURCE_COLOURS,
                 discrete=True, multiple="dodge", shrink=0.8, ax=axes[0, 0])
    axes[0, 0].set(xlabel="items in the pair", ylabel="pairs",
                   title=f"Items per pair ({len(per_pair):,} pair ids)")
    if len(queries):
        sns.histplot(x=queries["n_positives"], discrete=True, color="#7570b3", ax=axes[0, 1])
        no_pos = int((queries["n_positives"] == 0).sum())
        axes[0, 1].set(title=f"Positives per query ({len(queries):,} queries; median "
                             f"{queries['n_positives'].median():.0f}; {no_pos} with none)")
    else:
        axes[0, 1].text(0.5, 0.5, "no queries (user items with style > 0)", ha="center", va="center")
    axes[0, 1].set(xlabel="positive gallery items", ylabel="queries")
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def box_sizes(items: pd.DataFrame) -> Figure:
    """Box size: sqrt(box / image area) by source, and the area ratio per scale code (with the 10 % / 40 % cuts)."""
    import seaborn as sns

    boxes = box_table(items)
    fig, axes = _figure(11, 3.8, 1, 2)
    sns.histplot(data=boxes, x="sqrt_area", hue="source", hue_order=_sources(items), palette=SOURCE_COLOURS,
                 stat="percent", common_norm=False, bins=np.linspace(0, 1, 26), element="step", ax=axes[0, 0])
    axes[0, 0].set(xlabel="sqrt(box area / image area)", ylabel="% of items (per source)",
                   title="Box size by source")
    boxes["scale_label"] = boxes["scale"].map(ATTRIBUTE_LABELS["scale"])
    sns.boxplot(data=boxes, x="scale_label", y="area_ratio", hue="source", hue_order=_sources(items),
                order=list(ATTRIBUTE_LABELS["scale"].values()), palette=SOURCE_COLOURS, ax=axes[0, 1],
                fliersize=2)
    for cut in SCALE_THRESHOLDS:
        axes[0, 1].axhline(cut, color="grey", lw=0.8, ls="--")
    axes[0, 1].set(xlabel="scale", ylabel="box area / image area", title="Area ratio per scale label", ylim=(0, 1))
    return fig


def _thumbnail(path: str, max_side: int) -> tuple[np.ndarray, float]:
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        factor = min(1.0, max_side / max(img.size))
        if factor < 1.0:
            img = img.resize((max(1, round(img.width * factor)), max(1, round(img.height * factor))))
        return np.asarray(img), factor


def _draw_image(ax, path: str, boxes: pd.DataFrame, highlight: set[str], colour: str, title: str,
                max_side: int) -> None:
    pixels, factor = _thumbnail(path, max_side)
    ax.imshow(pixels)
    for row in boxes.itertuples(index=False):
        hit = row.key in highlight
        ax.add_patch(Rectangle((row.x1 * factor, row.y1 * factor), (row.x2 - row.x1) * factor,
                               (row.y2 - row.y1) * factor, fill=False, lw=2.2 if hit else 0.9,
                               ls="-" if hit else "--", edgecolor=colour if hit else "#bbbbbb"))
    ax.set_title(title, fontsize=7)
    ax.set_axis_off()


def pair_examples(items: pd.DataFrame, n_queries: int = 4, n_gallery: int = 3, seed: int = 0,
                  max_side: int = 320) -> Figure:
    """A grid of example queries (user item, red box) with their positive shop images (green boxes).

    Rows are ``n_queries`` queries drawn with ``seed`` among those with at least one positive, each from a different
    identity when possible; other items in the images are dashed grey.
    """
    rset = item_retrieval_set(items)
    queries = rset.queries[rset.queries["n_positives"] > 0]
    fig, axes = _figure(2.6 * (1 + n_gallery), 2.6 * max(1, min(n_queries, len(queries))) + 0.4,
                        max(1, min(n_queries, len(queries))), 1 + n_gallery)
    if queries.empty:
        axes[0, 0].text(0.5, 0.5, "no query with a positive", ha="center", va="center")
        for ax in axes.flat:
            ax.set_axis_off()
        return fig
    rng = np.random.default_rng(seed)
    one_per_identity = queries.groupby("identity").sample(n=1, random_state=int(rng.integers(2**31)))
    pool = one_per_identity if len(one_per_identity) >= n_queries else queries
    chosen = pool.iloc[rng.permutation(len(pool))[:n_queries]]
    def image_rows(split: str, image_id: int) -> pd.DataFrame:
        return items[(items["image_id"] == image_id) & (items["split"] == split)]

    for r, (qi, query) in enumerate(chosen.iterrows()):
        occlusion = ATTRIBUTE_LABELS["occlusion"][query["occlusion"]]
        viewpoint = ATTRIBUTE_LABELS["viewpoint"][query["viewpoint"]]
        q_title = f"QUERY {query['key']}\n{query['category_name']} · occl {occlusion} · {viewpoint}"
        _draw_image(axes[r, 0], query["path"], image_rows(query["split"], query["image_id"]), {query["key"]},
                    "#e41a1c", q_title, max_side)
        positives = rset.gallery.iloc[rset.positives[qi]]
        shown = positives.drop_duplicates(["split", "image_id"]).head(n_gallery)
        pos_keys = set(positives["key"])
        for c in range(n_gallery):
            ax = axes[r, 1 + c]
            if c < len(shown):
                g = shown.iloc[c]
                _draw_image(ax, g["path"], image_rows(g["split"], g["image_id"]), pos_keys, "#4daf4a",
                            f"positive {g['key']}\n{g['category_name']}", max_side)
            else:
                ax.set_axis_off()
    fig.suptitle("Query (user item) ↔ positive shop images: same pair_id and style > 0")
    return fig


# --------------------------------------------------------------------------------------------- fine-tuning


def training_curves(history: pd.DataFrame, smooth: int = 10) -> Figure:
    """Fine-tuning history (``capret_utils.train.read_history``): each loss term per step (rolling mean over
    ``smooth`` steps, raw values faint), and the validation hit@1 / hit@10 / mAP of every evaluation."""
    import seaborn as sns

    fig, axes = _figure(12, 4.2, 1, 2)
    train_rows = history[history["kind"] == "train"] if "kind" in history else history.iloc[0:0]
    terms = [c for c in train_rows.columns if c.startswith("loss_") and train_rows[c].notna().any()]
    ax = axes[0, 0]
    if len(train_rows) and terms:
        long = train_rows.melt(id_vars="step", value_vars=terms, var_name="term", value_name="value")
        long["term"] = long["term"].str.removeprefix("loss_")
        long["smoothed"] = long.groupby("term")["value"].transform(
            lambda s: s.rolling(max(1, smooth), min_periods=1).mean())
        sns.lineplot(data=long, x="step", y="value", hue="term", alpha=0.2, legend=False, ax=ax)
        sns.lineplot(data=long, x="step", y="smoothed", hue="term", ax=ax)
        ax.set(yscale="log", ylabel="loss (unweighted)", title="Training losses")
    else:
        ax.text(0.5, 0.5, "no training steps logged", ha="center", va="center")
    ax = axes[0, 1]
    evals = history[history["kind"] == "eval"] if "kind" in history else history.iloc[0:0]
    shown = [c for c in ("top1", "top10", "mAP") if c in evals.columns]
    if len(evals) and shown:
        long = evals.melt(id_vars="step", value_vars=shown, var_name="metric", value_name="value")
        sns.lineplot(data=long, x="step", y="value", hue="metric", marker="o", ax=ax)
        ax.set(ylim=(0, 1), ylabel="validation (item level)", title="Retrieval during fine-tuning")
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center")
    return fig


def zero_shot_vs_finetuned(metrics: dict[str, dict[str, float]]) -> Figure:
    """Bar chart of the headline metrics per phase, e.g. ``{"zero_shot": {...}, "finetuned": {...}}``."""
    import seaborn as sns

    bounds = ("_lo", "_hi")
    rows = [{"phase": phase, "metric": k, "value": float(v)} for phase, vals in metrics.items()
            for k, v in vals.items() if isinstance(v, (int, float)) and not k.endswith(bounds)]
    frame = pd.DataFrame(rows)
    fig, axes = _figure(8, 3.5)
    ax = axes[0, 0]
    sns.barplot(data=frame, x="metric", y="value", hue="phase", ax=ax)
    for container in ax.containers:
        ax.bar_label(container, fmt="%.2f", fontsize=7, padding=2)
    # 95 % intervals where the metrics carry them (top1: Wilson, mAP: bootstrap over queries)
    order = list(dict.fromkeys(frame["metric"]))
    phases = list(dict.fromkeys(frame["phase"]))
    width = 0.8 / max(1, len(phases))
    for j, phase in enumerate(phases):
        for i, name in enumerate(order):
            lo, hi = metrics[phase].get(f"{name}_lo"), metrics[phase].get(f"{name}_hi")
            if lo is None or hi is None:
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.errorbar([x], [metrics[phase][name]], yerr=[[metrics[phase][name] - lo], [hi - metrics[phase][name]]],
                        fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set(ylim=(0, 1.05), ylabel="", xlabel="", title="Item-level retrieval (bars: 95 % intervals)")
    return fig


class LiveFigure:
    """A notebook figure redrawn in place from accumulating history rows (a ``train.finetune`` callback).

    ``make(frame) -> Figure`` builds the figure from the rows seen so far; it is redrawn every ``every`` rows and
    after every evaluation row, into one ``IPython.display`` handle (papermill records the last version).
    """

    def __init__(self, make, every: int = 25) -> None:
        self.make = make
        self.every = max(1, int(every))
        self.rows: list[dict] = []
        self.handle = None

    def __call__(self, row: dict) -> None:
        self.rows.append(dict(row))
        if row.get("kind") == "eval" or len(self.rows) % self.every == 0:
            self.refresh()

    def refresh(self) -> None:
        if not self.rows:
            return
        from IPython.display import display

        image = inline(self.make(pd.json_normalize(self.rows)))
        if self.handle is None:
            self.handle = display(image, display_id=True)
        else:
            self.handle.update(image)

    def close(self) -> None:
        self.refresh()


# --------------------------------------------------------------------------------------------- captions (02)


def caption_length_figure(records: pd.DataFrame, items: pd.DataFrame | None = None) -> Figure:
    """Histogram of words per caption for the stored captions and, given the items, their template captions."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from capret_utils.captions import caption_lengths, template_captions

    lengths = caption_lengths(records)
    if items is not None and (records["method"] != "template").any():
        keys = set(records["key"])
        tmpl = {k: c for k, c in template_captions(items[items["key"].isin(keys)]).items()}
        extra = pd.DataFrame({"key": list(tmpl), "method": "template", "caption": list(tmpl.values())})
        lengths = pd.concat([lengths, caption_lengths(extra)], ignore_index=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.histplot(data=lengths, x="words", hue="method", discrete=True, element="step", stat="count", ax=ax)
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax.set_xlabel("words per caption")
    ax.set_ylabel("items")
    ax.set_title("Caption length")
    fig.tight_layout()
    return fig


def answer_filter_figure(records: pd.DataFrame) -> Figure:
    """Per dialogue round: how many answers were kept and why the others were filtered."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = [{"round": i + 1, "outcome": t.get("reason") or "kept"}
            for d in records.get("dialogue", pd.Series(dtype=object)) if isinstance(d, list)
            for i, t in enumerate(d)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if rows:
        sns.countplot(data=pd.DataFrame(rows), x="round", hue="outcome", ax=ax)
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    else:
        ax.text(0.5, 0.5, "no dialogues", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("answers")
    ax.set_title("Dialogue answers kept / filtered per round")
    fig.tight_layout()
    return fig


def answer_confusion_figure(confusion: pd.DataFrame, title: str = "Colour answers vs ground truth") -> Figure:
    """Row-normalised confusion heatmap of a topic's answers (rows = truth, columns = answer; cell text = count),
    e.g. ``AnswerQuality.confusion("colour")`` from notebook 02."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    n_cols, n_rows = max(confusion.shape[1], 1), max(confusion.shape[0], 1)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * n_cols, 1.2 + 0.4 * n_rows))
    if confusion.size:
        share = confusion.div(confusion.sum(axis=1).replace(0, 1), axis=0)
        sns.heatmap(share, annot=confusion.to_numpy(), fmt="d", cmap="Blues", vmin=0, vmax=1, cbar=False, ax=ax,
                    annot_kws={"fontsize": 7})
    else:
        ax.text(0.5, 0.5, "no answers", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{title} (row share; numbers = counts)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- retrieval (04)


def variant_metrics(table: pd.DataFrame, metrics: tuple[str, ...] = ("top1", "top10", "mAP")) -> Figure:
    """Horizontal bars of ``metrics`` per variant row (``analysis.variant_table``), one panel per metric, with the
    95 % intervals where the table has them (``<metric>_lo`` / ``_hi``); oracle rows (ground truth the query photo
    does not give) are hatched and their names end in "[oracle]"."""
    import seaborn as sns

    shown = [m for m in metrics if m in table.columns]
    table = table.reset_index(drop=True).copy()
    oracle = table["oracle"].astype(bool) if "oracle" in table else pd.Series(False, index=table.index)
    table["row"] = [f"{n} [oracle]" if o else str(n) for n, o in zip(table["name"], oracle)]
    fig, axes = _figure(4.2 * max(1, len(shown)), 0.45 * max(2, len(table)) + 1.4, 1, max(1, len(shown)),
                        sharey=True)
    for ax, m in zip(axes[0], shown):
        sns.barplot(data=table, y="row", x=m, hue="model", dodge=False, ax=ax, orient="h")
        for container in ax.containers:
            ax.bar_label(container, fmt="%.2f", fontsize=7, padding=2)
        for patch in ax.patches:  # the bar's row is the category position at its centre
            row = int(round(patch.get_y() + patch.get_height() / 2))
            if 0 <= row < len(table) and oracle.iloc[row] and patch.get_width() > 0:
                patch.set_hatch("//")
        if f"{m}_lo" in table and f"{m}_hi" in table:
            lo, hi, val = table[f"{m}_lo"].to_numpy(float), table[f"{m}_hi"].to_numpy(float), table[m].to_numpy(float)
            ok = ~(np.isnan(lo) | np.isnan(hi))
            ax.errorbar(val[ok], np.arange(len(table))[ok], xerr=np.vstack([val - lo, hi - val])[:, ok],
                        fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.set(xlim=(0, 1.1), xlabel=m, ylabel="", title=m)
        if ax.get_legend() is not None and ax is not axes[0, -1]:
            ax.get_legend().remove()
    fig.suptitle("Retrieval quality per variant with 95 % intervals (item level unless the variant is 'image'; "
                 "[oracle] = upper bound)")
    return fig


def breakdown_heatmap(table: pd.DataFrame, metric: str = "hit1") -> Figure:
    """Heat maps of ``metric`` per variant × attribute value, one panel per attribute (``analysis.breakdowns``)."""
    import seaborn as sns

    attributes = list(dict.fromkeys(table["attribute"]))
    fig, axes = _figure(3.4 * max(1, len(attributes)) + 1, 0.42 * max(2, table["variant"].nunique()) + 1.6, 1,
                        max(1, len(attributes)), sharey=True)
    for i, (ax, attr) in enumerate(zip(axes[0], attributes)):
        sub = table[table["attribute"] == attr]
        grid = sub.pivot_table(index="variant", columns="label", values=metric, aggfunc="mean", sort=False)
        counts = sub.groupby("label", sort=False)["n"].max()
        grid.columns = [f"{c}\n(n={int(counts.get(c, 0))})" for c in grid.columns]
        sns.heatmap(grid, ax=ax, vmin=0, vmax=1, cmap="viridis", annot=True, fmt=".2f", annot_kws={"fontsize": 6},
                    cbar=i == len(attributes) - 1)
        ax.set(title=attr, xlabel="", ylabel="" if i else "variant")
        ax.tick_params(axis="x", labelsize=6, rotation=45 if attr == "category_name" else 0)
    fig.suptitle(f"{metric} by query attribute (item-level variants)")
    return fig


def breakdown_bars(table: pd.DataFrame, attribute: str, metric: str = "hit1") -> Figure:
    """Grouped bars of ``metric`` per value of one attribute, hue = variant."""
    import seaborn as sns

    sub = table[table["attribute"] == attribute]
    fig, axes = _figure(max(6.0, 1.1 * sub["label"].nunique() + 3), 3.8)
    ax = axes[0, 0]
    sns.barplot(data=sub, x="label", y=metric, hue="variant", ax=ax)
    ax.set(ylim=(0, 1.05), xlabel=attribute, ylabel=metric, title=f"{metric} by {attribute}")
    ax.legend(fontsize=6, loc="upper right")
    return fig


def category_error_share(table: pd.DataFrame) -> Figure:
    """Bar per variant: share of top-1 errors that retrieve the right category but the wrong item."""
    import seaborn as sns

    fig, axes = _figure(7, 0.4 * max(2, len(table)) + 1.2)
    ax = axes[0, 0]
    frame = table.assign(label=[f"{n} (errors: {e})" for n, e in zip(table["name"], table["n_top1_errors"])])
    sns.barplot(data=frame, y="label", x="right_category_wrong_item", hue="model", dodge=False, ax=ax, orient="h")
    for container in ax.containers:
        ax.bar_label(container, fmt="%.2f", fontsize=7, padding=2)
    ax.set(xlim=(0, 1.1), xlabel="share of top-1 errors with the right category", ylabel="",
           title="Right category, wrong item")
    return fig


def error_gallery(examples: pd.DataFrame, items: pd.DataFrame, title: str = "", max_side: int = 240) -> Figure:
    """Rows of failures (``analysis.error_examples``): the query (red box), its top-5 (green box = relevant,
    orange = wrong) and the true match (blue) with its rank. Item keys or image keys (image-level variants)."""
    by_key = items.set_index("key", drop=False)
    img_of = items.assign(image_key=items["split"] + "/" + items["image_id"].map(lambda i: f"{int(i):06d}"))
    by_image = {k: g for k, g in img_of.groupby("image_key")}

    def rows_for(key: str) -> tuple[str, pd.DataFrame, set[str]]:
        if key in by_key.index:
            row = by_key.loc[key]
            image_key = f"{row['split']}/{int(row['image_id']):06d}"
            return str(row["path"]), by_image[image_key], {key}
        g = by_image[key]
        return str(g["path"].iloc[0]), g, set(g.loc[g["style"] > 0, "key"])

    n = max(1, len(examples))
    fig, axes = _figure(2.2 * 7, 2.3 * n + 0.4, n, 7)
    if examples.empty:
        axes[0, 0].text(0.5, 0.5, "no top-1 failure", ha="center", va="center")
    for r, ex in enumerate(examples.itertuples(index=False)):
        path, boxes, hl = rows_for(ex.query_key)
        _draw_image(axes[r, 0], path, boxes, hl, "#e41a1c", f"QUERY {ex.query_key}\nAP {ex.ap:.2f}", max_side)
        for c in range(5):
            ax = axes[r, 1 + c]
            if c < len(ex.top_keys) and ex.top_keys[c] is not None:
                path, boxes, hl = rows_for(str(ex.top_keys[c]))
                ok = bool(ex.top_relevant[c])
                _draw_image(ax, path, boxes, hl, "#4daf4a" if ok else "#ff7f00",
                            f"#{c + 1} {ex.top_keys[c]}\n{'match' if ok else 'wrong'}", max_side)
            else:
                ax.set_axis_off()
        ax = axes[r, 6]
        if ex.match_key is not None and isinstance(ex.match_key, str):
            path, boxes, hl = rows_for(ex.match_key)
            rank = "not ranked" if pd.isna(ex.first_hit_rank) else f"rank {int(ex.first_hit_rank)}"
            _draw_image(ax, path, boxes, hl, "#377eb8", f"TRUE MATCH {ex.match_key}\n{rank}", max_side)
        else:
            ax.set_axis_off()
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(title or "Top-1 failures: query, its top 5, the true match and its rank")
    return fig


def sweep_metric(long: pd.DataFrame, varying: list[str], metrics: tuple[str, ...] = ("top1", "mAP"),
                 title: str = "") -> Figure:
    """Metric vs the first varying parameter (hue = the second, if any), one panel per metric
    (``runs.sweep.long_form``)."""
    import seaborn as sns

    shown = [m for m in metrics if m in set(long["metric"])]
    fig, axes = _figure(4.8 * max(1, len(shown)), 3.6, 1, max(1, len(shown)))
    if not shown or not varying:
        axes[0, 0].text(0.5, 0.5, "no finished runs with a varying parameter", ha="center", va="center")
        return fig
    x, hue = varying[0], (varying[1] if len(varying) > 1 else None)
    for ax, m in zip(axes[0], shown):
        sub = long[long["metric"] == m].copy()
        if hue:
            sub[hue] = sub[hue].astype(str)
        numeric = pd.api.types.is_numeric_dtype(sub[x])
        if numeric:
            sns.lineplot(data=sub, x=x, y="value", hue=hue, marker="o", ax=ax)
        else:
            sns.barplot(data=sub, x=x, y="value", hue=hue, ax=ax)
        ax.set(xlabel=x.removeprefix("param."), ylabel=m, title=m, ylim=(0, 1.05))
    fig.suptitle(title or "Sweep: metric vs parameter")
    return fig
