"""Datasets over the items table: labels, texts, crops, box targets, P×K sampling (on the smoke benchmark)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from capret_utils.captions import item_texts
from capret_utils.data import df2
from capret_utils.data import loader as D
from capret_utils.x2vlm import build_wordpiece_tokenizer, fashion_caption_corpus


@pytest.fixture(scope="module")
def train_items(smoke_root):
    return df2.load_items(smoke_root / "train")


def test_identity_classes_and_labels(train_items):
    classes = D.identity_classes(train_items)
    expected = sorted({f"{p}:{s}" for p, s in zip(train_items["pair_id"], train_items["style"]) if s > 0})
    assert classes == expected
    labels = D.identity_labels(train_items, classes)
    for row, lab in zip(train_items.itertuples(), labels):
        if row.style == 0:
            assert lab == -1
        else:
            assert classes[lab] == f"{row.pair_id}:{row.style}"
    # an identity unseen in training maps to -1
    other = train_items.head(1).assign(pair_id=999_999, style=1)
    assert D.identity_labels(other, classes).tolist() == [-1]


def test_item_texts_modes(train_items):
    assert item_texts(train_items, "none") == list(train_items["category_name"])
    template = item_texts(train_items, "template")
    assert template[0].startswith(f"An image of a {train_items['category_name'].iloc[0]}")
    caps = {k: f"caption {i}" for i, k in enumerate(train_items["key"])}
    assert item_texts(train_items, "dialogue", caps)[3] == "caption 3"
    del caps[train_items["key"].iloc[5]], caps[train_items["key"].iloc[7]]
    with pytest.raises(KeyError, match=rf"2 of {len(train_items)} items have no caption"):
        item_texts(train_items, "dialogue", caps)
    with pytest.raises(ValueError, match="caption store"):
        item_texts(train_items, "dialogue", None)
    with pytest.raises(ValueError, match="use_captions"):
        item_texts(train_items, "llm")


def test_text_ids_group_identical_cleaned_texts():
    tok = build_wordpiece_tokenizer(fashion_caption_corpus(), 256)
    ids = D.text_ids(["A red skirt.", "a red skirt", "a blue skirt"], tok)
    assert ids[0] == ids[1] != ids[2]


def test_crop_box_hand_computed():
    row = {"key": "k", "x1": 10.0, "y1": 20.0, "x2": 50.0, "y2": 80.0}
    assert D.crop_box(row, 0.1, 100, 100) == (6, 14, 54, 86)
    assert D.crop_box(row, 0.5, 60, 90) == (0, 0, 60, 90)  # clamped to the image
    assert D.crop_box(row, 0.0, 100, 100) == (10, 20, 50, 80)
    with pytest.raises(ValueError, match="empty box"):
        D.crop_box({**row, "x2": 10.0}, 0.1, 100, 100)


def test_image_store_same_pixels_with_and_without_cache(train_items):
    row = train_items.iloc[2].to_dict()
    cached, plain = D.ImageStore(48, cache_mb=1, draft=False), D.ImageStore(48, cache_mb=0, draft=False)
    a, b = cached.crop(row, 0.1), plain.crop(row, 0.1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert max(a.size) <= 48
    with Image.open(row["path"]) as im:
        ref = im.convert("RGB").crop(D.crop_box(row, 0.1, im.width, im.height))
    ref.thumbnail((48, 48), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(a), np.asarray(ref))
    assert cached.crop(row, 0.1) is a and len(cached) == 1
    image, factor = cached.image(row)
    assert max(image.size) <= 48 and factor == pytest.approx(image.width / row["width"])


def test_image_store_names_a_missing_file(train_items):
    row = {**train_items.iloc[0].to_dict(), "path": "/nonexistent/000001.jpg"}
    with pytest.raises(FileNotFoundError, match=r"item train/000001/item1: image file /nonexistent"):
        D.ImageStore(32).crop(row, 0.1)


def _dataset(items, **kw) -> D.ItemDataset:
    cfg = D.DataConfig(image_res=32, **kw)
    labels = D.identity_labels(items, D.identity_classes(items))
    return D.ItemDataset(items, item_texts(items, "none"), labels, cfg)


def test_dataset_samples_are_deterministic_per_seed(train_items):
    ds = _dataset(train_items, identities_per_batch=2)
    a, b, c = ds[(3, 11)], ds[(3, 11)], ds[(3, 12)]
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert not torch.equal(a["pixel_values"], c["pixel_values"])
    assert a["pixel_values"].shape == (3, 32, 32) and a["text"] == train_items["category_name"].iloc[3]
    assert a["label"] >= 0 and a["itc_id"] == a["label"]
    # an unlabelled item (style 0) only matches itself
    i0 = int(np.flatnonzero(train_items["style"].to_numpy() == 0)[0])
    s0 = ds[(i0, 1)]
    assert s0["label"] == -1 and s0["itc_id"] == -1 - i0
    # an int index = evaluation preprocessing of the stored crop
    ev = ds[3]
    ref, _ = ds.processor.process_one(ds.store.crop(ds.row(3), ds.config.context), train=False)
    assert np.array_equal(ev["pixel_values"].numpy(), ref)


def test_dataset_box_target_is_the_item_box_relative_to_the_photo(train_items):
    ds = _dataset(train_items, identities_per_batch=2, box_task=True)
    for i in (2, 9, 23):
        r = train_items.iloc[i]
        target = ds[i]["box_target"].numpy()
        image, factor = ds.store.image(ds.row(i))
        # square resize of the whole (shrunk) photo: relative coordinates survive up to the shrink rounding
        expected = np.array([(r.x1 + r.x2) / 2 / r.width, (r.y1 + r.y2) / 2 / r.height,
                             (r.x2 - r.x1) / r.width, (r.y2 - r.y1) / r.height])
        np.testing.assert_allclose(target, expected, atol=0.02)
        assert ds[i]["box_pixel_values"].shape == (3, 32, 32)


def test_whole_image_view(train_items):
    ds = _dataset(train_items, identities_per_batch=2, view="image", box_task=False)
    paths = train_items["path"].to_numpy()
    i = int(np.flatnonzero(paths[:-1] == paths[1:])[0])  # two items of one photo
    a, b = ds[i], ds[i + 1]  # the same whole-image pixels, different texts
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["text"] != b["text"]
    assert "box_target" not in a


def test_pk_sampler_batches(train_items):
    labels = D.identity_labels(train_items, D.identity_classes(train_items))
    sampler = D.PKBatchSampler(labels, identities_per_batch=3, per_identity=2, seed=5)
    assert len(sampler) == 6 // 3
    batches = list(sampler)
    assert len(batches) == 2
    seen = Counter()
    for batch in batches:
        rows = [r for r, _ in batch]
        assert len(rows) == 6
        ids = [labels[r] for r in rows]
        assert all(i >= 0 for i in ids)
        counts = Counter(ids)
        assert len(counts) == 3 and set(counts.values()) == {2}
        seen.update(counts)
        assert len({s for _, s in batch}) == 6  # every slot has its own augmentation seed
    assert len(seen) == 6  # one epoch visits every identity once
    # deterministic per (seed, epoch), different across epochs
    assert D.PKBatchSampler(labels, 3, 2, seed=5).batches(0) == batches
    assert sampler.batches(1) != batches


def test_pk_sampler_resumes_mid_epoch(train_items):
    labels = D.identity_labels(train_items, D.identity_classes(train_items))
    a = D.PKBatchSampler(labels, 2, 2, seed=1)
    a.set_epoch(3)
    full = list(a)
    a.advance()
    state = a.state_dict()
    b = D.PKBatchSampler(labels, 2, 2, seed=1)
    b.load_state_dict(state)
    assert list(b) == full[1:]
    with pytest.raises(ValueError, match="seed"):
        D.PKBatchSampler(labels, 2, 2, seed=2).load_state_dict(state)


def test_pk_sampler_draws_with_replacement_for_small_identities():
    labels = np.array([0, 1, 1, 1, 2, -1])
    batch = D.PKBatchSampler(labels, 3, 3, seed=0).batches(0)[0]
    rows = [r for r, _ in batch]
    assert rows.count(0) == 3 and rows.count(4) == 3 and sorted(r for r in rows if labels[r] == 1) == [1, 2, 3]
    with pytest.raises(ValueError, match="at least P=4 identities"):
        D.PKBatchSampler(labels, 4, 2)


def test_collator(train_items):
    ds = _dataset(train_items, identities_per_batch=2, box_task=True)
    tok = build_wordpiece_tokenizer(fashion_caption_corpus() + list(train_items["category_name"]), 256)
    batch = D.Collator(tok)([ds[(i, i)] for i in (2, 3, 4, 9)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["box_pixel_values"].shape == (4, 3, 32, 32) and batch["box_targets"].shape == (4, 4)
    assert batch["keys"] == [train_items["key"].iloc[i] for i in (2, 3, 4, 9)]
    assert batch["labels"].dtype == torch.long
    assert batch["categories"].tolist() == [int(train_items["category_id"].iloc[i]) - 1 for i in (2, 3, 4, 9)]


def test_category_labels_hand_cases_and_errors():
    items = pd.DataFrame({"key": ["a", "b", "c"], "category_id": [1, 13, 7]})
    assert D.category_labels(items).tolist() == [0, 12, 6]
    with pytest.raises(ValueError, match=r"1 item\(s\) have a category_id outside 1-13; first: item 'b'"):
        D.category_labels(items.assign(category_id=[1, 14, 7]))
    with pytest.raises(ValueError, match="item 'c' with category_id nan"):
        D.category_labels(items.assign(category_id=[1, 2, None]))
    with pytest.raises(ValueError, match="no 'category_id' column"):
        D.category_labels(items.drop(columns="category_id"))


def test_collator_builds_box_views_for_the_first_box_per_batch_samples_only(train_items):
    every = _dataset(train_items, identities_per_batch=2, box_task=True)
    lazy = _dataset(train_items, identities_per_batch=2, box_task=True, box_per_batch=2)
    tok = build_wordpiece_tokenizer(fashion_caption_corpus() + list(train_items["category_name"]), 256)
    idx = [(i, i) for i in (2, 3, 4, 9)]
    assert "box_pixel_values" not in lazy[idx[0]]
    ref = D.Collator(tok)([every[i] for i in idx])
    got = D.Collator(tok, box_source=lazy)([lazy[i] for i in idx])
    assert got["box_pixel_values"].shape == (2, 3, 32, 32) and got["box_targets"].shape == (2, 4)
    assert torch.equal(got["box_pixel_values"], ref["box_pixel_values"][:2])
    assert torch.equal(got["box_targets"], ref["box_targets"][:2])
    assert torch.equal(got["pixel_values"], ref["pixel_values"])
    with pytest.raises(ValueError, match="box_per_batch"):
        D.DataConfig(box_per_batch=-1).validate()


def test_data_config_validation():
    with pytest.raises(ValueError, match="view"):
        D.DataConfig(view="patch").validate()
    with pytest.raises(ValueError, match="use_captions"):
        D.DataConfig(use_captions="llm").validate()
    with pytest.raises(ValueError, match="crop_scale"):
        D.DataConfig(crop_scale=(0.0, 1.0)).validate()
    with pytest.raises(ValueError, match="erase_prob"):
        D.DataConfig(erase_prob=1.5).validate()
    assert D.DataConfig(image_res=64).store_side == 128


def test_crop_ratio_setting_reaches_the_processor():
    # training views jitter the aspect ratio relative to their own shape (elongated items stay whole) unless asked
    assert D.build_processor(D.DataConfig()).settings.crop_ratio_relative is True
    assert D.build_processor(D.DataConfig(crop_ratio_relative=False)).settings.crop_ratio_relative is False
    from capret_utils import train
    cfg = train.TrainConfig(crop_ratio_relative=False)
    assert cfg.data_config(64).crop_ratio_relative is False
    assert cfg.trajectory_digest() != train.TrainConfig().trajectory_digest()  # a resume cannot mix the two


def test_erase_setting_reaches_the_processor():
    from capret_utils import train
    assert D.build_processor(D.DataConfig()).settings.erase_prob == 0.0
    cfg = train.TrainConfig(erase_prob=0.25)
    assert D.build_processor(cfg.data_config(64)).settings.erase_prob == 0.25
    assert cfg.trajectory_digest() != train.TrainConfig(erase_prob=0.0).trajectory_digest()
    with pytest.raises(ValueError, match="erase_prob"):
        train.TrainConfig(erase_prob=-0.1).validate()


def _recolour_naive(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per view and per pixel: Rodrigues rotation about (1, 1, 1) by theta, then channel order, then inversion."""
    n = pixels.shape[0]
    theta = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * np.pi
    order = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)
    invert = torch.rand(n, generator=generator) < 0.5
    k = np.ones(3) / np.sqrt(3)
    out = torch.empty_like(pixels)
    for i in range(n):
        t = float(theta[i])
        for y in range(pixels.shape[2]):
            for x in range(pixels.shape[3]):
                v = pixels[i, :, y, x].double().numpy()
                rotated = v * np.cos(t) + np.cross(k, v) * np.sin(t) + k * (k @ v) * (1 - np.cos(t))
                rotated = rotated[order[i].numpy()]
                out[i, :, y, x] = torch.from_numpy(-rotated if invert[i] else rotated)
    return out


def test_recolour_matches_a_per_pixel_reference_and_keeps_shape():
    pixels = torch.randn(5, 3, 4, 6, generator=torch.Generator().manual_seed(3))
    fast = D.recolour(pixels, torch.Generator().manual_seed(11))
    assert fast.shape == pixels.shape and fast.dtype == pixels.dtype
    torch.testing.assert_close(fast, _recolour_naive(pixels, torch.Generator().manual_seed(11)), atol=1e-5, rtol=0)
    # orthogonal per view: every pixel keeps its distance from the mean colour (the normalised origin) ...
    torch.testing.assert_close(fast.norm(dim=1), pixels.norm(dim=1), atol=1e-5, rtol=0)
    # ... and the same map for every pixel of a view: where two pixels were equal they stay equal
    same = pixels.clone()
    same[:, :, 1, 2] = same[:, :, 0, 0]
    out = D.recolour(same, torch.Generator().manual_seed(4))
    torch.testing.assert_close(out[:, :, 1, 2], out[:, :, 0, 0])
    # a grey pixel (on the rotation axis) stays grey, up to the inversion
    grey = torch.full((64, 3, 1, 1), 0.7)
    g = D.recolour(grey, torch.Generator().manual_seed(5))
    assert torch.allclose(g, g[:, :1].expand_as(g), atol=1e-6) and set(g[:, 0, 0, 0].sign().tolist()) == {-1.0, 1.0}
    # the colours do change, deterministically per generator state
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).repeat(32, 1, 1, 1)
    r = D.recolour(red, torch.Generator().manual_seed(6))
    assert (r[:, :, 0, 0] - red[:, :, 0, 0]).norm(dim=1).gt(0.5).float().mean() > 0.8
    torch.testing.assert_close(r, D.recolour(red, torch.Generator().manual_seed(6)))
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        D.recolour(torch.zeros(2, 4, 3, 3), torch.Generator())


def test_dialogue_captions_that_clean_to_nothing_fall_back_to_the_category_with_a_warning(train_items):
    caps = {k: f"caption {i}" for i, k in enumerate(train_items["key"])}
    caps[train_items["key"].iloc[2]] = "..."
    with pytest.warns(UserWarning, match="1 of .* empty after X2-VLM's caption cleaning"):
        texts = item_texts(train_items, "dialogue", caps)
    assert texts[2] == train_items["category_name"].iloc[2] and texts[3] == "caption 3"
