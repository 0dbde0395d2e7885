"""X2-VLM behind the :class:`~capret_utils.encoders.base.Encoder` interface: a thin adapter over the model bundle
notebook 03 writes and notebook 04 loads (:class:`capret_utils.evaluation.embed.ModelBundle`: model, tokenizer,
image processor, info).

Image features are X2-VLM's ITC image feature (``get_image_embeds(...)[1]``, the ``vision_proj`` of image token 0)
and text features its ``get_text_feat`` — the same vectors :func:`capret_utils.evaluation.embed.embed_items` (view
``crop``, fusion ``none``) and :func:`~capret_utils.evaluation.embed.embed_texts` return, which
``tests/test_encoders.py`` checks. The bundle is duck-typed (any object with ``model``, ``tokenizer``,
``processor`` and ``info``), so this stage does not import the later evaluation stage.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from capret_utils.encoders.base import Encoder


class X2VLMEncoder(Encoder):
    """An X2-VLM model bundle as an :class:`Encoder` (``family="x2vlm"``, with a text tower)."""

    family = "x2vlm"
    has_text = True

    def __init__(self, bundle: Any, name: str = "x2vlm", weights: str = "pretrained") -> None:
        self.bundle = bundle
        self.module = bundle.model
        self.name, self.weights = str(name), weights
        self.image_size = int(bundle.model.config.image_res)
        self.embed_dim = int(bundle.model.config.embed_dim)

    def preprocess(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        arrays = [self.bundle.processor.process_one(im, train=False)[0] for im in images]
        return {"pixel_values": torch.from_numpy(np.stack(arrays)).to(self.device)}

    def image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.get_image_embeds(inputs["pixel_values"])[1]

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.bundle.tokenizer(list(texts))
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        embeds = self.module.get_text_embeds(inputs["input_ids"], inputs["attention_mask"])
        return self.module.get_text_feat(embeds)

    def logit_scale(self) -> torch.Tensor | None:
        temp = getattr(self.module, "temp", None)
        return 1.0 / temp if temp is not None else None
