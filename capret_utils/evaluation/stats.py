"""Uncertainty and paired comparisons of retrieval results, over the evaluated queries.

* :func:`wilson_interval` — the 95 % Wilson score interval of a hit rate (hit@k), from scipy's ``binomtest``.
* :func:`bootstrap_interval` — a seeded percentile bootstrap interval of a mean over queries (mAP = mean AP).
* :func:`mcnemar_exact` — the exact McNemar test of two systems' hit@1 on the same queries: a two-sided binomial
  test of the discordant queries (won by one system, lost by the other) at p = 0.5.
* :func:`paired_bootstrap_delta` — the difference of two systems' means over the same queries, with a seeded
  paired bootstrap interval (queries resampled jointly).
* :func:`compare` / :func:`compare_to_baseline` — the per-variant comparison with a baseline that notebook 04's
  variant table reports (queries flipped each way, p for hit@1, ΔmAP with its interval).

Every function drops queries that were not evaluated (NaN / <NA>, e.g. a query with no relevant gallery item).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

CONFIDENCE = 0.95
N_RESAMPLES = 2000


def _as_float(values: Any) -> np.ndarray:
    return pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)


def wilson_interval(hits: Any, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of the mean of 0/1 ``hits`` (NaN entries dropped); (nan, nan) without queries."""
    h = _as_float(hits)
    h = h[~np.isnan(h)]
    if not len(h):
        return float("nan"), float("nan")
    ci = sps.binomtest(int(h.sum()), len(h)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _percentile(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    return float(np.quantile(samples, alpha)), float(np.quantile(samples, 1 - alpha))


def _resampled_means(values: np.ndarray, seed: int, n_resamples: int, chunk: int = 128) -> np.ndarray:
    """Means of ``n_resamples`` seeded resamples (with replacement) of ``values``, drawn ``chunk`` resamples at a
    time: memory stays ``chunk x n`` whatever the query count (12 k queries on DeepFashion2), and the draws are the
    same as one ``(n_resamples, n)`` draw, since the generator fills rows in order."""
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        means[start:start + rows] = values[rng.integers(0, len(values), size=(rows, len(values)))].mean(axis=1)
    return means


def bootstrap_interval(values: Any, seed: int = 0, confidence: float = CONFIDENCE,
                       n_resamples: int = N_RESAMPLES) -> tuple[float, float]:
    """Seeded percentile bootstrap interval of the mean of ``values`` over queries (NaN dropped)."""
    v = _as_float(values)
    v = v[~np.isnan(v)]
    if not len(v):
        return float("nan"), float("nan")
    return _percentile(_resampled_means(v, seed, n_resamples), confidence)


def _paired(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_float(a), _as_float(b)
    if x.shape != y.shape:
        raise ValueError(f"paired comparison needs the same queries on both sides, got {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def mcnemar_exact(a: Any, b: Any) -> dict[str, Any]:
    """Exact McNemar test of 0/1 outcomes ``a`` and ``b`` on the same queries.

    Returns ``only_a`` (queries ``a`` gets right and ``b`` wrong), ``only_b``, ``n`` (paired queries) and the
    two-sided ``p`` (1.0 when no query is discordant).
    """
    x, y = _paired(a, b)
    only_a, only_b = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    discordant = only_a + only_b
    p = float(sps.binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0
    return {"only_a": only_a, "only_b": only_b, "n": int(len(x)), "p": p}


def paired_bootstrap_delta(a: Any, b: Any, seed: int = 0, confidence: float = CONFIDENCE,
                           n_resamples: int = N_RESAMPLES) -> dict[str, float]:
    """mean(a) - mean(b) over the same queries, with a seeded paired bootstrap interval (``lo``, ``hi``)."""
    x, y = _paired(a, b)
    if not len(x):
        return {"delta": float("nan"), "lo": float("nan"), "hi": float("nan")}
    d = x - y
    lo, hi = _percentile(_resampled_means(d, seed, n_resamples), confidence)
    return {"delta": float(d.mean()), "lo": lo, "hi": hi}


def compare(a: pd.DataFrame, b: pd.DataFrame, seed: int = 0, key: str = "query_key") -> dict[str, Any]:
    """Variant ``a`` against variant ``b`` (per-query tables with ``key``, ``hit@1`` and ``ap``), matched on
    ``key``: queries flipped each way at hit@1, the exact McNemar p, and ΔmAP with its paired interval."""
    joined = a[[key, "hit@1", "ap"]].merge(b[[key, "hit@1", "ap"]], on=key, suffixes=("_a", "_b"))
    if len(joined) != len(a) or len(joined) != len(b):
        raise ValueError(f"the two per-query tables cover different queries ({len(a)} / {len(b)} rows, "
                         f"{len(joined)} shared on {key!r})")
    test = mcnemar_exact(joined["hit@1_a"], joined["hit@1_b"])
    delta = paired_bootstrap_delta(joined["ap_a"], joined["ap_b"], seed=seed)
    return {"won": test["only_a"], "lost": test["only_b"], "p_top1": test["p"],
            "delta_mAP": delta["delta"], "delta_mAP_lo": delta["lo"], "delta_mAP_hi": delta["hi"]}


def compare_to_baseline(per_query: pd.DataFrame, names: Sequence[str], baseline_of: dict[str, str],
                        seed: int = 0) -> pd.DataFrame:
    """One row per variant name in ``names`` whose ``baseline_of[name]`` is another evaluated variant: the
    :func:`compare` columns against that baseline (``per_query`` holds all variants, column ``variant``)."""
    rows = []
    for name in names:
        base = baseline_of.get(name)
        if not base or base == name:
            continue
        a, b = per_query[per_query["variant"] == name], per_query[per_query["variant"] == base]
        if not len(a) or not len(b):
            continue
        rows.append({"name": name, "baseline": base, **compare(a, b, seed=seed)})
    return pd.DataFrame(rows)
