"""open_clip encoders (Marqo-FashionSigLIP, Marqo-FashionCLIP, …) by ``hf-hub:<id>`` or local folder, through
open_clip's own ``create_model_and_transforms`` and its evaluation transform; saving a (fine-tuned) model back as
such a folder; a tiny random open_clip model for tests.

open_clip needs torchvision, which is broken beside this project's ``torch 2.13.0+cpu`` wheel (PyPI's torchvision
0.28.0); :func:`require_open_clip` raises an ``ImportError`` saying what to install (a torch / torchvision pair
that match, e.g. ``torch==2.14.1 torchvision==0.29.1``, then ``open_clip_torch``). A local folder holds
``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) and ``open_clip_model.safetensors`` or
``open_clip_pytorch_model.bin``, as the hub repositories do, plus the tokenizer files where ``model_cfg`` names an
``hf_tokenizer_name``; open_clip >= 3 reads it as ``local-dir:<folder>`` (config, weights, preprocessing and
tokenizer from the folder). An optional ``capret_encoder.json`` note (:data:`~capret_utils.encoders.hf.MARKER`)
says whether the weights are ``random-init`` or ``fine-tuned``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from capret_utils.common import atomic_dir
from capret_utils.encoders.base import Encoder
from capret_utils.encoders.hf import MARKER, read_marker

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
TINY_OPEN_CLIP = "tiny-open_clip"
"""Alias of the tiny random open_clip model (:func:`build_tiny_open_clip`; needs open_clip)."""
TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
"""``model_cfg`` of :data:`TINY_OPEN_CLIP`: a CLIP ViT of 32 px images, 8 px patches, width 32, 2 layers per tower
(open_clip's own BPE tokenizer, 16 tokens)."""
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
    """An open_clip model with the evaluation transform ``create_model_and_transforms`` returned.

    ``model_cfg``: the architecture config the model was built from (what :func:`save_open_clip` writes back).
    """

    def __init__(self, model: torch.nn.Module, transform: Any, tokenizer: Any, name: str,
                 family: str = "open_clip", weights: str = "pretrained",
                 model_cfg: Mapping[str, Any] | None = None) -> None:
        self.module = model.eval()
        self.transform = transform
        self.tokenizer = tokenizer
        self.model_cfg = copy.deepcopy(dict(model_cfg or {}))
        self.name, self.family, self.weights = str(name), family, weights
        self.has_text = hasattr(model, "encode_text")
        size = getattr(getattr(model, "visual", None), "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        with torch.no_grad():
            param = next(model.parameters())
            probe = torch.zeros(1, 3, self.image_size, self.image_size, device=param.device, dtype=param.dtype)
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


def _read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / OPEN_CLIP_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{cfg_path}: cannot read the open_clip config ({err})") from None
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise ValueError(f"{cfg_path}: field 'model_cfg' missing")
    return cfg


def load_open_clip(source: str | os.PathLike, device: str | torch.device = "cpu", name: str | None = None,
                   family: str = "open_clip") -> OpenCLIPEncoder:
    """Load ``hf-hub:<id>``, ``open_clip:<model>[@<pretrained tag>]`` or a local open_clip folder (its
    :data:`~capret_utils.encoders.hf.MARKER` note, when present, gives ``weights``)."""
    open_clip = require_open_clip()
    from open_clip import factory

    s = str(source)
    note: dict[str, Any] = {}
    if s.startswith("open_clip:"):
        arch, _, tag = s[len("open_clip:"):].partition("@")
        model, _, transform = open_clip.create_model_and_transforms(arch, pretrained=tag or None)
        tokenizer = open_clip.get_tokenizer(arch)
        model_cfg = open_clip.get_model_config(arch)
    elif s.startswith("hf-hub:"):
        model, _, transform = open_clip.create_model_and_transforms(s)
        tokenizer = open_clip.get_tokenizer(s)
        model_cfg = factory._get_hf_config(s[len("hf-hub:"):])["model_cfg"]
    else:
        folder = Path(s)
        cfg = _read_config(folder)
        note = read_marker(folder)
        model_cfg = cfg["model_cfg"]
        if hasattr(factory, "LOCAL_DIR_PREFIX"):  # open_clip >= 3: config, weights, transform, tokenizer
            spec = f"{factory.LOCAL_DIR_PREFIX}{folder.resolve()}"
            model, _, transform = open_clip.create_model_and_transforms(spec)
            tokenizer = open_clip.get_tokenizer(spec)
        else:  # older open_clip: register the architecture under a local name, as its hf-hub: path does
            weights = next((folder / f for f in (OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.bin")
                            if (folder / f).is_file()), None)
            arch = f"capret-local-{folder.resolve().name}"
            factory._MODEL_CONFIGS[arch] = copy.deepcopy(model_cfg)
            pre = {f"image_{k}": v for k, v in cfg.get("preprocess_cfg", {}).items()
                   if k in ("mean", "std", "interpolation", "resize_mode")}
            model, _, transform = open_clip.create_model_and_transforms(
                arch, pretrained=str(weights) if weights else None, **pre)
            tokenizer = open_clip.get_tokenizer(arch)
    enc = OpenCLIPEncoder(model, transform, tokenizer, name or s, family=note.get("family", family),
                          weights=note.get("weights", "pretrained"), model_cfg=model_cfg)
    return enc.to(device)


def save_open_clip(encoder: OpenCLIPEncoder, folder: str | os.PathLike,
                   note: Mapping[str, Any] | None = None) -> Path:
    """Write ``encoder`` as a local open_clip folder :func:`load_open_clip` reads back: ``open_clip_config.json``
    (``model_cfg`` and the model's ``preprocess_cfg``, by open_clip's own ``save_config_for_hf``), the weights
    (``open_clip_model.safetensors``), the tokenizer files where the tokenizer has ``save_pretrained`` and the
    ``note`` as :data:`~capret_utils.encoders.hf.MARKER`. The module must be a plain open_clip model (merge
    adapters first)."""
    require_open_clip()
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_model

    if not encoder.model_cfg:
        raise ValueError(f"{encoder.name}: no model_cfg recorded; cannot write {OPEN_CLIP_CONFIG}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(encoder.module, str(folder / OPEN_CLIP_WEIGHTS))  # handles shared tensors
    save_config_for_hf(encoder.module, folder / OPEN_CLIP_CONFIG, model_config=copy.deepcopy(encoder.model_cfg))
    if hasattr(encoder.tokenizer, "save_pretrained"):
        encoder.tokenizer.save_pretrained(folder)
    if note is not None:
        (folder / MARKER).write_text(json.dumps(dict(note), default=str) + "\n")
    return folder


def build_tiny_open_clip(out_dir: str | os.PathLike) -> Path:
    """Build (once) the tiny random open_clip model (:data:`TINY_OPEN_CLIP_CFG`, seed 0) as a local folder
    ``out_dir/tiny-open_clip`` (``weights: random-init``) and return it; needs open_clip."""
    open_clip = require_open_clip()
    out_dir = Path(out_dir)
    target = out_dir / TINY_OPEN_CLIP
    if (target / MARKER).is_file():
        return target
    with atomic_dir(target) as tmp:
        from open_clip import factory

        arch = "capret-tiny-open_clip"
        factory._MODEL_CONFIGS[arch] = copy.deepcopy(TINY_OPEN_CLIP_CFG)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model, _, transform = open_clip.create_model_and_transforms(arch)
        enc = OpenCLIPEncoder(model, transform, open_clip.get_tokenizer(arch), TINY_OPEN_CLIP,
                              weights="random-init", model_cfg=TINY_OPEN_CLIP_CFG)
        save_open_clip(enc, tmp, note={"family": "open_clip", "weights": "random-init", "seed": 0,
                                       "alias": TINY_OPEN_CLIP})
    return target
