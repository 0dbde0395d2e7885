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
    assert dets.groupby("photo_key").size().max() <= 2 and dets["score"].between(0, 1).all()
    assert (tmp_path / "official" / "zero-shot-crop-detected.results.json").is_file()
    n = {k: v["n_queries"] for k, v in modes.official.items()}
    assert len(set(n.values())) == 1  # every box mode scores the same GT queries
    entry = detect.metrics_entry(modes)
    assert set(entry["zero-shot"]["official"]) == {"gt", "detected", "oracle"}
