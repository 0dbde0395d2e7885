"""One training step's loss terms: :func:`compute_losses` and the :class:`Criterion` module built once from the config."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from capret_utils.data import loader as D
from capret_utils.train import losses as L
from capret_utils.train import precision as P
from capret_utils.train.config import TrainConfig, leading_rows
from capret_utils.x2vlm import (
    X2VLMModel,
)

# ------------------------------------------------------------------------------------------ one step


def compute_losses(net: X2VLMModel, arcface: L.ArcFace, batch: Mapping[str, Any], weights: L.LossWeights,
                   generator: torch.Generator, box_fraction: float = 0.25, device: torch.device | None = None,
                   bf16: bool = True, itm_fraction: float = 1.0, category: L.ArcFace | None = None,
                   category_recolour: int = 0, category_views: str = "recoloured", precision: str | None = None,
                   ) -> dict[str, torch.Tensor]:
    """Every active loss term of one batch (unweighted). ``net`` is the plain X2-VLM (LoRA layers, if any,
    are injected in its modules). The box loss uses the first ``leading_rows(B, box_fraction)`` samples; ITM
    fuses the pairs of the first ``leading_rows(B, itm_fraction)`` texts and images (negatives drawn from all B).
    The category term (``weights.category``) needs ``category``, the category ArcFace, and ``batch["categories"]``;
    with ``category_recolour`` > 0 it is the term on :func:`data.recolour` copies of the first ``category_recolour``
    views (a second vision pass, drawn from ``generator`` after the ITM negatives), or with ``category_views="both"``
    the mean of that and the term on the views. ``precision`` (``"bf16"`` | ``"fp16"`` | ``"fp32"``) sets the
    autocast of every pass; None = :func:`~capret_utils.train.precision.resolve_precision` of ``device`` and
    ``bf16`` (float32 on CPU)."""
    device = device or next(net.parameters()).device
    precision = precision or P.resolve_precision(device, bf16)
    pv = batch["pixel_values"].to(device)
    labels = batch["labels"].to(device)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    terms: dict[str, torch.Tensor] = {}
    with P.autocast(device, precision):
        image_embeds, image_feat = net.get_image_embeds(pv)
        need_text = weights.itc or weights.itm or weights.box
        text_embeds = net.get_text_embeds(ids, mask) if need_text else None
        text_feat = net.get_text_feat(text_embeds) if (weights.itc or weights.itm) else None
    if weights.arcface:
        terms["arcface"] = arcface(image_feat, labels)
    if weights.category:
        if category is None or "categories" not in batch:
            raise ValueError("the category loss is on but no category ArcFace or batch['categories'] was given")
        categories = batch["categories"].to(device)
        terms["category"] = category(image_feat, categories)
    pos = L.positive_mask(batch["itc_ids"].to(device), batch["text_ids"].to(device))
    if weights.itc:
        terms["itc"] = L.itc_loss(image_feat.float(), text_feat.float(), net.temp, pos)
    if weights.itm:
        with torch.no_grad():
            sim = image_feat.float() @ text_feat.float().t() / net.temp
        negs = L.sample_hard_negatives(sim, pos, generator)
        n_itm = leading_rows(pv.shape[0], itm_fraction)
        images, texts, masks, itm_labels = L.itm_pairs(image_embeds, text_embeds, mask, *negs, rows=n_itm)
        with P.autocast(device, precision):
            fused = net.get_fusion_embeds(texts, masks, images)
            logits = net.itm_logits(fused)
        terms["itm"] = L.itm_loss(logits, itm_labels)
        if weights.arcface_fused:
            with P.autocast(device, precision):
                fused_emb = net.text_proj(fused[:n_itm, 0, :])
            terms["arcface_fused"] = arcface(F.normalize(fused_emb.float(), dim=-1), labels[:n_itm])
    if weights.box:
        if "box_pixel_values" not in batch:
            raise ValueError("the box loss is on but the batch has no box targets (DataConfig.box_task)")
        nb = leading_rows(pv.shape[0], box_fraction)
        if batch["box_pixel_values"].shape[0] < nb:
            raise ValueError(f"the batch holds {batch['box_pixel_values'].shape[0]} box samples, the box loss needs "
                             f"{nb} (box_fraction {box_fraction} of {pv.shape[0]})")
        with P.autocast(device, precision):
            box_embeds, _ = net.get_image_embeds(batch["box_pixel_values"][:nb].to(device))
            fused_box = net.get_fusion_embeds(text_embeds[:nb], mask[:nb], box_embeds)
            pred = net.predict_bbox(fused_box)
        l1, giou = L.box_loss(pred, batch["box_targets"][:nb].to(device))
        terms["box_l1"], terms["box_giou"] = l1, giou
    if weights.category and category_recolour > 0:
        n = min(category_recolour, pv.shape[0])
        with P.autocast(device, precision):
            _, recoloured_feat = net.get_image_embeds(D.recolour(pv[:n], generator))
        recoloured = category(recoloured_feat, categories[:n])
        terms["category"] = 0.5 * (terms["category"] + recoloured) if category_views == "both" else recoloured
    return terms




class Criterion(torch.nn.Module):
    """The training loss, built once from the config: ``terms = criterion(net, batch)`` returns every active term
    (unweighted, as :func:`compute_losses`), ``criterion.total(terms, step)`` their weighted sum.

    It owns the identity ArcFace (``arcface``), the category ArcFace (``category``, None when ``w_category`` is 0)
    and the generator that draws ITM hard negatives and the colour-scrambled views (saved with the train state).
    """

    def __init__(self, config: TrainConfig, arcface: L.ArcFace, category: L.ArcFace | None,
                 generator: torch.Generator, device: torch.device | None = None) -> None:
        super().__init__()
        self.arcface, self.category = arcface, category
        self.weights = config.weights()
        self.generator = generator
        self.device = device
        self.box_fraction, self.bf16, self.itm_fraction = config.box_fraction, config.bf16, config.itm_share
        self.category_recolour, self.category_views = config.category_recolour, config.category_views
        self.precision = P.resolve_precision(device, config.bf16) if device is not None else None

    def forward(self, net: X2VLMModel, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return compute_losses(net, self.arcface, batch, self.weights, self.generator, self.box_fraction,
                              self.device, self.bf16, self.itm_fraction, self.category, self.category_recolour,
                              self.category_views, self.precision)

    def total(self, terms: Mapping[str, torch.Tensor], step: int, check: bool = True) -> torch.Tensor:
        """The weighted sum of ``terms`` at optimizer step ``step`` (1-based; the NaN guard names it); ``check``
        = raise on a non-finite term here (a host sync) rather than at the loop's log interval."""
        return L.total_loss(terms, self.weights, step, check)
