"""The X2-VLM model built from Hugging Face blocks: ``BeitModel`` + ``BertModel`` + fusion ``BertLayer`` s.

Exact official quantities (x2vlm.md §1.3, §8):

* ``image_embeds`` = [mean of the ``fc_norm``-ed patch tokens ; ``fc_norm``-ed patch tokens]; the ViT [CLS]
  output is dropped (this is *not* HF ``pooler_output``, which normalises after pooling);
* ``image_feat`` / ``text_feat`` = L2-normalised ``vision_proj(image token 0)`` / ``text_proj(text [CLS])``
  with the text [CLS] taken after the text-only layers;
* fusion layers: self-attention over text (padding mask) -> cross-attention to all 1+N image tokens -> FFN,
  key/value projections mapping the vision width to the text width;
* ``itm_logits`` = ``itm_head(fusion [CLS])`` (column 1 = match), ``bbox`` = sigmoid(``bbox_head``) as
  (cx, cy, w, h), ``itc_logits`` = ``image_feat @ text_feat.T / temp``.

State-dict names (ours): ``vision_encoder.*`` (HF ``BeitModel``), ``text_encoder.*`` (HF ``BertModel``, text-only
layers), ``fusion.{j}.*`` (HF ``BertLayer``), ``mlm_head.predictions.*`` (HF ``BertOnlyMLMHead``, decoder tied to
the word embeddings), ``vision_proj``, ``text_proj``, ``itm_head``, ``bbox_head``, ``temp``. Official names are
mapped by :mod:`capret_utils.x2vlm.convert`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, BeitModel, BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertLayer, BertOnlyMLMHead
from transformers.utils import ModelOutput

from capret_utils.x2vlm.config import X2VLMConfig
from capret_utils.x2vlm.convert import model_from_official

TEMP_MIN, TEMP_MAX = 0.001, 0.5  # official clamp of the ITC temperature before every training step


def build_mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Official head layout: Linear(d, 2d) -> LayerNorm(2d, eps 1e-5) -> GELU -> Linear(2d, out)."""
    return nn.Sequential(nn.Linear(in_dim, 2 * in_dim), nn.LayerNorm(2 * in_dim, eps=1e-5), nn.GELU(),
                         nn.Linear(2 * in_dim, out_dim))


def build_conv_stem(config: X2VLMConfig) -> nn.Sequential:
    """``vision_stem="conv"``: log2(patch_size) stride-2 3x3 convolutions, the last one to ``vision_width``; the
    ones before it to 32, 64, 128 ... channels, each followed by BatchNorm and GELU. It maps an image to the same
    ``image_res / patch_size`` token grid as the patch embedding it replaces."""
    n = config.patch_size.bit_length() - 1
    layers: list[nn.Module] = []
    channels = config.num_channels
    for i in range(n - 1):
        out = min(32 * 2**i, config.vision_width)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.GELU()]
        channels = out
    layers.append(nn.Conv2d(channels, config.vision_width, 3, stride=2, padding=1))
    return nn.Sequential(*layers)


def build_cnn_stem(config: X2VLMConfig) -> nn.Sequential:
    """``vision_stem="cnn"`` (a hybrid ViT): a stride-2 3x3 convolution to 32 channels, then log2(patch_size) - 1
    blocks of 3x3 convolution (64, 96, 128 ... channels) + BatchNorm + ReLU + 2x2 max-pool, then a 3x3 convolution
    to ``vision_width``: the same ``image_res / patch_size`` token grid as the patch embedding, from a feature map
    computed at full resolution (about 3x the multiply-adds of ``"conv"``)."""
    n = config.patch_size.bit_length() - 1
    channels = [32 * (i + 1) for i in range(n)]
    layers: list[nn.Module] = [nn.Conv2d(config.num_channels, channels[0], 3, stride=2, padding=1, bias=False),
                               nn.BatchNorm2d(channels[0]), nn.ReLU()]
    for i in range(1, n):
        layers += [nn.Conv2d(channels[i - 1], channels[i], 3, padding=1, bias=False), nn.BatchNorm2d(channels[i]),
                   nn.ReLU(), nn.MaxPool2d(2)]
    layers.append(nn.Conv2d(channels[-1], config.vision_width, 3, padding=1))
    return nn.Sequential(*layers)


STEM_BUILDERS = {"conv": build_conv_stem, "cnn": build_cnn_stem}


@dataclass
class X2VLMOutput(ModelOutput):
    """Outputs of :meth:`X2VLMModel.forward`; fields are None when their inputs were not given."""

    image_embeds: torch.Tensor | None = None  # (B, 1 + N, vision_width)
    image_feat: torch.Tensor | None = None  # (B, embed_dim), L2-normalised
    text_embeds: torch.Tensor | None = None  # (B, L, text_width), after the text-only layers
    text_feat: torch.Tensor | None = None  # (B, embed_dim), L2-normalised
    fusion_embeds: torch.Tensor | None = None  # (B, L, text_width), after the fusion layers
    itm_logits: torch.Tensor | None = None  # (B, 2), column 1 = match
    bbox: torch.Tensor | None = None  # (B, 4) sigmoid (cx, cy, w, h)
    itc_logits: torch.Tensor | None = None  # (B_img, B_txt) = image_feat @ text_feat.T / temp
    mlm_logits: torch.Tensor | None = None  # (B, L, vocab) when requested


class X2VLMModel(PreTrainedModel):
    """X2-VLM: vision tower, text encoder, fusion encoder and the ITC / ITM / box (/ MLM) heads."""

    config_class = X2VLMConfig
    config: X2VLMConfig
    base_model_prefix = "x2vlm"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["BeitLayer", "BertLayer", "BertEmbeddings"]

    def __init__(self, config: X2VLMConfig) -> None:
        super().__init__(config)
        # tied MLM decoder (official BertLMPredictionHead ties decoder.weight to the word embeddings and
        # decoder.bias to predictions.bias); only declared when the head exists
        self._tied_weights_keys = ({
            "mlm_head.predictions.decoder.weight": "text_encoder.embeddings.word_embeddings.weight",
            "mlm_head.predictions.decoder.bias": "mlm_head.predictions.bias",
        } if config.has_mlm_head else {})
        self.vision_encoder = BeitModel(config.beit_config(), add_pooling_layer=True)  # pooler.layernorm = fc_norm
        if config.vision_stem in STEM_BUILDERS:
            self.vision_encoder.embeddings.patch_embeddings.projection = STEM_BUILDERS[config.vision_stem](config)
        self.text_encoder = BertModel(config.bert_config(fusion=False), add_pooling_layer=False)
        fusion_config = config.bert_config(fusion=True)
        self.fusion = nn.ModuleList(
            [BertLayer(fusion_config, layer_idx=j) for j in range(config.fusion_layers)])
        for layer in self.fusion:
            layer.attention.self.is_causal = False  # bidirectional text self-attention, never causal
            cross = layer.crossattention.self
            # HF projects keys/values from the text width; the official fusion reads image tokens at the
            # vision width (`encoder_width`), so rebuild them as Linear(vision width -> text width)
            cross.key = nn.Linear(config.vision_width, cross.all_head_size)
            cross.value = nn.Linear(config.vision_width, cross.all_head_size)
        self.stripe_pool = (nn.Linear(config.vision_stripes * config.vision_width, config.vision_width)
                            if config.vision_stripes else None)
        self.vision_proj = nn.Linear(config.vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))
        self.itm_head = build_mlp(config.text_width, 2) if config.has_itm_head else None
        self.bbox_head = build_mlp(config.text_width, 4) if config.has_bbox_head else None
        self.mlm_head = BertOnlyMLMHead(self._fusion_config) if config.has_mlm_head else None
        self.post_init()

    # ------------------------------------------------------------------ HF plumbing
    @property
    def _fusion_config(self):
        return self.fusion[0].attention.self.config

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            init.constant_(self.temp, float(self.config.temp))
        elif module is self.stripe_pool:  # zero: a fresh model pools exactly as without stripes
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif self.mlm_head is not None and module is self.mlm_head.predictions:
            init.zeros_(module.bias)

    def set_attn_implementation(self, attn_implementation: str | dict, **kwargs: Any) -> None:
        """Switch every attention (vision, text, fusion) between ``"eager"`` and ``"sdpa"``."""
        super().set_attn_implementation(attn_implementation, **kwargs)
        self._fusion_config._attn_implementation_internal = self.config._attn_implementation

    def set_layer_checkpointing(self, enabled: bool = True) -> None:
        """Gradient checkpointing of every BEiT, BERT and fusion layer (transformers' non-reentrant checkpointing):
        in training each layer keeps only its inputs and recomputes its activations in backward. Works with LoRA
        layers injected by peft; evaluation (``eval()`` or ``no_grad``) is unaffected."""
        if enabled:
            if hasattr(self, "activation_checkpointing_enable"):
                self.activation_checkpointing_enable({"use_reentrant": False})
            else:  # transformers < 5
                self.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(self, "activation_checkpointing_disable"):
            self.activation_checkpointing_disable()
        else:
            self.gradient_checkpointing_disable()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_encoder.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.text_encoder.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return None if self.mlm_head is None else self.mlm_head.predictions.decoder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, strict: bool = True,
                        **kwargs: Any) -> "X2VLMModel":
        """Load our own ``save_pretrained`` folder (safetensors). ``strict`` (default) turns any missing,
        unexpected or mismatched key into an error naming the keys, instead of a logged warning."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        problems = {k: sorted(map(str, v)) for k, v in info.items()
                    if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if strict and problems:
            raise ValueError(f"{pretrained_model_name_or_path}: the saved weights do not match the X2-VLM "
                             f"architecture in its config.json: {problems}")
        return (model, info) if want_info else model

    @classmethod
    def from_official(cls, path: str | os.PathLike | dict, text_num_attention_heads: int | None = None,
                      image_res: int | None = None, **kwargs: Any) -> "X2VLMModel":
        """Build a model whose config is read from an official checkpoint's tensor shapes, then load it strictly.

        See :func:`capret_utils.x2vlm.convert.model_from_official` for the keyword arguments.
        """
        return model_from_official(path, text_num_attention_heads=text_num_attention_heads, image_res=image_res,
                                   model_class=cls, **kwargs)

    # ------------------------------------------------------------------ encoders
    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        res = self.config.image_res
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (res, res):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; this model is built for {res}x{res} images "
                f"(config.image_res). Resize with X2VLMImageProcessor(image_res={res}) or build/load the model at "
                f"the images' resolution (from_official(..., image_res=...)); the relative-position tables are "
                f"resized once at load time, never silently at run time.")

    def get_image_embeds(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_embeds (B, 1+N, Dv), image_feat (B, E))`` as in the official code."""
        self._check_pixels(pixel_values)
        hidden = self.vision_encoder(pixel_values=pixel_values).last_hidden_state
        patches = self.vision_encoder.pooler.layernorm(hidden[:, 1:])  # fc_norm on every patch token
        pooled = patches.mean(dim=1, keepdim=True)
        if self.stripe_pool is not None:  # config.vision_stripes bands of rows, top to bottom
            b, _, d = patches.shape
            stripes = patches.reshape(b, self.config.vision_stripes, -1, d).mean(dim=2)
            pooled = pooled + self.stripe_pool(stripes.reshape(b, 1, -1))
        image_embeds = torch.cat([pooled, patches], dim=1)
        return image_embeds, self.get_image_feat(image_embeds)

    def get_image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``vision_proj`` of image token 0."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def get_text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states after the text-only layers, (B, L, Dt)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def get_text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``text_proj`` of the text [CLS] (position 0 of ``text_embeds``)."""
        return F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

    def get_fusion_embeds(self, text_embeds: torch.Tensor, text_attention_mask: torch.Tensor | None,
                          image_embeds: torch.Tensor, image_atts: torch.Tensor | None = None) -> torch.Tensor:
        """Run the fusion layers on ``text_embeds`` cross-attending to ``image_embeds`` (pairs row by row).

        ``image_atts`` (B, 1+N) masks image tokens (1 = attend); None attends to all of them (the official
        default).
        """
        if text_embeds.shape[0] != image_embeds.shape[0]:
            raise ValueError(f"fusion pairs text i with image i: got {text_embeds.shape[0]} texts and "
                             f"{image_embeds.shape[0]} images")
        config = self._fusion_config
        if text_attention_mask is None:
            text_attention_mask = torch.ones(text_embeds.shape[:2], dtype=torch.long, device=text_embeds.device)
        self_mask = create_bidirectional_mask(config=config, inputs_embeds=text_embeds,
                                              attention_mask=text_attention_mask)
        cross_mask = None
        if image_atts is not None:
            cross_mask = create_bidirectional_mask(config=config, inputs_embeds=text_embeds,
                                                   attention_mask=image_atts, encoder_hidden_states=image_embeds)
        hidden = text_embeds
        for layer in self.fusion:
            # positional hidden states / encoder states so that gradient checkpointing propagates gradients
            hidden = layer(hidden, self_mask, image_embeds, encoder_attention_mask=cross_mask)
        return hidden

    # ------------------------------------------------------------------ heads
    def _require(self, head: str) -> nn.Module:
        module = getattr(self, head)
        if module is None:
            raise ValueError(f"this X2-VLM model has no {head} (config.has_{head}=False); a retrieval "
                             f"checkpoint has no box or MLM head: load with add_heads=({head!r},) to train a new one")
        return module

    def itm_logits(self, fusion_embeds: torch.Tensor) -> torch.Tensor:
        """ITM logits of the fusion [CLS], (B, 2); column 1 = match."""
        return self._require("itm_head")(fusion_embeds[:, 0, :])

    def predict_bbox(self, fusion_embeds: torch.Tensor) -> torch.Tensor:
        """Box of the fusion [CLS] as sigmoid (cx, cy, w, h) in [0, 1], (B, 4)."""
        return self._require("bbox_head")(fusion_embeds[:, 0, :]).sigmoid()

    def mlm_logits(self, fusion_embeds: torch.Tensor) -> torch.Tensor:
        """MLM logits (B, L, vocab) of the multimodal hidden states."""
        return self._require("mlm_head")(fusion_embeds)

    def itc_logits(self, image_feat: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        """``image_feat @ text_feat.T / temp`` (rows = images, columns = texts)."""
        return image_feat @ text_feat.t() / self.temp

    @torch.no_grad()
    def clamp_temp_(self, low: float = TEMP_MIN, high: float = TEMP_MAX) -> float:
        """Clamp ``temp`` in place to [0.001, 0.5] (the official step before every training step)."""
        self.temp.clamp_(low, high)
        return float(self.temp)

    # ------------------------------------------------------------------ forward
    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_atts: torch.Tensor | None = None,
                fuse: bool | None = None, return_mlm: bool = False) -> X2VLMOutput:
        """Image and/or text pass. With both, pairs row i with row i through the fusion layers (``fuse`` None:
        when the batch sizes match) and returns ITM logits, boxes and the ITC logit matrix."""
        out = X2VLMOutput()
        if pixel_values is not None:
            out.image_embeds, out.image_feat = self.get_image_embeds(pixel_values)
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            out.text_embeds = self.get_text_embeds(input_ids, attention_mask)
            out.text_feat = self.get_text_feat(out.text_embeds)
        if out.image_feat is not None and out.text_feat is not None:
            out.itc_logits = self.itc_logits(out.image_feat, out.text_feat)
            same = out.image_embeds.shape[0] == out.text_embeds.shape[0]
            if fuse is None:
                fuse = same
            if fuse:
                out.fusion_embeds = self.get_fusion_embeds(out.text_embeds, attention_mask, out.image_embeds,
                                                           image_atts)
                if self.itm_head is not None:
                    out.itm_logits = self.itm_logits(out.fusion_embeds)
                if self.bbox_head is not None:
                    out.bbox = self.predict_bbox(out.fusion_embeds)
                if return_mlm:
                    out.mlm_logits = self.mlm_logits(out.fusion_embeds)
        elif fuse:
            raise ValueError("fuse=True needs both pixel_values and input_ids")
        return out


def build_model(name: str, **overrides: Any) -> X2VLMModel:
    """A randomly initialised X2-VLM of a registered preset (:data:`~capret_utils.x2vlm.config.PRESETS`), e.g.
    ``build_model("demo")`` or ``build_model("base", image_res=384)``; pre-trained weights come from
    :meth:`X2VLMModel.from_official` or ``from_pretrained``."""
    return X2VLMModel(X2VLMConfig.preset(name, **overrides))


def register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModel`` load saved X2-VLM folders (``model_type`` "x2vlm")."""
    AutoConfig.register(X2VLMConfig.model_type, X2VLMConfig, exist_ok=True)
    AutoModel.register(X2VLMConfig, X2VLMModel, exist_ok=True)
