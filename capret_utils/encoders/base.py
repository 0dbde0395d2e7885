"""The encoder interface every retrieval backbone satisfies: image batch -> L2-normalised float32 vectors, text ->
vectors where the model has a text tower.

:class:`Encoder` is what evaluation (:mod:`capret_utils.evaluation.peers`) and fine-tuning
(:mod:`capret_utils.train.peers`) call; the concrete loaders live beside it: transformers CLIP / SigLIP / SigLIP 2 /
DINOv2 (:mod:`.hf`), open_clip (:mod:`.openclip`) and X2-VLM (:mod:`.adapter`). Each encoder splits its work into a
differentiable part (``preprocess`` -> ``image_features``; ``tokenize`` -> ``text_features``: raw, unnormalised
tensors with gradients, what a training step needs) and the inference helpers built on it here
(``encode_images`` / ``encode_texts``: batched, ``torch.no_grad``, L2-normalised, float32 numpy).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

WEIGHTS = ("pretrained", "random-init", "fine-tuned")
"""What an encoder's weights are: a published checkpoint, random (tiny test models: they test the path, not the
model), or fine-tuned by :mod:`capret_utils.train.peers`."""


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, max(1, int(size))):
        yield slice(start, min(start + max(1, int(size)), n))


class Encoder(ABC):
    """A retrieval backbone behind one interface.

    Attributes every encoder sets: ``name`` (hub id, folder or ``tiny-*`` alias it was loaded from), ``family``
    (``"clip"`` | ``"siglip"`` | ``"siglip2"`` | ``"dinov2"`` | ``"open_clip"`` | ``"x2vlm"``), ``has_text`` (a
    text tower exists), ``image_size`` (side in pixels the processor feeds the model; for SigLIP 2 NaFlex the
    side of a square image at the maximum patch count), ``embed_dim`` (output vector size), ``weights`` (one of
    :data:`WEIGHTS`) and ``module`` (the ``torch.nn.Module`` holding every weight: what LoRA wraps).
    """

    name: str
    family: str
    has_text: bool
    image_size: int
    embed_dim: int
    weights: str = "pretrained"
    module: torch.nn.Module

    # ------------------------------------------------------------------ what each encoder implements
    @abstractmethod
    def preprocess(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """PIL images -> the model's image inputs on :attr:`device`, by the model's own processor/transform."""

    @abstractmethod
    def image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Image inputs -> (B, embed_dim) features, unnormalised, differentiable."""

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> the text tower's inputs on :attr:`device` (encoders without a text tower raise)."""
        raise NotImplementedError(f"{self.name} ({self.family}) has no text tower")

    def text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Text inputs -> (B, embed_dim) features, unnormalised, differentiable."""
        raise NotImplementedError(f"{self.name} ({self.family}) has no text tower")

    def logit_scale(self) -> torch.Tensor | None:
        """The model's learnt image-text logit scale (``exp`` applied), or None: ITC uses ``1 / scale`` as its
        temperature when there is one."""
        return None

    # ------------------------------------------------------------------ shared helpers
    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def to(self, device: str | torch.device) -> "Encoder":
        self.module.to(device)
        return self

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA, nothing elsewhere (as X2-VLM embedding does)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """L2-normalised float32 (n, embed_dim) image vectors of PIL images, ``batch_size`` per forward pass."""
        self.module.eval()
        out = []
        for sl in _batches(len(images), batch_size):
            with self.autocast():
                feat = self.image_features(self.preprocess(list(images[sl])))
            out.append(F.normalize(feat.float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.embed_dim), np.float32)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 (n, embed_dim) text vectors (raises without a text tower)."""
        if not self.has_text:
            raise NotImplementedError(f"{self.name} ({self.family}) has no text tower")
        self.module.eval()
        out = []
        for sl in _batches(len(texts), batch_size):
            with self.autocast():
                feat = self.text_features(self.tokenize([str(t) for t in texts[sl]]))
            out.append(F.normalize(feat.float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.embed_dim), np.float32)

    def describe(self) -> dict[str, Any]:
        """The interface attributes as a dict (what tables and benchmarks record)."""
        params = sum(p.numel() for p in self.module.parameters())
        return {"name": self.name, "family": self.family, "has_text": self.has_text, "image_size": self.image_size,
                "embed_dim": self.embed_dim, "weights": self.weights, "params": int(params)}

    def __repr__(self) -> str:
        d = self.describe()
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in d.items())})"
