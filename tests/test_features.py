"""Embed once per view (capret_utils.evaluation.features): the same numbers as embed_items / ITMReranker, one
decode pass per view, a second call decodes nothing, and ITM re-ranking reads only the candidates' tokens."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_bundle import make_tiny_bundle

from capret_utils.data import df2
from capret_utils.evaluation import embed as E
from capret_utils.evaluation import features as FT
from capret_utils.evaluation import metrics


@pytest.fixture(scope="module")
def val_items(smoke_root):
    return df2.load_items(smoke_root / "validation")


@pytest.fixture(scope="module")
def bundle():
    return make_tiny_bundle()


def test_one_pass_gives_every_fusion_and_a_second_call_decodes_nothing(bundle, val_items, tmp_path):
    cfg = E.EmbedConfig(view="crop", batch_size=4, progress=False, num_workers=0)
    texts = [f"a {c}" for c in val_items["category_name"]]
    FT.DECODE_PASSES.clear()
    fv = FT.view_features(val_items, bundle, cfg, tmp_path, "v", tokens=True)
    assert FT.DECODE_PASSES == ["v"] and fv.tokens.shape[0] == len(val_items) and fv.tokens.dtype == np.float16
    _, plain = E.embed_items(val_items, bundle, cfg)
    np.testing.assert_allclose(fv.feats, plain, atol=1e-5)
    _, late = E.embed_items(val_items, bundle, E.EmbedConfig(view="crop", fusion="late", batch_size=4,
                                                             progress=False, num_workers=0), texts=texts)
    np.testing.assert_allclose(FT.fused(fv, texts, "late", bundle, cfg), late, atol=1e-5)
    _, cross = E.embed_items(val_items, bundle, E.EmbedConfig(view="crop", fusion="cross", batch_size=4,
                                                              progress=False, num_workers=0), texts=texts)
    np.testing.assert_allclose(FT.fused(fv, texts, "cross", bundle, cfg), cross, atol=5e-3)  # tokens in float16
    again = FT.view_features(val_items, bundle, cfg, tmp_path, "v", tokens=True)
    assert FT.DECODE_PASSES == ["v"] and np.array_equal(again.feats, fv.feats)
    # other keys (another split) are not served from the files of this one
    FT.view_features(val_items.iloc[:3], bundle, cfg, tmp_path, "v")
    assert FT.DECODE_PASSES == ["v", "v"]
    with pytest.raises(ValueError, match="tokens"):
        FT.cross_fusion(FT.ViewFeatures(fv.keys, fv.feats), texts, bundle, cfg)


def test_token_reranker_equals_the_decoding_reranker(bundle, val_items, tmp_path):
    queries, gallery = metrics.item_sets(val_items)
    qtexts = list(queries["category_name"])
    cfg = E.EmbedConfig(progress=False, batch_size=5, num_workers=0)
    old = E.ITMReranker(bundle, qtexts, gallery, cfg)
    fg = FT.view_features(gallery, bundle, cfg, tmp_path, "g", tokens=True)
    new = FT.TokenITMReranker(bundle, qtexts, fg, cfg)
    cand = np.array([[0, 1, -1], [2, 0, 1], [len(gallery) - 1, 0, 2]])
    rows = np.array([0, 1, min(2, len(queries) - 1)])
    a, b = old(rows, cand), new(rows, cand)
    assert np.isneginf(b[0, 2]) and np.isneginf(a[0, 2])
    np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=1e-4)
