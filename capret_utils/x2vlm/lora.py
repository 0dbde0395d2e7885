"""LoRA for X2-VLM via ``peft``: which modules get adapters, trainable-parameter report, merge for export.

Default targets (module names in :class:`~capret_utils.x2vlm.modeling.X2VLMModel`):

* ``"vision"``: ``vision_encoder.layers.{i}.attention.q_proj`` and ``.v_proj`` (BEiT query / value);
* ``"text"``: ``text_encoder.encoder.layer.{i}.attention.self.query`` and ``.value``;
* ``"fusion"``: ``fusion.{j}.attention.self.query`` / ``.value`` and ``fusion.{j}.crossattention.self.query`` /
  ``.value`` (the official text layers 12-17).

The heads named in ``trainable_heads`` (projections, ITM, box, stripe pooling) are trained fully through peft's
``modules_to_save``; ``temp`` stays trainable when ``train_temp``, and so do the absolute position embeddings of
``vision_abs_pos``. Everything else is frozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LORA_TARGETS: dict[str, str] = {
    "vision": r"vision_encoder\.layers\.\d+\.attention\.(q_proj|v_proj)",
    "text": r"text_encoder\.encoder\.layer\.\d+\.attention\.self\.(query|value)",
    "fusion": r"fusion\.\d+\.(attention|crossattention)\.self\.(query|value)",
}


HEAD_NAMES = ("vision_proj", "text_proj", "itm_head", "bbox_head", "stripe_pool")
"""Modules trained fully under LoRA and given the head learning rate (``train.build_optimizer``); absent ones skipped."""


@dataclass
class LoraSettings:
    """LoRA hyper-parameters and what to train."""

    r: int = 16  # rank
    alpha: int = 32  # scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the LoRA branch input
    targets: tuple[str, ...] = ("vision", "text", "fusion")  # groups of LORA_TARGETS
    target_regex: str | None = None  # full-match regex over module names; overrides ``targets``
    trainable_heads: tuple[str, ...] = HEAD_NAMES  # trained fully (absent ones skipped)
    train_temp: bool = True  # keep the ITC temperature trainable


def lora_target_regex(settings: LoraSettings) -> str:
    """The regex peft matches (full match) against module names."""
    if settings.target_regex:
        return settings.target_regex
    unknown = [t for t in settings.targets if t not in LORA_TARGETS]
    if unknown or not settings.targets:
        raise ValueError(f"LoRA targets {list(settings.targets)}: choose from {sorted(LORA_TARGETS)}")
    return "|".join(f"(?:{LORA_TARGETS[t]})" for t in settings.targets)


def apply_lora(model: nn.Module, settings: LoraSettings | None = None) -> Any:
    """Wrap an :class:`X2VLMModel` with peft LoRA; returns the ``PeftModel`` (its methods such as
    ``get_image_embeds`` stay reachable)."""
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    regex = lora_target_regex(settings)
    pattern = re.compile(regex)
    if not any(pattern.fullmatch(name) for name, _ in model.named_modules()):
        raise ValueError(f"no module matched the LoRA targets {regex!r}")
    heads = [h for h in settings.trainable_heads if getattr(model, h, None) is not None]
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=regex, modules_to_save=heads or None, bias="none")
    peft_model = get_peft_model(model, config)
    base = peft_model.get_base_model()
    base.temp.requires_grad_(settings.train_temp)
    positions = getattr(base.vision_encoder.embeddings, "position_embeddings", None)
    if isinstance(positions, nn.Parameter):  # vision_abs_pos: new and zero-initialised, so trained fully
        positions.requires_grad_(True)
    return peft_model


def trainable_parameters(model: nn.Module) -> dict[str, Any]:
    """Counts of trainable / all parameters (shared tensors once) and the trainable count per top-level part."""
    seen: set[int] = set()
    total = trainable = 0
    by_part: dict[str, int] = {}
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            parts = name.split(".")
            # strip peft's wrapper prefixes (base_model.model.)
            while parts and parts[0] in ("base_model", "model"):
                parts = parts[1:]
            key = "lora" if "lora_" in name else parts[0]
            by_part[key] = by_part.get(key, 0) + param.numel()
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1),
            "by_part": by_part}


def merge_lora(peft_model: Any) -> nn.Module:
    """Fold the LoRA weights into the base linears and drop peft's wrappers: a plain ``X2VLMModel`` ready for
    ``save_pretrained`` (the trained heads and ``temp`` are kept)."""
    merged = peft_model.merge_and_unload()
    for param in merged.parameters():
        param.requires_grad_(True)
    return merged


def lora_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter + trained-head tensors (what peft's ``save_pretrained`` writes), plus ``temp``."""
    from peft import get_peft_model_state_dict

    state = dict(get_peft_model_state_dict(peft_model))
    state["temp"] = peft_model.get_base_model().temp.detach().clone()
    return state
