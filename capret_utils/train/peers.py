"""LoRA fine-tuning of any peer encoder (:class:`capret_utils.encoders.Encoder`) with the identity ArcFace, plus
ITC where the encoder has a text tower — the losses of :mod:`capret_utils.train.losses`, so a GPU user can compare
X2-VLM with FashionCLIP / SigLIP / SigLIP 2 / DINOv2 at an equal budget.

One step: a seeded batch of item crops with an identity (``style > 0``; crops by
:func:`capret_utils.data.boxes.crop_box` through :class:`~capret_utils.data.loader.ImageStore`, no augmentation),
the encoder's own preprocessing, ``image_features`` through the LoRA-wrapped model, ArcFace over the training
identities on the L2-normalised features (margin in radians, :class:`~capret_utils.train.losses.ArcFace`) and, with
``w_itc > 0`` and a text tower, :func:`~capret_utils.train.losses.itc_loss` against the items' texts (template
captions or category names; identical texts and same identities are positives) at the temperature
``1 / logit_scale`` of the model (clamped to X2-VLM's [0.001, 0.5]); AdamW on the LoRA weights (``lr``) and the
ArcFace class weights (``lr_arcface``). The base weights stay frozen. :func:`save_encoder` merges the adapters
and writes a folder :func:`capret_utils.encoders.load_encoder` reads back (``weights: fine-tuned``), which
notebook 04 evaluates with ``-p encoders <folder>``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from capret_utils.data.boxes import CROP_CONTEXT
from capret_utils.data.loader import ImageStore, identity_classes, identity_labels
from capret_utils.encoders import Encoder
from capret_utils.encoders.hf import MARKER
from capret_utils.train.losses import ArcFace, LossWeights, itc_loss, positive_mask, total_loss
from capret_utils.x2vlm.lora import LORA_TARGETS
from capret_utils.x2vlm.modeling import TEMP_MAX, TEMP_MIN

LORA_TARGETS_BY_FAMILY: dict[str, str] = {
    "clip": r".*\.(q_proj|v_proj)",
    "siglip": r".*\.(q_proj|v_proj)",
    "siglip2": r".*\.(q_proj|v_proj)",
    "dinov2": r".*\.(q_proj|v_proj)",
    "open_clip": r".*\.(c_fc|c_proj|qkv)",
    "x2vlm": f"(?:{LORA_TARGETS['vision']})|(?:{LORA_TARGETS['text']})",
}
"""Module-name regex (full match) LoRA wraps per encoder family: query and value projections of every attention
layer (transformers 5 names them ``q_proj`` / ``v_proj`` in CLIP, SigLIP and DINOv2); open_clip's MLP and fused
``qkv`` linears (its ``nn.MultiheadAttention`` has no separate linears); X2-VLM's vision and text groups of
:data:`capret_utils.x2vlm.lora.LORA_TARGETS`."""


@dataclass
class PeerTrainConfig:
    """One or a few LoRA steps on a peer encoder."""

    steps: int = 1  # optimiser steps
    batch_size: int = 8  # item crops per step (items with an identity, drawn without replacement per step)
    lr: float = 1e-3  # AdamW learning rate of the LoRA weights
    lr_arcface: float = 1e-2  # learning rate of the ArcFace class weights
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA branch input
    target_regex: str = ""  # module-name regex for LoRA; "" = LORA_TARGETS_BY_FAMILY[encoder.family]
    margin: float = 0.15  # ArcFace additive angular margin, radians
    scale: float = 30.0  # ArcFace logit scale
    w_arcface: float = 1.0  # ArcFace weight (> 0)
    w_itc: float = 1.0  # ITC weight; 0 = off; ignored for encoders without a text tower
    text: str = "template"  # ITC text per item: "template" (template caption) | "category" (category name)
    context: float = CROP_CONTEXT  # crop margin per side, fraction of box w/h
    seed: int = 0  # batch draws, LoRA and ArcFace initialisation

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"PeerTrainConfig: steps >= 1 and batch_size >= 2 needed, got {self.steps}, "
                             f"{self.batch_size}")
        if self.text not in ("template", "category"):
            raise ValueError(f"PeerTrainConfig.text must be 'template' or 'category', got {self.text!r}")
        if not self.w_arcface > 0:
            raise ValueError(f"PeerTrainConfig.w_arcface must be > 0, got {self.w_arcface}")
        if self.lr <= 0 or self.lr_arcface <= 0 or self.lora_r < 1:
            raise ValueError("PeerTrainConfig: lr, lr_arcface and lora_r must be positive")


def apply_lora(encoder: Encoder, cfg: PeerTrainConfig) -> dict[str, int]:
    """Wrap ``encoder.module`` with peft LoRA in place (base weights frozen); returns trainable / total counts."""
    import re

    from peft import LoraConfig, get_peft_model

    regex = cfg.target_regex or LORA_TARGETS_BY_FAMILY.get(encoder.family, r".*\.(q_proj|v_proj)")
    names = [n for n, _ in encoder.module.named_modules() if re.fullmatch(regex, n)]
    if not names:
        raise ValueError(f"{encoder.name}: no module matches the LoRA target regex {regex!r}")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=regex, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder.module = get_peft_model(encoder.module, config)
    for name, param in encoder.module.named_parameters():
        param.requires_grad_("lora_" in name)
    total = sum(p.numel() for p in encoder.module.parameters())
    trainable = sum(p.numel() for p in encoder.module.parameters() if p.requires_grad)
    return {"trainable": int(trainable), "total": int(total), "lora_modules": len(names)}


def _texts(batch: pd.DataFrame, kind: str) -> list[str]:
    if kind == "category":
        return [str(c) for c in batch["category_name"]]
    from capret_utils.captions import template_captions

    table = template_captions(batch)
    return [table[k] for k in batch["key"]]


def finetune_encoder(encoder: Encoder, items: pd.DataFrame, cfg: PeerTrainConfig | None = None,
                     store: ImageStore | None = None) -> dict[str, Any]:
    """Apply LoRA to ``encoder`` and run ``cfg.steps`` ArcFace (+ ITC) steps on the items with an identity.

    Returns ``{"history": [{step, loss, arcface, itc?, seconds}], "lora": counts, "classes": n identities,
    "itc": bool}``; the encoder keeps its (unmerged) adapters — :func:`save_encoder` merges and writes them.
    """
    cfg = cfg or PeerTrainConfig()
    cfg.validate()
    labelled = items[items["style"] > 0].reset_index(drop=True)
    classes = identity_classes(labelled)
    if len(labelled) < cfg.batch_size or len(classes) < 2:
        raise ValueError(f"finetune_encoder needs >= {cfg.batch_size} items with an identity (style > 0) and >= 2 "
                         f"identities; got {len(labelled)} items, {len(classes)} identities")
    labels = identity_labels(labelled, classes)
    lora = apply_lora(encoder, cfg)
    device = encoder.device
    use_itc = bool(cfg.w_itc) and encoder.has_text
    weights = LossWeights(itc=cfg.w_itc if use_itc else 0.0, itm=0.0, box=0.0, arcface=cfg.w_arcface)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        arcface = ArcFace(len(classes), encoder.embed_dim, margin=cfg.margin, scale=cfg.scale).to(device)
    lora_params = [p for p in encoder.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr},
                                   {"params": list(arcface.parameters()), "lr": cfg.lr_arcface}], weight_decay=0.0)
    store = store or ImageStore(max(2 * encoder.image_size, 64))
    rng = np.random.default_rng(cfg.seed)
    history = []
    for step in range(1, cfg.steps + 1):
        started = time.time()
        rows = np.sort(rng.choice(len(labelled), size=cfg.batch_size, replace=False))
        batch = labelled.iloc[rows]
        ids = torch.as_tensor(labels[rows], device=device)
        encoder.module.train()
        with encoder.autocast():
            image = encoder.image_features(encoder.preprocess([store.crop(r, cfg.context)
                                                              for r in batch.to_dict("records")]))
            terms = {"arcface": arcface(F.normalize(image.float(), dim=-1), ids)}
            if use_itc:
                texts = _texts(batch, cfg.text)
                text = encoder.text_features(encoder.tokenize(texts))
                text_ids = torch.as_tensor(pd.factorize(pd.Series(texts))[0], device=device)
                scale = encoder.logit_scale()
                temp = (1.0 / scale.detach().float().reshape(-1)[0]).clamp(TEMP_MIN, TEMP_MAX) if scale is not None \
                    else 0.07
                terms["itc"] = itc_loss(F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1), temp,
                                        positive_mask(ids, text_ids))
        loss = total_loss(terms, weights, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": float(loss.detach()),
                        **{k: float(v.detach()) for k, v in terms.items()}, "seconds": time.time() - started})
    encoder.module.eval()
    encoder.weights = "fine-tuned"
    return {"history": history, "lora": lora, "classes": len(classes), "itc": use_itc, "config": asdict(cfg)}


def save_encoder(encoder: Encoder, folder: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Merge the LoRA adapters and write a transformers encoder (model, image processor, tokenizer) to ``folder``
    with a ``capret_encoder.json`` note (``weights: fine-tuned``, ``base``, ``info``); load it back with
    :func:`capret_utils.encoders.load_encoder`. Only transformers encoders (:class:`~capret_utils.encoders.HFEncoder`)."""
    from capret_utils.encoders import HFEncoder

    if not isinstance(encoder, HFEncoder):
        raise TypeError(f"save_encoder writes transformers encoders; {encoder.name} is a {type(encoder).__name__}")
    folder = Path(folder)
    module = encoder.module
    merged = module.merge_and_unload() if hasattr(module, "merge_and_unload") else module
    encoder.module = merged
    merged.save_pretrained(folder)
    encoder.processor.save_pretrained(folder)
    if encoder.tokenizer is not None:
        encoder.tokenizer.save_pretrained(folder)
    note = {"family": encoder.family, "weights": "fine-tuned", "base": encoder.name, "info": dict(info or {})}
    (folder / MARKER).write_text(json.dumps(note, default=str) + "\n")
    return folder


def trainable_names(module: torch.nn.Module) -> Sequence[str]:
    """Names of the parameters that receive gradients (tests, reports)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]
