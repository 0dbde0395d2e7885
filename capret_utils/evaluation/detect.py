"""Item detection from pixels alone, the detected-box official submission, and the detection report.

The official DeepFashion2 retrieval protocol scores *detected* query items (class must match, IoU >= 0.5 on the
gallery side, a missed query stays in the denominator; :mod:`capret_utils.evaluation.df2_eval`). This module gives
notebook 04 the three box modes of its variant table (column ``boxes``):

* ``gt``: the annotated boxes and classes (the usual retrieval benchmark setting);
* ``oracle``: the box head's box for the item's **ground-truth category** (``embed.predict_boxes``): better than
  nothing, but the category comes from the labels, so it is an upper bound, not a result;
* ``detected``: :func:`detect_photos` — no ground-truth field is read, only each photo's pixels (``path``,
  ``width``, ``height``).

**Detection.** Each photo goes once through the vision encoder; the fusion layers then pair its image tokens with
each of the 13 category names (text states computed once) and the box head gives one box per name: 13 candidate
boxes, each with a category. Each candidate is scored (:data:`SCORINGS`):

* ``itm-photo``: ITM match probability of (category name, whole photo), from the same fusion pass (free);
* ``itm-crop``: ITM match probability of (category name, crop of its box grown by the crop ``context``);
* ``itc-crop``: softmax over the 13 category names of the crop's ITC similarity, at the candidate's category;
* ``itm-photo*itc-crop``: the product of the two.

The asked scorings crop the best ``crop_candidates`` candidates (13 = all). The class scorings (:data:`CLASS_SCORINGS`)
instead classify each cropped box over the 13 categories — ``itc-class`` (ITC over the names), ``head-class``
(the fine-tuned category head, :mod:`capret_utils.evaluation.crop_scores`), ``head+itc-class`` (their mean) — and
emit a query-photo box once per each of its ``classes_per_box`` likeliest classes (the official matcher scores the
best same-class detection per query and ignores the rest; shop photos get one class: the gallery side ignores it).
Each photo is decoded once for all its crops and the crops share batched vision passes (no fusion pass unless
``itm-crop`` is asked). Candidates go through class-agnostic greedy non-maximum suppression (:func:`nms_padded`; the
box head gives one box per category, so per-class NMS would remove nothing) and the best ``max_detections`` boxes
per photo above ``min_score`` are kept.

Choice (``benchmarks/bench_detect.py --select``: fine-tuned demo checkpoint, synthetic **select** split, 647
photos, 477 queries; docs/experiments.md): at 4 boxes per photo, official top-1 / top-20 ``itc-crop`` (all 13
cropped) 0.082 / 0.193, ``itm-photo`` 0.050 / 0.178, ``itc-class`` (4 crops, 3 classes) 0.099 / 0.294,
``head-class`` 0.115 / 0.317, ``head+itc-class`` 0.134 / 0.333 (6 crops: 0.136 / 0.329). Default
``head+itc-class``, ``crop_candidates=4``, ``classes_per_box=3`` (a model without a head falls back to
``itc-class`` in :func:`run_box_modes`). All 13 classes per box, i.e. class errors removed, reach only 0.15-0.17:
the rest of the gap to GT boxes is box quality. Speed (tiny model, 2 shared cores, load ~5, 32,153 photos
extrapolated from 120): 2.5 min at 1 torch thread, 11.8 min at 2 (oversubscribed).

**Submission** (:func:`run_box_modes`): query detections on the query photos, gallery detections on every shop
photo, crops embedded as the ``crop`` variant, top-20 gallery detections per query detection
(:func:`capret_utils.evaluation.retrieval.exact_search`), written with ``df2_eval.detection_results`` next to the
GT-box file in ``run_dir/official`` and scored by ``df2_eval``.

**Report** (:func:`detection_report`): per-category recall at IoU 0.5 (same class, and any class), and the share
of queries lost before retrieval (no same-class detection assigned by the official matcher); :func:`gap_table`
splits the detected-box misses into lost (box missed / class wrong) vs scored (good / poor box).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from capret_utils.data.df2 import CATEGORY_NAMES
from capret_utils.data.loader import ImageStore
from capret_utils.evaluation import df2_eval, embed, stats
from capret_utils.evaluation.df2_eval import corners_to_xywh, iou_xywh

ASKED_SCORINGS = ("itm-photo", "itm-crop", "itc-crop", "itm-photo*itc-crop")
CLASS_SCORINGS = ("itc-class", "head-class", "head+itc-class")
SCORINGS = ASKED_SCORINGS + CLASS_SCORINGS
BOX_MODES = ("gt", "detected", "oracle")
CATEGORY_IDS: tuple[int, ...] = tuple(sorted(CATEGORY_NAMES))
_BOX = ["x1", "y1", "x2", "y2"]


@dataclass
class DetectConfig:
    """How detections are made from the 13 category-name candidates per photo."""

    scoring: str = "head+itc-class"  # candidate score, one of SCORINGS (chosen on the select split, module doc)
    crop_candidates: int = 4  # boxes per photo given a crop pass (crop scorings): 13 = all; fewer = the best of
    #   a class-agnostic NMS ranked by itm-photo (cheap filter), 1-13
    classes_per_box: int = 3  # class scorings: a query-photo box is emitted once per each of its best m classes
    #   (same box, score = that class's probability); shop photos always 1 (the gallery side ignores classes), 1-13
    nms_iou: float = 0.5  # class-agnostic NMS: a box overlapping a better one with IoU > this is dropped, in (0, 1]
    max_detections: int = 4  # detections kept per photo after NMS (best scores first), 1-13
    min_score: float = 0.0  # detections scoring below this are dropped (score in [0, 1]); 0 keeps max_detections
    context: float | None = None  # crop margin per side for the crop scorings (fraction of box w/h); None = bundle's
    batch_size: int = 64  # photos (or crops) per forward pass
    num_workers: int = -1  # image-loading worker processes: -1 auto (cores - 1, at most 8), 0 in-process
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    progress: bool = True  # tqdm bars

    def validate(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"DetectConfig.scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not 0 < self.nms_iou <= 1:
            raise ValueError(f"DetectConfig.nms_iou must be in (0, 1], got {self.nms_iou}")
        if not 1 <= self.max_detections <= len(CATEGORY_IDS):
            raise ValueError(f"DetectConfig.max_detections must be in 1-{len(CATEGORY_IDS)}, got {self.max_detections}")
        if self.batch_size < 1:
            raise ValueError(f"DetectConfig.batch_size must be >= 1, got {self.batch_size}")
        for name in ("crop_candidates", "classes_per_box"):
            if not 1 <= getattr(self, name) <= len(CATEGORY_IDS):
                raise ValueError(f"DetectConfig.{name} must be in 1-{len(CATEGORY_IDS)}, got {getattr(self, name)}")
        if self.scoring in CLASS_SCORINGS and self.max_detections > self.crop_candidates:
            raise ValueError(f"DetectConfig: a class scoring keeps at most crop_candidates={self.crop_candidates} "
                             f"boxes per photo, max_detections={self.max_detections} is larger")

    @property
    def needs_crops(self) -> bool:
        return self.scoring != "itm-photo"


# ------------------------------------------------------------------------------------------ NMS


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of corner boxes ``a`` (..., n, 4) vs ``b`` (..., m, 4) -> (..., n, m), the official evaluator's
    arithmetic (:func:`df2_eval.iou_xywh`)."""
    return iou_xywh(corners_to_xywh(a)[..., :, None, :], corners_to_xywh(b)[..., None, :, :])


def nms_padded(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS for many photos at once: ``boxes`` (P, C, 4) corners, ``scores`` (P, C) (NaN / -inf = no
    candidate) -> keep mask (P, C). Within each photo, the best-scoring live box suppresses every lower one with
    IoU > ``iou_threshold`` (ties: the earlier candidate first), as the usual single-image NMS."""
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if boxes.ndim != 3 or boxes.shape[2] != 4 or scores.shape != boxes.shape[:2]:
        raise ValueError(f"nms_padded needs boxes (P, C, 4) and scores (P, C), got {boxes.shape} / {scores.shape}")
    P, C = scores.shape
    valid = np.isfinite(scores)
    order = np.argsort(np.where(valid, -scores, np.inf), axis=1, kind="stable")
    b = np.take_along_axis(boxes, order[..., None], axis=1)
    alive = np.take_along_axis(valid, order, axis=1)
    iou = pairwise_iou(b, b)
    later = np.triu(np.ones((C, C), dtype=bool), k=1)
    for i in range(C):
        alive &= ~(alive[:, i:i + 1] & (iou[:, i, :] > iou_threshold) & later[i])
    keep = np.zeros((P, C), dtype=bool)
    np.put_along_axis(keep, order, alive, axis=1)
    return keep


# ------------------------------------------------------------------------------------------ photos and candidates


def photo_table(items: pd.DataFrame) -> pd.DataFrame:
    """The photos of a split's retrieval sets, one row each (sorted by split, image id): the query photos (user
    photos holding a style > 0 item, as the official query GT) and every shop photo. Columns ``key``
    (``"{split}/{image_id:06d}"``), ``split``, ``image_id``, ``source``, ``path``, ``width``, ``height``: the only
    fields detection reads."""
    need = ["split", "image_id", "source", "path", "width", "height", "style"]
    missing = [c for c in need if c not in items]
    if missing:
        raise KeyError(f"items table lacks column(s) {missing} (capret_utils.data.df2.load_items)")
    query = (items["source"] == "user") & (items["style"] > 0)
    g = items.assign(query=query).groupby(["split", "image_id"], sort=True, observed=True)
    photos = g.agg(source=("source", "first"), path=("path", "first"), width=("width", "first"),
                   height=("height", "first"), query=("query", "any")).reset_index()
    photos = photos[(photos["source"] == "shop") | photos["query"]].drop(columns="query").reset_index(drop=True)
    photos.insert(0, "key", [f"{s}/{int(i):06d}" for s, i in zip(photos["split"], photos["image_id"])])
    return photos


def _category_texts(bundle: embed.ModelBundle) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text states, mask and ITC features of the 13 category names (in :data:`CATEGORY_IDS` order)."""
    enc = bundle.tokenizer([CATEGORY_NAMES[c] for c in CATEGORY_IDS])
    ids, mask = enc["input_ids"].to(bundle.device), enc["attention_mask"].to(bundle.device)
    states = bundle.model.get_text_embeds(ids, mask)
    return states, mask, bundle.model.get_text_feat(states)


@torch.no_grad()
def candidates(photos: pd.DataFrame, bundle: embed.ModelBundle, config: DetectConfig | None = None,
               store: ImageStore | None = None, crops: bool | None = None, head: torch.Tensor | None = None,
               itm_crop: bool | None = None) -> dict[str, np.ndarray]:
    """The 13 category-name candidates of every photo: ``boxes`` (P, 13, 4) pixel corners and ``itm-photo``
    (P, 13). With ``crops`` (default: the configured scoring needs them) the best ``config.crop_candidates`` of
    them (all 13, or the best of a class-agnostic NMS ranked by ``itm-photo``: ``slots`` (P, K) candidate indices,
    ``valid`` (P, K)) get one crop pass each (:func:`capret_utils.evaluation.crop_scores.crop_scores`): class
    distributions ``itc_probs`` and, with a category ``head``, ``head_probs`` (P, K, 13); the asked-category
    scores ``itc-crop`` and (``itm_crop``, default: the scoring needs it) ``itm-crop`` (P, 13, NaN for candidates
    without a crop). Category j of a photo is ``CATEGORY_IDS[j]``."""
    from capret_utils.evaluation import crop_scores

    config = config or DetectConfig()
    crops = config.needs_crops if crops is None else crops
    itm_crop = ("itm-crop" in config.scoring) if itm_crop is None else itm_crop
    model, C = bundle.model.eval(), len(CATEGORY_IDS)
    ecfg = embed.EmbedConfig(batch_size=config.batch_size, bf16=config.bf16, num_workers=config.num_workers,
                             progress=config.progress)
    store = store if store is not None else bundle.store()
    with embed.autocast(bundle.device, config.bf16):
        states, mask, text_feat = _category_texts(bundle)
    rel, itm_photo = [], []
    for sl, pv in embed._loader_batches(photos, bundle, ecfg, store, "image", desc="detect: photos"):
        n = pv.shape[0]
        with embed.autocast(bundle.device, config.bf16):
            image_embeds, _ = model.get_image_embeds(pv)
            fused = model.get_fusion_embeds(states.repeat(n, 1, 1), mask.repeat(n, 1),
                                            image_embeds.repeat_interleave(C, dim=0))
            rel.append(model.predict_bbox(fused).float().cpu())
            itm_photo.append(model.itm_logits(fused).float().softmax(-1)[:, 1].cpu())
    P = len(photos)
    W = np.repeat(photos["width"].to_numpy(np.float32), C)
    H = np.repeat(photos["height"].to_numpy(np.float32), C)
    rel_all = torch.cat(rel).numpy() if rel else np.zeros((0, 4), np.float32)
    out = {"boxes": embed.box_to_pixels(rel_all, W, H).reshape(P, C, 4),
           "itm-photo": (torch.cat(itm_photo).numpy() if itm_photo else np.zeros(0, np.float32)).reshape(P, C)}
    if not crops:
        return out
    slots, valid = crop_slots(out["boxes"], out["itm-photo"], config.crop_candidates, config.nms_iou)
    boxes = np.take_along_axis(out["boxes"], slots[..., None], axis=1)
    got = crop_scores.crop_scores(photos, boxes, valid, bundle, text_feat, head,
                                  (states, mask, slots) if itm_crop else None, config.context, config.batch_size,
                                  config.num_workers, config.bf16, store, config.progress)
    out.update(slots=slots, valid=valid, itc_probs=got["itc"], crop_feat=got["feat"])
    if "head" in got:
        out["head_probs"] = got["head"]
    asked = np.take_along_axis(got["itc"], slots[..., None], axis=2)[..., 0]
    for name, value in (("itc-crop", asked), ("itm-crop", got.get("itm"))):
        if value is not None:
            full = np.full((P, C), np.nan, np.float32)
            np.put_along_axis(full, slots, np.where(valid, value, np.nan), axis=1)
            out[name] = full
    return out


def crop_slots(boxes: np.ndarray, itm_photo: np.ndarray, k: int, nms_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Which candidates get a crop pass: ``(slots (P, k) candidate indices, valid (P, k))``. ``k`` = 13: all, in
    order; fewer: the best ``k`` by ``itm_photo`` that survive class-agnostic NMS at ``nms_iou``."""
    P, C = itm_photo.shape
    if k >= C:
        return np.tile(np.arange(C), (P, 1)), np.ones((P, C), bool)
    keep = nms_padded(boxes, itm_photo, nms_iou)
    ranked = np.where(keep, np.asarray(itm_photo, np.float64), -np.inf)
    slots = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    return slots, np.isfinite(np.take_along_axis(ranked, slots, axis=1))


def candidate_scores(cands: Mapping[str, np.ndarray], scoring: str) -> np.ndarray:
    """The (P, 13) score of one :data:`ASKED_SCORINGS` entry from :func:`candidates`' output (NaN: no score)."""
    if scoring not in ASKED_SCORINGS:
        raise ValueError(f"scoring must be one of {ASKED_SCORINGS}, got {scoring!r}")
    parts = scoring.split("*")
    missing = [p for p in parts if p not in cands]
    if missing:
        raise KeyError(f"scoring {scoring!r} needs candidate scores {missing}; call candidates(..., crops=True)")
    out = np.ones_like(cands[parts[0]], dtype=np.float64)
    for p in parts:
        out = out * cands[p]
    return out


def class_probs(cands: Mapping[str, np.ndarray], scoring: str) -> np.ndarray:
    """The (P, K, 13) class distribution of each cropped box for one :data:`CLASS_SCORINGS` entry: ``itc``, the
    category ``head``, or ``head+itc`` (their mean)."""
    need = {"itc-class": ["itc_probs"], "head-class": ["head_probs"], "head+itc-class": ["head_probs", "itc_probs"]}
    if scoring not in need:
        raise ValueError(f"scoring must be one of {CLASS_SCORINGS}, got {scoring!r}")
    missing = [k for k in need[scoring] if k not in cands]
    if missing:
        raise KeyError(f"scoring {scoring!r} needs {missing}; call candidates(..., crops=True"
                       f"{', head=<category head>' if 'head_probs' in missing else ''})")
    return np.mean([np.asarray(cands[k], np.float64) for k in need[scoring]], axis=0)


_DET_COLUMNS = ["key", "split", "image_id", "source", "path", "width", "height"]


def _detection_rows(photos: pd.DataFrame, p_idx: np.ndarray, boxes: np.ndarray, cat_idx: np.ndarray,
                    scores: np.ndarray, cand_idx: np.ndarray) -> pd.DataFrame:
    """Detection rows (ordered by photo, then as given): rank r = position within the photo, ``candidate`` = the
    box-head candidate (category index 0-12 it was asked for) the box comes from."""
    base = photos.iloc[p_idx][_DET_COLUMNS].reset_index(drop=True)
    dets = base.rename(columns={"key": "photo_key"})
    rank = dets.groupby("photo_key", sort=False).cumcount().to_numpy() if len(dets) else np.zeros(0, np.int64)
    dets.insert(0, "key", [f"{k}/det{r}" for k, r in zip(dets["photo_key"], rank)])
    dets[_BOX] = np.asarray(boxes, np.float64).reshape(-1, 4)
    cats = np.asarray(CATEGORY_IDS, dtype=np.int64)[np.asarray(cat_idx, np.int64)]
    dets["category_id"] = cats
    dets["category_name"] = [CATEGORY_NAMES[int(c)] for c in cats]
    dets["score"] = np.asarray(scores, np.float64)
    dets["rank"] = rank.astype(np.int64)
    dets["candidate"] = np.asarray(cand_idx, np.int64)
    return dets


def select_detections(photos: pd.DataFrame, cands: Mapping[str, np.ndarray], config: DetectConfig) -> pd.DataFrame:
    """NMS + the best ``max_detections`` above ``min_score`` per photo -> one row per detection: ``key``
    (``"<photo key>/det<r>"``, r = rank in the photo), ``photo_key``, ``split``, ``image_id``, ``source``,
    ``path``, ``width``, ``height``, ``x1 y1 x2 y2``, ``category_id``, ``category_name``, ``score``, ``rank``,
    ``candidate``.

    Asked scorings: each candidate keeps the category it was asked for. Class scorings: each cropped box is
    ranked by its best class probability, and a query-photo box is emitted once per each of its best
    ``classes_per_box`` classes (score = that probability; shop photos: the best class only)."""
    config.validate()
    if config.scoring in CLASS_SCORINGS:
        return _select_classified(photos, cands, config)
    boxes, scores = np.asarray(cands["boxes"], dtype=np.float64), candidate_scores(cands, config.scoring)
    scores = np.where(scores >= config.min_score, scores, -np.inf)  # NaN (no crop) fails the test too
    keep = nms_padded(boxes, scores, config.nms_iou)
    ranked = np.where(keep, scores, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :config.max_detections]
    p_idx = np.repeat(np.arange(len(photos)), order.shape[1])
    c_idx = order.reshape(-1)
    ok = np.isfinite(ranked[p_idx, c_idx])
    p_idx, c_idx = p_idx[ok], c_idx[ok]
    return _detection_rows(photos, p_idx, boxes[p_idx, c_idx], c_idx, scores[p_idx, c_idx], c_idx)


def _select_classified(photos: pd.DataFrame, cands: Mapping[str, np.ndarray], config: DetectConfig) -> pd.DataFrame:
    probs = class_probs(cands, config.scoring)  # (P, K, 13)
    slots, valid = np.asarray(cands["slots"]), np.asarray(cands["valid"], bool)
    boxes = np.take_along_axis(np.asarray(cands["boxes"], np.float64), slots[..., None], axis=1)
    best = np.where(valid, np.nan_to_num(probs, nan=-np.inf).max(axis=2), -np.inf)
    best = np.where(best >= config.min_score, best, -np.inf)
    keep = nms_padded(boxes, best, config.nms_iou)
    ranked = np.where(keep, best, -np.inf)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :config.max_detections]  # (P, D) box slots
    m = config.classes_per_box
    cls = np.argsort(-np.nan_to_num(probs, nan=-np.inf), axis=2, kind="stable")[..., :m]  # (P, K, m)
    user = (photos["source"].to_numpy() == "user")
    P, D = order.shape
    p_idx = np.repeat(np.arange(P), D * m)
    k_idx = np.repeat(order.reshape(-1), m)
    j = np.tile(np.arange(m), P * D)
    c_idx = cls[p_idx, k_idx, j]
    score = probs[p_idx, k_idx, c_idx]
    ok = np.isfinite(ranked[p_idx, k_idx]) & ((j == 0) | user[p_idx]) & (score >= config.min_score)
    p_idx, k_idx, c_idx, score = p_idx[ok], k_idx[ok], c_idx[ok], score[ok]
    return _detection_rows(photos, p_idx, boxes[p_idx, k_idx], c_idx, score, slots[p_idx, k_idx])

def detect_photos(photos: pd.DataFrame, bundle: embed.ModelBundle, config: DetectConfig | None = None,
                  store: ImageStore | None = None, head: torch.Tensor | None = None) -> pd.DataFrame:
    """Detections (:func:`select_detections`) of every photo, from pixels alone; ``head``: the fine-tuned
    category head (:func:`capret_utils.evaluation.crop_scores.load_category_head`) the ``head`` scorings need."""
    config = config or DetectConfig()
    config.validate()
    if "head" in config.scoring and head is None:
        raise ValueError(f"scoring {config.scoring!r} needs the fine-tuned category head (category_W of the "
                         f"checkpoint's arcface.safetensors); this model has none: use itc-class")
    return select_detections(photos, candidates(photos, bundle, config, store, head=head), config)


# ------------------------------------------------------------------------------------------ official protocol


def query_gt_records(items: pd.DataFrame) -> list[dict[str, Any]]:
    """The official query GT records of an items table (``df2.query_gt_frame``: user items with style > 0)."""
    from capret_utils.data import df2

    f = df2.query_gt_frame(items)
    return [{"query_image_id": int(r.query_image_id), "bbox": [float(r.x1), float(r.y1), float(r.x2), float(r.y2)],
             "cls": int(r.cls), "style": int(r.style), "pair_id": int(r.pair_id)} for r in f.itertuples()]


def official_matches(dets: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """The official matcher's choice for every GT query (``df2_eval.evaluate_df2`` with placeholder gallery
    lists): ``result_index`` (row of ``dets`` among the query photos' detections, -1 = lost: no same-class
    detection was assigned to it) and ``result_iou``; one row per GT query in query-GT order, with ``query_key``."""
    q = dets[dets["source"] == "user"].reset_index(drop=True) if "source" in dets else dets
    results = [{"query_image_id": int(i), "query_bbox": [float(v) for v in b], "query_cls": int(c),
                "query_score": float(s), "gallery_image_id": [0], "gallery_bbox": [[0.0, 0.0, 1.0, 1.0]]}
               for i, b, c, s in zip(q["image_id"], q[_BOX].to_numpy(), q["category_id"], q["score"])]
    ev = df2_eval.evaluate_df2(results, query_gt_records(items), [])
    queries = items[(items["source"] == "user") & (items["style"] > 0)]
    out = ev.per_query[["cls", "result_index", "result_iou"]].copy()
    out.insert(0, "query_key", queries["key"].to_numpy()[ev.per_query["gt_index"].to_numpy()])
    return out


def item_recall(dets: pd.DataFrame, items: pd.DataFrame, iou: float = df2_eval.IOU_THRESHOLD) -> pd.DataFrame:
    """Per GT query item (user, style > 0): ``found`` (a same-class detection in its photo with IoU >= ``iou``),
    ``found_any_class`` (a detection of any class with IoU >= ``iou``) and ``best_iou`` (any class)."""
    queries = items[(items["source"] == "user") & (items["style"] > 0)].reset_index(drop=True)
    photo = [f"{s}/{int(i):06d}" for s, i in zip(queries["split"], queries["image_id"])]
    by_photo = {k: g for k, g in dets.groupby("photo_key", sort=False)} if len(dets) else {}
    found, found_any, best = [], [], []
    for k, row in zip(photo, queries[_BOX + ["category_id"]].to_numpy()):
        g = by_photo.get(k)
        if g is None:
            found.append(False), found_any.append(False), best.append(0.0)
            continue
        ious = pairwise_iou(row[None, :4], g[_BOX].to_numpy(np.float64))[0]
        same = g["category_id"].to_numpy() == int(row[4])
        found.append(bool((ious[same] >= iou).any()))
        found_any.append(bool((ious >= iou).any()))
        best.append(float(ious.max()))
    return pd.DataFrame({"query_key": queries["key"], "category_id": queries["category_id"],
                         "category_name": queries["category_name"], "found": found, "found_any_class": found_any,
                         "best_iou": best})


def detection_report(dets: pd.DataFrame, items: pd.DataFrame, photos: pd.DataFrame | None = None,
                     ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-category recall at IoU 0.5 of the GT query items (``recall``: same class; ``box_recall``: any class)
    and a summary: overall recalls, ``lost_share`` (queries the official matcher gives no same-class detection:
    certain misses before retrieval), ``no_detection_photos`` (query photos with no detection at all: their
    queries count as misses), detections per photo."""
    rec = item_recall(dets, items)
    per_cat = rec.groupby(["category_id", "category_name"], sort=True, observed=True).agg(
        n=("found", "size"), recall=("found", "mean"), box_recall=("found_any_class", "mean"),
        mean_best_iou=("best_iou", "mean")).reset_index()
    match = official_matches(dets, items)
    lost = match["result_index"].to_numpy() < 0
    n_photos = len(photos) if photos is not None else dets["photo_key"].nunique()
    qphotos = set(photos[photos["source"] == "user"]["key"]) if photos is not None else set()
    summary = {"n_queries": int(len(rec)), "recall_iou50": float(rec["found"].mean()) if len(rec) else float("nan"),
               "box_recall_iou50": float(rec["found_any_class"].mean()) if len(rec) else float("nan"),
               "lost_share": float(lost.mean()) if len(lost) else float("nan"), "n_lost": int(lost.sum()),
               "no_detection_photos": int(len(qphotos - set(dets["photo_key"]))),
               "detections_per_photo": float(len(dets) / n_photos) if n_photos else float("nan")}
    return per_cat, summary


def gap_table(per_query_detected: pd.DataFrame, recall: pd.DataFrame, per_query_gt: pd.DataFrame) -> pd.DataFrame:
    """Where detected-box retrieval loses against GT boxes: each GT query in one group — ``lost: box missed``
    (no detection of any class with IoU >= 0.5), ``lost: class wrong`` (a box, but no same-class detection
    assigned), ``scored: good box`` / ``scored: poor box`` (the scored detection's IoU >= / < 0.5) — with the group
    size and the official hit@1 / hit@20 of both box modes (the three tables in query-GT order)."""
    lost = per_query_detected["result_index"].to_numpy() < 0
    good = per_query_detected["result_iou"].to_numpy(np.float64) >= df2_eval.IOU_THRESHOLD
    any_box = recall["found_any_class"].to_numpy(bool)
    group = np.where(lost, np.where(any_box, "lost: class wrong", "lost: box missed"),
                     np.where(good, "scored: good box", "scored: poor box"))
    frame = pd.DataFrame({"group": group, "det_hit1": per_query_detected["hit@1"].astype(float).to_numpy(),
                          "det_hit20": per_query_detected["hit@20"].astype(float).to_numpy(),
                          "gt_hit1": per_query_gt["hit@1"].astype(float).to_numpy(),
                          "gt_hit20": per_query_gt["hit@20"].astype(float).to_numpy()})
    out = frame.groupby("group", observed=True).agg(n=("det_hit1", "size"), gt_top1=("gt_hit1", "mean"),
                                     detected_top1=("det_hit1", "mean"), gt_top20=("gt_hit20", "mean"),
                                     detected_top20=("det_hit20", "mean")).reset_index()
    n = len(frame)
    out["share"] = out["n"] / n if n else np.nan
    out["top1_lost"] = (out["gt_top1"] - out["detected_top1"]) * out["share"]  # contribution to the top-1 gap
    return out


# ------------------------------------------------------------------------------------------ the three box modes


@dataclass
class BoxModes:
    """What :func:`run_box_modes` measured: ``per_query[name]`` (``df2_eval`` per-GT-query rows of each box row,
    names ``<model>/crop@<mode>``), ``official[name]`` (its top-k), ``detections[model]``, ``recall[model]``
    (per-category table), ``summary[model]`` (detection summary + seconds), ``gaps[model]`` (:func:`gap_table`)."""

    per_query: dict[str, pd.DataFrame]
    official: dict[str, dict[str, float]]
    detections: dict[str, pd.DataFrame]
    recall: dict[str, pd.DataFrame]
    summary: dict[str, dict[str, Any]]
    gaps: dict[str, pd.DataFrame]
    config: DetectConfig


def detection_heads(checkpoint: str | Path) -> dict[str, torch.Tensor | None]:
    """``{"fine-tuned": category head}`` of notebook 03's checkpoint folder (empty when ``checkpoint`` is empty or
    has no head): the ``heads`` argument of :func:`run_box_modes` (the zero-shot model has none)."""
    from capret_utils.evaluation.crop_scores import load_category_head

    head = load_category_head(checkpoint) if checkpoint else None
    return {"fine-tuned": head} if head is not None else {}


def mode_label(boxes: str) -> str:
    """``AnalysisConfig.boxes`` -> the ``boxes`` column: ``"gt"`` stays, ``"predicted"`` (category given) is
    ``"oracle"``."""
    return {"gt": "gt", "predicted": "oracle"}.get(boxes, boxes)


def _digest(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float64).tobytes()).hexdigest()[:10]


def detected_submission(bundle: embed.ModelBundle, dets: pd.DataFrame, items: pd.DataFrame, out_dir: Path,
                        name: str, batch_size: int = 64, num_workers: int = -1, progress: bool = True,
                        cache: Path | None = None, k: int = 20) -> df2_eval.Df2EvalResult:
    """Embed the detections' crops (the ``crop`` variant's view), rank the shop-photo detections for every
    query-photo detection (top ``k``), write ``<out_dir>/<name>.results.json`` (``df2_eval.detection_results``)
    and score it against the split's official GT files in ``out_dir``."""
    from capret_utils.data import df2
    from capret_utils.evaluation.retrieval import exact_search

    q = dets[dets["source"] == "user"].reset_index(drop=True)
    g = dets[dets["source"] == "shop"].reset_index(drop=True)
    ecfg = embed.EmbedConfig(view="crop", batch_size=batch_size, num_workers=num_workers, progress=progress)
    vecs = []
    for frame, side in ((q, "q"), (g, "g")):
        # one crop per distinct box: a box emitted with several classes is embedded once
        box_id = frame.groupby(["photo_key"] + _BOX, sort=False).ngroup().to_numpy() if len(frame) else np.zeros(0, int)
        uniq = frame.drop_duplicates(["photo_key"] + _BOX).reset_index(drop=True)
        keys = uniq["key"].tolist()
        compute = (lambda f=uniq: embed.embed_items(f, bundle, ecfg))
        tag = f"{name}-detcrop-{_digest(uniq[_BOX].to_numpy())}-{side}"
        got = embed.cached_embeddings(cache, tag, keys, compute)[1] if cache is not None else compute()[1]
        vecs.append(got[box_id])
    if not len(q) or not len(g):
        records: list[dict] = []
    else:
        res = exact_search(vecs[0], vecs[1], min(k, len(g)))
        records = df2_eval.detection_results(q, g, res.indices)
    out_dir.mkdir(parents=True, exist_ok=True)
    qgt, ggt = out_dir / "query_gt.json", out_dir / "gallery_gt.json"
    if not (qgt.is_file() and ggt.is_file()):
        df2.write_official_gt(items, out_dir, query_name=qgt.name, gallery_name=ggt.name)
    path = df2_eval.write_results(out_dir / f"{name}.results.json", records)
    return df2_eval.evaluate_files(path, qgt, ggt)


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def run_box_modes(models: Mapping[str, embed.ModelBundle], data: Any, cfg: Any, config: DetectConfig | None = None,
                  run_dir: str | Path | None = None, heads: Mapping[str, torch.Tensor | None] | None = None,
                  ) -> BoxModes:
    """The ``crop`` variant of every model under the three box modes, each scored with ``df2_eval``: ``gt`` and
    ``oracle`` through :func:`capret_utils.evaluation.analysis.run_variant` (oracle results under
    ``official/oracle-boxes/``), ``detected`` through :func:`detect_photos` + :func:`detected_submission`
    (``official/<model>-crop-detected.results.json``, detections in ``official/detections-<model>.csv``).
    ``data`` is notebook 04's ``analysis.RetrievalData``, ``cfg`` its ``analysis.AnalysisConfig``. ``heads``:
    the category head of each model that has one (:func:`detection_heads`); a ``head`` scoring falls back to
    ``itc-class`` (same class pipeline, ITC instead of the head) for a model without one, noted in its summary."""
    import tempfile

    from capret_utils.evaluation import analysis

    config = config or DetectConfig()
    config.validate()
    tmp = tempfile.TemporaryDirectory(prefix="capret-boxes-") if run_dir is None else None
    root = Path(run_dir) if run_dir is not None else Path(tmp.name)
    official, cache = root / "official", root / "embeddings"
    out = BoxModes({}, {}, {}, {}, {}, {}, config)
    photos = photo_table(data.items)
    try:
        for m in [m for m in analysis.MODEL_NAMES if m in models]:
            bundle = models[m]
            bundle.info["bad_images"] = cfg.bad_images
            for mode, folder in (("gt", official), ("oracle", official / "oracle-boxes")):
                folder.mkdir(parents=True, exist_ok=True)
                boxes = "predicted" if mode == "oracle" else "gt"
                res = analysis.run_variant(analysis.VARIANTS["crop"], m, bundle, data, replace(cfg, boxes=boxes),
                                           cache, folder)
                ev = df2_eval.evaluate_files(folder / f"{_slug(res.name)}.results.json", folder / "query_gt.json",
                                             folder / "gallery_gt.json")
                out.per_query[f"{m}/crop@{mode}"], out.official[f"{m}/crop@{mode}"] = ev.per_query, ev.metrics
            started = time.time()
            head = (heads or {}).get(m)
            dcfg = replace(config, num_workers=cfg.num_workers, progress=cfg.progress)
            if "head" in dcfg.scoring and head is None:
                dcfg = replace(dcfg, scoring="itc-class")
            dets = detect_photos(photos, bundle, dcfg, bundle.store(), head)
            seconds = time.time() - started
            name = f"{m}/crop@detected"
            ev = detected_submission(bundle, dets, data.items, official, _slug(name), cfg.batch_size,
                                     cfg.num_workers, cfg.progress, cache)
            dets.to_csv(official / f"detections-{_slug(m)}.csv", index=False)
            out.per_query[name], out.official[name], out.detections[m] = ev.per_query, ev.metrics, dets
            per_cat, summary = detection_report(dets, data.items, photos)
            summary.update({"seconds": round(seconds, 2), "photos": int(len(photos)),
                            "seconds_per_photo": seconds / max(len(photos), 1), "scoring": dcfg.scoring,
                            "max_detections": config.max_detections, "nms_iou": config.nms_iou,
                            "crop_candidates": config.crop_candidates, "classes_per_box": config.classes_per_box})
            out.recall[m], out.summary[m] = per_cat, summary
            out.gaps[m] = gap_table(ev.per_query, item_recall(dets, data.items), out.per_query[f"{m}/crop@gt"])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


OFFICIAL_KS = (1, 5, 10, 20)


def add_to_table(table: pd.DataFrame, modes: BoxModes, main_boxes: str = "gt", seed: int = 0) -> pd.DataFrame:
    """Notebook 04's variant ``table`` with a ``boxes`` column (``gt`` | ``detected`` | ``oracle``; the existing
    rows get ``mode_label(main_boxes)``) and the ``crop`` rows of the other box modes appended (``<model>/crop@
    <mode>``), every box row with 95 % Wilson intervals of the official top-1 / top-20
    (``official_top{k}_lo`` / ``_hi``). A detected row's hit@k / mAP are NaN (they need GT items; its numbers are
    the official protocol's) and it is compared with its model's GT-box ``crop`` at official top-1 (``won`` /
    ``lost`` / ``p_top1``, ``baseline``)."""
    table = table.copy()
    main = mode_label(main_boxes)
    table["boxes"] = main
    rows = []
    for name, ev in modes.official.items():
        model, mode = name.split("/crop@")
        row: dict[str, Any] = {f"official_top{k}": float(ev[f"top{k}"]) for k in OFFICIAL_KS}
        pq = modes.per_query[name]
        for k in (1, 20):
            row[f"official_top{k}_lo"], row[f"official_top{k}_hi"] = stats.wilson_interval(pq[f"hit@{k}"].astype(float))
        if mode == main:
            for col, v in row.items():
                table.loc[table["name"] == f"{model}/crop", col] = v
            continue
        row.update({"name": name, "model": model, "variant": "crop", "level": "item", "text": "none",
                    "fusion": "none", "rerank": False, "text_source": "none", "oracle": False, "boxes": mode,
                    "n_queries": int(ev["n_queries"]), "encoder": "X2-VLM"})
        gt = modes.per_query.get(f"{model}/crop@gt")
        if gt is not None and mode != "gt":
            test = stats.mcnemar_exact(pq["hit@1"].astype(float), gt["hit@1"].astype(float))
            row.update({"baseline": f"{model}/crop" if main == "gt" else f"{model}/crop@gt",
                        "won": test["only_a"], "lost": test["only_b"], "p_top1": test["p"]})
        rows.append(row)
    if "weights" in table and rows:
        w = dict(zip(table["name"], table["weights"]))
        for r in rows:
            r["weights"] = w.get(f"{r['model']}/crop")
    if rows:
        table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    return table


def recall_table(modes: BoxModes) -> pd.DataFrame:
    """The per-category recall tables of every model, stacked with a ``model`` column."""
    frames = [t.assign(model=m) for m, t in modes.recall.items()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def metrics_entry(modes: BoxModes) -> dict[str, Any]:
    """What notebook 04 writes under ``metrics.json`` ``detection``: per model the detection summary, the
    per-category recall (``{category: recall}``), and the official top-k of every box mode."""
    out: dict[str, Any] = {"scoring": modes.config.scoring, "max_detections": modes.config.max_detections,
                           "nms_iou": modes.config.nms_iou}
    for m, summary in modes.summary.items():
        rec = modes.recall[m]
        out[m] = {**summary, "recall_by_category": dict(zip(rec["category_name"], rec["recall"].astype(float))),
                  "official": {mode: {k: float(v) for k, v in modes.official[f"{m}/crop@{mode}"].items()
                                      if k.startswith("top")}
                               for mode in BOX_MODES if f"{m}/crop@{mode}" in modes.official}}
    return out
