"""Notebook 04's per-query results in FiftyOne: each variant's columns on the query items and the saved failure
views (``failures-top<k>-<variant>``, ``worst-ap-<variant>``, ``top<k>-<a>-not-<b>``), built from the tables of
:mod:`capret_utils.evaluation.analysis`."""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd

from capret_utils.evaluation.analysis import TABLE_KS


def fo_results(per_query: pd.DataFrame, variant: str, ks: Sequence[int] = TABLE_KS) -> pd.DataFrame:
    """The per-query columns written into FiftyOne for one variant (key column ``key``)."""
    rows = per_query[per_query["variant"] == variant]
    out = pd.DataFrame({"key": rows["query_key"].astype(str).to_numpy()})
    out["topk_keys"] = [list(v) for v in rows["top_keys"]]
    out["topk_scores"] = [[float(x) for x in v] for v in rows["top_scores"]]
    out["first_hit_rank"] = [None if pd.isna(v) else int(v) for v in rows["first_hit_rank"]]
    for k in ks:
        out[f"hit_at_{k}"] = [None if pd.isna(v) else bool(v) for v in rows[f"hit@{k}"]]
    out["ap"] = [None if pd.isna(v) else float(v) for v in rows["ap"]]
    out["variant"] = variant
    return out


def write_fiftyone(dataset: Any, per_query: pd.DataFrame, table: pd.DataFrame, k: int = 10, worst: int = 50,
                   compare: Sequence[tuple[str, str]] = ()) -> dict[str, int]:
    """Attach every variant's per-query results to ``dataset`` and save the failure views; returns
    ``{saved view name: number of samples/patches}``."""
    from capret_utils.viz import fo as cfo

    views: dict[str, int] = {}
    levels = dict(zip(table["name"], table["level"]))
    index = cfo.item_index(dataset)  # once: writing results adds attributes, not detections
    for name, level in levels.items():  # every label first: the views saved below are current when saved
        cfo.attach_results(dataset, fo_results(per_query, name), name, level=level, refresh=False, declare=False,
                           index=index)
    cfo.declare_item_fields(dataset)  # one schema change for every variant's attributes
    for name, level in levels.items():
        views.update(cfo.save_failure_views(dataset, name, level=level, k=k, worst=worst))
    for a, b in compare:
        if a in levels and b in levels and levels[a] == levels[b]:
            views.update(cfo.save_comparison_view(dataset, a, b, level=levels[a], k=k))
    cfo.refresh_saved_views(dataset, skip=views)  # only the older generated views (query-items, earlier runs')
    return views


def default_comparisons(table: pd.DataFrame, variant: str = "crop") -> list[tuple[str, str]]:
    """Pairs for "match in the top-k of one but not the other": fine-tuned vs zero-shot (both ways) on ``variant``,
    and fine-tuned ``variant`` vs each other fine-tuned item-level variant (both ways)."""
    names = set(table["name"])
    pairs = []
    ft, zs = f"fine-tuned/{variant}", f"zero-shot/{variant}"
    if ft in names and zs in names:
        pairs += [(ft, zs), (zs, ft)]
    base = ft if ft in names else zs
    model = base.split("/")[0]
    for other in table[(table["model"] == model) & (table["level"] == "item")]["name"]:
        if other != base:
            pairs += [(other, base), (base, other)]
    return pairs
