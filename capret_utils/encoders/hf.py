"""transformers encoders: CLIP (FashionCLIP 2.0), SigLIP, SigLIP 2 (FixRes and NaFlex) and DINOv2, by hub id or
``save_pretrained`` folder, through each library class's own ``from_pretrained``.

The model class follows the checkpoint's ``config.json`` ``model_type`` (:data:`MODEL_CLASSES`): ``clip`` ->
``CLIPModel``, ``siglip`` -> ``SiglipModel`` (SigLIP and the SigLIP 2 FixRes ids such as
``google/siglip2-base-patch16-224``), ``siglip2`` -> ``Siglip2Model`` (the ``-naflex`` ids), ``dinov2`` ->
``Dinov2Model`` (image only). Images go through the checkpoint's own image processor
(``AutoImageProcessor.from_pretrained``; the PIL backend by default, which needs no torchvision — the torchvision
backend is what transformers picks when torchvision imports, and ours is broken beside torch 2.13.0+cpu), texts
through its own tokenizer (``AutoTokenizer``; SigLIP pads to ``max_length`` as it was trained).

Features: CLIP / SigLIP / SigLIP 2 = ``get_image_features`` / ``get_text_features`` (the projected, contrastive
space); DINOv2 = ``pooler_output`` (the layer-normed [CLS] token, the usual DINOv2 global descriptor).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from capret_utils.encoders.base import WEIGHTS, Encoder

MODEL_CLASSES: dict[str, str] = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model",
                                 "dinov2": "Dinov2Model"}
"""config ``model_type`` -> transformers model class."""

MARKER = "capret_encoder.json"
"""A folder's optional note (written by :mod:`.tiny` and :mod:`capret_utils.train.peers`): ``family`` and
``weights`` (:data:`~capret_utils.encoders.base.WEIGHTS`) of the weights it holds."""

_TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def read_marker(source: str | os.PathLike) -> dict[str, Any]:
    """The folder's :data:`MARKER` note, or ``{}`` (hub ids, folders without one)."""
    path = Path(source) / MARKER
    if not path.is_file():
        return {}
    try:
        note = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if note.get("weights", "pretrained") not in WEIGHTS:
        raise ValueError(f"{path}: field 'weights' must be one of {WEIGHTS}, got {note.get('weights')!r}")
    return note


def _output(out: Any) -> torch.Tensor:
    """transformers 5 returns ``BaseModelOutputWithPooling`` from ``get_*_features`` (the feature in
    ``pooler_output``); 4.x returned the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFEncoder(Encoder):
    """A transformers CLIP / SigLIP / SigLIP 2 / DINOv2 model with its own image processor and tokenizer."""

    def __init__(self, model: torch.nn.Module, processor: Any, tokenizer: Any | None, name: str, family: str,
                 weights: str = "pretrained") -> None:
        self.module = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.name = str(name)
        self.model_type = str(model.config.model_type)
        self.family = family
        self.has_text = self.model_type != "dinov2"
        self.weights = weights
        cfg = model.config
        if self.model_type == "clip":
            self.embed_dim = int(cfg.projection_dim)
        elif self.model_type in ("siglip", "siglip2"):
            self.embed_dim = int(cfg.vision_config.hidden_size)
        else:
            self.embed_dim = int(cfg.hidden_size)
        if self.model_type == "siglip2":  # NaFlex: a square image at the maximum patch count
            self.image_size = int(math.isqrt(int(processor.max_num_patches))) * int(processor.patch_size)
        else:
            crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
            size = crop or processor.size
            self.image_size = int(size.get("height") or size.get("shortest_edge"))
        if self.has_text:
            limit = int(cfg.text_config.max_position_embeddings)
            tok_max = int(getattr(tokenizer, "model_max_length", limit) or limit)
            self.max_text_length = min(limit, tok_max) if tok_max < 100_000 else limit

    def preprocess(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        batch = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        keep = ("pixel_values", "pixel_attention_mask", "spatial_shapes") if self.model_type == "siglip2" else (
            "pixel_values",)
        return {k: batch[k].to(self.device) for k in keep}

    def image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.model_type == "dinov2":
            return self.module(pixel_values=inputs["pixel_values"]).pooler_output
        return _output(self.module.get_image_features(**inputs))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if not self.has_text:
            return super().tokenize(texts)
        padding = "max_length" if self.model_type in ("siglip", "siglip2") else True
        enc = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=self.max_text_length,
                             return_tensors="pt")
        names = [n for n in getattr(self.tokenizer, "model_input_names", ["input_ids"]) if n in _TEXT_INPUTS]
        return {k: enc[k].to(self.device) for k in names if k in enc}

    def text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.has_text:
            return super().text_features(inputs)
        return _output(self.module.get_text_features(**inputs))

    def logit_scale(self) -> torch.Tensor | None:
        scale = getattr(self.module, "logit_scale", None)
        return scale.exp() if scale is not None else None


def load_hf(source: str | os.PathLike, device: str | torch.device = "cpu", family: str | None = None,
            name: str | None = None, image_backend: str = "pil") -> HFEncoder:
    """Load a transformers encoder by hub id or ``save_pretrained`` folder (:data:`MODEL_CLASSES`).

    ``family``: the label to report (default: the folder's :data:`MARKER`, else the config's ``model_type``);
    ``image_backend``: ``"pil"`` (default; no torchvision needed) or ``"torchvision"``. An unsupported
    ``model_type`` raises naming the config file and the field.
    """
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    source = str(source)
    config = AutoConfig.from_pretrained(source)
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{source}/config.json: field 'model_type' is {model_type!r}; the transformers encoder "
                         f"loader supports {sorted(MODEL_CLASSES)} (open_clip models: 'hf-hub:<id>' or a folder "
                         f"with open_clip_config.json)")
    note = read_marker(source) if Path(source).is_dir() else {}
    cls = getattr(transformers, MODEL_CLASSES[model_type])
    model = cls.from_pretrained(source)
    processor = AutoImageProcessor.from_pretrained(source, backend=image_backend)
    tokenizer = AutoTokenizer.from_pretrained(source) if model_type != "dinov2" else None
    enc = HFEncoder(model, processor, tokenizer, name or source, family or note.get("family") or model_type,
                    weights=note.get("weights", "pretrained"))
    return enc.to(device)
