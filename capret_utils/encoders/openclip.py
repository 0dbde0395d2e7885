"""open_clip encoders (Marqo-FashionSigLIP, Marqo-FashionCLIP, …) by ``hf-hub:<id>`` or local folder, through
open_clip's own ``create_model_and_transforms`` and its evaluation transform.

open_clip needs torchvision, which is broken beside this project's ``torch 2.13.0+cpu`` wheel (PyPI's torchvision
0.28.0); :func:`require_open_clip` raises an ``ImportError`` saying what to install (a torch / torchvision pair
that match, e.g. ``torch==2.14.1 torchvision==0.29.1``, then ``open_clip_torch``). A local folder holds
``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and ``open_clip_pytorch_model.bin`` or
``open_clip_model.safetensors``, as the hub repositories do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from capret_utils.encoders.base import Encoder

OPEN_CLIP_CONFIG = "open_clip_config.json"
INSTALL_HINT = ("open_clip needs a working torchvision: install a matching pair, e.g. "
                "`pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch` (PyPI's torchvision 0.28.0 is "
                "broken beside torch 2.13.0+cpu), or use a transformers id instead (CLIP / SigLIP / DINOv2)")


def require_open_clip() -> Any:
    """``import open_clip`` or an ``ImportError`` saying what to install."""
    try:
        import open_clip  # noqa: F401
    except Exception as err:  # ModuleNotFoundError, or torchvision failing to import underneath
        raise ImportError(f"{INSTALL_HINT} (import failed: {type(err).__name__}: {err})") from err
    return open_clip


def is_open_clip_source(source: str | os.PathLike) -> bool:
    """``hf-hub:`` ids, ``open_clip:`` model names and folders holding ``open_clip_config.json``."""
    s = str(source)
    return s.startswith(("hf-hub:", "open_clip:")) or (Path(s) / OPEN_CLIP_CONFIG).is_file()


class OpenCLIPEncoder(Encoder):
    """An open_clip model with the evaluation transform ``create_model_and_transforms`` returned."""

    def __init__(self, model: torch.nn.Module, transform: Any, tokenizer: Any, name: str,
                 family: str = "open_clip", weights: str = "pretrained") -> None:
        self.module = model.eval()
        self.transform = transform
        self.tokenizer = tokenizer
        self.name, self.family, self.weights = str(name), family, weights
        self.has_text = hasattr(model, "encode_text")
        size = getattr(getattr(model, "visual", None), "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        with torch.no_grad():
            probe = torch.zeros(1, 3, self.image_size, self.image_size)
            self.embed_dim = int(model.encode_image(probe).shape[-1])

    def preprocess(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack([self.transform(im.convert("RGB")) for im in images]).to(self.device)}

    def image_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.encode_image(inputs["pixel_values"])

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"text": self.tokenizer(list(texts)).to(self.device)}

    def text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module.encode_text(inputs["text"])

    def logit_scale(self) -> torch.Tensor | None:
        scale = getattr(self.module, "logit_scale", None)
        return scale.exp() if scale is not None else None


def load_open_clip(source: str | os.PathLike, device: str | torch.device = "cpu", name: str | None = None,
                   family: str = "open_clip") -> OpenCLIPEncoder:
    """Load ``hf-hub:<id>``, ``open_clip:<model>[@<pretrained tag>]`` or a local open_clip folder."""
    open_clip = require_open_clip()
    s = str(source)
    if s.startswith("open_clip:"):
        arch, _, tag = s[len("open_clip:"):].partition("@")
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=tag or None)
        tokenizer = open_clip.get_tokenizer(arch)
    elif s.startswith("hf-hub:"):
        model, _, transform = open_clip.create_model_and_transforms(s)
        tokenizer = open_clip.get_tokenizer(s)
    else:
        folder = Path(s)
        cfg_path = folder / OPEN_CLIP_CONFIG
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{cfg_path}: cannot read the open_clip config ({err})") from None
        weights = next((folder / f for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                        if (folder / f).is_file()), None)
        if "model_cfg" not in cfg:
            raise ValueError(f"{cfg_path}: field 'model_cfg' missing")
        arch = f"capret-local-{folder.resolve().name}"
        from open_clip import factory  # register the folder's architecture as the hf-hub: path does

        factory._MODEL_CONFIGS[arch] = cfg["model_cfg"]
        pre = {f"image_{k}": v for k, v in cfg.get("preprocess_cfg", {}).items()
               if k in ("mean", "std", "interpolation", "resize_mode")}
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=str(weights) if weights else None,
                                                                    **pre)
        tokenizer = open_clip.get_tokenizer(arch)
    enc = OpenCLIPEncoder(model, transform, tokenizer, name or s, family=family)
    return enc.to(device)
