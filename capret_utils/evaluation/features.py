"""Embed once per view: every variant of notebook 04 reuses one decode pass per (model, view, split side).

:func:`view_features` decodes an items table's views once (through the shared loader) and keeps

* the pooled retrieval feature (L2-normalised ``vision_proj`` of image token 0), ``(n, E)`` float32 in RAM and on
  disk (``<folder>/<name>.feat.npy`` + ``.keys.json``);
* optionally the image tokens ``(n, 1 + N, D)`` float16 in an on-disk ``.npy`` memmap (``<name>.tokens.npy``),
  written batch by batch and read back in chunks: what cross-attention fusion and ITM re-ranking need, in host
  memory that does not grow with the gallery (about 33 GB on disk for X2-VLM-base at 384 px over the 37 k-item
  validation gallery, a few MB on the demo).

From those, without decoding again: image-only embeddings, late fusion (:func:`late_fusion`: image feature + alpha x
text feature, renormalised: what ``embed_items(fusion="late")`` computes), cross fusion (:func:`cross_fusion`) and
ITM re-ranking (:class:`TokenITMReranker`). A second run with the same folder finds the files and decodes nothing
(:data:`DECODE_PASSES` counts the passes of this process, for tests and benchmarks).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from capret_utils.common import atomic_path
from capret_utils.evaluation import embed

DECODE_PASSES: list[str] = []
"""Names of the view passes this process decoded (appended by :func:`view_features` on a cache miss)."""


@dataclass
class ViewFeatures:
    """One view of an items table: keys, pooled features and (optionally) the token memmap."""

    keys: list[str]
    feats: np.ndarray  # (n, E) float32, L2-normalised
    tokens: np.ndarray | None = None  # (n, 1 + N, D) float16 memmap (read-only) or None

    def __len__(self) -> int:
        return len(self.keys)


def _files(folder: Path, name: str) -> tuple[Path, Path, Path]:
    return folder / f"{name}.feat.npy", folder / f"{name}.keys.json", folder / f"{name}.tokens.npy"


def _load(folder: Path, name: str, keys: Sequence[str], tokens: bool) -> ViewFeatures | None:
    feat_path, keys_path, tok_path = _files(folder, name)
    if not (feat_path.is_file() and keys_path.is_file()) or (tokens and not tok_path.is_file()):
        return None
    if json.loads(keys_path.read_text()) != list(keys):
        return None
    feats = np.load(feat_path)
    tok = np.load(tok_path, mmap_mode="r") if tok_path.is_file() else None
    if tok is not None and tok.shape[0] != len(keys):
        return None
    return ViewFeatures(list(keys), feats, tok)


@torch.no_grad()
def view_features(items: pd.DataFrame, bundle: embed.ModelBundle, config: embed.EmbedConfig, folder: str | os.PathLike,
                  name: str, tokens: bool = False, store: Any = None) -> ViewFeatures:
    """The features of ``items``' views (``config.view``: ``"crop"`` with the table's boxes, or ``"image"``), from
    ``folder`` when present for the same keys, else from one decode pass (saved there). ``tokens`` also keeps the
    image tokens in an on-disk memmap."""
    folder = Path(folder)
    keys = [str(k) for k in items["key"]]
    hit = _load(folder, name, keys, tokens)
    if hit is not None:
        return hit
    folder.mkdir(parents=True, exist_ok=True)
    feat_path, keys_path, tok_path = _files(folder, name)
    store = store if store is not None else bundle.store(config.cache_images)
    model = bundle.model.eval()
    view = "image" if config.view == "image" else "crop"
    context = embed._context(bundle, config)
    feats = np.zeros((len(keys), int(model.config.embed_dim)), np.float32)
    memmap, tmp_tok = None, None
    for sl, pv in embed._loader_batches(items, bundle, config, store, view, context, None, f"embed {name}",
                                        embed.tta_contexts(bundle, config)):
        with embed.autocast(bundle.device, config.bf16):
            image_embeds, image_feat = embed.image_features(model, pv)
        feats[sl] = F.normalize(image_feat.float(), dim=-1).cpu().numpy()
        if tokens:
            if memmap is None:
                tmp_tok = tok_path.with_name(f".{tok_path.name}.tmp-{os.getpid()}")
                memmap = np.lib.format.open_memmap(tmp_tok, mode="w+", dtype=np.float16,
                                                   shape=(len(keys), *image_embeds.shape[1:]))
            memmap[sl] = image_embeds.to(torch.float16).cpu().numpy()
    DECODE_PASSES.append(name)
    if memmap is not None:
        memmap.flush()
        del memmap
        os.replace(tmp_tok, tok_path)
    with atomic_path(feat_path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, feats)
    with atomic_path(keys_path) as tmp:
        tmp.write_text(json.dumps(keys))
    tok = np.load(tok_path, mmap_mode="r") if tokens and len(keys) else None
    return ViewFeatures(keys, feats, tok)


def text_features(texts: Sequence[str], bundle: embed.ModelBundle, config: embed.EmbedConfig) -> np.ndarray:
    """L2-normalised text ITC features of ``texts`` (float32)."""
    return embed.embed_texts([str(t) for t in texts], bundle, config)


def late_fusion(image_feats: np.ndarray, text_feats: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """``normalize(image feature + alpha x text feature)`` per row: ``embed_items(fusion="late")`` from cached
    features."""
    fused = torch.from_numpy(np.asarray(image_feats, np.float32)) + alpha * torch.from_numpy(
        np.asarray(text_feats, np.float32))
    return F.normalize(fused, dim=-1).numpy()


@torch.no_grad()
def cross_fusion(features: ViewFeatures, texts: Sequence[str], bundle: embed.ModelBundle,
                 config: embed.EmbedConfig) -> np.ndarray:
    """``normalize(text_proj(fusion [CLS]))`` of (text i, view i) from the token memmap, chunk by chunk:
    ``embed_items(fusion="cross")`` without decoding."""
    if features.tokens is None:
        raise ValueError("cross fusion needs the image tokens: view_features(..., tokens=True)")
    if len(texts) != len(features):
        raise ValueError(f"cross fusion: {len(texts)} texts for {len(features)} views")
    model, device, out = bundle.model.eval(), bundle.device, []
    for start in range(0, len(features), config.batch_size):
        stop = min(start + config.batch_size, len(features))
        enc = bundle.tokenizer([str(t) for t in texts[start:stop]])
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        image_embeds = torch.from_numpy(np.array(features.tokens[start:stop])).to(device)  # a copy: memmap is read-only
        with embed.autocast(device, config.bf16):
            text_embeds = model.get_text_embeds(ids, mask)
            fused = model.get_fusion_embeds(text_embeds, mask, image_embeds.to(text_embeds.dtype))
            out.append(F.normalize(model.text_proj(fused[:, 0, :]).float(), dim=-1).cpu())
    dim = int(model.config.embed_dim)
    return torch.cat(out).numpy() if out else np.zeros((0, dim), np.float32)


class TokenITMReranker:
    """ITM re-ranking from the gallery's token memmap: ``scorer(query_rows (b,), candidates (b, k)) -> (b, k)`` raw
    ITM "match" logits of (query caption, candidate view); -inf for empty slots (-1). Only the candidates of the
    current chunk are read into memory (``config.batch_size`` pairs at a time), so host memory does not depend on
    the gallery size."""

    def __init__(self, bundle: embed.ModelBundle, query_texts: Sequence[str], gallery: ViewFeatures,
                 config: embed.EmbedConfig | None = None) -> None:
        if gallery.tokens is None:
            raise ValueError("ITM re-ranking needs the gallery's image tokens: view_features(..., tokens=True)")
        self.bundle, self.gallery = bundle, gallery
        self.config = config or embed.EmbedConfig()
        self.query_texts = [str(t) for t in query_texts]

    def _tokens(self, rows: np.ndarray) -> torch.Tensor:
        order = np.argsort(rows)  # memmap reads in file order
        block = np.empty((len(rows), *self.gallery.tokens.shape[1:]), np.float16)
        block[order] = self.gallery.tokens[rows[order]]
        return torch.from_numpy(block)

    def __call__(self, query_rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return embed.itm_scores(self.bundle, self.query_texts, query_rows, candidates, self._tokens, self.config)


def fused(features: ViewFeatures, texts: Sequence[str] | None, fusion: str, bundle: embed.ModelBundle,
          config: embed.EmbedConfig) -> np.ndarray:
    """One side's embedding for a variant: the image features (``fusion="none"`` or no texts), late fusion with
    the texts' features, or cross fusion over the token memmap."""
    if fusion == "none" or texts is None:
        return features.feats
    if fusion == "late":
        return late_fusion(features.feats, text_features(texts, bundle, config), config.alpha)
    if fusion == "cross":
        return cross_fusion(features, texts, bundle, config)
    raise ValueError(f"fusion must be none | late | cross, got {fusion!r}")
