"""Embedding extraction against direct model calls, hand-set box heads, the ITM hook and the .npy cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny_bundle import make_tiny_bundle

from capret_utils.data import df2
from capret_utils.data.loader import ImageStore
from capret_utils.evaluation import embed as E
from capret_utils.evaluation import metrics
from capret_utils.x2vlm import X2VLMModel


@pytest.fixture(scope="module")
def val_items(smoke_root):
    return df2.load_items(smoke_root / "validation")


@pytest.fixture(scope="module")
def bundle():
    return make_tiny_bundle()


def _direct(bundle, images):
    pv = torch.from_numpy(np.stack([bundle.processor.process_one(im, train=False)[0] for im in images]))
    with torch.no_grad():
        return bundle.model.get_image_embeds(pv)


def test_crop_embeddings_match_direct_model_calls(bundle, val_items):
    cfg = E.EmbedConfig(view="crop", batch_size=4, progress=False)
    keys, emb = E.embed_items(val_items, bundle, cfg)
    assert keys == list(val_items["key"]) and emb.dtype == np.float32
    assert emb.shape == (len(val_items), bundle.model.config.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    store = ImageStore(64)
    _, feat = _direct(bundle, [store.crop(r, 0.1) for r in val_items.to_dict("records")])
    np.testing.assert_allclose(emb, feat.numpy(), atol=1e-5)
    # batch size does not change the result
    _, emb2 = E.embed_items(val_items, bundle, E.EmbedConfig(view="crop", batch_size=64, progress=False))
    np.testing.assert_allclose(emb, emb2, atol=1e-5)


def test_whole_image_view_gives_equal_rows_for_one_photo(bundle, val_items):
    _, emb = E.embed_items(val_items, bundle, E.EmbedConfig(view="image", progress=False))
    same = val_items.groupby("path").indices
    multi = [rows for rows in same.values() if len(rows) > 1]
    assert multi, "the smoke benchmark has photos with several items"
    for rows in multi:
        np.testing.assert_allclose(emb[rows], np.repeat(emb[rows[:1]], len(rows), 0), atol=1e-6)
    images, _ = metrics.image_sets(val_items)
    ikeys, iemb = E.embed_images(images, bundle, E.EmbedConfig(progress=False))
    assert ikeys == list(images["key"]) and iemb.shape == (len(images), bundle.model.config.embed_dim)


def _constant_box_head(model: X2VLMModel, cx: float, cy: float, w: float, h: float) -> None:
    last = model.bbox_head[3]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.logit(torch.tensor([cx, cy, w, h])))


def test_predicted_boxes_hand_computed(bundle, val_items):
    state = {k: v.clone() for k, v in bundle.model.bbox_head.state_dict().items()}
    try:
        _constant_box_head(bundle.model, 0.5, 0.5, 0.5, 0.5)
        boxes = E.predict_boxes(val_items, bundle, config=E.EmbedConfig(progress=False))
        W, H = val_items["width"].to_numpy(), val_items["height"].to_numpy()
        expected = np.stack([0.25 * W, 0.25 * H, 0.75 * W, 0.75 * H], 1)
        np.testing.assert_allclose(boxes, expected, rtol=1e-4)
        # a predicted crop view = crop of that box (+ context)
        sub = val_items.head(3)
        _, emb = E.embed_items(sub, bundle, E.EmbedConfig(view="predicted", progress=False))
        moved = sub.copy()
        moved[["x1", "y1", "x2", "y2"]] = expected[:3]
        _, ref = E.embed_items(moved, bundle, E.EmbedConfig(view="crop", progress=False, batch_size=1))
        np.testing.assert_allclose(emb, ref, atol=1e-5)
    finally:
        bundle.model.bbox_head.load_state_dict(state)


def test_late_and_cross_fusion(bundle, val_items):
    texts = [f"a {c}" for c in val_items["category_name"]]
    cfg = E.EmbedConfig(view="crop", progress=False)
    _, img = E.embed_items(val_items, bundle, cfg)
    txt = E.embed_texts(texts, bundle)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1.0, atol=1e-5)
    _, late = E.embed_items(val_items, bundle, E.EmbedConfig(fusion="late", alpha=0.5, progress=False), texts)
    ref = img + 0.5 * txt
    np.testing.assert_allclose(late, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    _, cross = E.embed_items(val_items, bundle, E.EmbedConfig(fusion="cross", progress=False), texts)
    store = ImageStore(64)
    embeds, _ = _direct(bundle, [store.crop(r, 0.1) for r in val_items.to_dict("records")])
    enc = bundle.tokenizer(texts)
    with torch.no_grad():
        te = bundle.model.get_text_embeds(enc["input_ids"], enc["attention_mask"])
        fused = bundle.model.get_fusion_embeds(te, enc["attention_mask"], embeds)
        manual = F.normalize(bundle.model.text_proj(fused[:, 0]), dim=-1).numpy()
    np.testing.assert_allclose(cross, manual, atol=1e-5)
    with pytest.raises(ValueError, match="one text per item"):
        E.embed_items(val_items, bundle, E.EmbedConfig(fusion="late", progress=False))


def test_itm_reranker_scores_and_metrics_hook(bundle, val_items):
    queries, gallery = metrics.item_sets(val_items)
    qtexts = list(queries["category_name"])
    cfg = E.EmbedConfig(progress=False, batch_size=5)
    scorer = E.ITMReranker(bundle, qtexts, gallery, cfg)
    cand = np.array([[0, 1, -1], [2, 0, 1]])
    scores = scorer(np.array([0, 1]), cand)
    assert scores.shape == (2, 3) and np.isneginf(scores[0, 2])
    store = ImageStore(64)
    grow = gallery.to_dict("records")
    for i, j in [(0, 0), (1, 2)]:
        q, g = [0, 1][i], cand[i, j]
        embeds, _ = _direct(bundle, [store.crop(grow[g], 0.1)])
        enc = bundle.tokenizer([qtexts[q]])
        with torch.no_grad():
            te = bundle.model.get_text_embeds(enc["input_ids"], enc["attention_mask"])
            fused = bundle.model.get_fusion_embeds(te, enc["attention_mask"],
                                                   embeds.to(torch.float16).to(torch.float32))
            expected = bundle.model.itm_logits(fused)[0, 1].item()
        assert scores[i, j] == pytest.approx(expected, abs=1e-4)
    _, q = E.embed_items(queries, bundle, cfg)
    _, g = E.embed_items(gallery, bundle, cfg)
    res = metrics.evaluate_items(q, g, queries, gallery, ks=(1, 2), rerank=scorer, rerank_k=4,
                                 config=metrics.EvalConfig(progress=False))
    assert res.metrics["rerank_k"] == 4 and 0 <= res.metrics["mAP"] <= 1


def test_embedding_then_training_still_works(bundle, val_items):
    """Embedding must not leave inference tensors behind (HF BEiT caches its relative position index)."""
    E.embed_items(val_items.head(2), bundle, E.EmbedConfig(progress=False))
    model = bundle.model.train()
    try:
        _, feat = model.get_image_embeds(torch.randn(2, 3, 32, 32))
        feat.sum().backward()
        assert model.vision_proj.weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_save_load_and_cache(tmp_path):
    keys = ["a", "b", "c"]
    arr = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    path = E.save_embeddings(tmp_path, "gallery_crop", keys, arr)
    assert path.name == "gallery_crop.npy" and (tmp_path / "gallery_crop.keys.json").is_file()
    k2, a2 = E.load_embeddings(tmp_path, "gallery_crop")
    assert k2 == keys and np.array_equal(a2, arr)
    calls = []

    def compute():
        calls.append(1)
        return ["a", "b"], arr[:2]

    assert E.cached_embeddings(tmp_path, "gallery_crop", keys, compute)[0] == keys and not calls
    got_keys, got = E.cached_embeddings(tmp_path, "gallery_crop", ["a", "b"], compute)
    assert calls == [1] and got_keys == ["a", "b"] and got.shape == (2, 4)
    with pytest.raises(ValueError, match="keys for"):
        E.save_embeddings(tmp_path, "x", ["a"], arr)
    with pytest.raises(FileNotFoundError):
        E.load_embeddings(tmp_path, "missing")
    with pytest.raises(ValueError, match="plain file stem"):
        E.save_embeddings(tmp_path, "../x", keys, arr)


def test_embed_config_validation():
    with pytest.raises(ValueError, match="view"):
        E.EmbedConfig(view="mask").validate()
    with pytest.raises(ValueError, match="fusion"):
        E.EmbedConfig(fusion="early").validate()


def test_itm_scores_share_each_caption_across_its_candidates_and_equal_one_pair_at_a_time(bundle, val_items):
    """Blocks of queries (caption encoded once, k fusion pairs) give the scores of a naive one-pair-per-forward loop,
    whatever the block size (smaller than k, or several queries), with empty slots -inf."""
    queries, gallery = metrics.item_sets(val_items)
    qtexts = [f"{c} with a long description number {i}" * (1 + i % 3) for i, c in enumerate(queries["category_name"])]
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.standard_normal((len(gallery), 5, bundle.model.config.vision_width))
                              .astype(np.float16))
    rows = np.arange(min(6, len(queries)))
    cand = rng.integers(0, len(gallery), size=(len(rows), 4))
    cand[1, 2] = cand[4, 0] = -1
    naive = np.full(cand.shape, -np.inf, dtype=np.float32)
    with torch.no_grad():
        for i, j in zip(*np.nonzero(cand >= 0)):
            enc = bundle.tokenizer([qtexts[rows[i]]])
            te = bundle.model.get_text_embeds(enc["input_ids"], enc["attention_mask"])
            fused = bundle.model.get_fusion_embeds(te, enc["attention_mask"], tokens[[cand[i, j]]].float())
            naive[i, j] = bundle.model.itm_logits(fused)[0, 1].item()
    for batch_size in (1, 4, 9, 64):
        got = E.itm_scores(bundle, qtexts, rows, cand, lambda r: tokens[torch.as_tensor(r)],
                           E.EmbedConfig(batch_size=batch_size, bf16=False, progress=False))
        np.testing.assert_allclose(got, naive, atol=1e-4)


def test_tta_contexts_average_the_normalised_features_of_each_crop_context(bundle, val_items):
    """Crop TTA equals the naive reference: one embedding pass per context, features summed and renormalised; the
    bundle's ``tta_contexts`` is the default, an explicit () turns it off, whole photos never get it."""
    cfg = dict(view="crop", batch_size=3, progress=False, num_workers=0)
    store = ImageStore(64, draft=False)  # full decodes: every context's crop equals its own crop()
    _, at_01 = E.embed_items(val_items, bundle, E.EmbedConfig(context=0.1, tta_contexts=(), **cfg), store=store)
    _, at_0 = E.embed_items(val_items, bundle, E.EmbedConfig(context=0.0, tta_contexts=(), **cfg), store=store)
    _, at_02 = E.embed_items(val_items, bundle, E.EmbedConfig(context=0.2, tta_contexts=(), **cfg), store=store)
    expected = at_01 + at_0 + at_02
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    _, tta = E.embed_items(val_items, bundle, E.EmbedConfig(context=0.1, tta_contexts=(0.0, 0.2), **cfg),
                           store=store)
    np.testing.assert_allclose(tta, expected, atol=1e-5)
    assert not np.allclose(tta, at_01, atol=1e-3)
    info = dict(bundle.info)
    try:
        bundle.info["tta_contexts"] = [0.0, 0.2]
        _, default = E.embed_items(val_items, bundle, E.EmbedConfig(context=0.1, **cfg), store=store)
        _, off = E.embed_items(val_items, bundle, E.EmbedConfig(context=0.1, tta_contexts=(), **cfg), store=store)
        assert E.tta_tag(bundle, E.EmbedConfig()) == "-tta0_0.2" and E.tta_tag(bundle, E.EmbedConfig(view="image")) == ""
    finally:
        bundle.info.clear()
        bundle.info.update(info)
    np.testing.assert_allclose(default, expected, atol=1e-5)
    np.testing.assert_allclose(off, at_01, atol=1e-6)
    assert E.tta_contexts(bundle, E.EmbedConfig(view="image", tta_contexts=(0.0,))) == ()


def test_image_features_of_a_tta_stack_keep_the_first_views_tokens(bundle, val_items):
    store = ImageStore(64)
    rows = val_items.head(3).to_dict("records")
    crops = [store.crop_contexts(r, (0.1, 0.0)) for r in rows]
    for r, (a, b) in zip(rows, crops):  # one decode: the first crop is crop()'s, the others equal theirs undrafted
        assert np.array_equal(np.asarray(a), np.asarray(store.crop(r, 0.1)))
        assert np.array_equal(np.asarray(ImageStore(64, draft=False).crop_contexts(r, (0.1, 0.0))[1]),
                              np.asarray(ImageStore(64, draft=False).crop(r, 0.0)))
    stack = torch.stack([torch.stack([torch.from_numpy(bundle.processor.process_one(im, train=False)[0]) for im in c])
                         for c in crops])
    with torch.no_grad():
        embeds, feat = E.image_features(bundle.model, stack)
    first_embeds, first = _direct(bundle, [c[0] for c in crops])
    _, second = _direct(bundle, [c[1] for c in crops])
    torch.testing.assert_close(embeds, first_embeds)
    torch.testing.assert_close(feat, F.normalize(first + second, dim=-1))
