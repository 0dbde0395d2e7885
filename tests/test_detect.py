"""capret_utils.evaluation.detect: NMS against a naive reference, detections selected per photo, the official
protocol with detected boxes (a photo with no detection and a class mismatch are misses that stay in the
denominator), the detection report and the box-mode table rows; one end-to-end run on the smoke benchmark."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from capret_utils.evaluation import detect, df2_eval


def naive_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Textbook greedy NMS on one image, one box at a time."""

    def iou(a, b):
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        if w <= 0 or h <= 0:
            return 0.0
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    order = sorted((i for i in range(len(scores)) if np.isfinite(scores[i])), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[j]) <= thr for j in keep):
            keep.append(i)
    return sorted(keep)


def random_boxes(rng: np.random.Generator, p: int, c: int) -> np.ndarray:
    xy = rng.uniform(0, 80, (p, c, 2))
    wh = rng.uniform(5, 60, (p, c, 2))
    return np.concatenate([xy, xy + wh], axis=-1)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_padded_matches_naive_reference(thr):
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 40, 13)
    scores = rng.uniform(0, 1, (40, 13))
    scores[rng.uniform(size=scores.shape) < 0.1] = -np.inf  # missing candidates
    scores[3, :4] = 0.5  # ties: the earlier candidate wins
    keep = detect.nms_padded(boxes, scores, thr)
    for p in range(40):
        assert np.flatnonzero(keep[p]).tolist() == naive_nms(boxes[p], scores[p], thr), p


def test_nms_hand_case():
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]]], dtype=float)
    scores = np.array([[0.9, 0.8, 0.7, np.nan]])
    # box 1 overlaps box 0 with IoU 0.81 > 0.5: suppressed; box 2 is far; box 3 has no score
    assert detect.nms_padded(boxes, scores, 0.5).tolist() == [[True, False, True, False]]
    assert detect.nms_padded(boxes, scores, 0.9).tolist() == [[True, True, True, False]]


def photos_frame() -> pd.DataFrame:
    return pd.DataFrame({"key": ["s/000001", "s/000002"], "split": ["s", "s"], "image_id": [1, 2],
                         "source": ["user", "shop"], "path": ["a.jpg", "b.jpg"], "width": [100, 100],
                         "height": [100, 100]})


def test_select_detections_keeps_best_after_nms():
    photos = photos_frame()
    C = len(detect.CATEGORY_IDS)
    boxes = np.tile(np.array([10.0, 10.0, 50.0, 50.0]), (2, C, 1))
    boxes[:, 1] = [60, 60, 90, 90]  # category 2 elsewhere
    score = np.linspace(0.1, 0.9, C)[None].repeat(2, 0)
    cands = {"boxes": boxes, "itm-photo": score}
    cfg = detect.DetectConfig(scoring="itm-photo", max_detections=3)
    dets = detect.select_detections(photos, cands, cfg)
    # all boxes but category index 1 coincide: NMS keeps the best of them (index 12) and index 1
    assert dets.groupby("photo_key").size().tolist() == [2, 2]
    first = dets[dets["photo_key"] == "s/000001"]
    assert first["category_id"].tolist() == [detect.CATEGORY_IDS[12], detect.CATEGORY_IDS[1]]
    assert first["rank"].tolist() == [0, 1] and first["score"].is_monotonic_decreasing
    high = detect.select_detections(photos, cands, detect.DetectConfig(scoring="itm-photo", min_score=0.5))
    assert high["category_id"].tolist() == [detect.CATEGORY_IDS[12]] * 2
    with pytest.raises(KeyError, match="crops=True"):
        detect.select_detections(photos, cands, detect.DetectConfig(scoring="itm-crop"))


def items_frame() -> pd.DataFrame:
    """Two query photos (image 1: two items, image 2: one) and one shop photo holding the matches."""
    rows = [  # key, image_id, source, pair_id, category_id, style, box
        ("s/000001/item1", 1, "user", 1, 1, 1, (10, 10, 50, 50)),
        ("s/000001/item2", 1, "user", 1, 8, 2, (10, 60, 50, 95)),
        ("s/000002/item1", 2, "user", 2, 3, 1, (20, 20, 80, 80)),
        ("s/000003/item1", 3, "shop", 1, 1, 1, (0, 0, 40, 40)),
        ("s/000003/item2", 3, "shop", 1, 8, 2, (50, 50, 90, 90)),
        ("s/000004/item1", 4, "shop", 2, 3, 1, (10, 10, 90, 90)),
    ]
    return pd.DataFrame({
        "key": [r[0] for r in rows], "split": "s", "image_id": [r[1] for r in rows],
        "source": [r[2] for r in rows], "path": [f"{r[1]}.jpg" for r in rows], "width": 100, "height": 100,
        "pair_id": [r[3] for r in rows], "category_id": [r[4] for r in rows],
        "category_name": [detect.CATEGORY_NAMES[r[4]] for r in rows], "style": [r[5] for r in rows],
        **{c: [float(r[6][i]) for r in rows] for i, c in enumerate(["x1", "y1", "x2", "y2"])}})


def dets_frame(rows) -> pd.DataFrame:
    """Detections: (image_id, source, category_id, score, box)."""
    return pd.DataFrame({
        "key": [f"s/{r[0]:06d}/det{i}" for i, r in enumerate(rows)],
        "photo_key": [f"s/{r[0]:06d}" for r in rows], "image_id": [r[0] for r in rows],
        "source": [r[1] for r in rows], "category_id": [r[2] for r in rows], "score": [r[3] for r in rows],
        **{c: [float(r[4][i]) for r in rows] for i, c in enumerate(["x1", "y1", "x2", "y2"])}})


def official(items: pd.DataFrame, dets: pd.DataFrame, gallery_entries: dict[int, list]) -> df2_eval.Df2EvalResult:
    """Score detections with the official evaluator; ``gallery_entries[row]`` = [(image_id, box), ...]."""
    from capret_utils.data import df2

    q = dets[dets["source"] == "user"].reset_index(drop=True)
    results = [{"query_image_id": int(r.image_id), "query_bbox": [r.x1, r.y1, r.x2, r.y2],
                "query_cls": int(r.category_id), "query_score": float(r.score),
                "gallery_image_id": [e[0] for e in gallery_entries[i]],
                "gallery_bbox": [list(e[1]) for e in gallery_entries[i]]} for i, r in enumerate(q.itertuples())]
    gal = df2.gallery_gt_frame(items)
    gallery_gt = [{"gallery_image_id": int(r.gallery_image_id), "bbox": [r.x1, r.y1, r.x2, r.y2],
                   "style": int(r.style), "pair_id": int(r.pair_id)} for r in gal.itertuples()]
    return df2_eval.evaluate_df2(results, detect.query_gt_records(items), gallery_gt)


def test_photo_without_detection_and_class_mismatch_are_misses():
    items = items_frame()
    # photo 2 has no detection at all; photo 1: item1 found with its class, item2 only with a wrong class (5)
    dets = dets_frame([(1, "user", 1, 0.9, (10, 10, 50, 50)), (1, "user", 5, 0.8, (10, 60, 50, 95))])
    hit = (3, (0, 0, 40, 40))  # the shop box of pair 1 / style 1
    ev = official(items, dets, {0: [hit], 1: [(3, (50, 50, 90, 90))]})
    assert ev.metrics["n_queries"] == 3  # never dropped from the denominator
    assert ev.metrics["n_matched"] == 1
    assert ev.metrics["top1"] == pytest.approx(1 / 3)
    pq = ev.per_query.set_index("gt_index")
    assert pq.loc[1, "result_index"] == -1 and not pq.loc[1, "hit@1"]  # class mismatch: a miss
    assert pq.loc[2, "result_index"] == -1 and not pq.loc[2, "hit@20"]  # no detection: a miss

    per_cat, summary = detect.detection_report(dets, items, detect.photo_table(items))
    assert summary["n_queries"] == 3 and summary["n_lost"] == 2 and summary["lost_share"] == pytest.approx(2 / 3)
    assert summary["no_detection_photos"] == 1
    assert summary["recall_iou50"] == pytest.approx(1 / 3)
    assert summary["box_recall_iou50"] == pytest.approx(2 / 3)  # item2's box was found, with the wrong class
    by = per_cat.set_index("category_id")
    assert by.loc[1, "recall"] == 1 and by.loc[8, "recall"] == 0 and by.loc[8, "box_recall"] == 1
    assert by.loc[3, "recall"] == 0 and by.loc[3, "n"] == 1

    rec = detect.item_recall(dets, items)
    gap = detect.gap_table(ev.per_query, rec, ev.per_query).set_index("group")
    assert gap.loc["lost: class wrong", "n"] == 1 and gap.loc["lost: box missed", "n"] == 1
    assert gap.loc["scored: good box", "n"] == 1 and gap["share"].sum() == pytest.approx(1.0)


def test_official_matches_mirror_the_evaluator():
    items = items_frame()
    dets = dets_frame([(1, "user", 1, 0.9, (12, 12, 50, 50)), (1, "user", 1, 0.95, (0, 0, 20, 20)),
                       (2, "user", 3, 0.4, (0, 0, 30, 30)), (4, "shop", 3, 0.9, (10, 10, 90, 90))])
    m = detect.official_matches(dets, items)
    assert m["query_key"].tolist() == ["s/000001/item1", "s/000001/item2", "s/000002/item1"]
    # item1: both detections are assigned to it, the higher score wins even with the lower IoU
    assert m["result_index"].tolist() == [1, -1, 2]
    assert m.loc[2, "result_iou"] < 0.5  # scored with a poor box: not lost, but its box is poor


def test_photo_table_reads_no_labels():
    items = items_frame()
    photos = detect.photo_table(items)
    assert photos["key"].tolist() == ["s/000001", "s/000002", "s/000003", "s/000004"]
    assert set(photos.columns) == {"key", "split", "image_id", "source", "path", "width", "height"}


def test_add_to_table_box_rows():
    pq = pd.DataFrame({"hit@1": [True, False, True, False], "hit@20": [True, True, True, False]})
    det = pd.DataFrame({"hit@1": [False, False, True, False], "hit@20": [True, False, True, False]})
    ev = {f"top{k}": 0.5 for k in (1, 5, 10, 15, 20)} | {"n_queries": 4}
    modes = detect.BoxModes({"m/crop@gt": pq, "m/crop@oracle": pq, "m/crop@detected": det},
                            {"m/crop@gt": ev, "m/crop@oracle": ev, "m/crop@detected": {**ev, "top1": 0.25}},
                            {}, {}, {}, {}, detect.DetectConfig())
    table = pd.DataFrame({"name": ["m/crop", "m/image"], "model": "m", "top1": [0.4, 0.1]})
    out = detect.add_to_table(table, modes).set_index("name")
    assert out["boxes"].to_dict() == {"m/crop": "gt", "m/image": "gt", "m/crop@oracle": "oracle",
                                      "m/crop@detected": "detected"}
    assert out.loc["m/crop@detected", "official_top1"] == 0.25 and np.isnan(out.loc["m/crop@detected", "top1"])
    assert out.loc["m/crop@detected", "lost"] == 1 and out.loc["m/crop@detected", "won"] == 0
    lo, hi = out.loc["m/crop", ["official_top1_lo", "official_top1_hi"]]
    assert lo < 0.5 < hi


@pytest.mark.slow
def test_run_box_modes_smoke(tmp_path):
    from capret_utils.data import splits
    from capret_utils.evaluation import analysis
    from capret_utils.runs import paths

    items, _ = splits.load_role(paths.data_root("", True), "test")
    data = analysis.RetrievalData.build(items)
    models = analysis.load_models("", "tiny", 0, [t for tb in data.texts.values() for t in tb.values()],
                                  device="cpu")
    cfg = analysis.AnalysisConfig(num_workers=0, progress=False, device="cpu")
    modes = detect.run_box_modes(models, data, cfg, detect.DetectConfig(max_detections=2), run_dir=tmp_path)
    assert set(modes.official) == {"zero-shot/crop@gt", "zero-shot/crop@oracle", "zero-shot/crop@detected"}
    dets = modes.detections["zero-shot"]
    # max_detections counts boxes; the zero-shot model has no category head: itc-class, 3 classes per query box
    assert dets.groupby("photo_key")["candidate"].nunique().max() <= 2 and dets["score"].between(0, 1).all()
    assert modes.summary["zero-shot"]["scoring"] == "itc-class"
    assert dets[dets["source"] == "shop"].groupby("photo_key").size().max() <= 2
    assert dets[dets["source"] == "user"].groupby(["photo_key", "candidate"]).size().max() == 3
    assert (tmp_path / "official" / "zero-shot-crop-detected.results.json").is_file()
    n = {k: v["n_queries"] for k, v in modes.official.items()}
    assert len(set(n.values())) == 1  # every box mode scores the same GT queries
    entry = detect.metrics_entry(modes)
    assert set(entry["zero-shot"]["official"]) == {"gt", "detected", "oracle"}


# ------------------------------------------------------------------------------------------ fast crop paths


def photo_files(tmp_path, n: int = 3) -> pd.DataFrame:
    """``n`` random JPEG photos of different sizes, as a photo table."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        w, h = 300 + 97 * i, 420 - 60 * i
        path = tmp_path / f"p{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        rows.append({"key": f"s/{i:06d}", "split": "s", "image_id": i, "source": "user" if i else "shop",
                     "path": str(path), "width": w, "height": h})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("draft", [False, True])
def test_store_crops_match_one_decode_per_crop(tmp_path, draft):
    from capret_utils.data.decode import ImageStore

    photos = photo_files(tmp_path)
    row = photos.iloc[2].to_dict()
    boxes = np.array([[10, 20, 200, 300], [50.5, 60.2, 120.7, 140.1], [0, 0, row["width"], row["height"]]])
    # all regions need the same draft scale (so the pixels agree): long sides well above 2 x side or all below
    side = 32 if draft else 64
    many = ImageStore(side, draft=draft).crops(row, boxes, 0.1)
    for b, got in zip(boxes, many):
        one = ImageStore(side, draft=draft).crop({**row, "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]}, 0.1)
        if draft:  # the one-decode path decodes for the smallest region: never smaller than each crop's own
            assert got.size == one.size or max(got.size) == side
        else:
            assert got.size == one.size and np.array_equal(np.asarray(got), np.asarray(one))


def naive_crop_scores(photos, boxes, bundle, head):
    """Reference: one ImageStore.crop + one vision pass per candidate box, ITC / head softmax by hand."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        _, _, text_feat = detect._category_texts(bundle)
    store = bundle.store()
    feats = []
    for i, row in enumerate(photos.to_dict("records")):
        for b in boxes[i]:
            im = store.crop({**row, "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3]}, bundle.info["context"])
            pv = torch.from_numpy(bundle.processor.process_one(im, train=False)[0])[None]
            with torch.no_grad():
                feats.append(bundle.model.get_image_embeds(pv)[1][0])
    feat = torch.stack(feats)
    itc = (feat @ text_feat.t() / bundle.model.temp.detach()).softmax(-1)
    hd = (30.0 * F.normalize(feat, dim=-1) @ F.normalize(head, dim=0)).softmax(-1)
    shape = boxes.shape[:2]
    return feat.numpy().reshape(*shape, -1), itc.numpy().reshape(*shape, 13), hd.numpy().reshape(*shape, 13)


def test_crop_scores_match_naive_reference(tmp_path):
    import torch

    from _tiny_bundle import make_tiny_bundle
    from capret_utils.evaluation import crop_scores

    bundle = make_tiny_bundle()
    bundle.info["cache_side"] = 4096  # no shrinking: both paths cut the same full-size pixels
    photos = photo_files(tmp_path)
    rng = np.random.default_rng(2)
    boxes = np.concatenate([rng.uniform(0, 100, (3, 4, 2)), rng.uniform(150, 250, (3, 4, 2))], axis=-1)
    valid = np.ones((3, 4), bool)
    valid[1, 2:] = False  # a photo with fewer candidates: NaN there
    head = torch.randn(int(bundle.model.config.embed_dim), 13)
    with torch.no_grad():
        _, _, text_feat = detect._category_texts(bundle)
    got = crop_scores.crop_scores(photos, boxes, valid, bundle, text_feat, head, batch_size=2, num_workers=0)
    feat, itc, hd = naive_crop_scores(photos, boxes, bundle, head)
    for name, ref in (("feat", feat), ("itc", itc), ("head", hd)):
        np.testing.assert_allclose(got[name][valid], ref[valid], rtol=1e-4, atol=1e-5, err_msg=name)
        assert np.isnan(got[name][~valid]).all()


def test_crop_slots_are_nms_top_k():
    rng = np.random.default_rng(3)
    boxes = random_boxes(rng, 20, 13)
    itm = rng.uniform(0, 1, (20, 13))
    slots, valid = detect.crop_slots(boxes, itm, 13, 0.5)
    assert (slots == np.arange(13)).all() and valid.all()
    slots, valid = detect.crop_slots(boxes, itm, 4, 0.5)
    for p in range(20):
        kept = sorted(naive_nms(boxes[p], itm[p], 0.5), key=lambda i: -itm[p, i])[:4]
        assert slots[p, valid[p]].tolist() == kept


def class_cands(probs: np.ndarray, valid: np.ndarray) -> dict:
    """Two photos (user, shop), K = 3 cropped boxes each: disjoint boxes, except slot 2 on top of slot 0."""
    C = len(detect.CATEGORY_IDS)
    boxes = np.zeros((2, C, 4))
    boxes[:, :, :] = [0, 0, 5, 5]
    boxes[:, 3] = [0, 0, 40, 40]
    boxes[:, 5] = [50, 50, 90, 90]
    boxes[:, 7] = [1, 1, 40, 40]  # IoU with candidate 3 > 0.5
    slots = np.array([[3, 5, 7], [3, 5, 7]])
    return {"boxes": boxes, "itm-photo": np.zeros((2, C)), "slots": slots, "valid": valid, "head_probs": probs,
            "itc_probs": probs[:, :, ::-1]}


def test_select_classified_hand_case():
    photos = photos_frame()
    probs = np.full((2, 3, 13), 0.01)
    probs[:, 0, [4, 9]] = [0.6, 0.3]  # box 0: class index 4 then 9
    probs[:, 1, [2, 0]] = [0.5, 0.4]
    probs[:, 2, 1] = 0.9  # box 2 overlaps box 0 and is more confident: box 0 is suppressed
    cfg = detect.DetectConfig(scoring="head-class", crop_candidates=3, classes_per_box=2, max_detections=3)
    dets = detect.select_detections(photos, class_cands(probs, np.ones((2, 3), bool)), cfg)
    user = dets[dets["source"] == "user"]
    ids = detect.CATEGORY_IDS
    assert user["candidate"].tolist() == [7, 7, 5, 5]
    assert user["category_id"].tolist() == [ids[1], ids[0], ids[2], ids[0]]
    assert user["score"].tolist() == pytest.approx([0.9, 0.01, 0.5, 0.4])
    assert user["rank"].tolist() == [0, 1, 2, 3]
    shop = dets[dets["source"] == "shop"]  # the gallery side: one class per box
    assert shop["candidate"].tolist() == [7, 5] and shop["category_id"].tolist() == [ids[1], ids[2]]
    assert (shop[["x1", "y1", "x2", "y2"]].to_numpy()[0] == [1, 1, 40, 40]).all()
    # max_detections counts boxes; min_score drops weak classes; itc-class reads the other distribution
    one = detect.select_detections(photos, class_cands(probs, np.ones((2, 3), bool)),
                                   detect.DetectConfig(scoring="head-class", crop_candidates=3, classes_per_box=2,
                                                       max_detections=1, min_score=0.2))
    assert one["category_id"].tolist() == [ids[1], ids[1]]
    itc = detect.select_detections(photos, class_cands(probs, np.ones((2, 3), bool)),
                                   detect.DetectConfig(scoring="itc-class", crop_candidates=3, max_detections=3,
                                                       classes_per_box=1))
    assert itc[itc["candidate"] == 7]["category_id"].tolist() == [ids[11]] * 2  # reversed distribution
    with pytest.raises(KeyError, match="head"):
        cands = class_cands(probs, np.ones((2, 3), bool))
        del cands["head_probs"]
        detect.select_detections(photos, cands, cfg)


def test_photo_without_cropped_box_is_a_miss():
    """A query photo none of whose candidates got a crop (unreadable file, skipped) yields no detection, and its
    queries stay misses in the denominator."""
    photos = detect.photo_table(items_frame())
    probs = np.full((4, 3, 13), 1 / 13)
    cands = class_cands(np.full((2, 3, 13), 1 / 13), np.ones((2, 3), bool))
    C = len(detect.CATEGORY_IDS)
    cands = {"boxes": np.tile(cands["boxes"][:1], (4, 1, 1)), "itm-photo": np.zeros((4, C)),
             "slots": np.tile([3, 5, 7], (4, 1)), "valid": np.ones((4, 3), bool), "head_probs": probs}
    cands["valid"][1] = False  # photo s/000002 (query item 3): nothing cropped
    dets = detect.select_detections(photos, cands, detect.DetectConfig(scoring="head-class", crop_candidates=3,
                                                                      max_detections=3))
    assert "s/000002" not in set(dets["photo_key"])
    _, summary = detect.detection_report(dets, items_frame(), photos)
    assert summary["no_detection_photos"] == 1 and summary["n_queries"] == 3
    assert detect.official_matches(dets, items_frame()).set_index("query_key").loc["s/000002/item1",
                                                                                  "result_index"] == -1


def test_config_rejects_bad_crop_settings():
    with pytest.raises(ValueError, match="crop_candidates"):
        detect.DetectConfig(crop_candidates=0).validate()
    with pytest.raises(ValueError, match="max_detections"):
        detect.DetectConfig(scoring="itc-class", crop_candidates=2, max_detections=4).validate()
    with pytest.raises(ValueError, match="category head"):
        detect.detect_photos(photos_frame(), None, detect.DetectConfig(scoring="head-class", crop_candidates=4))
