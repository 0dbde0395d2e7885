"""capret_utils.data.df2: reading + validation, skip reports, clamping, retrieval sets, official JSON formats,
release check. Hand-made splits are written to tmp dirs; the 2019 GT comes from ../shared/data."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from capret_utils.data import df2, df2_reader
from capret_utils.data.df2 import DeepFashion2FormatError

W, H = 120, 90  # size of the hand-made images


def item(cat: int = 1, style: int = 1, box=(10, 10, 60, 70), **over) -> dict:
    n = df2.LANDMARK_COUNTS[cat]
    x1, y1, x2, y2 = box
    lms = []
    for k in range(n):
        lms += [x1 + (k * 7) % max(1, int(x2 - x1)), y1 + (k * 5) % max(1, int(y2 - y1)), 2 if k % 3 else 1]
    rec = {"segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]], "scale": 2, "viewpoint": 2, "zoom_in": 1,
           "style": style, "bounding_box": list(box), "occlusion": 1, "landmarks": lms,
           "category_name": df2.CATEGORY_NAMES[cat], "category_id": cat}
    rec.update(over)
    return rec


def anno(source: str = "user", pair_id: int = 1, *items: dict) -> dict:
    out: dict = {"source": source, "pair_id": pair_id}
    for n, it in enumerate(items or (item(),)):
        out[f"item{n + 1}"] = it
    return out


def write_split(root: Path, annos: dict[int, dict | str | None], images: dict[int, bytes | None] | None = None,
                name: str = "validation") -> Path:
    """annos: id -> dict (JSON), str (raw text) or None (no annotation file); images default to a W x H JPEG."""
    split = root / name
    (split / "annos").mkdir(parents=True, exist_ok=True)
    (split / "image").mkdir(parents=True, exist_ok=True)
    jpg = split / ".proto.jpg"
    Image.new("RGB", (W, H), (120, 60, 30)).save(jpg, quality=80)
    proto = jpg.read_bytes()
    jpg.unlink()
    images = images or {}
    for iid in sorted(set(annos) | set(images)):
        a = annos.get(iid, None)
        if a is not None:
            text = a if isinstance(a, str) else json.dumps(a)
            (split / "annos" / f"{iid:06d}.json").write_text(text)
        img = images.get(iid, proto) if iid in images else (proto if a is not None else None)
        if img is not None:
            (split / "image" / f"{iid:06d}.jpg").write_bytes(img)
    return split


@pytest.fixture()
def good_split(tmp_path: Path) -> Path:
    return write_split(tmp_path, {
        1: anno("user", 1, item(1, 1), item(8, 0, (5, 40, 50, 88))),
        2: anno("shop", 1, item(1, 1, (0, 0, 120, 90))),
        3: anno("user", 2, item(9, 1, (20, 20, 40, 50))),
    })


# ------------------------------------------------------------------------------------------ reading


def test_load_items_columns_order_and_values(good_split: Path):
    df = df2.load_items(good_split)
    assert tuple(df.columns) == df2.COLUMNS
    assert list(df["key"]) == ["validation/000001/item1", "validation/000001/item2", "validation/000002/item1",
                               "validation/000003/item1"]
    r = df.iloc[1]
    assert (r["split"], r["image_id"], r["source"], r["pair_id"], r["item"]) == ("validation", 1, "user", 1, "item2")
    assert (r["category_id"], r["category_name"], r["style"]) == (8, "trousers", 0)
    assert (r["x1"], r["y1"], r["x2"], r["y2"]) == (5.0, 40.0, 50.0, 88.0)
    assert (r["width"], r["height"]) == (W, H)
    assert Path(r["path"]).is_absolute() and Path(r["path"]).name == "000001.jpg"
    assert len(r["landmarks"]) == 3 * 14 and r["segmentation"] == [[5, 40, 50, 40, 50, 88, 5, 88]]
    assert df.attrs["skipped"] == [] and df.attrs["clamped"] == 0 and df.attrs["n_files"] == 3
    for c in ("image_id", "width", "height", "pair_id", "category_id", "style", "scale", "occlusion", "zoom_in",
              "viewpoint"):
        assert df[c].dtype == np.int64, c


def test_items_sorted_by_item_number_not_string(tmp_path: Path):
    a = anno("user", 1, *[item(1, 1) for _ in range(11)])
    split = write_split(tmp_path, {1: a})
    df = df2.load_items(split)
    assert list(df["item"]) == [f"item{n}" for n in range(1, 12)]


def _mutate(path: str, value, a: dict | None = None) -> dict:
    a = copy.deepcopy(a or anno("user", 1, item(1, 1), item(7, 0, (30, 30, 70, 60))))
    obj = a
    parts = path.split(".")
    for p in parts[:-1]:
        obj = obj[p]
    if value is _DELETE:
        del obj[parts[-1]]
    else:
        obj[parts[-1]] = value
    return a


_DELETE = object()

RULES = [  # (path to change, new value, expected error field)
    ("item1.category_id", 14, "item1.category_id"),
    ("item1.category_id", 0, "item1.category_id"),
    ("item1.category_id", "1", "item1.category_id"),
    ("item1.category_name", "t-shirt", "item1.category_name"),
    ("item1.category_name", _DELETE, "item1.category_name"),
    ("item1.style", -1, "item1.style"),
    ("item1.style", 1.0, "item1.style"),
    ("item1.style", True, "item1.style"),
    ("item1.bounding_box", [60, 10, 10, 70], "item1.bounding_box"),
    ("item1.bounding_box", [10, 70, 60, 70], "item1.bounding_box"),
    ("item1.bounding_box", [10, 10, 60], "item1.bounding_box"),
    ("item1.bounding_box", [10, 10, 60, "70"], "item1.bounding_box"),
    ("item1.bounding_box", [10, 10, W + 5, 70], "item1.bounding_box"),
    ("item1.bounding_box", [-4, 10, 60, 70], "item1.bounding_box"),
    ("item1.bounding_box", _DELETE, "item1.bounding_box"),
    ("item1.landmarks", [1, 2, 2] * 24, "item1.landmarks"),
    ("item1.landmarks", [1, 2, 3] * 25, "item1.landmarks"),
    ("item1.landmarks", [1, None, 2] * 25, "item1.landmarks"),
    ("item2.landmarks", [1, 2, 2] * 25, "item2.landmarks"),  # shorts need 10 landmarks
    ("item1.segmentation", [], "item1.segmentation"),
    ("item1.segmentation", [[1, 2, 3, 4, 5]], "item1.segmentation"),
    ("item1.segmentation", [[1, 2, 3, 4]], "item1.segmentation"),
    ("item1.segmentation", "polygon", "item1.segmentation"),
    ("item1.scale", 0, "item1.scale"),
    ("item1.occlusion", 4, "item1.occlusion"),
    ("item1.zoom_in", "2", "item1.zoom_in"),
    ("item1.viewpoint", _DELETE, "item1.viewpoint"),
    ("item2.viewpoint", 9, "item2.viewpoint"),
    ("source", "consumer", "source"),
    ("source", _DELETE, "source"),
    ("pair_id", "7", "pair_id"),
    ("pair_id", _DELETE, "pair_id"),
    ("item1", ["not", "an", "object"], "item1"),
    ("itemX", {}, "itemX"),
]


@pytest.mark.parametrize("path,value,field", RULES, ids=[f"{r[0]}={r[1]!r}"[:60] for r in RULES])
def test_each_rule_names_file_and_field(tmp_path: Path, path, value, field):
    split = write_split(tmp_path, {1: anno(), 2: _mutate(path, value)})
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.load_items(split)
    err = ei.value
    assert Path(err.file).name == "000002.json" and Path(err.file).parent.name == "annos"
    assert err.field == field
    assert err.reason and err.file in str(err) and field in str(err) and err.reason in str(err)


def test_no_items(tmp_path: Path):
    split = write_split(tmp_path, {1: {"source": "user", "pair_id": 3}})
    with pytest.raises(DeepFashion2FormatError, match="item") as ei:
        df2.load_items(split)
    assert ei.value.field == "item*"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_unparseable_json(tmp_path: Path, text: str):
    split = write_split(tmp_path, {4: text})
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.load_items(split)
    assert ei.value.field == "<json>" and ei.value.file.endswith("000004.json")


def test_annotation_without_image(tmp_path: Path):
    split = write_split(tmp_path, {1: anno(), 2: anno()})
    (split / "image" / "000002.jpg").unlink()
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.load_items(split)
    assert ei.value.field == "image" and ei.value.file.endswith("000002.json") and "no image" in ei.value.reason


def test_image_without_annotation(tmp_path: Path):
    split = write_split(tmp_path, {1: anno(), 2: None}, images={2: None})
    proto = (split / "image" / "000001.jpg").read_bytes()
    (split / "image" / "000002.jpg").write_bytes(proto)
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.load_items(split)
    assert ei.value.field == "annotation" and ei.value.file.endswith("000002.jpg")


def test_undecodable_image(tmp_path: Path):
    split = write_split(tmp_path, {1: anno(), 2: anno()}, images={2: b"this is not a jpeg"})
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.load_items(split)
    assert ei.value.field == "image" and ei.value.file.endswith("000002.json") and "000002.jpg" in ei.value.reason


def test_truncated_jpeg_caught_only_by_full_check(tmp_path: Path):
    rng = np.random.default_rng(0)
    import io

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    split = write_split(tmp_path, {1: anno(), 2: anno()}, images={2: data[: len(data) // 2]})
    assert len(df2.load_items(split)) == 2  # header check: size is readable
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.load_items(split, check_images="full")
    assert ei.value.field == "image" and ei.value.file.endswith("000002.json")
    skipped = df2.load_items(split, errors="skip", check_images="full").attrs["skipped"]
    assert [(s["level"], s["field"]) for s in skipped] == [("file", "image")]


def test_bad_file_names(tmp_path: Path):
    split = write_split(tmp_path, {1: anno()})
    (split / "annos" / "notes.json").write_text("{}")
    (split / "annos" / ".DS_Store").write_text("ignored: hidden")
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.load_items(split)
    assert ei.value.field == "file name" and ei.value.file.endswith("notes.json")
    df = df2.load_items(split, errors="skip")
    assert len(df) == 1 and [s["field"] for s in df.attrs["skipped"]] == ["file name"]


def test_missing_split_folders(tmp_path: Path):
    (tmp_path / "validation" / "image").mkdir(parents=True)
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.load_items(tmp_path / "validation")
    assert ei.value.field == "annos"
    with pytest.raises(FileNotFoundError):
        df2.load_items(tmp_path / "nope")
    with pytest.raises(ValueError):
        df2.load_items(tmp_path / "validation", errors="ignore")


def test_error_is_picklable():
    import pickle

    e = pickle.loads(pickle.dumps(DeepFashion2FormatError("/a/b.json", "item1.style", "bad")))
    assert (e.file, e.field, e.reason) == ("/a/b.json", "item1.style", "bad")


# ------------------------------------------------------------------------------------ skip reports


def test_skip_reports_every_item_and_file(tmp_path: Path):
    annos = {
        1: anno("user", 1, item(1, 1), item(1, -2), item(9, 0, (1, 1, 30, 30))),  # item2 bad
        2: anno("shop", 1, item(1, 1, category_name="top"), item(8, 1, landmarks=[0, 0, 0])),  # both bad
        3: "{broken",  # file-level
        4: anno("user", 5, item(5, 2)),  # image missing below
        5: None,  # image without annotation
        6: _mutate("source", "nobody", anno("shop", 2, item(2, 1))),  # file-level
        7: anno("shop", 2, item(2, 1), item(3, 0)),
    }
    split = write_split(tmp_path, annos)
    (split / "image" / "000004.jpg").unlink()
    Image.new("RGB", (W, H)).save(split / "image" / "000005.jpg")
    df = df2.load_items(split, errors="skip")
    assert list(df["key"]) == ["validation/000001/item1", "validation/000001/item3", "validation/000007/item1",
                               "validation/000007/item2"]
    sk = df.attrs["skipped"]
    got = sorted((Path(s["file"]).name, s["field"], s["level"], s["key"]) for s in sk)
    assert got == sorted([
        ("000001.json", "item2.style", "item", "validation/000001/item2"),
        ("000002.json", "item1.category_name", "item", "validation/000002/item1"),
        ("000002.json", "item2.landmarks", "item", "validation/000002/item2"),
        ("000003.json", "<json>", "file", None),
        ("000004.json", "image", "file", None),
        ("000005.jpg", "annotation", "file", None),
        ("000006.json", "source", "file", None),
    ])
    assert all(s["reason"] for s in sk)
    # nothing silently dropped: kept + item-level skips = all items of the files that were read
    n_items_readable = 3 + 2 + 2
    assert len(df) + sum(s["level"] == "item" for s in sk) == n_items_readable


def test_skip_mode_empty_result_keeps_columns(tmp_path: Path):
    split = write_split(tmp_path, {1: "{"})
    df = df2.load_items(split, errors="skip")
    assert len(df) == 0 and tuple(df.columns) == df2.COLUMNS and len(df.attrs["skipped"]) == 1


# --------------------------------------------------------------------------- clamping and tolerances


def test_box_past_border_is_clamped_and_counted(tmp_path: Path):
    split = write_split(tmp_path, {
        1: anno("user", 1, item(1, 1, (-1, 0, W + 1, H)), item(1, 2, (0, 0, W, H)), item(1, 3, (3, 4, W + 2, H + 2))),
    })
    df = df2.load_items(split)
    assert df.attrs["clamped"] == 2  # touching the border (item2) is inside, not clamped
    assert df[["x1", "y1", "x2", "y2"]].to_numpy().tolist() == [[0, 0, W, H], [0, 0, W, H], [3, 4, W, H]]
    assert (df["x2"] <= df["width"]).all() and (df["y2"] <= df["height"]).all()


def test_box_tolerance_is_configurable(tmp_path: Path):
    split = write_split(tmp_path, {1: anno("user", 1, item(1, 1, (0, 0, W + 2, H)))})
    assert df2.load_items(split).attrs["clamped"] == 1
    with pytest.raises(DeepFashion2FormatError, match="more than 0 px"):
        df2.load_items(split, config=df2.ReadConfig(box_tolerance_px=0))
    split2 = write_split(tmp_path / "b", {1: anno("user", 1, item(1, 1, (W + 1, 0, W + 2, H)))})
    with pytest.raises(DeepFashion2FormatError, match="no area inside"):
        df2.load_items(split2)


def test_landmarks_outside_image_are_kept_and_counted(tmp_path: Path):
    it = item(7, 1)
    it["landmarks"][0:3] = [W + 40, -5, 1]  # visible/occluded point outside: kept unchanged
    it2 = item(7, 2)
    it2["landmarks"][0:3] = [W + 40, -5, 0]  # v = 0: not labelled, not counted
    split = write_split(tmp_path, {1: anno("user", 1, it, it2)})
    df = df2.load_items(split)
    assert df.attrs["landmarks_outside"] == 1
    assert df.iloc[0]["landmarks"][:3] == [W + 40, -5, 1]


def test_parallel_read_equals_serial(tmp_path: Path):
    annos = {i: anno("user" if i < 30 else "shop", i // 3 + 1, item(1 + i % 13, i % 3, (i % 20, 5, 80, 80)))
             for i in range(1, 61)}
    split = write_split(tmp_path, annos)
    a = df2.load_items(split, config=df2.ReadConfig(workers=1))
    b = df2.load_items(split, config=df2.ReadConfig(workers=2, progress=False))
    pd.testing.assert_frame_equal(a, b)
    bad = write_split(tmp_path / "bad", {**annos, 45: _mutate("item1.style", -1)})
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.load_items(bad, config=df2.ReadConfig(workers=2, progress=False))
    assert ei.value.file.endswith("000045.json")


# ---------------------------------------------------------------------------------- retrieval sets


@pytest.fixture()
def protocol_split(tmp_path: Path) -> pd.DataFrame:
    """Hand-made split with known answers.

    user 1: pair 1 {style 1 (cat 1), style 0 (cat 8)}; user 2: pair 1 {style 1}; user 3: pair 2 {style 1,
    style 2}; user 4: pair 4 {style 0 only}; shop 5: pair 1 {style 1, style 0}; shop 6: pair 2 {style 2};
    shop 7: pair 2 {style 0}; shop 8: pair 3 {style 1}; shop 9: pair 1 {style 1}.
    """
    split = write_split(tmp_path, {
        1: anno("user", 1, item(1, 1), item(8, 0, (5, 40, 50, 88))),
        2: anno("user", 1, item(1, 1)),
        3: anno("user", 2, item(7, 1), item(2, 2)),
        4: anno("user", 4, item(9, 0)),
        5: anno("shop", 1, item(1, 1), item(8, 0)),
        6: anno("shop", 2, item(2, 2)),
        7: anno("shop", 2, item(7, 0)),
        8: anno("shop", 3, item(3, 1)),
        9: anno("shop", 1, item(1, 1)),
    })
    return df2.load_items(split)


def test_item_retrieval_set(protocol_split: pd.DataFrame):
    rs = df2.item_retrieval_set(protocol_split)
    assert list(rs.queries["key"]) == ["validation/000001/item1", "validation/000002/item1",
                                       "validation/000003/item1", "validation/000003/item2"]
    assert len(rs.gallery) == 6 and (rs.gallery["source"] == "shop").all()  # style 0 included
    assert list(rs.queries["identity"]) == ["1:1", "1:1", "2:1", "2:2"]
    assert rs.gallery["identity"].tolist() == ["1:1", None, "2:2", None, "3:1", "1:1"]
    gk = rs.gallery["key"].tolist()
    pos = [[gk[i] for i in p] for p in rs.positives]
    assert pos == [["validation/000005/item1", "validation/000009/item1"]] * 2 + [[],
                                                                                  ["validation/000006/item1"]]
    assert rs.queries["n_positives"].tolist() == [2, 2, 0, 1]
    rel = rs.relevance().toarray()
    assert rel.shape == (4, 6) and rel.sum() == 5 and rel[0, 0] and rel[0, 5] and rel[3, 2]
    ql, gl = rs.labels()
    assert ql[0] == ql[1] == gl[0] == gl[5] and gl[1] == -1 and ql[3] == gl[2] and ql[2] not in set(gl)


def test_image_retrieval_set(protocol_split: pd.DataFrame):
    rs = df2.image_retrieval_set(protocol_split)
    assert rs.queries["key"].tolist() == ["validation/000001", "validation/000002", "validation/000003"]
    assert rs.gallery["key"].tolist() == [f"validation/{i:06d}" for i in (5, 6, 7, 8, 9)]
    assert rs.queries["identities"].tolist() == [("1:1",), ("1:1",), ("2:1", "2:2")]
    assert rs.gallery["identities"].tolist() == [("1:1",), ("2:2",), (), ("3:1",), ("1:1",)]
    gk = rs.gallery["key"].tolist()
    assert [[gk[i] for i in p] for p in rs.positives] == [
        ["validation/000005", "validation/000009"], ["validation/000005", "validation/000009"], ["validation/000006"]]
    assert rs.queries["n_items"].tolist() == [2, 1, 2]
    with pytest.raises(ValueError):
        rs.labels()


def test_retrieval_set_matches_naive_reference(protocol_split: pd.DataFrame):
    rs = df2.item_retrieval_set(protocol_split)
    for qi, q in rs.queries.iterrows():
        naive = [gi for gi, g in rs.gallery.iterrows()
                 if g["pair_id"] == q["pair_id"] and g["style"] == q["style"] and g["style"] > 0]
        assert rs.positives[qi].tolist() == naive


# ------------------------------------------------------------------------------ official formats


def test_items_to_official_gt_round_trip(protocol_split: pd.DataFrame, tmp_path: Path):
    qp, gp = df2.write_official_gt(protocol_split, tmp_path)
    q, g = df2.read_query_gt(qp), df2.read_gallery_gt(gp)
    pd.testing.assert_frame_equal(q, df2.query_gt_frame(protocol_split))
    pd.testing.assert_frame_equal(g, df2.gallery_gt_frame(protocol_split))
    assert tuple(q.columns) == df2.QUERY_GT_COLUMNS and tuple(g.columns) == df2.GALLERY_GT_COLUMNS
    assert len(q) == 4 and len(g) == 6
    rec = json.loads(qp.read_text())[0]
    assert rec == {"query_image_id": 1, "style": 1, "pair_id": 1, "bbox": [10, 10, 60, 70], "cls": 1}
    assert all(isinstance(v, int) for v in rec["bbox"])  # integral boxes are written as ints
    q0 = df2.query_gt_frame(protocol_split, include_style0=True)
    assert len(q0) == 6 and set(q0["style"]) == {0, 1, 2}


def test_2019_ground_truth_imports_with_expected_counts(shared_data: Path, tmp_path: Path):
    d = shared_data / "df2_val_gt_2019"
    if not (d / "query_gt.json").is_file():
        pytest.skip(f"{d} holds no query_gt.json")
    q = df2.read_query_gt(d / "query_gt.json")
    g = df2.read_gallery_gt(d / "gallery_gt.json")
    assert len(q) == 15752 and int((q["style"] > 0).sum()) == 12550
    assert q[q["style"] > 0]["query_image_id"].nunique() <= q["query_image_id"].nunique() == 10990
    assert len(g) == 24012 and (g["style"] > 0).all() and g["gallery_image_id"].nunique() == 21390
    ident = set(zip(q.loc[q["style"] > 0, "pair_id"], q.loc[q["style"] > 0, "style"]))
    assert len(ident) == 3043
    # export -> import round-trips exactly, and the written records equal the original ones
    df2.write_query_gt(q, tmp_path / "q.json")
    df2.write_gallery_gt(g, tmp_path / "g.json")
    pd.testing.assert_frame_equal(df2.read_query_gt(tmp_path / "q.json"), q)
    pd.testing.assert_frame_equal(df2.read_gallery_gt(tmp_path / "g.json"), g)
    assert json.loads((tmp_path / "q.json").read_text()) == json.loads((d / "query_gt.json").read_text())
    assert json.loads((tmp_path / "g.json").read_text()) == json.loads((d / "gallery_gt.json").read_text())


GT_ERRORS = [
    ('{"a": 1}', "<json>"),
    ("[1]", "[0]"),
    ('[{"query_image_id": 1, "style": 1, "pair_id": 1, "bbox": [1, 2, 3, 4]}]', "[0].cls"),
    ('[{"query_image_id": 1, "style": 1, "pair_id": 1, "bbox": [1, 2, 3], "cls": 1}]', "[0].bbox"),
    ('[{"query_image_id": 1, "style": 1, "pair_id": 1, "bbox": [5, 2, 3, 4], "cls": 1}]', "[0].bbox"),
    ('[{"query_image_id": 1, "style": -1, "pair_id": 1, "bbox": [1, 2, 3, 4], "cls": 1}]', "[0].style"),
    ('[{"query_image_id": "1", "style": 1, "pair_id": 1, "bbox": [1, 2, 3, 4], "cls": 1}]', "[0].query_image_id"),
    ('[{"query_image_id": 1, "style": 1, "pair_id": 1, "bbox": [1, 2, 3, 4], "cls": 14}]', "[0].cls"),
    ("[{", "<json>"),
]


@pytest.mark.parametrize("text,field", GT_ERRORS)
def test_query_gt_import_errors(tmp_path: Path, text: str, field: str):
    p = tmp_path / "val_query.json"
    p.write_text(text)
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.read_query_gt(p)
    assert ei.value.field == field and ei.value.file == str(p)


def test_gallery_gt_import_error(tmp_path: Path):
    p = tmp_path / "val_gallery.json"
    p.write_text('[{"gallery_image_id": 3, "style": 1, "bbox": [1, 2, 3, 4]}]')
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.read_gallery_gt(p)
    assert ei.value.field == "[0].pair_id"


def test_results_round_trip_and_validation(protocol_split: pd.DataFrame, tmp_path: Path):
    rs = df2.item_retrieval_set(protocol_split)
    ranking = np.tile(np.arange(len(rs.gallery))[::-1], (len(rs.queries), 1))
    recs = df2.results_records(rs.queries, rs.gallery, ranking, scores=np.linspace(0.5, 0.9, len(rs.queries)))
    assert recs[0]["query_image_id"] == 1 and recs[0]["query_cls"] == 1 and recs[0]["query_bbox"] == [10, 10, 60, 70]
    assert recs[0]["gallery_image_id"] == [9, 8, 7, 6, 5, 5]
    assert len(recs[0]["gallery_bbox"]) == 6
    path = df2.write_results(recs, tmp_path / "results.json")
    back = df2.read_results(path)
    assert back == recs
    assert json.loads(path.read_text()) == recs
    with pytest.raises(DeepFashion2FormatError, match="at least 20"):
        df2.read_results(path, min_k=20)
    bad = copy.deepcopy(recs)
    bad[2]["gallery_image_id"] = bad[2]["gallery_image_id"][:3]
    bad[2]["gallery_bbox"] = bad[2]["gallery_bbox"][:3]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DeepFashion2FormatError) as ei:
        df2.read_results(tmp_path / "bad.json")
    assert ei.value.field == "[2].gallery_image_id" and "equal-length" in ei.value.reason
    for mutate, field in [
        (lambda r: r.pop("query_score"), "[0].query_score"),
        (lambda r: r.__setitem__("query_score", float("nan")), "[0].query_score"),
        (lambda r: r.__setitem__("query_cls", 0), "[0].query_cls"),
        (lambda r: r.__setitem__("gallery_bbox", r["gallery_bbox"][:-1]), "[0].gallery_bbox"),
        (lambda r: r["gallery_bbox"].__setitem__(1, [3, 3, 1, 1]), "[0].gallery_bbox[1]"),
        (lambda r: r.__setitem__("query_bbox", [1, 2]), "[0].query_bbox"),
    ]:
        b = copy.deepcopy(recs)
        mutate(b[0])
        with pytest.raises(DeepFashion2FormatError) as ei:
            df2.write_results(b, tmp_path / "x.json")
        assert ei.value.field == field
    with pytest.raises(ValueError):
        df2.results_records(rs.queries, rs.gallery, ranking[:2])


# ---------------------------------------------------------------------------------- release check


def test_check_release_reports_differences(protocol_split: pd.DataFrame, tmp_path: Path):
    split_dir = Path(protocol_split["path"].iloc[0]).parent.parent
    rep = df2.check_release(split_dir)  # named "validation": compared with the released numbers
    assert not rep.ok and rep.expected is df2.RELEASED["validation"]
    diffs = {d["quantity"]: (d["expected"], d["found"]) for d in rep.differences}
    assert diffs["images"] == (32153, 9) and diffs["queries"] == (12377, 4) and diffs["gallery"] == (36961, 6)
    assert diffs["user_id_range"] == ((1, 10844), (1, 4))
    assert "32153" in str(rep) and "DIFFERS" in str(rep)
    exact = df2.ReleaseCounts(images=9, user_images=4, shop_images=5, queries=4, gallery=6, items=12,
                              user_id_range=(1, 4), shop_id_range=(5, 9))
    rep2 = df2.check_release(split_dir, items=protocol_split, expected=exact)
    assert rep2.ok, str(rep2)
    frame = rep2.to_frame()
    assert frame.set_index("quantity").loc["queries", "found"] == 4 and frame["match"].dropna().all()


def test_check_release_reports_layout_problems(tmp_path: Path):
    split = write_split(tmp_path, {1: anno(), 2: "{"})
    rep = df2.check_release(split, expected=df2.ReleaseCounts(images=2))
    assert not rep.ok and any("failed validation" in p for p in rep.problems)
    rep = df2.check_release(tmp_path / "missing")
    assert not rep.ok and "does not exist" in rep.problems[0]
    (tmp_path / "train" / "image").mkdir(parents=True)
    rep = df2.check_release(tmp_path / "train")
    assert any("annos" in p for p in rep.problems)


def test_released_numbers_are_consistent():
    v = df2.RELEASED["validation"]
    assert v.user_images + v.shop_images == v.images == 32153
    assert v.user_id_range == (1, 10844) and v.shop_id_range == (10845, 32153)
    assert v.gallery == v.shop_items == 36961 and v.queries == 12377
    assert set(df2.LANDMARK_COUNTS) == set(df2.CATEGORY_NAMES) == set(range(1, 14))
    assert sum(df2.LANDMARK_COUNTS.values()) == 294


@pytest.mark.parametrize("kw", [dict(), dict(progressive=True), dict(subsampling=0, quality=95),
                                dict(exif=b"Exif\x00\x00" + b"\x00" * 40000), dict(mode="L"),
                                dict(restart_marker_blocks=1), dict(exif=b"Exif\x00\x00" + b"\x00" * 65000)],
                         ids=["baseline", "progressive", "444", "exif40k", "grey", "restart", "exif65k"])
def test_fast_jpeg_header_matches_pillow(tmp_path: Path, kw: dict):
    kw = dict(kw)
    mode = kw.pop("mode", "RGB")
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (37, 53, 3) if mode == "RGB" else (37, 53), dtype=np.uint8)
    p = tmp_path / "a.jpg"
    Image.fromarray(arr, mode).save(p, format="JPEG", **kw)
    with Image.open(p) as im:
        expect = im.size
    fast = df2_reader._jpeg_header_size(p.read_bytes()[:65536])
    assert fast in (expect, None)  # None only when the frame header lies past 64 KiB (Pillow then reads it)
    assert df2_reader._image_size(str(p), "header") == expect == (53, 37)
    assert df2_reader._image_size(str(p), "full") == expect


def test_png_images_are_read_through_pillow(tmp_path: Path):
    split = write_split(tmp_path, {1: anno()})
    (split / "image" / "000001.jpg").unlink()
    Image.new("RGB", (W, H)).save(split / "image" / "000001.png")
    df = df2.load_items(split)
    assert df.iloc[0]["path"].endswith("000001.png") and (df.iloc[0]["width"], df.iloc[0]["height"]) == (W, H)
