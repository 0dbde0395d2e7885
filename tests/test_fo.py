"""capret_utils.viz.fo: the items table as a FiftyOne dataset (real MongoDB via FiftyOne), look-ups, results, views."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pandas as pd
import pytest
from _items_fixture import make_items

from capret_utils.viz import fo as cfo

# ------------------------------------------------------------------------------------ pure helpers (no DB)


def test_dataset_name_from_root_and_split(tmp_path):
    assert cfo.dataset_name(tmp_path / "synthetic", "validation") == "capret-synthetic-validation"
    assert cfo.dataset_name(tmp_path / "deep fashion2", "train") == "capret-deep-fashion2-train"
    assert cfo.dataset_name(tmp_path / "x", "validation", override="mine") == "mine"
    assert cfo.dataset_name(tmp_path / "x", "validation", override="  ") == "capret-x-validation"


def test_keys_and_result_fields():
    assert cfo.image_key("validation", 12) == "validation/000012"
    assert cfo.image_key_of("validation/000012/item2") == "validation/000012"
    assert cfo.image_key_of("validation/000012") == "validation/000012"
    with pytest.raises(ValueError, match="neither an item key"):
        cfo.image_key_of("000012")
    assert cfo.result_field("crop+caption", "hit@10") == "crop_caption_hit_10"
    assert cfo.result_field("", "ap") == "ap"
    assert cfo.result_field("2stage", "ap") == "r_2stage_ap"
    with pytest.raises(ValueError):
        cfo.result_field("v", "")


def test_relative_box_hand_computed():
    # 200 x 100 image, box corners (20, 10) - (120, 60): x 0.1, y 0.1, w 0.5, h 0.5
    assert cfo.relative_box(20, 10, 120, 60, 200, 100) == pytest.approx([0.1, 0.1, 0.5, 0.5])
    # corners past the border are clipped into the image
    assert cfo.relative_box(-4, 0, 210, 100, 200, 100) == pytest.approx([0.0, 0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="image size"):
        cfo.relative_box(0, 0, 1, 1, 0, 10)


def test_relative_landmarks_marks_unlabelled_points_nan():
    points, vis = cfo.relative_landmarks([50, 25, 2, 0, 0, 0, 100, 50, 1], 100, 50)
    assert vis == [2, 0, 1]
    assert points[0] == (0.5, 0.5) and points[2] == (1.0, 1.0)
    assert all(math.isnan(v) for v in points[1])
    with pytest.raises(ValueError, match="flat"):
        cfo.relative_landmarks([1, 2], 10, 10)


def test_bad_items_table_errors_name_the_column(tmp_path):
    items = make_items(tmp_path, n_pairs=1)
    with pytest.raises(ValueError, match="viewpoint"):
        cfo.build_dataset(items.drop(columns=["viewpoint"]), "never-built")
    clash = items.copy()
    clash.loc[clash.index[1], "pair_id"] = 99  # item2 of image 1 disagrees with item1 on pair_id
    with pytest.raises(ValueError, match="pair_id"):
        cfo.build_dataset(clash, "never-built")
    dup = pd.concat([items, items.iloc[:1]])
    with pytest.raises(ValueError, match="duplicate key"):
        cfo.build_dataset(dup, "never-built")
    with pytest.raises(ValueError, match="empty"):
        cfo.build_dataset(items.iloc[:0], "never-built")


# ------------------------------------------------------------------------------------ with FiftyOne



@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return make_items(tmp_path_factory.mktemp("fo-items"), n_pairs=3)


@pytest.fixture(scope="module")
def dataset(items):
    name = f"capret-test-fo-{uuid.uuid4().hex[:8]}"  # unique: the DB may be shared with other processes
    ds = cfo.build_dataset(items, name, cfo.BuildConfig(persistent=False, segmentation=True),
                           info={"data_root": "/somewhere"})
    yield ds
    cfo.delete_dataset(name)


@pytest.mark.fiftyone
def test_one_sample_per_image_with_fields(dataset, items):
    images = items.drop_duplicates("path")
    assert len(dataset) == len(images) == 12
    assert sorted(dataset.values("image_key")) == sorted(f"validation/{i:06d}" for i in images["image_id"])
    assert dataset.count_values("source") == {"user": 6, "shop": 6}
    assert dataset.count_sample_tags() == {"user": 6, "shop": 6, "query": 6, "gallery": 6}
    first = dataset.sort_by("image_id").first()
    assert (first.source, first.pair_id, first.split, first.n_items) == ("user", 1, "validation", 2)
    assert (first.metadata.width, first.metadata.height) == (200, 160)
    assert dataset.info["n_items"] == len(items) and dataset.info["data_root"] == "/somewhere"
    assert dataset.info["n_queries"] == int(((items.source == "user") & (items["style"] > 0)).sum())
    assert dataset.default_classes == ["short sleeve top", "shorts", "trousers", "skirt"]  # by category id


@pytest.mark.fiftyone
def test_detections_carry_items_table_rows(dataset, items):
    by_key = items.set_index("key")
    n = 0
    for sample in dataset:
        for det in sample["items"].detections:
            row = by_key.loc[det.key]
            n += 1
            assert det.label == row.category_name
            x, y, w, h = det.bounding_box
            assert x * row.width == pytest.approx(row.x1) and y * row.height == pytest.approx(row.y1)
            assert (x + w) * row.width == pytest.approx(row.x2) and (y + h) * row.height == pytest.approx(row.y2)
            for attr in ("style", "scale", "occlusion", "zoom_in", "viewpoint", "category_id"):
                assert det[attr] == row[attr], attr
            assert det.is_query == (row.source == "user" and row["style"] > 0)
            assert det.is_gallery == (row.source == "shop")
            assert det.identity == (f"{row.pair_id}:{row['style']}" if row["style"] > 0 else None)
    assert n == len(items)
    # landmarks: one Keypoints entry per item that has landmarks (shorts here have none)
    kps = [kp for s in dataset for kp in s["landmarks"].keypoints]
    assert len(kps) == sum(len(lm) > 0 for lm in items["landmarks"])
    kp = next(k for k in kps if k.key == "validation/000001/item1")
    row = by_key.loc["validation/000001/item1"]
    assert kp.visibility == row.landmarks[2::3]
    assert kp.points[0] == pytest.approx((row.landmarks[0] / row.width, row.landmarks[1] / row.height))
    assert all(math.isnan(v) for v in kp.points[3])  # every 4th landmark is unlabelled in the fixture
    assert sum(len(s["segmentation"].polylines) for s in dataset) == len(items)


@pytest.mark.fiftyone
def test_saved_views_match_pandas(dataset, items):
    assert dataset.list_saved_views() == list(cfo.SAVED_VIEWS)
    user = items[items.source == "user"]
    q_images = user[user["style"] > 0]["path"].nunique()
    assert len(dataset.load_saved_view("user-queries")) == q_images
    patches = dataset.load_saved_view("query-items")
    assert len(patches) == int((user["style"] > 0).sum())
    assert sorted(patches.values("items.key")) == sorted(user[user["style"] > 0]["key"])
    heavy = dataset.load_saved_view("heavy-occlusion")
    assert len(heavy) == items[items.occlusion == 3]["path"].nunique()
    assert heavy.count("items.detections") == int((items.occlusion == 3).sum())
    side = dataset.load_saved_view("side-or-back")
    assert side.count("items.detections") == int((items.viewpoint == 3).sum())
    pairs = dataset.load_saved_view("pairs")
    groups = list(pairs.iter_dynamic_groups())
    assert len(groups) == items["pair_id"].nunique()
    for group in groups:
        sources = group.values("source")
        assert len(set(group.values("pair_id"))) == 1
        assert sources == sorted(sources, reverse=True)  # user photos first


@pytest.mark.fiftyone
def test_rebuild_is_idempotent(items):
    name = f"capret-test-rebuild-{uuid.uuid4().hex[:8]}"
    import fiftyone as fo

    try:
        first = cfo.build_dataset(items, name, cfo.BuildConfig(persistent=False))
        backing = first.load_saved_view("query-items")._dataset.name  # the patches live in a private dataset
        assert fo.dataset_exists(backing)
        again = cfo.build_dataset(items, name, cfo.BuildConfig(persistent=False))
        assert fo.list_datasets().count(name) == 1
        # nothing piles up per rebuild: FiftyOne marks the old backing dataset non-persistent (garbage-collected)
        assert not fo.dataset_exists(backing) or not fo.load_dataset(backing).persistent
        assert len(again) == items["path"].nunique()
        assert again.count("items.detections") == len(items)
        assert again.list_saved_views() == list(cfo.SAVED_VIEWS)
        with pytest.raises(FileExistsError):
            cfo.build_dataset(items, name, cfo.BuildConfig(persistent=False, overwrite=False))
    finally:
        cfo.delete_dataset(name)


@pytest.mark.fiftyone
def test_failed_rebuild_keeps_the_previous_dataset(items):
    import fiftyone as fo

    name = f"capret-test-failed-{uuid.uuid4().hex[:8]}"
    try:
        cfo.build_dataset(items, name, cfo.BuildConfig(persistent=True))
        broken = items.copy()
        last = broken["image_id"] == broken["image_id"].max()
        broken.loc[last, "width"] = 0  # fails inside add_samples, after most images were added
        with pytest.raises(ValueError, match="image size"):
            cfo.build_dataset(broken, name, cfo.BuildConfig(persistent=True))
        kept = fo.load_dataset(name)
        assert len(kept) == items["image_id"].nunique() and kept.persistent
        assert not [d for d in fo.list_datasets() if d.startswith(f"{name}.building-")]
    finally:
        cfo.delete_dataset(name)


@pytest.mark.fiftyone
def test_lookups_by_key(dataset, items):
    index = cfo.item_index(dataset)
    assert sorted(index.index) == sorted(items["key"])
    keys = ["validation/000005/item1", "validation/000001/item2"]
    view = cfo.find_samples(dataset, keys)
    assert view.values("image_key") == ["validation/000005", "validation/000001"]  # in the given order
    only = cfo.find_items(dataset, keys)
    assert sorted(k for ks in only.values("items.detections.key") for k in ks) == sorted(keys)
    patches = cfo.find_items(dataset, keys, patches=True)
    assert sorted(patches.values("items.key")) == sorted(keys)
    ids = cfo.label_ids(dataset, keys)
    selected = dataset.select_labels(ids=ids)
    assert sorted(k for ks in selected.values("items.detections.key") for k in ks) == sorted(keys)
    with pytest.raises(KeyError, match="not in dataset"):
        cfo.find_items(dataset, ["validation/000001/item9"])
    with pytest.raises(KeyError, match="not in dataset"):
        cfo.find_samples(dataset, ["validation/999999"])
    with pytest.raises(ValueError, match="no saved view"):
        cfo.resolve_view(dataset, "nope")
    assert cfo.resolve_view(dataset, "") is dataset


@pytest.mark.fiftyone
def test_attach_item_and_image_results(dataset, items):
    queries = items[(items.source == "user") & (items["style"] > 0)]["key"].tolist()
    rng = np.random.default_rng(0)
    results = pd.DataFrame({
        "key": queries,
        "topk_keys": [[f"validation/{j:06d}/item1" for j in rng.integers(1, 12, size=3)] for _ in queries],
        "topk_scores": [rng.random(3).astype(np.float32) for _ in queries],
        "first_hit_rank": [np.int64(i % 4 + 1) for i in range(len(queries))],
        "hit_at_1": [bool(i % 4 == 0) for i in range(len(queries))],
        "ap": rng.random(len(queries)),
    })
    patches_before = len(dataset.load_saved_view("query-items"))
    fields = cfo.attach_results(dataset, results, variant="crop+caption")
    assert fields == ["crop_caption_topk_keys", "crop_caption_topk_scores", "crop_caption_first_hit_rank",
                      "crop_caption_hit_at_1", "crop_caption_ap"]
    patches = dataset.load_saved_view("query-items")  # refreshed by attach_results
    assert len(patches) == patches_before
    got = dict(zip(patches.values("items.key"), patches.values("items.crop_caption_ap")))
    assert got == pytest.approx(dict(zip(results["key"], results["ap"])))
    ranks = dict(zip(patches.values("items.key"), patches.values("items.crop_caption_first_hit_rank")))
    assert ranks == dict(zip(results["key"], [int(v) for v in results["first_hit_rank"]]))
    topk = dict(zip(patches.values("items.key"), patches.values("items.crop_caption_topk_keys")))
    assert topk[queries[0]] == results["topk_keys"][0]
    # non-query items are untouched; failure views are one filter away
    from fiftyone import ViewField as F

    values = [v for vs in dataset.values("items.detections.crop_caption_ap") for v in vs]
    assert sum(v is not None for v in values) == len(queries)
    failures = patches.match(F("items.crop_caption_hit_at_1") == False)  # noqa: E712
    assert len(failures) == int((~results["hit_at_1"]).sum())
    # image level: keyed by image key
    image_results = pd.DataFrame({"key": ["validation/000001", "validation/000002"], "ap": [0.25, 0.75]})
    assert cfo.attach_results(dataset, image_results, variant="image", level="image") == ["image_ap"]
    got = dict(zip(dataset.values("image_key"), dataset.values("image_ap")))
    assert got["validation/000001"] == 0.25 and got["validation/000002"] == 0.75 and got["validation/000003"] is None
    with pytest.raises(KeyError):
        cfo.attach_results(dataset, pd.DataFrame({"key": ["validation/000001/item7"], "ap": [1.0]}), "x")
    with pytest.raises(ValueError, match="level"):
        cfo.attach_results(dataset, image_results, "x", level="pair")


@pytest.mark.fiftyone
def test_item_table_equals_per_attribute_writes_and_declares_once(dataset, items):
    """set_item_table (one bulk write, one schema merge) stores what FiftyOne's set_label_values (the per-attribute
    reference, declaring as it goes) stores, with the same declared types; deferred declaration finds them all."""
    from fiftyone import ViewField as F

    keys = items[(items.source == "user") & (items["style"] > 0)]["key"].tolist()
    table = pd.DataFrame({
        "key": keys,
        "keys": [[f"k{i}", f"k{i + 1}"] for i in range(len(keys))],
        "scores": [np.asarray([0.5, np.float32(0.25)]) for _ in keys],
        "rank": [np.int64(i + 1) if i % 3 else None for i in range(len(keys))],
        "hit": [bool(i % 2) for i in range(len(keys))],
        "ap": [float("nan")] + [0.1 * i for i in range(1, len(keys))],
    })
    ref = table.rename(columns={c: f"ref_{c}" for c in table.columns if c != "key"})
    rows = cfo.item_index(dataset).loc[ref["key"]]
    for column in ref.columns[1:]:
        updates = [{"sample_id": s, "label_id": lab, "value": cfo._python(v)}
                   for s, lab, v in zip(rows["sample_id"], rows["label_id"], ref[column])]
        dataset.set_label_values(f"items.detections.{column}", updates, dynamic=True)
    fast = table.rename(columns={c: f"fast_{c}" for c in table.columns if c != "key"})
    assert cfo.set_item_table(dataset, fast) == list(fast.columns[1:])
    schema = dataset.get_field_schema(flat=True)
    for c in table.columns[1:]:
        got_ref = dataset.values(f"items.detections.ref_{c}")
        assert dataset.values(f"items.detections.fast_{c}") == got_ref, c
        ref_type, fast_type = schema[f"items.detections.ref_{c}"], schema[f"items.detections.fast_{c}"]
        assert type(fast_type) is type(ref_type), c
        assert type(getattr(fast_type, "field", None)) is type(getattr(ref_type, "field", None)), c
    assert len(dataset.filter_labels("items", F("fast_hit") == True)) > 0  # noqa: E712  (declared: filterable)
    # deferred: written undeclared, then one scan declares them
    late = table.rename(columns={c: f"late_{c}" for c in table.columns if c != "key"})
    cfo.set_item_table(dataset, late, declare=False)
    assert "items.detections.late_ap" not in dataset.get_field_schema(flat=True)
    assert set(cfo.declare_item_fields(dataset)) >= {f"late_{c}" for c in table.columns[1:]}
    assert type(dataset.get_field_schema(flat=True)["items.detections.late_ap"]) is type(schema["items.detections.ref_ap"])
    assert cfo.declare_item_fields(dataset) == []  # nothing left to declare
    with pytest.raises(KeyError, match="not in dataset"):
        cfo.set_item_table(dataset, pd.DataFrame({"key": ["validation/000001/item9"], "x": [1]}))


@pytest.mark.fiftyone
def test_launch_refuses_remote_in_a_notebook(dataset, monkeypatch):
    from capret_utils.viz import fo_session

    monkeypatch.setattr(fo_session, "in_notebook", lambda: True)
    with pytest.raises(ValueError, match="remote=True cannot be used from a notebook"):
        fo_session.launch(dataset, remote=True)


# ------------------------------------------------------------------------------------ retrieval failure views


def test_failure_view_names():
    assert cfo.failure_view_name("fine-tuned/crop+itm", 10) == "failures-top10-fine-tuned-crop-itm"
    assert cfo.worst_ap_view_name("zero-shot/image") == "worst-ap-zero-shot-image"
    assert cfo.comparison_view_name("a/crop", "b/crop", 5) == "top5-a-crop-not-b-crop"


@pytest.mark.fiftyone
def test_image_level_failure_views(items):
    name = f"capret-test-fo-img-{uuid.uuid4().hex[:8]}"
    ds = cfo.build_dataset(items, name, cfo.BuildConfig(persistent=False, keypoints=False))
    try:
        query_images = sorted({cfo.image_key_of(k) for k in items[(items.source == "user") & (items["style"] > 0)].key})
        hits = {k: i % 3 != 0 for i, k in enumerate(query_images)}  # every third query image fails
        results = pd.DataFrame({"key": query_images, "hit_at_10": [hits[k] for k in query_images],
                                "ap": [0.9 if hits[k] else 0.1 * (i + 1) for i, k in enumerate(query_images)]})
        cfo.attach_results(ds, results, "v/image", level="image")
        counts = cfo.save_failure_views(ds, "v/image", level="image", k=10, worst=2)
        fails = ds.load_saved_view(cfo.failure_view_name("v/image", 10))
        assert counts[cfo.failure_view_name("v/image", 10)] == len(fails)
        assert sorted(fails.values("image_key")) == sorted(k for k, h in hits.items() if not h)
        worst = ds.load_saved_view(cfo.worst_ap_view_name("v/image"))
        assert worst.values("v_image_ap") == sorted(results["ap"])[:2]
        with pytest.raises(ValueError, match="level"):
            cfo.save_failure_views(ds, "v/image", level="pixels")
    finally:
        cfo.delete_dataset(name)


@pytest.mark.fiftyone
def test_processes_connecting_at_the_same_moment_share_one_database_service(tmp_path):
    """Three processes connect to a fresh database folder at once: the connect lock lets the first start mongod and
    the others join it (without it the losers failed with "failed to bind to port")."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, FIFTYONE_DATABASE_DIR=str(tmp_path / "db"), FIFTYONE_DO_NOT_TRACK="true",
               FIFTYONE_DATABASE_VALIDATION="false")
    env.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
    code = ("import time, sys; t = float(sys.argv[1]); time.sleep(max(0.0, t - time.time()))\n"
            "from capret_utils.viz import fo\nprint(len(fo.fiftyone_connected().list_datasets()))")
    start = __import__("time").time() + 6.0  # all three past their imports before the same instant
    # output to files, not pipes: the database service a client starts inherits them and outlives the client
    logs = [(tmp_path / f"out{i}.txt", tmp_path / f"err{i}.txt") for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start)], env=env, stdout=open(o, "w"),
                              stderr=open(e, "w")) for o, e in logs]
    for p, (out, err) in zip(procs, logs):
        assert p.wait(timeout=240) == 0, err.read_text()[-2000:]
        assert out.read_text().strip().isdigit()  # connected and listed the datasets
