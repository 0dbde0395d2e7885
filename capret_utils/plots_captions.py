"""Seaborn figures for notebook 02 (captions): caption lengths and what the dialogue answer filter kept.

Kept apart from ``plots`` while that module is being written; the lead merges them. Functions take the caption
records (``CaptionStore.read()``) and return a matplotlib Figure.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from capret_utils.captions import caption_lengths, template_captions


def caption_length_figure(records: pd.DataFrame, items: pd.DataFrame | None = None) -> Any:
    """Histogram of words per caption for the stored captions and, given the items, their template captions."""
    import matplotlib.pyplot as plt
    import seaborn as sns

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


def answer_filter_figure(records: pd.DataFrame) -> Any:
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
