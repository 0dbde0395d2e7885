"""capret_utils.evaluation.stats against hand-computed cases and a naive bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from capret_utils.evaluation import stats as S


def test_wilson_matches_the_closed_form():
    k, n, z = 9, 10, sps.norm.ppf(0.975)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    lo, hi = S.wilson_interval([1] * 9 + [0] + [np.nan])
    assert lo == pytest.approx(centre - half, abs=1e-9) and hi == pytest.approx(centre + half, abs=1e-9)
    assert all(math.isnan(v) for v in S.wilson_interval([]))


def test_mcnemar_exact_by_hand():
    # a wins 6 queries, b wins 1, 3 tie: p = 2 * P(X <= 1 | n=7, 0.5) = 2 * 8/128 = 0.125
    a = [1] * 6 + [0] + [1, 1, 0]
    b = [0] * 6 + [1] + [1, 1, 0]
    out = S.mcnemar_exact(a, b)
    assert out == {"only_a": 6, "only_b": 1, "n": 10, "p": pytest.approx(0.125)}
    assert S.mcnemar_exact([1, 0], [1, 0])["p"] == 1.0
    # NaN (not evaluated) queries drop out of both sides
    assert S.mcnemar_exact([1, np.nan, 0], [0, 1, 0])["n"] == 2


def test_bootstrap_intervals_are_seeded_and_cover_the_mean():
    rng = np.random.default_rng(3)
    v = rng.random(200)
    lo, hi = S.bootstrap_interval(v, seed=1)
    assert lo < v.mean() < hi and (lo, hi) == S.bootstrap_interval(v, seed=1)
    # naive reference: the same resampling written as a loop
    r = np.random.default_rng(1)
    idx = r.integers(0, len(v), size=(S.N_RESAMPLES, len(v)))
    means = np.array([v[row].mean() for row in idx])
    assert (lo, hi) == (pytest.approx(np.quantile(means, 0.025)), pytest.approx(np.quantile(means, 0.975)))


def test_paired_delta_and_compare():
    a = pd.DataFrame({"query_key": list("abcd"), "hit@1": [1, 1, 0, 1], "ap": [1.0, 0.5, 0.2, 1.0]})
    b = pd.DataFrame({"query_key": list("dcba"), "hit@1": [0, 0, 1, 1], "ap": [0.5, 0.2, 0.5, 1.0]})
    out = S.compare(a, b)
    # matched on the key: a wins d, b wins nothing; ΔAP per query = 0, 0, 0, 0.5
    assert (out["won"], out["lost"]) == (1, 0) and out["p_top1"] == pytest.approx(1.0)
    assert out["delta_mAP"] == pytest.approx(0.125)
    assert out["delta_mAP_lo"] <= 0.125 <= out["delta_mAP_hi"]
    with pytest.raises(ValueError, match="different queries"):
        S.compare(a, b.iloc[:3])
    same = S.paired_bootstrap_delta([0.3, 0.3], [0.3, 0.3])
    assert same == {"delta": 0.0, "lo": 0.0, "hi": 0.0}


def test_compare_to_baseline_rows():
    pq = pd.concat([
        pd.DataFrame({"variant": "crop", "query_key": list("ab"), "hit@1": [1, 0], "ap": [1.0, 0.2]}),
        pd.DataFrame({"variant": "crop+t", "query_key": list("ab"), "hit@1": [1, 1], "ap": [1.0, 1.0]}),
    ])
    table = S.compare_to_baseline(pq, ["crop", "crop+t"], {"crop": "crop", "crop+t": "crop"})
    assert list(table["name"]) == ["crop+t"] and table["won"].iloc[0] == 1
    assert table["delta_mAP"].iloc[0] == pytest.approx(0.4)
