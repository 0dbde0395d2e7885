"""Peer encoders (FashionCLIP, SigLIP, SigLIP 2, DINOv2, open_clip, …) through the same evaluation as X2-VLM:
the same item crops, queries, gallery, metrics, intervals and paired tests, as extra rows of notebook 04's variant
table.

For every encoder (:func:`capret_utils.encoders.load_encoder`) the rows are ``<label>/crop`` (the item crop,
image only) and, for encoders with a text tower, ``<label>/crop+<kind>-late`` (``normalise(image + alpha *
text)`` on both sides, as X2-VLM's late fusion) and ``<label>/crop+<kind>-gallery`` (captions on shop items only)
for each caption kind the data has (template; dialogue when given). Crops are the items table's boxes grown by
the run's ``context`` through :class:`capret_utils.data.loader.ImageStore` (:func:`capret_utils.data.boxes.crop_box`),
or the X2-VLM box head's boxes with ``boxes="predicted"`` (the reference model's, shared with its rows).

Scoring is :func:`capret_utils.evaluation.analysis.score_items` and the official protocol
:func:`~capret_utils.evaluation.analysis.official_topk`; :func:`add_to_table` builds the rows with
:func:`~capret_utils.evaluation.analysis.variant_table` (each caption row against its encoder's ``crop``) and
compares each encoder's ``crop`` with X2-VLM's reference ``crop`` on the same queries (:func:`stats.compare`). Two
columns are added to every row: ``encoder`` (hub id, folder or alias; ``X2-VLM`` for the bundle rows) and
``weights`` (``pretrained`` | ``random-init`` | ``fine-tuned``): random-init rows test the path, not the model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from capret_utils.data.boxes import CROP_CONTEXT
from capret_utils.data.loader import ImageStore
from capret_utils.encoders import Encoder, load_encoder, parse_encoders, row_label
from capret_utils.evaluation import analysis, embed, stats

@dataclass
class PeerConfig:
    """How peer encoders are evaluated."""

    context: float | None = None  # crop margin per side (fraction of box w/h); None = the X2-VLM reference's
    alpha: float = 1.0  # late fusion text weight (as embed.EmbedConfig.alpha)
    captions: bool = True  # caption rows (late, gallery-only) for encoders with a text tower
    batch_size: int = 64  # crops per forward pass
    cache_mb: float = 512.0  # RAM budget of the decoded crops shared by encoders of one input size, MB; 0 = none
    model_dir: str | None = None  # where tiny-* random encoders are built (required for them)
    device: str = "auto"  # encoder device ("auto": CUDA when torch sees it)
    progress: bool = True  # tqdm bars

    def validate(self) -> None:
        if self.context is not None and not self.context >= 0:
            raise ValueError(f"PeerConfig.context must be >= 0 or None, got {self.context}")
        if self.batch_size < 1:
            raise ValueError(f"PeerConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.cache_mb < 0:
            raise ValueError(f"PeerConfig.cache_mb is a RAM budget in MB (0 = none), got {self.cache_mb}")


def encoder_variants(encoder: Encoder, data: analysis.RetrievalData, captions: bool = True,
                     ) -> list[analysis.Variant]:
    """``crop``, plus ``crop+<kind>-late`` and ``crop+<kind>-gallery`` per caption kind for text encoders (the
    template and main dialogue kinds; the extra oracle dialogue of :mod:`.caption_sources` is X2-VLM only)."""
    out = [analysis.VARIANTS["crop"]]
    if captions and encoder.has_text:
        for kind in [k for k in data.texts if f"crop+{k}-late" in analysis.VARIANTS]:
            out += [analysis.VARIANTS[f"crop+{kind}-late"], analysis.VARIANTS[f"crop+{kind}-gallery"]]
    return out


def embed_crops(encoder: Encoder, frame: pd.DataFrame, store: ImageStore, context: float, batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
    """L2-normalised float32 crop vectors of every row of an items slice (rows in order)."""
    from tqdm.auto import tqdm

    rows = frame.to_dict("records")
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc=f"{encoder.name} crops", disable=not progress,
                      leave=False):
        crops = [store.crop(r, context) for r in rows[start:start + batch_size]]
        out.append(encoder.encode_images(crops, batch_size=batch_size))
    return np.concatenate(out) if out else np.zeros((0, encoder.embed_dim), np.float32)


def _fuse(image: np.ndarray, text: np.ndarray, alpha: float) -> np.ndarray:
    fused = image.astype(np.float32) + np.float32(alpha) * text.astype(np.float32)
    return fused / np.maximum(np.linalg.norm(fused, axis=1, keepdims=True), 1e-12)


def _cached(cache: Path | None, name: str, keys: Sequence[str], compute) -> np.ndarray:
    if cache is None:
        return compute()
    return embed.cached_embeddings(cache, name, keys, lambda: (list(keys), compute()))[1]


def run_encoder(encoder: Encoder, data: analysis.RetrievalData, cfg: analysis.AnalysisConfig,
                pcfg: PeerConfig, queries: pd.DataFrame, gallery: pd.DataFrame, context: float,
                store: ImageStore, cache: Path | None = None, official_dir: Path | None = None,
                label: str | None = None) -> list[analysis.VariantResult]:
    """Every :func:`encoder_variants` row of one encoder on ``queries`` / ``gallery`` (boxes already chosen)."""
    label = label or row_label(encoder.name)
    tag = f"{label}-{analysis.fingerprint(SimpleNamespace(model=encoder.module))}"
    view = "crop" if cfg.boxes == "gt" else "predcrop"
    image = {side: _cached(cache, f"{tag}-{view}-image-{side}", frame["key"].tolist(),
                           lambda f=frame: embed_crops(encoder, f, store, context, pcfg.batch_size, pcfg.progress))
             for side, frame in (("q", queries), ("g", gallery))}
    out = []
    for variant in encoder_variants(encoder, data, pcfg.captions):
        q, g = image["q"], image["g"]
        if variant.text != "none":
            def text(frame: pd.DataFrame, side: str) -> np.ndarray:
                return _cached(cache, f"{tag}-text-{variant.text}-{side}", frame["key"].tolist(),
                               lambda: encoder.encode_texts(data.text_of(frame, variant.text), pcfg.batch_size))
            g = _fuse(g, text(gallery, "g"), pcfg.alpha)
            if variant.text_side == "both":
                q = _fuse(q, text(queries, "q"), pcfg.alpha)
        res = analysis.score_items(q, g, queries, gallery, device=cfg.device)
        row = analysis.VariantResult(f"{label}/{variant.name}", label, variant, dict(res.metrics), res.per_query,
                                     text_source=analysis.text_source(variant, data.sources))
        row.official = analysis.official_topk(queries, gallery, res.indices, data.items, official_dir, row.name)
        out.append(row)
    return out


def reference_name(models: Mapping[str, Any]) -> str | None:
    """The X2-VLM model the encoders are compared with: ``fine-tuned`` when present, else ``zero-shot``."""
    return next((m for m in analysis.MODEL_NAMES if m in models), None)


def run_encoders(specs: str | Sequence[str], data: analysis.RetrievalData, cfg: analysis.AnalysisConfig,
                 run_dir: str | os.PathLike | None = None, models: Mapping[str, embed.ModelBundle] | None = None,
                 pcfg: PeerConfig | None = None) -> tuple[list[analysis.VariantResult], dict[str, dict[str, Any]]]:
    """Evaluate every encoder in ``specs`` (comma list or sequence: hub ids, folders, ``tiny-*``); returns the
    results and ``{label: encoder description + "spec" + "seconds"}``.

    ``models``: notebook 04's X2-VLM bundles; the reference one gives the crop ``context`` (unless
    ``pcfg.context``) and, with ``cfg.boxes == "predicted"``, the boxes (cached with its own rows). Embeddings are
    cached under ``<run_dir>/embeddings``, official files under ``<run_dir>/official``.
    """
    from capret_utils.common import resolve_device

    pcfg = pcfg or PeerConfig()
    pcfg.validate()
    cfg.validate()
    specs = parse_encoders(specs) if isinstance(specs, str) else list(specs)
    if not specs:
        return [], {}
    models = dict(models or {})
    ref = reference_name(models)
    context = pcfg.context
    if context is None:
        context = float(models[ref].info.get("context", CROP_CONTEXT)) if ref else CROP_CONTEXT
    cache = Path(run_dir) / "embeddings" if run_dir else None
    official = Path(run_dir) / "official" if run_dir else None
    if official is not None:
        official.mkdir(parents=True, exist_ok=True)
    queries, gallery = data.queries, data.gallery
    if cfg.boxes == "predicted":
        if ref is None:
            raise ValueError("boxes='predicted' needs an X2-VLM model (its box head gives the boxes)")
        bundle = models[ref]
        ecfg = embed.EmbedConfig(view="crop", batch_size=cfg.batch_size, progress=cfg.progress)
        queries, gallery = analysis._item_view_frames(data, bundle, cfg, ecfg, cache,
                                                      f"{ref}-{analysis.fingerprint(bundle)}")
    device = str(resolve_device(pcfg.device))
    results, info, stores, labels = [], {}, {}, set()
    for spec in specs:
        started = time.time()
        encoder = load_encoder(spec, device=device, model_dir=pcfg.model_dir)
        label = row_label(spec)
        while label in labels or label in analysis.MODEL_NAMES:
            label += "+"
        labels.add(label)
        side = max(2 * encoder.image_size, 64)  # as X2-VLM: crops shrunk to twice the model's input side
        if side not in stores:
            stores[side] = ImageStore(side, cache_mb=pcfg.cache_mb)
        results += run_encoder(encoder, data, cfg, pcfg, queries, gallery, context, stores[side], cache, official,
                               label)
        info[label] = {**encoder.describe(), "spec": str(spec), "context": context,
                       "seconds": round(time.time() - started, 2)}
    return results, info


def x2vlm_weights(model_name: str, bundle: Any) -> str:
    """``fine-tuned`` for notebook 03's model, else ``random-init`` or ``pretrained`` by where it came from."""
    from capret_utils.train import RANDOM_INIT_PRESETS

    if model_name == "fine-tuned":
        return "fine-tuned"
    info = getattr(bundle, "info", {}) or {}
    init = str((info.get("source") or {}).get("init", "")) if isinstance(info.get("source"), dict) else ""
    random = info.get("zero_shot_of") in RANDOM_INIT_PRESETS or init.startswith("random")
    return "random-init" if random else "pretrained"


def add_to_table(table: pd.DataFrame, peer_results: Sequence[analysis.VariantResult],
                 x2_results: Sequence[analysis.VariantResult], info: Mapping[str, Mapping[str, Any]],
                 models: Mapping[str, Any] | None = None, seed: int = 0) -> pd.DataFrame:
    """Notebook 04's variant ``table`` with the encoders' rows appended, and ``encoder`` / ``weights`` columns.

    Caption rows compare with their encoder's ``crop`` (as X2-VLM's do); each encoder's ``crop`` compares with the
    reference X2-VLM ``crop`` (``fine-tuned/crop``, else ``zero-shot/crop``; column ``baseline`` names it).
    """
    models = dict(models or {})
    table = table.copy()
    table["encoder"] = "X2-VLM"
    table["weights"] = [x2vlm_weights(m, models.get(m)) for m in table["model"]] if len(table) else []
    if not peer_results:
        return table
    peers = analysis.variant_table(peer_results, seed=seed)
    ref = reference_name(models) or reference_name({r.model: r for r in x2_results})
    base = next((r for r in x2_results if ref and r.name == f"{ref}/crop"), None)
    if base is not None:
        b = base.per_query[base.per_query["hit@1"].notna()].astype({"hit@1": float})
        for r in peer_results:
            if r.variant.name != "crop":
                continue
            a = r.per_query[r.per_query["hit@1"].notna()].astype({"hit@1": float})
            cmp = {"baseline": base.name, **stats.compare(a, b, seed=seed)}
            for col, value in cmp.items():
                if col not in peers:
                    peers[col] = pd.Series([None] * len(peers), dtype=object if col == "baseline" else float)
                peers.loc[peers["name"] == r.name, col] = value
    peers["encoder"] = [info.get(m, {}).get("spec", m) for m in peers["model"]]
    peers["weights"] = [info.get(m, {}).get("weights", "pretrained") for m in peers["model"]]
    return pd.concat([table, peers], ignore_index=True)
