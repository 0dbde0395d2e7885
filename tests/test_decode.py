"""The streaming image path: reduced JPEG decode, the bounded view cache, compact columns, the cached lean index,
worker-count determinism and bad images inside DataLoader workers (capret_utils.data.decode / index / loader)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from capret_utils.captions import item_texts
from capret_utils.data import decode as DEC
from capret_utils.data import df2
from capret_utils.data import index as IDX
from capret_utils.data import loader as D
from capret_utils.x2vlm import (
    BERT_SPECIAL_IDS,
    build_wordpiece_tokenizer,
    fashion_caption_corpus,
)


@pytest.fixture(scope="module")
def train_items(smoke_root):
    return df2.load_items(smoke_root / "train")


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    """An 800 x 600 photo with structure at every scale (gradients + blocks)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:600, 0:800]
    arr = np.stack([(x * 255 // 800), (y * 255 // 600), ((x // 50 + y // 50) % 2) * 200], axis=-1).astype(np.uint8)
    arr = np.clip(arr.astype(int) + rng.integers(-10, 10, arr.shape), 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("jpeg") / "000001.jpg"
    Image.fromarray(arr).save(path, quality=92)
    return path


def test_string_column_round_trip():
    values = ["train/000001/item1", "", "photos/ä–漢字.jpg", "x" * 300]
    col = DEC.StringColumn(values)
    assert len(col) == 4 and list(col) == values and col[-1] == values[-1] and col[2] == values[2]
    assert col.nbytes < 600


def test_item_columns_rows_match_the_table(train_items):
    cols = DEC.ItemColumns(train_items)
    for i in (0, 5, len(train_items) - 1):
        row, ref = cols.row(i), train_items.iloc[i]
        assert row["key"] == ref["key"] and row["path"] == ref["path"]
        assert (row["x1"], row["y2"], row["width"], row["height"]) == (ref["x1"], ref["y2"], ref["width"], ref["height"])


def test_reduced_decode_cuts_the_same_region_at_lower_cost(big_jpeg):
    row = {"key": "k", "path": str(big_jpeg), "x1": 100.0, "y1": 50.0, "x2": 700.0, "y2": 550.0,
           "width": 800, "height": 600}
    fast, full = DEC.ImageStore(128, draft=True), DEC.ImageStore(128, draft=False)
    a, b = fast.crop(row, 0.05), full.crop(row, 0.05)
    assert max(a.size) == max(b.size) == 128 and abs(a.height - b.height) <= 1  # region rounded at 1/4 scale
    a = a.resize(b.size, Image.Resampling.BICUBIC)
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
    assert diff < 6.0, diff  # same region; DCT scaling vs bicubic shrink differ by a few grey levels
    # the decode really ran at a reduced scale: 600 px crop -> 128 px view allows 1/4 (>= 128 px left)
    image, size = DEC.open_image(str(big_jpeg), "k", request=DEC._request(800, 600, 600 * 1.1, 128))
    assert size == (800, 600) and image.size == (200, 150)
    # a small view of a small region: no reduction (the region would drop below the view side)
    assert DEC._request(800, 600, 200, 128) is None
    whole, factor = fast.image(row)
    assert max(whole.size) == 128 and factor == pytest.approx(whole.width / 800)


def test_cache_is_bounded_and_gives_the_same_pixels(train_items):
    rows = [DEC.ItemColumns(train_items).row(i) for i in range(len(train_items))]
    one = max(v.width * v.height * 3 for v in (DEC.ImageStore(64).crop(r, 0.05) for r in rows[:6]))
    store = DEC.ImageStore(64, cache_mb=one / 2**20)
    plain = DEC.ImageStore(64)
    for r in rows[:6]:
        assert np.array_equal(np.asarray(store.crop(r, 0.05)), np.asarray(plain.crop(r, 0.05)))
        assert store.cached_bytes <= store.budget
    assert 1 <= len(store) < 6  # views were dropped to stay in the budget
    hit = store.crop(rows[5], 0.05)
    assert store.crop(rows[5], 0.05) is hit  # most recent stays cached
    store.split_budget(4)
    assert store.budget == store.budget_total // 4
    store.split_budget(1)
    assert store.budget == store.budget_total
    with pytest.raises(ValueError, match="cache_mb"):
        DEC.ImageStore(64, cache_mb=-1)


def test_bad_images_raise_naming_the_file_or_are_skipped(tmp_path, train_items):
    row = DEC.ItemColumns(train_items).row(0)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(row["path"]).read_bytes()[:200])  # truncated JPEG
    bad = {**row, "path": str(broken)}
    with pytest.raises(ValueError, match=rf"item {row['key']}: cannot read image {broken} \(field 'path'\)"):
        DEC.ImageStore(64).crop(bad, 0.05)
    with pytest.raises(FileNotFoundError, match="not found"):
        DEC.ImageStore(64).image({**row, "path": str(tmp_path / "missing.jpg")})
    store = DEC.ImageStore(64, on_error="skip")
    assert store.crop(bad, 0.05) is None and store.image(bad) is None
    assert [s["path"] for s in store.skipped] == [str(broken)] * 2
    with pytest.raises(ValueError, match="on_error"):
        DEC.ImageStore(64, on_error="ignore")


# ------------------------------------------------------------------------------------------ index


def test_index_is_cached_lean_and_rebuilt_when_a_file_changes(smoke_root, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(smoke_root / "train", split)
    cache = tmp_path / "cache"
    first = IDX.load_index(split, cache_dir=cache)
    assert first.attrs["index"]["hit"] is False and "landmarks" not in first.columns
    second = IDX.load_index(split, cache_dir=cache)
    assert second.attrs["index"]["hit"] is True
    full = df2.load_items(split)
    pd.testing.assert_frame_equal(second, full.drop(columns=list(IDX.HEAVY_COLUMNS)), check_dtype=False,
                                  check_categorical=False)
    heavy = IDX.load_index(split, heavy=True, cache_dir=cache)
    assert heavy.attrs["index"]["hit"] is True
    assert heavy["landmarks"].tolist() == full["landmarks"].tolist()
    assert heavy["segmentation"].tolist() == full["segmentation"].tolist()
    # an edited annotation file changes the listing digest: the index is rebuilt and sees the edit
    anno = sorted((split / "annos").iterdir())[0]
    data = json.loads(anno.read_text())
    data["item1"]["occlusion"] = 3 if data["item1"]["occlusion"] != 3 else 1
    time.sleep(0.01)
    anno.write_text(json.dumps(data))
    third = IDX.load_index(split, cache_dir=cache)
    assert third.attrs["index"]["hit"] is False
    assert third.loc[third["key"] == f"train/{anno.stem}/item1", "occlusion"].item() == data["item1"]["occlusion"]


def test_index_skip_mode_lists_bad_files_and_keeps_them_listed_when_cached(smoke_root, tmp_path):
    split = tmp_path / "train"
    shutil.copytree(smoke_root / "train", split)
    anno = sorted((split / "annos").iterdir())[1]
    anno.write_text("{not json")
    with pytest.raises(df2.DeepFashion2FormatError, match=anno.name):
        IDX.load_index(split, cache_dir=tmp_path / "c")
    for _ in range(2):  # parsed, then from the cache
        items = IDX.load_index(split, errors="skip", cache_dir=tmp_path / "c")
        assert [s["file"] for s in items.attrs["skipped"]] == [str(anno)]
    from capret_utils.data.splits import skipped_report

    report = skipped_report(items)
    assert len(report) == 1 and report["file"].iloc[0] == str(anno)


# ------------------------------------------------------------------------------------------ loader


def _setup(items, **kw):
    cfg = D.DataConfig(image_res=32, identities_per_batch=2, per_identity=2, box_task=True, box_per_batch=2,
                       erase_prob=0.3, **kw)
    labels = D.identity_labels(items, D.identity_classes(items))
    dataset = D.ItemDataset(items, item_texts(items, "none"), labels, cfg)
    tok = build_wordpiece_tokenizer(fashion_caption_corpus(), 1000, special_ids=BERT_SPECIAL_IDS)
    return dataset, D.Collator(tok, box_source=dataset), labels


def _epoch(dataset, collate, labels, workers):
    sampler = D.PKBatchSampler(labels, 2, 2, seed=7)
    loader = D.build_loader(dataset, collate, workers, batch_sampler=sampler, seed=7)
    return list(loader)


def test_batches_are_identical_for_every_worker_count(train_items):
    dataset, collate, labels = _setup(train_items)
    runs = [_epoch(dataset, collate, labels, w) for w in (0, 1, 2)]
    assert len(runs[0]) >= 2
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for a, b in zip(runs[0], other):
            assert a["keys"] == b["keys"]
            for k in ("pixel_values", "input_ids", "labels", "box_pixel_values", "box_targets"):
                assert torch.equal(a[k], b[k]), k


def test_resolve_workers():
    cores = len(os.sched_getaffinity(0))
    assert D.resolve_workers(-1) == max(0, min(8, cores - 1))
    assert D.resolve_workers(0) == 0 and D.resolve_workers(3) == 3
    with pytest.raises(ValueError, match="num_workers"):
        D.resolve_workers(-2)


def test_a_corrupt_image_inside_a_worker_names_the_file_or_is_skipped(train_items, tmp_path):
    items = train_items.copy()
    bad_path = tmp_path / "000001.jpg"
    bad_path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    labels = D.identity_labels(items, D.identity_classes(items))
    first = D.PKBatchSampler(labels, 2, 2, seed=7).batches(0)[0][0][0]  # a row the first batch draws
    victim = items["path"] == items["path"].iloc[first]
    items.loc[victim, "path"] = str(bad_path)
    dataset, collate, labels = _setup(items)
    with pytest.raises(Exception, match=rf"cannot read image {bad_path} \(field 'path'\)"):
        _epoch(dataset, collate, labels, 2)
    dataset, collate, labels = _setup(items, bad_images="skip")
    batches = _epoch(dataset, collate, labels, 2)
    skipped = [s for b in batches for s in b["skipped"]]
    bad_keys = set(items.loc[victim, "key"])
    drawn = {k for b in batches for k in b["keys"]}
    assert skipped and {s["key"] for s in skipped} <= bad_keys and not drawn & bad_keys
    assert all(s["path"] == str(bad_path) for s in skipped)


def test_view_dataset_keeps_every_row_and_reports_unreadable_ones(train_items, tmp_path):
    items = train_items.iloc[:6].copy()
    items.loc[items.index[1], "path"] = str(tmp_path / "gone.jpg")
    store = DEC.ImageStore(64, on_error="skip")
    ds = D.ViewDataset(items, store, D.build_processor(D.DataConfig(image_res=32)), "crop")
    batch = D.collate_views([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["rows"].tolist() == list(range(6))
    assert [s["key"] for s in batch["skipped"]] == [items["key"].iloc[1]]


ORPHAN_SCRIPT = r"""
import sys, time
sys.path.insert(0, {repo!r})
import numpy as np, torch
from capret_utils.data import loader as D

class Slow(torch.utils.data.Dataset):
    def __len__(self): return 10**6
    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.zeros(2)

loader = D.build_loader(Slow(), torch.utils.data.default_collate, 2, batch_size=4)
it = iter(loader)
next(it)
print("ready", flush=True)
time.sleep(600)
"""


def test_killing_the_parent_leaves_no_orphan_workers(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "loader_parent.py"
    script.write_text(ORPHAN_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1])))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"orphan DataLoader workers still running: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_prefetched_caption_views_equal_in_process_views(train_items):
    from capret_utils.captions.views import load_views, prefetch_views

    rows = train_items.to_dict("records")
    batches = [rows[i:i + 4] for i in range(0, 12, 4)]
    ahead = list(prefetch_views(batches, "crop", 0.05, num_workers=2))
    assert len(ahead) == 3
    for rows_b, views in zip(batches, ahead):
        here = load_views(rows_b, "crop", 0.05)
        assert [v.key for v in views] == [v.key for v in here]
        assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(views, here))
