"""Batched embedding extraction with an X2-VLM model bundle: items DataFrame + bundle + config -> (keys, float32).

Representations (:class:`EmbedConfig`):

* ``view="crop"``: the item's GT box grown by ``context`` (the fine-tuning view); ``view="image"``: the whole
  photo; ``view="predicted"``: the box head's box for the item's text (category name or caption) on the whole
  photo, then a crop of that box (+ ``context``) — item retrieval without GT boxes;
* ``fusion="none"``: the image ITC feature (L2-normalised ``vision_proj`` of image token 0) — the retrieval
  embedding fine-tuning trains with ArcFace; ``fusion="late"``: ``normalise(image_feat + alpha * text_feat)``
  (both in the ITC space, aligned by ITC); ``fusion="cross"``: the fusion encoder's [CLS] for (caption, image
  tokens), projected by the model's ``text_proj`` and L2-normalised (the fusion [CLS] continues the text [CLS]'s
  residual stream; notebook 03 trains this projection of fused pairs with ArcFace, loss term ``arcface_fused``).

:class:`ITMReranker` is the ITM re-ranking hook for :mod:`capret_utils.evaluation.retrieval` / :mod:`capret_utils.evaluation.metrics`:
the query item's caption against each candidate gallery view's image tokens through the fusion layers; score =
the raw ITM "match" logit (official X2-VLM re-ranking, docs/x2vlm.md §6).

Everything runs under ``torch.no_grad()`` (not ``inference_mode``: Hugging Face BEiT caches its relative
position index tensor on first use, and an inference-mode tensor in that cache breaks a later training step in
the same process) and bf16 autocast on CUDA. Embeddings are cached as ``<name>.npy`` + ``<name>.keys.json`` in a
run folder (:func:`save_embeddings`, :func:`cached_embeddings`).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from capret_utils.data.boxes import CROP_CONTEXT
from capret_utils.data.loader import (
    ImageStore,
    ViewDataset,
    build_loader,
    collate_views,
)
from capret_utils.x2vlm import X2VLMImageProcessor, X2VLMModel, X2VLMTokenizer

VIEWS = ("crop", "image", "predicted")
FUSIONS = ("none", "late", "cross")


@dataclass
class ModelBundle:
    """A model with what it needs to embed: tokenizer, image processor and the settings it was trained with
    (``info``: ``context``, ``cache_side``, ``use_captions``, identity classes, training config …)."""

    model: X2VLMModel
    tokenizer: X2VLMTokenizer
    processor: X2VLMImageProcessor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_res(self) -> int:
        return int(self.model.config.image_res)

    def store(self, cache: bool = False, bad_images: str | None = None) -> ImageStore:
        """An :class:`ImageStore` with the shrink side used in training (same pixels as fine-tuning saw); ``cache``
        keeps up to 512 MB of decoded views; ``bad_images`` ("raise" | "skip") defaults to ``info["bad_images"]``."""
        side = int(self.info.get("cache_side") or 2 * self.image_res)
        return ImageStore(side, cache_mb=512.0 if cache else 0.0,
                          on_error=bad_images or self.info.get("bad_images", "raise"))


@dataclass
class EmbedConfig:
    """What to embed and how."""

    view: str = "crop"  # "crop" (GT box + context) | "image" (whole photo) | "predicted" (box head box + context)
    context: float | None = None  # crop margin per side (fraction of box w/h); None = the bundle's training value
    tta_contexts: tuple[float, ...] | None = None  # further crop margins whose features are averaged in (crop views;
    # test-time augmentation, the tokens stay those of `context`); None = the bundle's (TrainConfig.tta_contexts)
    fusion: str = "none"  # "none" (image feature) | "late" (image + alpha * text feature) | "cross" (fusion [CLS])
    alpha: float = 1.0  # late fusion text weight
    batch_size: int = 64  # images per forward pass
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    cache_images: bool = False  # keep decoded views in memory (repeated calls over the same items; num_workers 0)
    num_workers: int = -1  # image-loading worker processes: -1 auto (cores - 1, at most 8), 0 in-process
    progress: bool = True  # tqdm bars

    def validate(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"EmbedConfig.view must be one of {VIEWS}, got {self.view!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"EmbedConfig.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.batch_size < 1:
            raise ValueError(f"EmbedConfig.batch_size must be >= 1, got {self.batch_size}")


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _bar(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not show, leave=False, unit="img")


def _context(bundle: ModelBundle, config: EmbedConfig) -> float:
    return float(config.context if config.context is not None else bundle.info.get("context", CROP_CONTEXT))


def tta_contexts(bundle: ModelBundle, config: EmbedConfig) -> tuple[float, ...]:
    """The extra crop contexts averaged into crop features (``config`` first, else the bundle's training config)."""
    if config.view == "image":
        return ()
    values = config.tta_contexts if config.tta_contexts is not None else bundle.info.get("tta_contexts", ())
    return tuple(float(c) for c in values or ())


def tta_tag(bundle: ModelBundle, config: EmbedConfig) -> str:
    """A file-name suffix for cached crop features that differ by test-time augmentation ("" when off)."""
    extra = tta_contexts(bundle, config)
    return "-tta" + "_".join(f"{c:g}" for c in extra) if extra else ""


def image_features(model: X2VLMModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_embeds, image_feat)`` of a batch: ``(B, 3, H, W)`` as :meth:`~capret_utils.x2vlm.X2VLMModel
    .get_image_embeds`; a test-time-augmentation stack ``(B, V, 3, H, W)`` (:class:`~capret_utils.data.loader
    .ViewDataset` with ``tta_contexts``) gives the first view's tokens and the renormalised mean of the V
    normalised features."""
    if pixel_values.ndim == 4:
        return model.get_image_embeds(pixel_values)
    b, v = pixel_values.shape[:2]
    embeds, feat = model.get_image_embeds(pixel_values.flatten(0, 1))
    feat = F.normalize(F.normalize(feat.float(), dim=-1).view(b, v, -1).sum(1), dim=-1)
    return embeds.view(b, v, *embeds.shape[1:])[:, 0], feat


def _texts_for(items: pd.DataFrame, texts: Sequence[str] | None, what: str) -> list[str]:
    if texts is None:
        raise ValueError(f"{what} needs one text per item (captions or category names)")
    if len(texts) != len(items):
        raise ValueError(f"{what}: got {len(texts)} texts for {len(items)} items")
    return [str(t) for t in texts]


@torch.no_grad()
def embed_texts(texts: Sequence[str], bundle: ModelBundle, config: EmbedConfig | None = None,
                ) -> np.ndarray:
    """L2-normalised text ITC features (n, embed_dim), float32."""
    config = config or EmbedConfig()
    model, out = bundle.model.eval(), []
    for sl in _batches(len(texts), max(config.batch_size, 1)):
        enc = bundle.tokenizer(list(texts[sl]))
        with autocast(bundle.device, config.bf16):
            emb = model.get_text_embeds(enc["input_ids"].to(bundle.device), enc["attention_mask"].to(bundle.device))
            out.append(model.get_text_feat(emb).float().cpu())
    dim = int(model.config.embed_dim)
    return torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)


def _loader_batches(items: pd.DataFrame, bundle: ModelBundle, config: EmbedConfig, store: ImageStore, view: str,
                    context: float = 0.0, boxes: np.ndarray | None = None, desc: str = "embed",
                    tta: Sequence[float] = ()) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(row slice, pixel values on the model's device)`` per batch, in row order, through the shared loader
    (:func:`capret_utils.data.loader.build_loader`; in-process for a single batch). Unreadable images (store
    ``on_error="skip"``) come as grey placeholders and are reported in one warning at the end. ``tta``: further
    crop contexts, stacked per row (``(B, 1 + len(tta), 3, H, W)``; :func:`image_features`)."""
    dataset = ViewDataset(items, store, bundle.processor, view, context, boxes, tta)
    workers = 0 if len(dataset) <= config.batch_size else config.num_workers
    cuda = bundle.device.type == "cuda"
    loader = build_loader(dataset, collate_views, workers, batch_size=config.batch_size, pin_memory=cuda,
                          persistent=False)
    skipped: list[dict[str, str]] = []
    bar = _bar(len(dataset), desc, config.progress)
    start = 0
    for batch in loader:
        n = len(batch["rows"])
        skipped.extend(batch["skipped"])
        yield slice(start, start + n), batch["pixel_values"].to(bundle.device, non_blocking=cuda)
        start += n
        bar.update(n)
    bar.close()
    if skipped:
        warnings.warn(f"{desc}: {len(skipped)} unreadable image(s) embedded as grey placeholders (bad_images="
                      f"'skip'; they stay in the evaluation): first {skipped[0]['path']} (item {skipped[0]['key']})",
                      stacklevel=3)


@torch.no_grad()
def predict_boxes(items: pd.DataFrame, bundle: ModelBundle, texts: Sequence[str] | None = None,
                  config: EmbedConfig | None = None, store: ImageStore | None = None) -> np.ndarray:
    """The box head's box for each item (its text on the whole photo) as (x1, y1, x2, y2) in original pixels.

    ``texts`` default to the category names (what the box loss trains with when captions are off).
    """
    config = config or EmbedConfig()
    texts = [str(c) for c in items["category_name"]] if texts is None else _texts_for(items, texts, "predict_boxes")
    store = store if store is not None else bundle.store(config.cache_images)
    model, out = bundle.model.eval(), []
    for sl, pv in _loader_batches(items, bundle, config, store, "image", desc="predict boxes"):
        enc = bundle.tokenizer(texts[sl])
        ids, mask = enc["input_ids"].to(bundle.device), enc["attention_mask"].to(bundle.device)
        with autocast(bundle.device, config.bf16):
            image_embeds, _ = model.get_image_embeds(pv)
            fused = model.get_fusion_embeds(model.get_text_embeds(ids, mask), mask, image_embeds)
            out.append(model.predict_bbox(fused).float().cpu())
    rel = torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, 4), np.float32)
    return box_to_pixels(rel, items["width"].to_numpy(np.float32), items["height"].to_numpy(np.float32))


def box_to_pixels(rel: np.ndarray, W: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Box-head outputs (n, 4) sigmoid ``(cx, cy, w, h)`` in [0, 1] -> (x1, y1, x2, y2) float32 pixels of images
    ``W`` × ``H`` (n,), clamped into the image and at least one pixel wide and high."""
    rel = np.asarray(rel, dtype=np.float32).reshape(-1, 4)
    W, H = np.asarray(W, dtype=np.float32), np.asarray(H, dtype=np.float32)
    cx, cy, w, h = (rel[:, i] for i in range(4))
    boxes = np.stack([(cx - w / 2) * W, (cy - h / 2) * H, (cx + w / 2) * W, (cy + h / 2) * H], axis=1)
    boxes = boxes.astype(np.float32).reshape(-1, 4)
    # clamp into the image and keep at least one pixel
    boxes[:, 0] = np.clip(boxes[:, 0], 0, W - 1)
    boxes[:, 1] = np.clip(boxes[:, 1], 0, H - 1)
    boxes[:, 2] = np.clip(np.maximum(boxes[:, 2], boxes[:, 0] + 1), 1, W)
    boxes[:, 3] = np.clip(np.maximum(boxes[:, 3], boxes[:, 1] + 1), 1, H)
    return boxes


def _view_batches(items: pd.DataFrame, bundle: ModelBundle, config: EmbedConfig, texts: Sequence[str] | None,
                  store: ImageStore, desc: str) -> Iterator[tuple[slice, torch.Tensor]]:
    """Batches of the configured ``view`` (GT crop, whole photo, or the crop of the box head's box)."""
    boxes = predict_boxes(items, bundle, texts, config, store) if config.view == "predicted" else None
    view = "image" if config.view == "image" else "crop"
    return _loader_batches(items, bundle, config, store, view, _context(bundle, config), boxes, desc,
                           tta_contexts(bundle, config))


@torch.no_grad()
def embed_items(items: pd.DataFrame, bundle: ModelBundle, config: EmbedConfig | None = None,
                texts: Sequence[str] | None = None, store: ImageStore | None = None,
                ) -> tuple[list[str], np.ndarray]:
    """Embed every row of an items table: ``(keys, float32 (n, embed_dim))``, L2-normalised.

    ``texts`` (one per row) are needed for ``fusion="late" | "cross"`` and used by ``view="predicted"`` (default
    there: category names).
    """
    config = config or EmbedConfig()
    config.validate()
    if config.fusion != "none":
        texts = _texts_for(items, texts, f"fusion={config.fusion!r}")
    store = store if store is not None else bundle.store(config.cache_images)
    model = bundle.model.eval()
    keys = [str(k) for k in items["key"]]
    out = []
    desc = f"embed {config.view}" + (f"+{config.fusion}" if config.fusion != "none" else "")
    for sl, pv in _view_batches(items, bundle, config, texts, store, desc):
        with autocast(bundle.device, config.bf16):
            image_embeds, image_feat = image_features(model, pv)
            if config.fusion == "none":
                feat = image_feat
            else:
                enc = bundle.tokenizer(texts[sl])
                ids, mask = enc["input_ids"].to(bundle.device), enc["attention_mask"].to(bundle.device)
                text_embeds = model.get_text_embeds(ids, mask)
                if config.fusion == "late":
                    feat = image_feat.float() + config.alpha * model.get_text_feat(text_embeds).float()
                else:
                    fused = model.get_fusion_embeds(text_embeds, mask, image_embeds)
                    feat = model.text_proj(fused[:, 0, :])
        out.append(F.normalize(feat.float(), dim=-1).cpu())
    dim = int(model.config.embed_dim)
    return keys, (torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, dim), np.float32))


@torch.no_grad()
def embed_images(images: pd.DataFrame, bundle: ModelBundle, config: EmbedConfig | None = None,
                 store: ImageStore | None = None) -> tuple[list[str], np.ndarray]:
    """Whole-photo image features for an image table (``metrics.image_sets`` rows: ``key``, ``path``):
    ``(image keys, float32 (n, embed_dim))``."""
    config = config or EmbedConfig()
    store = store if store is not None else bundle.store(config.cache_images)
    model = bundle.model.eval()
    out = []
    table = pd.DataFrame({"key": [str(k) for k in images["key"]], "path": [str(p) for p in images["path"]]})
    for _, pv in _loader_batches(table, bundle, config, store, "image", desc="embed images"):
        with autocast(bundle.device, config.bf16):
            out.append(model.get_image_embeds(pv)[1].float().cpu())
    dim = int(model.config.embed_dim)
    return [str(k) for k in images["key"]], (torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32))


class ITMReranker:
    """ITM re-ranking hook: ``scorer(query_rows (b,), candidates (b, k)) -> (b, k)`` raw ITM "match" logits of
    (query caption, candidate gallery view) pairs; -inf for empty slots (-1).

    The gallery views' image tokens are computed once (stored in float16 on the CPU; ``n × (1 + N) × width``
    values) and the query captions' text states per call.
    """

    def __init__(self, bundle: ModelBundle, query_texts: Sequence[str], gallery: pd.DataFrame,
                 config: EmbedConfig | None = None, gallery_texts: Sequence[str] | None = None) -> None:
        self.bundle = bundle
        self.config = config or EmbedConfig()
        self.query_texts = [str(t) for t in query_texts]
        store = bundle.store(self.config.cache_images)
        model = bundle.model.eval()
        tokens = []
        with torch.no_grad():
            for _, pv in _view_batches(gallery, bundle, self.config, gallery_texts, store, "ITM gallery tokens"):
                with autocast(bundle.device, self.config.bf16):
                    tokens.append(model.get_image_embeds(pv)[0].to(torch.float16).cpu())
        self.gallery_tokens = torch.cat(tokens) if tokens else torch.zeros(0)

    def __call__(self, query_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return itm_scores(self.bundle, self.query_texts, query_rows, candidates,
                          lambda rows: self.gallery_tokens[torch.as_tensor(rows)], self.config)


@torch.no_grad()
def itm_scores(bundle: ModelBundle, query_texts: Sequence[str], query_rows: np.ndarray, candidates: np.ndarray,
               tokens_of: Callable[[np.ndarray], torch.Tensor], config: EmbedConfig) -> np.ndarray:
    """Raw ITM "match" logits ``(b, k)`` of (query caption, candidate gallery view) pairs; -inf for empty slots (-1).
    ``tokens_of(gallery rows)`` gives those rows' image tokens (held in memory by :class:`ITMReranker`, read from an
    on-disk memmap by :class:`capret_utils.evaluation.features.TokenITMReranker`).

    Queries go in blocks of about ``config.batch_size`` pairs (at least one query, i.e. its ``k`` pairs); each
    query's caption is tokenized and text-encoded once per block and shared by its ``k`` candidates (the text
    encoder does not see the image), so only the fusion layers run per pair."""
    query_rows = np.asarray(query_rows, dtype=np.int64)
    candidates = np.asarray(candidates, dtype=np.int64)
    b, k = candidates.shape
    scores = np.full((b, k), -np.inf, dtype=np.float32)
    model, device = bundle.model.eval(), bundle.device
    for sl in _batches(b, max(1, config.batch_size // max(k, 1))):
        block = candidates[sl]
        local, slot = np.nonzero(block >= 0)
        if not len(local):
            continue
        enc = bundle.tokenizer([query_texts[r] for r in query_rows[sl]])
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        image_embeds = tokens_of(block[local, slot]).to(device)
        pick = torch.as_tensor(local, device=device)
        with autocast(device, config.bf16):
            text_embeds = model.get_text_embeds(ids, mask)
            fused = model.get_fusion_embeds(text_embeds[pick], mask[pick], image_embeds.to(text_embeds.dtype))
            scores[sl][local, slot] = model.itm_logits(fused)[:, 1].float().cpu().numpy()
    return scores


# ------------------------------------------------------------------------------------------ caching on disk


def _paths(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"embedding name must be a plain file stem, got {name!r}")
    folder = Path(folder)
    return folder / f"{name}.npy", folder / f"{name}.keys.json"


def save_embeddings(folder: str | os.PathLike, name: str, keys: Sequence[str], array: np.ndarray) -> Path:
    """Write ``<folder>/<name>.npy`` (float32) and ``<name>.keys.json`` atomically (keys last)."""
    if len(keys) != len(array):
        raise ValueError(f"{len(keys)} keys for {len(array)} embedding rows")
    npy, keyfile = _paths(folder, name)
    npy.parent.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_name(f".{npy.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, np.asarray(array, dtype=np.float32))
    os.replace(tmp, npy)
    tmp = keyfile.with_name(f".{keyfile.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(list(map(str, keys))))
    os.replace(tmp, keyfile)
    return npy


def load_embeddings(folder: str | os.PathLike, name: str) -> tuple[list[str], np.ndarray]:
    """Read what :func:`save_embeddings` wrote; a missing or inconsistent pair raises naming the file."""
    npy, keyfile = _paths(folder, name)
    if not npy.is_file() or not keyfile.is_file():
        raise FileNotFoundError(f"embeddings {npy} / {keyfile} not found")
    keys = json.loads(keyfile.read_text())
    array = np.load(npy)
    if array.ndim != 2 or len(keys) != len(array):
        raise ValueError(f"{npy}: {array.shape} rows do not match the {len(keys)} keys in {keyfile}")
    return keys, array


def cached_embeddings(folder: str | os.PathLike, name: str, keys: Sequence[str],
                      compute: Callable[[], tuple[list[str], np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """Load ``name`` from ``folder`` when it holds exactly ``keys`` (same order), else compute and save it."""
    try:
        got_keys, array = load_embeddings(folder, name)
        if list(got_keys) == list(map(str, keys)):
            return got_keys, array
    except (FileNotFoundError, ValueError):
        pass
    got_keys, array = compute()
    save_embeddings(folder, name, got_keys, array)
    return got_keys, array
