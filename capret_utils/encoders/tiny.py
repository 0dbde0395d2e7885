"""Tiny random CLIP / SigLIP / SigLIP 2 (NaFlex) / DINOv2 checkpoints for tests, smoke runs and the demo, built
offline from configs and saved with ``save_pretrained`` (model, image processor, tokenizer).

They are loaded back through the same ``from_pretrained`` code path as a hub id (:func:`capret_utils.encoders.load_encoder`
with ``"tiny-clip"`` etc.), so the loaders, the processors and the evaluation rows are exercised without a
download. Their weights are random (``capret_encoder.json``: ``"weights": "random-init"``): rows computed with
them test the path, not the models. Sizes: 32 px images, 8 px patches, width 32, 2 layers (≈ 40–60 k parameters).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from capret_utils.common import atomic_dir
from capret_utils.data.df2 import CATEGORY_NAMES
from capret_utils.encoders.hf import MARKER

TINY_SEED = 0
TINY_FAMILIES: dict[str, str] = {"tiny-clip": "clip", "tiny-siglip": "siglip", "tiny-siglip2": "siglip2",
                                 "tiny-dinov2": "dinov2"}
"""Alias -> family of the tiny random encoders."""

_SIDE, _PATCH, _WIDTH = 32, 8, 32
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
_WORDS = ("an image of a with viewpoint occlusion level scale and zoom in no wear frontal side back slight medium "
          "heavy small moderate large none navy white black red blue green grey beige pink yellow brown solid "
          "horizontal vertical stripes polka dots checks cotton denim sleeve sleeves long short").split()


def _tokenizer(pad_to_max: bool) -> Any:
    """A lower-casing word-level tokenizer over the caption words, ``<s> … </s>``; SigLIP-style (``pad_to_max``)
    tokenizers take only ``input_ids`` as SigLIP's do."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*_WORDS, *(w for name in CATEGORY_NAMES.values() for w in name.lower().split()),
             *"0123456789", ",", ".", "-"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*_SPECIALS, *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    names = ["input_ids"] if pad_to_max else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=16, model_input_names=names)


def _layers(**extra: Any) -> dict[str, Any]:
    return dict(hidden_size=_WIDTH, intermediate_size=2 * _WIDTH, num_hidden_layers=2, num_attention_heads=4, **extra)


def _text(tok: Any) -> dict[str, Any]:
    return _layers(vocab_size=len(tok), max_position_embeddings=16, pad_token_id=tok.pad_token_id,
                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _clip(out: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tok = _tokenizer(pad_to_max=False)
    config = CLIPConfig(text_config=_text(tok), vision_config=_layers(image_size=_SIDE, patch_size=_PATCH),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(out)
    # FashionCLIP's processor: shortest edge to 224 (bicubic), centre crop 224, CLIP mean/std — at 32 px
    CLIPImageProcessorPil(size={"shortest_edge": _SIDE}, crop_size={"height": _SIDE, "width": _SIDE}).save_pretrained(out)
    tok.save_pretrained(out)


def _siglip(out: Path) -> None:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel

    tok = _tokenizer(pad_to_max=True)
    config = SiglipConfig(text_config=_text(tok), vision_config=_layers(image_size=_SIDE, patch_size=_PATCH))
    SiglipModel(config).save_pretrained(out)
    SiglipImageProcessorPil(size={"height": _SIDE, "width": _SIDE}).save_pretrained(out)  # squash, mean/std 0.5
    tok.save_pretrained(out)


def _siglip2(out: Path) -> None:
    from transformers import Siglip2Config, Siglip2ImageProcessorPil, Siglip2Model

    tok = _tokenizer(pad_to_max=True)
    n_patches = (_SIDE // _PATCH) ** 2
    config = Siglip2Config(text_config=_text(tok), vision_config=_layers(num_patches=n_patches, patch_size=_PATCH))
    Siglip2Model(config).save_pretrained(out)
    Siglip2ImageProcessorPil(patch_size=_PATCH, max_num_patches=n_patches).save_pretrained(out)  # NaFlex
    tok.save_pretrained(out)


def _dinov2(out: Path) -> None:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    Dinov2Model(Dinov2Config(**_layers(image_size=_SIDE, patch_size=_PATCH))).save_pretrained(out)
    # DINOv2's processor: shortest edge 256 (bicubic), centre crop 224, ImageNet mean/std — scaled to 32 px
    BitImageProcessorPil(size={"shortest_edge": _SIDE * 8 // 7}, crop_size={"height": _SIDE, "width": _SIDE},
                         do_convert_rgb=True, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(out)


_BUILDERS: dict[str, Callable[[Path], None]] = {"tiny-clip": _clip, "tiny-siglip": _siglip, "tiny-siglip2": _siglip2,
                                                "tiny-dinov2": _dinov2}


def build_tiny_encoder(alias: str, out_dir: str | os.PathLike) -> Path:
    """Build (once) the tiny random encoder ``alias`` (:data:`TINY_FAMILIES`) under ``out_dir/<alias>``; returns
    the folder. Deterministic (seed 0); written to a temporary folder and renamed into place."""
    import torch

    if alias not in _BUILDERS:
        raise ValueError(f"unknown tiny encoder {alias!r}; known: {sorted(_BUILDERS)}")
    out_dir = Path(out_dir)
    target = out_dir / alias
    if (target / MARKER).is_file():
        return target
    with atomic_dir(target) as tmp:
        with torch.random.fork_rng():
            torch.manual_seed(TINY_SEED)
            _BUILDERS[alias](tmp)
        note = {"family": TINY_FAMILIES[alias], "weights": "random-init", "seed": TINY_SEED, "alias": alias}
        (tmp / MARKER).write_text(json.dumps(note) + "\n")
    return target


def build_tiny_encoders(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Every tiny encoder (:data:`TINY_FAMILIES`) under ``out_dir``: ``{alias: folder}``."""
    return {alias: build_tiny_encoder(alias, out_dir) for alias in _BUILDERS}
