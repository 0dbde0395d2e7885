"""Retrieval analysis for notebook 04: run the embedding variants, assemble the variant table, per-attribute
breakdowns, the error-gallery data, the "right category, wrong item" share and the sweep summaries.

A **variant** is one way to embed queries and gallery, evaluated by :mod:`capret_utils.evaluation.metrics` (exact hit@k and
full-ranking mAP) and, for item-level variants, also by the official DeepFashion2 top-k protocol
(:mod:`capret_utils.evaluation.df2_eval`, through the official results format):

* ``image``: whole photos, image-level retrieval (query = user image with >= 1 style>0 item, gallery = shop
  images, relevant when they share an identity);
* ``crop``: item crops (GT boxes, or the box head's boxes with ``boxes="predicted"``), item-level retrieval;
* ``crop+template-late`` / ``crop+template-cross`` / ``crop+dialogue-late`` / ``crop+dialogue-cross``: the crop
  fused with the item's template or dialogue caption (late fusion in the ITC space, or the fusion encoder's
  [CLS]); the gallery items get their own captions the same way;
* ``crop+itm``: the ``crop`` ranking with its top ``rerank_k`` re-scored by the ITM head (query caption vs
  candidate gallery crop).

Each runs for every model given (``fine-tuned`` and ``zero-shot``); the row name is ``"<model>/<variant>"``.
Embeddings are computed by :mod:`capret_utils.evaluation.embed` and cached in the run folder (``embeddings/``), so a killed
run keeps what it finished. Nothing here re-implements search or scoring.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from capret_utils.common import atomic_path, resolve_device
from capret_utils.evaluation import df2_eval, embed, features, metrics, stats

KS: tuple[int, ...] = metrics.DEFAULT_KS
TABLE_KS: tuple[int, ...] = (1, 5, 10, 20)
OFFICIAL_KS: tuple[int, ...] = (1, 5, 10, 20)
BREAKDOWN_ATTRIBUTES: tuple[str, ...] = ("occlusion", "scale", "viewpoint", "zoom_in", "category_name")
MODEL_NAMES = ("fine-tuned", "zero-shot")


@dataclass(frozen=True)
class Variant:
    """One representation of queries and gallery."""

    name: str  # e.g. "crop+dialogue-late"
    level: str  # "item" | "image"
    text: str = "none"  # caption fused into the embedding: "none" | "template" | "dialogue"
    fusion: str = "none"  # "none" | "late" | "cross"
    rerank: bool = False  # ITM re-ranking of the top rerank_k
    text_side: str = "both"  # captions on "both" sides, or on the "gallery" only (queries stay image-only)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("image", "image"),
    Variant("crop", "item"),
    Variant("crop+template-late", "item", "template", "late"),
    Variant("crop+template-cross", "item", "template", "cross"),
    Variant("crop+dialogue-late", "item", "dialogue", "late"),
    Variant("crop+dialogue-cross", "item", "dialogue", "cross"),
    Variant("crop+template-gallery", "item", "template", "late", text_side="gallery"),
    Variant("crop+dialogue-gallery", "item", "dialogue", "late", text_side="gallery"),
    Variant("crop+itm", "item", rerank=True),
)}


TEXT_SOURCES = ("none", "gallery-only", "pixel", "oracle")
"""Where a variant's query-side text comes from: ``none`` (image only), ``gallery-only`` (only shop items carry
text, as a shop's product text; queries stay image-only), ``pixel`` (a model that saw only the query photo wrote
it) or ``oracle`` (ground truth the query photo does not give the system: an upper bound, not a result)."""


def text_source(variant: Variant, sources: Mapping[str, str]) -> str:
    """The :data:`TEXT_SOURCES` label of ``variant`` given where each caption kind comes from (``sources``, e.g.
    ``{"template": "oracle", "dialogue": "pixel"}``; ITM re-ranking reads the query's ``rerank`` text)."""
    if variant.rerank:
        return sources.get("rerank", "oracle")
    if variant.text == "none":
        return "none"
    if variant.text_side == "gallery":
        return "gallery-only"
    return sources.get(variant.text, "oracle")


def skipped_variants(spec: str, have_dialogue: bool = True) -> list[dict[str, str]]:
    """The variants ``spec`` asks for that cannot run, each with its reason (listed in the notebook and in
    ``metrics.json``, never dropped silently)."""
    names = list(VARIANTS) if str(spec).strip() == "all" else [s.strip() for s in str(spec).split(",") if s.strip()]
    return [{"variant": n, "reason": "no dialogue captions (captions_path is empty): run notebook 02 and pass its "
             "captions.jsonl"} for n in names if n in VARIANTS and VARIANTS[n].text == "dialogue" and not have_dialogue]


def select_variants(spec: str, have_dialogue: bool = True) -> list[Variant]:
    """``"all"`` or a comma list of :data:`VARIANTS` names; dialogue variants need dialogue captions.

    Unknown names raise listing the valid ones; ``"all"`` leaves the dialogue variants out when there are no
    dialogue captions (:func:`skipped_variants` lists them with the reason), an explicit dialogue name without
    captions raises.
    """
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise ValueError(f"variants is empty; use 'all' or a comma list of {list(VARIANTS)}")
    if names == ["all"]:
        return [v for v in VARIANTS.values() if have_dialogue or v.text != "dialogue"]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {bad}; valid: 'all' or a comma list of {list(VARIANTS)}")
    chosen = [VARIANTS[n] for n in dict.fromkeys(names)]
    if not have_dialogue and any(v.text == "dialogue" for v in chosen):
        raise ValueError("dialogue variants need captions_path (notebook 02's captions.jsonl)")
    return chosen


# ------------------------------------------------------------------------------------------ models


def _random_init(model: str) -> bool:
    from capret_utils.train import RANDOM_INIT_PRESETS

    return model in RANDOM_INIT_PRESETS


def zero_shot_of(finetuned: embed.ModelBundle, device: str = "auto") -> embed.ModelBundle:
    """The model 03 started from, with the fine-tuned bundle's tokenizer and processor.

    Random-init presets (``tiny`` / ``demo``) are rebuilt from the checkpoint's recorded config and seed (the
    same weights 03's zero-shot evaluation saw); other sources (official checkpoint, saved folder) are loaded
    again through ``train.build_model``.
    """
    import torch

    from capret_utils import train
    from capret_utils.x2vlm import X2VLMModel

    cfg = dict(finetuned.info.get("config") or {})
    if not cfg:
        raise ValueError("the checkpoint's finetune_info.json has no 'config' (written by train.finetune); cannot "
                         "rebuild its zero-shot model")
    tcfg = train.TrainConfig.from_dict({k: v for k, v in cfg.items() if k in train.config_fields()})
    if _random_init(tcfg.model):
        torch.manual_seed(tcfg.seed)
        model = X2VLMModel(finetuned.model.config)
        model.set_attn_implementation("sdpa")
    else:
        model, _, _ = train.build_model(tcfg, [])
    model.to(resolve_device(device)).eval()
    info = {**finetuned.info, "zero_shot_of": tcfg.model}
    return embed.ModelBundle(model=model, tokenizer=finetuned.tokenizer, processor=finetuned.processor, info=info)


def fresh_bundle(model: str, seed: int, texts: Sequence[str], device: str = "auto",
                 context: float | None = None) -> embed.ModelBundle:
    """A zero-shot bundle for ``model`` (preset or checkpoint file/folder) when no fine-tuned checkpoint is given;
    ``context`` None = the fine-tuning default (``TrainConfig.context``)."""
    from capret_utils import train
    from capret_utils.x2vlm import X2VLMImageProcessor
    from capret_utils.x2vlm.processing import ImageSettings

    tcfg = train.TrainConfig(model=model, seed=seed)
    net, tokenizer, source = train.build_model(tcfg, texts)
    net.to(resolve_device(device)).eval()
    res = int(net.config.image_res)
    return embed.ModelBundle(model=net, tokenizer=tokenizer,
                             processor=X2VLMImageProcessor(ImageSettings(image_res=res)),
                             info={"context": tcfg.context if context is None else context, "cache_side": 2 * res,
                                   "tta_contexts": list(tcfg.tta_contexts), "source": source})


def load_models(checkpoint: str, model: str, seed: int, texts: Sequence[str], device: str = "auto",
                ) -> dict[str, embed.ModelBundle]:
    """``{"fine-tuned": bundle, "zero-shot": bundle}`` for a checkpoint folder, or ``{"zero-shot": ...}`` of
    ``model`` when ``checkpoint`` is empty."""
    from capret_utils import train

    if checkpoint:
        tuned = train.load_finetuned(checkpoint, device=device)
        return {"fine-tuned": tuned, "zero-shot": zero_shot_of(tuned, device)}
    return {"zero-shot": fresh_bundle(model, seed, texts, device)}


def fingerprint(bundle: embed.ModelBundle) -> str:
    """A short digest of a model's weights (names the embedding cache files)."""
    h = hashlib.sha256()
    for name, p in sorted(bundle.model.state_dict().items()):
        t = p.detach().float().cpu().reshape(-1)
        h.update(name.encode())
        h.update(t[:: max(1, t.numel() // 64)][:64].numpy().tobytes())
    return h.hexdigest()[:10]


# ------------------------------------------------------------------------------------------ running variants


@dataclass
class AnalysisConfig:
    """How the variants run."""

    boxes: str = "gt"  # item views: "gt" (GT boxes) | "predicted" (box head boxes)
    rerank_k: int = 20  # ITM re-scores this many first-stage candidates
    batch_size: int = 64  # embedding batch
    progress: bool = True  # tqdm bars
    device: str = "auto"  # exact evaluator device ("auto": CUDA when torch sees it)
    num_workers: int = -1  # image-loading worker processes: -1 auto (cores - 1, at most 8), 0 in-process
    keep_tokens: bool | None = None  # keep image tokens on disk in the one decode pass; None: per variant (run_all sets it)
    bad_images: str = "raise"  # unreadable image: "raise" | "skip" (grey placeholder view, counted in a warning)

    def validate(self) -> None:
        if self.bad_images not in ("raise", "skip"):
            raise ValueError(f"bad_images must be 'raise' or 'skip', got {self.bad_images!r}")
        if self.boxes not in ("gt", "predicted"):
            raise ValueError(f"boxes must be 'gt' or 'predicted', got {self.boxes!r}")
        if self.rerank_k < 1:
            raise ValueError(f"rerank_k must be >= 1, got {self.rerank_k}")


@dataclass
class RetrievalData:
    """The split's items, retrieval sets and texts that every variant shares."""

    items: pd.DataFrame
    queries: pd.DataFrame
    gallery: pd.DataFrame
    query_images: pd.DataFrame
    gallery_images: pd.DataFrame
    texts: dict[str, dict[str, str]] = field(default_factory=dict)  # "template"/"dialogue" -> {key: caption}
    sources: dict[str, str] = field(default_factory=dict)  # caption kind -> TEXT_SOURCES label (query side)

    @classmethod
    def build(cls, items: pd.DataFrame, dialogue: Mapping[str, str] | None = None,
              dialogue_source: str = "oracle") -> "RetrievalData":
        """Template captions always (built from the items table's ground truth: ``oracle`` on the query side);
        dialogue captions when given, labelled ``dialogue_source`` (:func:`dialogue_source`)."""
        from capret_utils.captions import template_captions

        queries, gallery = metrics.item_sets(items)
        qi, gi = metrics.image_sets(items)
        texts = {"template": template_captions(items)}
        sources = {"template": "oracle"}
        if dialogue:
            missing = [k for k in pd.concat([queries["key"], gallery["key"]]) if k not in dialogue]
            if missing:
                raise KeyError(f"{len(missing)} query/gallery item(s) have no dialogue caption, e.g. {missing[:3]}; "
                               f"caption the split with notebook 02 (split='all')")
            texts["dialogue"] = dict(dialogue)
            if dialogue_source not in TEXT_SOURCES:
                raise ValueError(f"dialogue_source must be one of {TEXT_SOURCES}, got {dialogue_source!r}")
            sources["dialogue"] = dialogue_source
        data = cls(items, queries, gallery, qi, gi, texts, sources)
        data.sources["rerank"] = sources[data.rerank_text]
        return data

    def text_of(self, frame: pd.DataFrame, kind: str) -> list[str]:
        table = self.texts[kind]
        return [table[k] for k in frame["key"]]

    @property
    def rerank_text(self) -> str:
        return "dialogue" if "dialogue" in self.texts else "template"


@dataclass
class VariantResult:
    """One evaluated variant."""

    name: str  # "<model>/<variant>"
    model: str
    variant: Variant
    metrics: dict[str, Any]
    per_query: pd.DataFrame
    official: dict[str, float] = field(default_factory=dict)
    text_source: str = "none"  # TEXT_SOURCES label


def _embed_cached(cache: Path | None, name: str, keys: Sequence[str], compute) -> np.ndarray:
    if cache is None:
        return compute()[1]
    return embed.cached_embeddings(cache, name, keys, compute)[1]


def _item_view_frames(data: RetrievalData, bundle: embed.ModelBundle, cfg: AnalysisConfig, ecfg: embed.EmbedConfig,
                      cache: Path | None, tag: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Queries/gallery with the boxes the item views use (GT, or the box head's for ``boxes="predicted"``)."""
    if cfg.boxes == "gt":
        return data.queries, data.gallery
    out = []
    for frame, side in ((data.queries, "q"), (data.gallery, "g")):
        keys = frame["key"].tolist()
        boxes = _embed_cached(cache, f"{tag}-boxes-{side}", keys,
                              lambda f=frame, k=keys: (k, embed.predict_boxes(f, bundle, config=ecfg)))
        f2 = frame.copy()
        f2[["x1", "y1", "x2", "y2"]] = np.asarray(boxes, dtype=np.float64)
        out.append(f2)
    return out[0], out[1]


def run_variant(variant: Variant, model_name: str, bundle: embed.ModelBundle, data: RetrievalData,
                cfg: AnalysisConfig = AnalysisConfig(), cache: str | os.PathLike | None = None,
                official_dir: str | os.PathLike | None = None) -> VariantResult:
    """Embed, search and score one variant with one model (item level: + the official protocol)."""
    cfg.validate()
    bundle.info["bad_images"] = cfg.bad_images  # what its image stores do with an unreadable file
    cache = Path(cache) if cache is not None else None
    ecfg = embed.EmbedConfig(view="crop", batch_size=cfg.batch_size, progress=cfg.progress,
                             num_workers=cfg.num_workers)
    tag = f"{model_name}-{fingerprint(bundle)}{embed.tta_tag(bundle, ecfg)}"  # cached features differ by their TTA
    if variant.level == "image":
        def emb(frame: pd.DataFrame, side: str) -> np.ndarray:
            keys = frame["key"].tolist()
            return _embed_cached(cache, f"{tag}-image-{side}", keys,
                                 lambda: embed.embed_images(frame, bundle, ecfg))
        res = score_images(emb(data.query_images, "q"), emb(data.gallery_images, "g"), data.query_images,
                           data.gallery_images, data.items, device=cfg.device)
        return VariantResult(f"{model_name}/{variant.name}", model_name, variant, dict(res.metrics), res.per_query,
                             text_source=text_source(variant, data.sources))

    queries, gallery = _item_view_frames(data, bundle, cfg, ecfg, cache, tag)
    view = "crop" if cfg.boxes == "gt" else "predcrop"
    scratch = None if cache is not None else tempfile.TemporaryDirectory(prefix="capret-features-")  # gone on return
    folder = cache if cache is not None else Path(scratch.name)
    tokens = cfg.keep_tokens if cfg.keep_tokens is not None else (variant.fusion == "cross" or variant.rerank)
    views = {side: features.view_features(frame, bundle, ecfg, folder, f"{tag}-{view}-{side}", tokens=tokens)
             for side, frame in (("q", queries), ("g", gallery))}  # one decode pass per view, reused by variants

    def emb(frame: pd.DataFrame, side: str) -> np.ndarray:
        if variant.text == "none" or (side == "q" and variant.text_side == "gallery"):
            return views[side].feats  # image only (queries of a gallery-only variant stay image-only)
        texts = data.text_of(frame, variant.text)
        name = f"{tag}-{view}-{variant.text}-{variant.fusion}-{side}"
        return _embed_cached(cache, name, frame["key"].tolist(), lambda: (
            frame["key"].tolist(), features.fused(views[side], texts, variant.fusion, bundle, ecfg)))

    q, g = emb(queries, "q"), emb(gallery, "g")
    rerank, rerank_k = None, 0
    if variant.rerank:
        if views["g"].tokens is None:  # keep_tokens=False: a second pass for the gallery's tokens
            views["g"] = features.view_features(gallery, bundle, ecfg, folder, f"{tag}-{view}-g", tokens=True)
        rerank = features.TokenITMReranker(bundle, data.text_of(queries, data.rerank_text), views["g"], ecfg)
        rerank_k = int(cfg.rerank_k)
    res = score_items(q, g, queries, gallery, rerank=rerank, rerank_k=rerank_k, device=cfg.device)
    out = VariantResult(f"{model_name}/{variant.name}", model_name, variant, dict(res.metrics), res.per_query,
                        text_source=text_source(variant, data.sources))
    out.official = official_topk(queries, gallery, res.indices, data.items, official_dir, out.name)
    return out


def score_items(q: np.ndarray, g: np.ndarray, queries: pd.DataFrame, gallery: pd.DataFrame, *,
                rerank: Any = None, rerank_k: int = 0, device: str = "auto") -> metrics.RetrievalResult:
    """Item-level exact metrics (:func:`metrics.evaluate_items`, lists of ``max(20, rerank_k)``) with two more
    per-query columns: ``match_key`` (the best-ranked relevant gallery item) and ``right_category`` (the top-1
    gallery item has the query's category)."""
    list_length = max(max(KS), int(rerank_k) if rerank is not None else 0)
    res = metrics.evaluate_items(q, g, queries, gallery, ks=KS, list_length=list_length, rerank=rerank,
                                 rerank_k=rerank_k, config=metrics.EvalConfig(progress=False, device=device))
    res.per_query["match_key"] = _match_keys(res, queries, gallery, q, g, "item")
    res.per_query["right_category"] = _item_category_match(res, queries, gallery)
    return res


def score_images(q: np.ndarray, g: np.ndarray, query_images: pd.DataFrame, gallery_images: pd.DataFrame,
                 items: pd.DataFrame, device: str = "auto") -> metrics.RetrievalResult:
    """Image-level exact metrics with ``match_key`` and ``right_category`` (the top-1 shop image holds an item of a
    category among the query image's style>0 items)."""
    res = metrics.evaluate_images(q, g, query_images, gallery_images, ks=KS,
                                  config=metrics.EvalConfig(progress=False, device=device))
    res.per_query["match_key"] = _match_keys(res, query_images, gallery_images, q, g, "image")
    res.per_query["right_category"] = _image_category_match(res, items, query_images, gallery_images)
    return res


def _match_keys(res: metrics.RetrievalResult, queries: pd.DataFrame, gallery: pd.DataFrame,
                q: np.ndarray | None, g: np.ndarray | None, level: str) -> list[str | None]:
    """The best-ranked relevant gallery key per query (the "true match" of the error gallery)."""
    if level == "item":
        ql, gl = metrics.item_labels(queries, gallery)
    else:
        ql, gl = metrics.image_labels(queries, gallery)
    indptr, rel = metrics.relevance_csr(ql, gl, len(queries), len(gallery))
    gkeys = gallery["key"].astype(str).tolist()
    out: list[str | None] = []
    for i, (first, top) in enumerate(zip(res.per_query["first_hit_rank"], res.per_query["top_keys"])):
        pos = rel[indptr[i]:indptr[i + 1]]
        if not len(pos):
            out.append(None)
        elif not pd.isna(first) and int(first) <= len(top):
            out.append(str(top[int(first) - 1]))
        elif q is not None and g is not None:  # beyond the stored list: the ranking there is by score
            out.append(gkeys[int(pos[np.argmax(g[pos] @ q[i])])])
        else:
            out.append(gkeys[int(pos[0])])
    return out


def _item_category_match(res: metrics.RetrievalResult, queries: pd.DataFrame, gallery: pd.DataFrame) -> np.ndarray:
    """Whether each query's top-1 gallery item has the query's category."""
    top1 = res.indices[:, 0] if res.indices.shape[1] else np.full(len(queries), -1)
    gcat = gallery["category_id"].to_numpy()
    qcat = queries["category_id"].to_numpy()
    return np.where(top1 >= 0, gcat[np.clip(top1, 0, len(gcat) - 1)] == qcat, False)


def _image_category_match(res: metrics.RetrievalResult, items: pd.DataFrame, query_images: pd.DataFrame,
                          gallery_images: pd.DataFrame) -> np.ndarray:
    """Whether each query image's top-1 shop image holds an item of a category among the query's style>0 items."""
    img_key = items["split"] + "/" + items["image_id"].map(lambda i: f"{int(i):06d}")
    q_cats = items[items["style"] > 0].groupby(img_key[items["style"] > 0])["category_id"].agg(set).to_dict()
    all_cats = items.groupby(img_key)["category_id"].agg(set).to_dict()
    gkeys = gallery_images["key"].tolist()
    out = []
    for qk, top in zip(query_images["key"], res.indices[:, 0] if res.indices.shape[1] else []):
        out.append(bool(top >= 0 and q_cats.get(qk, set()) & all_cats.get(gkeys[int(top)], set())))
    return np.asarray(out, dtype=bool)


def official_topk(queries: pd.DataFrame, gallery: pd.DataFrame, indices: np.ndarray, items: pd.DataFrame,
                  out_dir: str | os.PathLike | None = None, name: str = "results") -> dict[str, float]:
    """The official DeepFashion2 top-k of an item ranking, through the official files: GT query/gallery JSON of the
    split and this ranking as a results JSON (query/gallery boxes = the views' boxes, GT or predicted)."""
    import tempfile

    from capret_utils.data import df2

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="capret-official-")
        out_dir = tmp.name
    out_dir = Path(out_dir)
    try:
        qgt, ggt = out_dir / "query_gt.json", out_dir / "gallery_gt.json"
        if not (qgt.is_file() and ggt.is_file()):
            qgt, ggt = df2.write_official_gt(items, out_dir, query_name=qgt.name, gallery_name=ggt.name)
        results = out_dir / f"{_slug(name)}.results.json"
        df2_eval.write_results(results, df2_eval.gt_box_results(queries, gallery, indices))
        ev = df2_eval.evaluate_files(results, qgt, ggt)
        return {f"official_top{k}": float(ev.metrics[f"top{k}"]) for k in OFFICIAL_KS}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def run_all(variants: Sequence[Variant], models: Mapping[str, embed.ModelBundle], data: RetrievalData,
            cfg: AnalysisConfig = AnalysisConfig(), run_dir: str | os.PathLike | None = None,
            ) -> list[VariantResult]:
    """Every variant for every model (fine-tuned first), embeddings cached under ``<run_dir>/embeddings``."""
    from tqdm.auto import tqdm

    scratch = None if run_dir else tempfile.TemporaryDirectory(prefix="capret-features-")  # one pass per view, shared
    cache = Path(run_dir) / "embeddings" if run_dir else Path(scratch.name)
    official = Path(run_dir) / "official" if run_dir else None
    if official is not None:
        official.mkdir(parents=True, exist_ok=True)
    jobs = [(m, v) for m in MODEL_NAMES if m in models for v in variants]
    if cfg.keep_tokens is None:  # one decode pass per view: keep tokens when any variant needs them
        cfg = replace(cfg, keep_tokens=any(v.fusion == "cross" or v.rerank for v in variants))
    out = []
    for m, v in tqdm(jobs, desc="variants", disable=not cfg.progress):
        out.append(run_variant(v, m, models[m], data, cfg, cache, official))
    return out


# ------------------------------------------------------------------------------------------ tables


def category_error_share(per_query: pd.DataFrame) -> tuple[float, int]:
    """Among evaluated queries whose top-1 is wrong: the share whose top-1 has the right category.

    Needs ``hit@1`` (nullable bool; <NA> = not evaluated) and ``right_category`` columns. Returns
    ``(share, number of top-1 errors)``; the share is NaN without errors.
    """
    hit = per_query["hit@1"]
    errors = per_query[hit.notna() & (hit == False)]  # noqa: E712
    n = len(errors)
    return (float(errors["right_category"].astype(bool).mean()) if n else float("nan")), n


def variant_row(result: VariantResult, seed: int = 0) -> dict[str, Any]:
    """One row of the variant table: hit@k and mAP with 95 % intervals (Wilson for hit@1, a seeded bootstrap over
    queries for mAP), the official protocol, the category-error share and the ``text_source`` label."""
    m = result.metrics
    share, n_err = category_error_share(result.per_query)
    row: dict[str, Any] = {"name": result.name, "model": result.model, "variant": result.variant.name,
                           "level": result.variant.level, "text": result.variant.text,
                           "fusion": result.variant.fusion, "rerank": result.variant.rerank,
                           "text_source": result.text_source, "oracle": result.text_source == "oracle"}
    row.update({f"top{k}": float(m[f"top{k}"]) for k in TABLE_KS})
    row["mAP"] = float(m["mAP"])
    evaluated = result.per_query[result.per_query["hit@1"].notna()] if "hit@1" in result.per_query else None
    if evaluated is not None and len(evaluated):
        row["top1_lo"], row["top1_hi"] = stats.wilson_interval(evaluated["hit@1"].astype(float))
        row["mAP_lo"], row["mAP_hi"] = stats.bootstrap_interval(evaluated["ap"].astype(float), seed=seed)
    for k in OFFICIAL_KS:
        row[f"official_top{k}"] = result.official.get(f"official_top{k}", float("nan"))
    row["right_category_wrong_item"] = share
    row["n_top1_errors"] = n_err
    row["n_queries"] = int(m["n_evaluated"])
    row["n_gallery"] = int(m["n_gallery"])
    return row


def baseline_name(name: str, level: str) -> str:
    """The image-only baseline a variant row is compared with: the same model's ``crop`` (item level) or
    ``image`` (image level)."""
    model = name.split("/", 1)[0]
    return f"{model}/{'crop' if level == 'item' else 'image'}"


def variant_table(results: Sequence[VariantResult], seed: int = 0) -> pd.DataFrame:
    """One row per evaluated variant (see :func:`variant_row`), each compared with the image-only baseline of its
    model (:func:`baseline_name`) on the same queries: ``won`` / ``lost`` queries at hit@1, the exact McNemar
    ``p_top1``, and ``delta_mAP`` with its paired-bootstrap 95 % interval (:mod:`.stats`)."""
    table = pd.DataFrame([variant_row(r, seed) for r in results])
    if not len(table):
        return table
    per_query = {r.name: r.per_query for r in results}
    rows = []
    for r in results:
        base = baseline_name(r.name, r.variant.level)
        if base == r.name or base not in per_query:
            continue
        a, b = per_query[r.name], per_query[base]
        a, b = a[a["hit@1"].notna()], b[b["hit@1"].notna()]
        rows.append({"name": r.name, "baseline": base,
                     **stats.compare(a.astype({"hit@1": float}), b.astype({"hit@1": float}), seed=seed)})
    if rows:
        table = table.merge(pd.DataFrame(rows), on="name", how="left")
    return table


def per_query_table(results: Sequence[VariantResult]) -> pd.DataFrame:
    """All variants' per-query rows, parquet-friendly (lists instead of arrays), with ``variant`` / ``model`` /
    ``level`` columns."""
    frames = []
    for r in results:
        pq = r.per_query.copy()
        for col in ("top_indices", "top_scores", "top_relevant", "top_keys"):
            if col in pq:
                pq[col] = [list(np.asarray(v).tolist()) for v in pq[col]]
        pq.insert(0, "level", r.variant.level)
        pq.insert(0, "model", r.model)
        pq.insert(0, "variant", r.name)
        frames.append(pq)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if len(table):
        table["first_hit_rank"] = table["first_hit_rank"].astype("Int64")
    return table


def zero_shot_vs_finetuned(table: pd.DataFrame, variant: str = "crop") -> dict[str, Any]:
    """Zero-shot vs fine-tuned on one variant, the best non-oracle variant by mAP, and the best oracle row
    (an upper bound, labelled as such)."""
    cols = [f"top{k}" for k in TABLE_KS] + ["mAP"]
    out: dict[str, Any] = {}
    for model, key in (("zero-shot", "zero_shot"), ("fine-tuned", "finetuned")):
        rows = table[(table["model"] == model) & (table["variant"] == variant)]
        if len(rows):
            out[key] = {c: float(rows.iloc[0][c]) for c in cols}
    if "zero_shot" in out and "finetuned" in out:
        out["finetuned_minus_zero_shot"] = {c: out["finetuned"][c] - out["zero_shot"][c] for c in cols}
    honest = table[~table["oracle"].astype(bool)] if "oracle" in table else table
    if len(honest):  # oracle rows are upper bounds, never the best result
        best = honest.loc[honest["mAP"].idxmax()]
        out["best_variant"] = {"name": str(best["name"]), "mAP": float(best["mAP"]), "top1": float(best["top1"]),
                               "text_source": str(best.get("text_source", "none"))}
    oracle = table[table["oracle"].astype(bool)] if "oracle" in table else table.iloc[0:0]
    if len(oracle):
        top = oracle.loc[oracle["mAP"].idxmax()]
        out["best_oracle_upper_bound"] = {"name": str(top["name"]), "mAP": float(top["mAP"]),
                                          "top1": float(top["top1"])}
    out["variant"] = variant
    return out


def metrics_dict(table: pd.DataFrame, head: Mapping[str, Any]) -> dict[str, Any]:
    """What 04 writes to ``metrics.json``: the headline and the whole table keyed by row name."""
    rows = {}
    for rec in table.to_dict("records"):
        name = rec.pop("name")
        rows[name] = {k: (None if isinstance(v, float) and np.isnan(v) else
                          (v.item() if isinstance(v, np.generic) else v)) for k, v in rec.items()}
    return {"headline": dict(head), "variants": rows}


def with_attributes(per_query: pd.DataFrame, items: pd.DataFrame,
                    attributes: Sequence[str] = BREAKDOWN_ATTRIBUTES) -> pd.DataFrame:
    """Item-level per-query rows joined with their query item's attributes (by ``query_key``)."""
    item_rows = per_query[per_query["level"] == "item"]
    attrs = items.set_index("key")[list(attributes)]
    return item_rows.join(attrs, on="query_key")


def breakdown(per_query: pd.DataFrame, items: pd.DataFrame, attribute: str,
              metrics_: Sequence[str] = ("hit@1", "hit@10", "ap")) -> pd.DataFrame:
    """Mean of ``metrics_`` per (variant, attribute value) over evaluated item-level queries, with ``n`` and a
    readable ``label`` (e.g. occlusion 3 -> "heavy")."""
    from capret_utils.viz.plots import ATTRIBUTE_LABELS

    joined = with_attributes(per_query, items, (attribute,))
    joined = joined[joined["n_relevant"] > 0]
    cols = {m: joined[m].astype("float64") for m in metrics_}
    frame = pd.DataFrame({"variant": joined["variant"], "value": joined[attribute], **cols})
    out = frame.groupby(["variant", "value"], sort=True).agg(n=("value", "size"), **{
        m.replace("@", ""): (m, "mean") for m in metrics_}).reset_index()
    labels = ATTRIBUTE_LABELS.get(attribute, {})
    out.insert(2, "label", [labels.get(v, str(v)) for v in out["value"]])
    out.insert(1, "attribute", attribute)
    return out


def breakdowns(per_query: pd.DataFrame, items: pd.DataFrame,
               attributes: Sequence[str] = BREAKDOWN_ATTRIBUTES) -> pd.DataFrame:
    """:func:`breakdown` for every attribute, stacked (``value`` as str)."""
    frames = [breakdown(per_query, items, a).astype({"value": str}) for a in attributes]
    return pd.concat(frames, ignore_index=True)


def error_examples(per_query: pd.DataFrame, variant: str, n: int = 4, seed: int = 0) -> pd.DataFrame:
    """``n`` top-1 failures of one variant (seeded choice, worst AP first among the chosen): ``query_key``,
    ``top_keys`` (first 5), ``top_relevant``, ``match_key``, ``first_hit_rank``, ``ap``."""
    rows = per_query[(per_query["variant"] == variant) & (per_query["n_relevant"] > 0)]
    fails = rows[rows["hit@1"] == False]  # noqa: E712
    if fails.empty:
        return fails.iloc[0:0]
    picked = fails.sample(n=min(n, len(fails)), random_state=seed).sort_values("ap")
    out = picked[["query_key", "top_keys", "top_relevant", "match_key", "first_hit_rank", "ap"]].copy()
    out["top_keys"] = [list(v)[:5] for v in out["top_keys"]]
    out["top_relevant"] = [list(v)[:5] for v in out["top_relevant"]]
    return out.reset_index(drop=True)


def write_table(table: pd.DataFrame, run_dir: str | os.PathLike, name: str = "variants.csv") -> Path:
    """Atomically write a CSV into the run folder."""
    path = Path(run_dir) / name
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def write_parquet(table: pd.DataFrame, run_dir: str | os.PathLike, name: str = "per_query.parquet") -> Path:
    path = Path(run_dir) / name
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path
