"""Fine-tuning losses: ITC, ITM with hard negatives, box L1 + GIoU, and ArcFace (margin given in radians).

Definitions follow the official X2-VLM code (docs/x2vlm.md §2); each function takes tensors and returns a scalar:

* :func:`itc_loss` — symmetric InfoNCE over the batch, logits ``image_feat @ text_feat.T / temp``; with a
  positive mask (several samples of one identity, or identical texts) the targets are soft: each row's positives
  share the probability mass equally (official ``idx`` targets), and the two directions are averaged.
* :func:`sample_hard_negatives` + :func:`itm_pairs` + :func:`itm_loss` — ITM on 3B pairs: the B positives, one
  negative image per text and one negative text per image, each drawn from ``softmax(sim) + 1e-5`` with every
  positive zeroed (official ``get_hard_negatives``), label 1 = match; cross-entropy over the 3B pairs.
* :func:`box_loss` — on (cx, cy, w, h) in [0, 1]: L1 summed over the 4 coordinates and (1 − GIoU), each averaged
  over the boxes; the GIoU term is 0 for a batch holding a degenerate box (official ``get_bbox_loss``).
* :class:`ArcFace` — pytorch-metric-learning's ``ArcFaceLoss`` over identity classes. **Our margin is in
  radians** (the original study's 0.15); PML expects degrees, so it is converted here (0.15 rad = 8.59°; passing
  0.15 straight to PML would mean 0.0026 rad). Rows with label < 0 (items without an identity, DeepFashion2
  ``style == 0``) are left out. A second :class:`ArcFace` over the 13 garment categories (every item, style 0
  included) is the ``category`` term: it makes the retrieval embedding encode the garment type, which colour and
  pattern alone do not tell apart.

:class:`LossWeights` holds one weight per term; :func:`total_loss` combines a dict of terms and reports which term
is not finite.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

ITM_EPS = 1e-5  # added to the softmax weights before zeroing positives (official get_hard_negatives)


@dataclass
class LossWeights:
    """Weight of each loss term; 0 switches a term off (it is then not computed at all)."""

    itc: float = 1.0  # image-text contrastive
    itm: float = 1.0  # image-text matching with hard negatives
    box: float = 1.0  # box head: L1 + (1 - GIoU) on the whole image, text = the item's caption/category
    arcface: float = 1.0  # ArcFace on the retrieval embedding (image_feat) over train identities
    arcface_fused: float = 0.0  # ArcFace on the cross-attention fused embedding (needs itm > 0)
    category: float = 0.0  # ArcFace on the retrieval embedding (image_feat) over the garment categories

    def active(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v}

    def validate(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"LossWeights.{name} must be a finite number >= 0, got {value!r}")
        if not self.active():
            raise ValueError("every loss weight is 0: nothing to train")
        if self.arcface_fused and not self.itm:
            raise ValueError("LossWeights.arcface_fused needs the ITM pass (itm > 0): it reuses its fused pairs")


# --------------------------------------------------------------------------------------------------- ITC


def positive_mask(ids: torch.Tensor, text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, B) bool: ``ids[i] == ids[j]`` (same identity), or identical texts when ``text_ids`` is given.

    Identical texts (e.g. the category name when captions are off) cannot be told apart by the text tower, so
    treating them as negatives would ask for the impossible; they count as positives.
    """
    mask = ids[:, None] == ids[None, :]
    if text_ids is not None:
        mask = mask | (text_ids[:, None] == text_ids[None, :])
    return mask


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float,
             pos: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE; ``pos`` (B, B) bool marks positives (the diagonal must be True), None = diagonal only.

    Image → text: −Σⱼ yᵢⱼ log softmax(sᵢ·)ⱼ with yᵢⱼ = posᵢⱼ / Σₖ posᵢₖ; text → image likewise on sᵀ; the mean
    over rows of each direction, then the average of the two.
    """
    if image_feat.shape != text_feat.shape:
        raise ValueError(f"ITC pairs image i with text i: got {tuple(image_feat.shape)} and {tuple(text_feat.shape)}")
    logits = image_feat @ text_feat.t() / temp
    n = logits.shape[0]
    if pos is None:
        pos = torch.eye(n, dtype=torch.bool, device=logits.device)
    if not bool(pos.diagonal().all()):
        raise ValueError("ITC positive mask must include the diagonal (each image matches its own text)")
    targets = pos.to(logits.dtype)
    i2t = -(F.log_softmax(logits, dim=1) * (targets / targets.sum(1, keepdim=True))).sum(1).mean()
    t_targets = targets.t()
    t2i = -(F.log_softmax(logits.t(), dim=1) * (t_targets / t_targets.sum(1, keepdim=True))).sum(1).mean()
    return (i2t + t2i) / 2


# --------------------------------------------------------------------------------------------------- ITM


def sample_hard_negatives(sim_i2t: torch.Tensor, pos: torch.Tensor, generator: torch.Generator | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One hard negative image per text and one negative text per image.

    ``sim_i2t`` (B, B): image-text logits (rows images); weights ``softmax(sim) + 1e-5`` with positives zeroed,
    one multinomial draw per row (texts: from the columns of ``sim_i2t``). Returns ``(neg_image_for_text,
    text_has_neg, neg_text_for_image, image_has_neg)``: indices (B,) and bool masks; a row whose every candidate
    is a positive (a batch of one identity) has no negative and is flagged False (its index is 0).
    """
    sim = sim_i2t.detach().float()
    w_i2t = F.softmax(sim, dim=1) + ITM_EPS
    w_t2i = F.softmax(sim.t(), dim=1) + ITM_EPS
    w_i2t = w_i2t.masked_fill(pos, 0.0)
    w_t2i = w_t2i.masked_fill(pos.t(), 0.0)

    def draw(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ok = weights.sum(1) > 0
        safe = torch.where(ok[:, None], weights, torch.ones_like(weights))
        idx = torch.multinomial(safe.cpu(), 1, generator=generator).squeeze(1).to(weights.device)
        return torch.where(ok, idx, torch.zeros_like(idx)), ok

    neg_img, txt_ok = draw(w_t2i)  # for each text, an image
    neg_txt, img_ok = draw(w_i2t)  # for each image, a text
    return neg_img, txt_ok, neg_txt, img_ok


def itm_pairs(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor,
              neg_image_for_text: torch.Tensor, text_has_neg: torch.Tensor,
              neg_text_for_image: torch.Tensor, image_has_neg: torch.Tensor, rows: int | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ITM batch: B positives, then (negative image, text) and (image, negative text) for rows that have one.

    ``rows``: only the first ``rows`` texts / images contribute pairs (their negatives still come from the whole
    batch), which cuts the fusion-encoder cost by B / rows. Returns ``(image_embeds, text_embeds, text_mask,
    labels)`` of the stacked pairs; labels 1 = match, 0 = not.
    """
    b = image_embeds.shape[0] if rows is None else min(int(rows), image_embeds.shape[0])
    if b < 1:
        raise ValueError(f"itm_pairs: rows must be >= 1, got {rows}")
    t_rows = torch.nonzero(text_has_neg[:b]).squeeze(1)
    i_rows = torch.nonzero(image_has_neg[:b]).squeeze(1)
    images = torch.cat([image_embeds[:b], image_embeds[neg_image_for_text[t_rows]], image_embeds[i_rows]])
    texts = torch.cat([text_embeds[:b], text_embeds[t_rows], text_embeds[neg_text_for_image[i_rows]]])
    masks = torch.cat([text_mask[:b], text_mask[t_rows], text_mask[neg_text_for_image[i_rows]]])
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(len(t_rows) + len(i_rows), dtype=torch.long)])
    return images, texts, masks, labels.to(image_embeds.device)


def itm_loss(itm_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the ITM logits (N, 2) against match labels (1 = match)."""
    return F.cross_entropy(itm_logits.float(), labels)


# --------------------------------------------------------------------------------------------------- boxes


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of xyxy boxes (N, 4) and (N, 4) -> (N,). Boxes must be non-degenerate."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_a + area_b - inter
    iou = inter / union
    lt_c = torch.minimum(a[:, :2], b[:, :2])
    rb_c = torch.maximum(a[:, 2:], b[:, 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    area_c = wh_c[:, 0] * wh_c[:, 1]
    return iou - (area_c - union) / area_c


def box_loss(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, 1 − GIoU)`` for (cx, cy, w, h) boxes (N, 4) normalised to [0, 1].

    L1 = Σ over boxes of the summed absolute coordinate error / N; GIoU term = Σ (1 − GIoU) / N, or 0 when any
    predicted or target box is degenerate (x2 < x1 or y2 < y1), as in the official code.
    """
    if pred.shape != target.shape or pred.shape[-1] != 4:
        raise ValueError(f"box_loss needs matching (N, 4) boxes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.float(), target.float()
    n = max(pred.shape[0], 1)
    l1 = (pred - target).abs().sum() / n
    p, g = cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target)
    degenerate = bool(((p[:, 2:] < p[:, :2]).any() or (g[:, 2:] < g[:, :2]).any()))
    if degenerate or pred.shape[0] == 0:
        return l1, pred.new_zeros(())
    return l1, (1 - generalized_iou(p, g)).sum() / n


# --------------------------------------------------------------------------------------------------- ArcFace


class ArcFace(nn.Module):
    """ArcFace over classes (identities, or garment categories) via ``pytorch_metric_learning.losses.ArcFaceLoss``.

    ``margin`` is the additive angular margin in **radians** (converted to the degrees PML expects);
    ``scale`` multiplies the logits. The class weights live in ``self.loss.W`` (embedding_size × num_classes) and
    need the optimiser (give them their own learning rate). Labels < 0 are ignored. The loss always runs in
    float32 outside autocast: PML casts ``W`` to the embeddings' dtype in place, which under bf16 autocast would
    silently turn the master weights into bf16.
    """

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.15, scale: float = 30.0) -> None:
        super().__init__()
        from pytorch_metric_learning.losses import ArcFaceLoss

        if num_classes < 1:
            raise ValueError(f"ArcFace needs at least one identity class, got num_classes={num_classes}")
        if not (0 <= margin < math.pi / 2):
            raise ValueError(f"ArcFace margin is in radians and must lie in [0, pi/2), got {margin} "
                             f"(did you pass degrees? 0.15 rad = 8.6 degrees)")
        self.margin_rad = float(margin)
        self.scale = float(scale)
        self.num_classes = int(num_classes)
        self.loss = ArcFaceLoss(num_classes=num_classes, embedding_size=embedding_size,
                                margin=math.degrees(margin), scale=scale)

    @property
    def W(self) -> nn.Parameter:  # noqa: N802 - PML's name
        return self.loss.W

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keep = labels >= 0
        if not bool(keep.any()):
            return embeddings.new_zeros((), dtype=torch.float32)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.loss(embeddings[keep].float(), labels[keep])

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine logits against every class (no margin): for inspection and tests."""
        w = F.normalize(self.W.float(), dim=0)
        return F.normalize(embeddings.float(), dim=1) @ w * self.scale


# --------------------------------------------------------------------------------------------------- totals


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; ``.step`` and ``.terms`` say where."""

    def __init__(self, step: int, terms: dict[str, float]) -> None:
        self.step = step
        self.terms = terms
        bad = ", ".join(f"{k}={v}" for k, v in terms.items())
        super().__init__(f"step {step}: non-finite loss term(s) {bad}; training stopped (lower the learning rate, "
                         f"check the inputs of these terms, or disable bf16 autocast)")


def check_finite(terms: Mapping[str, Any], step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming every NaN / inf term (tensors or floats) at ``step``."""
    bad = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()
           if not (bool(torch.isfinite(v.detach()).all()) if torch.is_tensor(v) else math.isfinite(v))}
    if bad:
        raise NonFiniteLossError(step, bad)


def total_loss(terms: dict[str, torch.Tensor], weights: LossWeights, step: int = -1, check: bool = True,
               ) -> torch.Tensor:
    """Σ weight × term over the computed terms (keys ``itc``, ``itm``, ``box_l1``, ``box_giou``, ``arcface``,
    ``arcface_fused``, ``category``; both box parts use ``weights.box``). With ``check`` raises
    :class:`NonFiniteLossError` naming every non-finite term (a host sync; the training loop checks the terms at its
    log interval instead)."""
    if check:
        check_finite(terms, step)
    total = None
    for name, value in terms.items():
        w = getattr(weights, "box" if name.startswith("box_") else name)
        part = w * value
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no loss term was computed")
    return total
