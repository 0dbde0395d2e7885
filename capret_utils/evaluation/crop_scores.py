"""Crop-level scores of detection candidates: each photo decoded once, its candidate crops cut from that decode and
encoded in batched vision passes, then classified over the 13 garment categories.

:mod:`capret_utils.evaluation.detect` gets up to K candidate boxes per photo from the box head; this module turns
them into scores without touching any ground-truth field:

* :class:`CandidateCrops` — a dataset with one item per **photo**: the crops of its candidate boxes (grown by the
  crop ``context``) cut from one decode (:meth:`capret_utils.data.decode.ImageStore.crops`, JPEG draft decoding
  at the size the smallest region needs), each processed as the evaluation ``crop`` view. The naive path (one
  decode per crop through ``ImageStore.crop``) gives the same pixels when the draft scales agree
  (``tests/test_detect.py`` compares both).
* :func:`crop_scores` — one vision pass per crop (batches of photos' crops): ``feat`` (P, K, embed_dim), the
  crop's retrieval embedding (the ``crop`` variant's view of that box), and from it:

  - ``itc``: softmax over the 13 category names of the crop's ITC similarity (X2-VLM's own zero-shot classifier);
  - ``head``: softmax of the fine-tuned **category head** (the category ArcFace of ``w_category``, its class
    weights ``category_W`` saved in the checkpoint's ``arcface.safetensors``: :func:`load_category_head`), cosine
    logits times the ArcFace scale;
  - ``itm`` (only when asked): ITM match probability of (asked category name, crop), one fusion pass per crop.

Each is (P, K, 13) (``itm``: (P, K)), NaN where a photo has fewer candidates or its file was skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from capret_utils.data.decode import ImageStore
from capret_utils.data.loader import build_loader
from capret_utils.evaluation import embed

CATEGORY_HEAD_FILE = "arcface.safetensors"  # train.checkpoint.ARCFACE_FILE (not imported: evaluation -> train cycle)


def load_category_head(checkpoint: str | Path) -> torch.Tensor | None:
    """The fine-tuned category head of a checkpoint folder (notebook 03's ``<run>/checkpoint``): ``category_W``
    (embed_dim × 13, column j = category_id j + 1) from ``arcface.safetensors``; None when the folder has no such
    file or the run trained no category term (``w_category`` = 0)."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / CATEGORY_HEAD_FILE
    if not path.is_file():
        return None
    weights = load_file(str(path))
    head = weights.get("category_W")
    if head is not None and (head.ndim != 2 or head.shape[1] != 13):
        raise ValueError(f"{path}: category_W has shape {tuple(head.shape)}, expected (embed_dim, 13)")
    return head


class CandidateCrops(torch.utils.data.Dataset):
    """Item i = photo i: ``pixel_values`` (n_i, 3, res, res) of its valid candidate boxes ``boxes[i][valid[i]]``
    (pixel corners, grown by ``context``), cut from one decode; ``slots`` = their candidate indices. An unreadable
    photo (store ``on_error="skip"``) gives no crops and is listed in ``skipped``: its candidates stay NaN."""

    def __init__(self, photos: pd.DataFrame, boxes: np.ndarray, valid: np.ndarray, store: ImageStore,
                 processor: Any, context: float) -> None:
        self.rows = photos[["key", "path", "width", "height"]].to_dict("records")
        self.boxes, self.valid = np.asarray(boxes, np.float64), np.asarray(valid, bool)
        if self.boxes.shape[:2] != self.valid.shape or len(self.rows) != len(self.valid):
            raise ValueError(f"CandidateCrops: {len(self.rows)} photos, boxes {self.boxes.shape}, valid "
                             f"{self.valid.shape}")
        self.store, self.processor, self.context = store, processor, float(context)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row, slots = self.rows[i], np.flatnonzero(self.valid[i])
        out: dict[str, Any] = {"row": int(i), "slots": slots}
        crops: list[Image.Image] | None = self.store.crops(row, self.boxes[i, slots], self.context) if len(slots) else []
        if crops is None:
            out["skipped"] = {"key": row["key"], "path": row["path"]}
            crops, out["slots"] = [], slots[:0]
        pv = [torch.from_numpy(self.processor.process_one(c, train=False)[0]) for c in crops]
        out["pixel_values"] = torch.stack(pv) if pv else None
        return out


def collate_crops(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Concatenate :class:`CandidateCrops` items: ``pixel_values`` (sum n_i, ...), ``photo`` and ``slot`` per crop."""
    pv = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    return {"pixel_values": torch.cat(pv) if pv else None,
            "photo": np.concatenate([np.full(len(s["slots"]), s["row"]) for s in samples]).astype(np.int64),
            "slot": np.concatenate([s["slots"] for s in samples]).astype(np.int64),
            "skipped": [s["skipped"] for s in samples if "skipped" in s]}


@torch.no_grad()
def crop_scores(photos: pd.DataFrame, boxes: np.ndarray, valid: np.ndarray, bundle: embed.ModelBundle,
                text_feat: torch.Tensor, head: torch.Tensor | None = None, itm_texts: tuple | None = None,
                context: float | None = None, batch_size: int = 64, num_workers: int = -1, bf16: bool = True,
                store: ImageStore | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Scores of the valid candidates ``boxes[valid]`` ((P, K, 4) pixel corners, ``valid`` (P, K)): ``itc``
    (P, K, 13) from ``text_feat`` (13 category-name ITC features), ``head`` (P, K, 13) when a category ``head``
    is given, ``itm`` (P, K) when ``itm_texts`` = (text states (13, L, D), mask (13, L), category index (P, K))
    asks for the ITM probability of each crop with its own category name. ``batch_size`` counts photos per pass."""
    import warnings

    P, K = np.asarray(valid).shape
    model = bundle.model.eval()
    context = float(context if context is not None else bundle.info.get("context", 0.05))
    store = store if store is not None else bundle.store()
    dataset = CandidateCrops(photos, boxes, valid, store, bundle.processor, context)
    workers = 0 if P <= batch_size else num_workers
    loader = build_loader(dataset, collate_crops, workers, batch_size=batch_size,
                          pin_memory=bundle.device.type == "cuda", persistent=False)
    dim = int(model.config.embed_dim)
    out = {"itc": np.full((P, K, 13), np.nan, np.float32), "feat": np.full((P, K, dim), np.nan, np.float32)}
    if head is not None:
        out["head"] = np.full((P, K, 13), np.nan, np.float32)
        w = F.normalize(head.to(bundle.device).float(), dim=0)
        scale = float((bundle.info.get("config") or {}).get("arcface_scale", 30.0))
    if itm_texts is not None:
        out["itm"] = np.full((P, K), np.nan, np.float32)
    skipped: list[dict] = []
    bar = embed._bar(P, "detect: crops", progress)
    for batch in loader:
        skipped.extend(batch["skipped"])
        bar.update(int(len(np.unique(batch["photo"]))) if len(batch["photo"]) else 0)
        if batch["pixel_values"] is None:
            continue
        p, s = batch["photo"], batch["slot"]
        pv = batch["pixel_values"].to(bundle.device)
        with embed.autocast(bundle.device, bf16):
            image_embeds, image_feat = model.get_image_embeds(pv)
            feat = image_feat.float()
            out["feat"][p, s] = feat.cpu().numpy()
            out["itc"][p, s] = model.itc_logits(feat, text_feat.float()).softmax(-1).cpu().numpy()
            if head is not None:
                out["head"][p, s] = (scale * F.normalize(feat, dim=-1) @ w).softmax(-1).cpu().numpy()
            if itm_texts is not None:
                states, mask, cat = itm_texts
                c = torch.as_tensor(np.asarray(cat)[p, s], device=bundle.device)
                fused = model.get_fusion_embeds(states[c], mask[c], image_embeds)
                out["itm"][p, s] = model.itm_logits(fused).float().softmax(-1)[:, 1].cpu().numpy()
    bar.close()
    if skipped:
        warnings.warn(f"detect: {len(skipped)} unreadable photo(s) got no crop scores (bad_images='skip'; their "
                      f"queries count as misses): first {skipped[0]['path']}", stacklevel=2)
    return out
