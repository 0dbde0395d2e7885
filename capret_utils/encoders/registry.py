"""Known peer encoders (hub id, library, licence, size) and the one loader that resolves a spec — hub id, local
folder, ``hf-hub:`` open_clip id or ``tiny-*`` alias — to an :class:`~capret_utils.encoders.base.Encoder`.

Sizes are approximate parameter counts (model cards, or the fp32 safetensors size / 4 bytes); SigLIP 2's are
large for a ViT-B because of its 256 k-token Gemma vocabulary (the image tower alone is ≈ 86 M, as in every
ViT-B/16). None of these models has a published image-to-image consumer-to-shop or DeepFashion2 number
(``docs``: Marqo's benchmark is text-to-image product search).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from capret_utils.encoders.base import Encoder
from capret_utils.encoders.hf import load_hf
from capret_utils.encoders.openclip import TINY_OPEN_CLIP, build_tiny_open_clip, is_open_clip_source, load_open_clip
from capret_utils.encoders.tiny import TINY_FAMILIES, build_tiny_encoder


@dataclass(frozen=True)
class KnownEncoder:
    """One published checkpoint a user would compare X2-VLM with."""

    hub_id: str  # what load_encoder takes (open_clip ones with the "hf-hub:" prefix)
    family: str  # "clip" | "siglip" | "siglip2" | "dinov2" | "open_clip"
    library: str  # "transformers" (model class from config.json) | "open_clip" (needs torchvision)
    model_class: str  # CLIPModel | SiglipModel | Siglip2Model | Dinov2Model | open_clip architecture
    licence: str  # SPDX id from the model card
    params_m: float  # approximate parameters, millions (both towers)
    image_size: int  # pixels per side the model's processor feeds it (NaFlex: at the default 256 patches)
    has_text: bool  # a text tower exists (late caption fusion, ITC fine-tuning)
    note: str = ""


KNOWN: dict[str, KnownEncoder] = {e.hub_id: e for e in (
    KnownEncoder("hf-hub:Marqo/marqo-fashionSigLIP", "open_clip", "open_clip", "ViT-B-16-SigLIP", "Apache-2.0",
                 203, 224, True, "SigLIP ViT-B/16 fine-tuned on fashion products (GCL)"),
    KnownEncoder("hf-hub:Marqo/marqo-fashionCLIP", "open_clip", "open_clip", "ViT-B-16", "Apache-2.0", 150, 224,
                 True, "CLIP ViT-B/16 (laion2b) fine-tuned on fashion products (GCL)"),
    KnownEncoder("patrickjohncyh/fashion-clip", "clip", "transformers", "CLIPModel", "MIT", 151, 224, True,
                 "FashionCLIP 2.0: CLIP ViT-B/32 fine-tuned on Farfetch products"),
    KnownEncoder("google/siglip-base-patch16-224", "siglip", "transformers", "SiglipModel", "Apache-2.0", 203, 224,
                 True, "SigLIP ViT-B/16, WebLI"),
    KnownEncoder("google/siglip2-base-patch16-224", "siglip2", "transformers", "SiglipModel", "Apache-2.0", 375, 224,
                 True, "SigLIP 2 FixRes (config model_type 'siglip': loads as SiglipModel)"),
    KnownEncoder("google/siglip2-base-patch16-naflex", "siglip2", "transformers", "Siglip2Model", "Apache-2.0", 375,
                 256, True, "SigLIP 2 NaFlex (native aspect ratio, up to 256 patches)"),
    KnownEncoder("facebook/dinov2-base", "dinov2", "transformers", "Dinov2Model", "Apache-2.0", 86, 224, False,
                 "DINOv2 ViT-B/14, self-supervised, image only ([CLS] after the final layer norm)"),
    KnownEncoder("facebook/dinov2-small", "dinov2", "transformers", "Dinov2Model", "Apache-2.0", 22, 224, False,
                 "DINOv2 ViT-S/14"),
)}
"""Published encoders by the id :func:`load_encoder` takes."""


def known_table() -> list[dict[str, Any]]:
    """:data:`KNOWN` as rows (README's Baselines table, benchmarks)."""
    return [asdict(e) for e in KNOWN.values()]


def parse_encoders(spec: str) -> list[str]:
    """A comma list of encoder specs -> the list, stripped, duplicates dropped; ``""`` -> ``[]``."""
    return list(dict.fromkeys(s.strip() for s in str(spec or "").split(",") if s.strip()))


def row_label(spec: str) -> str:
    """The short model name of an encoder's table rows (no ``/``, which separates model and variant):
    ``"patrickjohncyh/fashion-clip"`` -> ``"fashion-clip"``, ``"hf-hub:Marqo/marqo-fashionSigLIP"`` ->
    ``"marqo-fashionSigLIP"``, a folder -> its name, ``"tiny-clip"`` -> itself."""
    s = str(spec).rstrip("/")
    s = re.sub(r"^(hf-hub:|open_clip:)", "", s)
    label = Path(s).name if s else "encoder"
    return re.sub(r"[^A-Za-z0-9_.@+-]", "-", label) or "encoder"


def load_encoder(spec: str | os.PathLike, device: str | torch.device = "cpu",
                 model_dir: str | os.PathLike | None = None) -> Encoder:
    """The encoder ``spec`` names: a ``tiny-*`` alias (:data:`~capret_utils.encoders.tiny.TINY_FAMILIES`, or
    ``tiny-open_clip`` when open_clip imports; built once under ``model_dir`` and loaded from there like any folder), an open_clip source (``hf-hub:<id>``,
    ``open_clip:<arch>[@<tag>]`` or a folder with ``open_clip_config.json``; needs open_clip, else an ImportError
    says what to install), or a transformers hub id / ``save_pretrained`` folder (CLIP, SigLIP, SigLIP 2,
    DINOv2)."""
    s = str(spec)
    if s in TINY_FAMILIES or s == TINY_OPEN_CLIP:
        if model_dir is None:
            raise ValueError(f"encoder {s!r} is a tiny random test model: pass model_dir (where it is built)")
        if s == TINY_OPEN_CLIP:
            return load_open_clip(build_tiny_open_clip(model_dir), device=device, name=s)
        return load_hf(build_tiny_encoder(s, model_dir), device=device, name=s)
    known = KNOWN.get(s)
    if is_open_clip_source(s):
        return load_open_clip(s, device=device, name=s, family=known.family if known else "open_clip")
    if not Path(s).exists() and Path(s).is_absolute():
        raise FileNotFoundError(f"encoder folder {s} does not exist")
    return load_hf(s, device=device, family=known.family if known else None, name=s)
