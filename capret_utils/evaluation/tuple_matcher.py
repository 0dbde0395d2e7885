"""The exact-tuple matcher: how much of retrieval the answer key alone solves.

The oracle caption variants of notebook 04 (template captions, the dialogue answered from ``attributes.jsonl``)
know an item's *captionable tuple* — category, colour, pattern and pattern colour: everything a template caption
or a scripted dialogue answer can say about the garment itself (viewpoint, occlusion, scale and zoom describe the
photo, not the item). This baseline uses nothing else: for each query it ranks the gallery items with the
query's exact tuple first, then all others; inside each of those two blocks the order is uniformly random.

Reported numbers are the **exact expectations** over that random order (no sampling, no seed), per query:

* hit@1 = ``p / g``, where ``g`` = gallery items with the query's tuple and ``p`` = relevant ones among them
  (``R / N`` — random ranking — when no gallery item has the tuple; ``R`` relevant items out of ``N``);
* AP = ``(1/R) * sum_k E[rel_k * hits(1..k)] / k`` over both blocks, with the pair probabilities of a uniformly
  random order (``p/g`` for one position, ``p(p-1) / (g(g-1))`` for two, and likewise in the second block);

averaged over the official item-level queries with at least one relevant gallery item (user items with
style > 0 against every shop item, :func:`capret_utils.evaluation.metrics.item_sets`). On the synthetic benchmark
an identity's tuple is fixed, so a query's positives always share its tuple and hit@1 = 1 / (number of
gallery identities' items with that tuple, as a share): it is 1 exactly when the tuple identifies the item.
Oracle caption rows above this number owe it to the answer key, not to the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from capret_utils.evaluation import metrics

TUPLE_FIELDS = ("category_id", "colour", "pattern", "pattern_colour")
"""The captionable tuple: the items table's ``category_id`` and the ``attributes.jsonl`` fields the answerer reads."""


def captionable_tuples(items: pd.DataFrame, attributes: Mapping[str, Mapping[str, Any]]) -> pd.Series:
    """One captionable tuple per items-table row (``category_id`` from the table, the rest from ``attributes``).

    An item without an attributes record raises ``KeyError`` counting them and naming the first few keys.
    """
    missing = [k for k in items["key"] if k not in attributes]
    if missing:
        raise KeyError(f"{len(missing)} of {len(items)} items have no record in attributes.jsonl, e.g. {missing[:3]}")
    rows = [(int(c), *(attributes[k].get(f) for f in TUPLE_FIELDS[1:]))
            for k, c in zip(items["key"], items["category_id"])]
    return pd.Series(rows, index=items.index, dtype=object, name="tuple")


def _expected_ap(p: int, g: int, q: int, m: int) -> float:
    """Expected AP when p of the first g ranks and q of the next m ranks are relevant, each block in uniformly
    random order (R = p + q > 0)."""
    total = 0.0
    if g:
        k = np.arange(1, g + 1, dtype=np.float64)
        pair = p * (p - 1) / (g * (g - 1)) if g > 1 else 0.0
        total += float(np.sum((p / g + (k - 1) * pair) / k))
    if m and q:
        j = np.arange(1, m + 1, dtype=np.float64)
        pair = q * (q - 1) / (m * (m - 1)) if m > 1 else 0.0
        total += float(np.sum((q * (p + 1) / m + (j - 1) * pair) / (g + j)))
    return total / (p + q)


def tuple_matcher(items: pd.DataFrame, attributes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Expected hit@1 and mAP of the exact-tuple matcher on one split's items table (see the module docstring).

    Returns ``top1``, ``mAP``, ``n_queries`` (with a positive), ``n_gallery``, ``unique_share`` (queries whose
    tuple no wrong gallery item has: hit@1 = 1) and ``mean_group`` (mean number of gallery items with the
    query's tuple).
    """
    queries, gallery = metrics.item_sets(items)
    q_lab, g_lab = metrics.item_labels(queries, gallery)
    q_tup = captionable_tuples(queries, attributes).to_numpy()
    g_tup = captionable_tuples(gallery, attributes).to_numpy()
    group_of: dict[tuple, list[int]] = {}
    for n, t in enumerate(g_tup):
        group_of.setdefault(t, []).append(n)
    pos_of: dict[int, int] = pd.Series(g_lab[g_lab >= 0]).value_counts().to_dict()
    n_gal = len(gallery)
    hits, aps, groups, unique = [], [], [], []
    for lab, t in zip(q_lab, q_tup):
        r = int(pos_of.get(int(lab), 0))
        if r == 0:
            continue
        members = group_of.get(t, [])
        g = len(members)
        p = int(np.sum(g_lab[members] == lab)) if g else 0
        hits.append(p / g if g else r / n_gal)
        aps.append(_expected_ap(p, g, r - p, n_gal - g))
        groups.append(g)
        unique.append(g > 0 and p == g)
    return {"top1": float(np.mean(hits)) if hits else float("nan"),
            "mAP": float(np.mean(aps)) if aps else float("nan"),
            "n_queries": len(hits), "n_gallery": n_gal,
            "unique_share": float(np.mean(unique)) if unique else float("nan"),
            "mean_group": float(np.mean(groups)) if groups else float("nan")}


def tuple_matcher_split(split_dir: str | os.PathLike, items: pd.DataFrame | None = None) -> dict[str, Any] | None:
    """:func:`tuple_matcher` on a split folder (its ``attributes.jsonl`` read as the dialogue answerer reads it);
    ``items`` defaults to the folder's items table. ``None`` when the folder has no ``attributes.jsonl`` (real
    DeepFashion2: no colour or pattern ground truth to match on)."""
    from capret_utils.captions import ATTRIBUTES_FILE, load_attributes
    from capret_utils.data import df2

    split_dir = Path(split_dir)
    if not (split_dir / ATTRIBUTES_FILE).is_file():
        return None
    if items is None:
        items = df2.load_items(split_dir)
    return tuple_matcher(items, load_attributes(split_dir))
