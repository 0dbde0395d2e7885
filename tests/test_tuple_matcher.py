"""capret_utils.evaluation.tuple_matcher: the exact-tuple matcher's expected hit@1 / mAP against a hand-computed
case and a brute-force average over every order of the random blocks."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest

from capret_utils.evaluation import tuple_matcher as T

A = {"colour": "red", "pattern": "solid", "pattern_colour": None}
B = {"colour": "blue", "pattern": "solid", "pattern_colour": None}
C = {"colour": "red", "pattern": "checks", "pattern_colour": "white"}


def _case() -> tuple[pd.DataFrame, dict]:
    rows = [  # key, source, pair_id, style, category_id, attributes
        ("g0", "shop", 1, 1, 1, A), ("g1", "shop", 2, 1, 1, A), ("g2", "shop", 3, 1, 1, B),
        ("g3", "shop", 3, 0, 8, C),
        ("q0", "user", 1, 1, 1, A),  # 2 gallery items share A, 1 is right: hit@1 1/2, AP (1 + 1/2) / 2
        ("q1", "user", 3, 1, 1, B),  # B is unique: hit@1 1, AP 1
        ("q2", "user", 4, 1, 1, A),  # no relevant gallery item: not evaluated
        ("q3", "user", 3, 0, 1, A),  # style 0: not a query
    ]
    items = pd.DataFrame([r[:5] for r in rows], columns=["key", "source", "pair_id", "style", "category_id"])
    return items, {r[0]: {"key": r[0], **r[5]} for r in rows}


def test_hand_computed_case():
    items, attrs = _case()
    out = T.tuple_matcher(items, attrs)
    assert out["top1"] == pytest.approx((1 / 2 + 1) / 2)
    assert out["mAP"] == pytest.approx((0.75 + 1) / 2)
    assert out["n_queries"] == 2 and out["n_gallery"] == 4
    assert out["unique_share"] == 0.5 and out["mean_group"] == 1.5


def test_query_whose_tuple_no_gallery_item_has_is_ranked_at_random():
    items, attrs = _case()
    attrs["q1"] = {"key": "q1", **C}  # category 1 + C: no gallery item (g3 is category 8) -> a random ranking
    out = T.tuple_matcher(items, attrs)
    random_ap = sum(1 / k for k in range(1, 5)) / 4  # R = 1 of N = 4 at a uniformly random rank
    assert out["top1"] == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert out["mAP"] == pytest.approx((0.75 + random_ap) / 2)


@pytest.mark.parametrize("p,g,q,m", [(1, 3, 0, 4), (2, 3, 1, 3), (0, 2, 2, 3), (3, 3, 1, 1), (1, 1, 2, 4)])
def test_expected_ap_matches_brute_force(p, g, q, m):
    def ap(rel):
        ranks = [k + 1 for k, r in enumerate(rel) if r]
        return sum(i / r for i, r in enumerate(ranks, 1)) / len(ranks)

    first = set(itertools.permutations([1] * p + [0] * (g - p)))
    second = set(itertools.permutations([1] * q + [0] * (m - q)))
    brute = sum(ap(a + b) for a in first for b in second) / (len(first) * len(second))
    assert T._expected_ap(p, g, q, m) == pytest.approx(brute)
    assert math.isclose(T._expected_ap(1, 1, 0, 5), 1.0)


def test_missing_attributes_are_named():
    items, attrs = _case()
    del attrs["g2"]
    with pytest.raises(KeyError, match=r"1 of 4 items have no record in attributes.jsonl, e.g. \['g2'\]"):
        T.tuple_matcher(items, attrs)


def test_split_without_attributes_file_gives_none(tmp_path):
    assert T.tuple_matcher_split(tmp_path) is None
