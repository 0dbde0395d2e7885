"""X2-VLM configuration: one flat ``PreTrainedConfig`` with the ``base``, ``large`` and ``tiny`` presets.

The config owns every architecture number (vision tower, text + fusion stack, heads, special-token ids) and
derives the Hugging Face sub-configs the model is built from (``BeitConfig`` for the vision tower, two
``BertConfig`` objects for the text-only layers and the fusion layers). Vision width and text width are
independent: the fusion cross-attention maps image tokens (vision width) to the text width.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import BeitConfig, BertConfig, PreTrainedConfig

# CLIP statistics (the official evaluation transform normalises with these, not BEiT's 0.5 / 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

VISION_STEMS = ("patch", "conv", "cnn")
PRESETS: dict[str, dict[str, Any]] = {
    # BEiT-v2 ViT-B/16 + bert-base (12 text + 6 fusion layers); pre-trained at 224, retrieval at 384
    "base": dict(
        vision_width=768, vision_layers=12, vision_heads=12, vision_mlp=3072, patch_size=16, image_res=224,
        text_width=768, text_heads=12, text_ffn=3072, text_layers=12, fusion_layers=6,
        vocab_size=30522, max_position_embeddings=512, embed_dim=256,
    ),
    # BEiT-v2 ViT-L/16 + bert-large widths (12 text + 6 fusion layers)
    "large": dict(
        vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp=4096, patch_size=16, image_res=224,
        text_width=1024, text_heads=16, text_ffn=4096, text_layers=12, fusion_layers=6,
        vocab_size=30522, max_position_embeddings=512, embed_dim=256,
    ),
    # the official-format test fixture (../shared/data/x2vlm/tiny_public): 32 px, 4 patches, vocab 120
    "tiny": dict(
        vision_width=48, vision_layers=2, vision_heads=4, vision_mlp=192, patch_size=16, image_res=32,
        text_width=48, text_heads=4, text_ffn=96, text_layers=2, fusion_layers=2,
        vocab_size=120, max_position_embeddings=40, embed_dim=16,
    ),
    # the embedded demo: small enough to learn the synthetic benchmark from random weights on 2 CPU cores in
    # minutes (64 px crops, a convolutional stem onto a 4 x 4 token grid, 4 + 2 + 2 layers of width 128, no
    # dropout, a 512-entry WordPiece vocabulary with the compact special ids 0-4)
    "demo": dict(
        vision_width=128, vision_layers=4, vision_heads=4, vision_mlp=512, patch_size=16, image_res=64,
        text_width=128, text_heads=4, text_ffn=512, text_layers=2, fusion_layers=2, vocab_size=512,
        max_position_embeddings=64, embed_dim=128, vision_drop_path_rate=0.0, vision_stem="conv",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        pad_token_id=0, unk_token_id=1, cls_token_id=2, sep_token_id=3, mask_token_id=4,
    ),
}
"""The one registry of X2-VLM architectures, by name (:meth:`X2VLMConfig.preset`, :func:`~capret_utils.x2vlm.build_model`)."""
RANDOM_INIT_PRESETS = ("tiny", "demo")
"""Presets that exist offline only with random weights (no official checkpoint): trained from scratch."""


class X2VLMConfig(PreTrainedConfig):
    """Architecture of an X2-VLM model (vision tower, text-only BERT layers, fusion layers, heads).

    Build one with :meth:`preset` (``"base"``, ``"large"``, ``"tiny"``) or with any sizes, e.g. a small demo
    model ``X2VLMConfig(vision_width=96, text_width=128, image_res=64, ...)``. Special-token ids must agree with
    the tokenizer (:func:`capret_utils.x2vlm.check_tokenizer`).
    """

    model_type: ClassVar[str] = "x2vlm"

    # vision tower (BEiT-v2: per-block relative position bias, layer scale, q/v bias, mean-pooled fc_norm)
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    patch_size: int = 16
    image_res: int = 224
    num_channels: int = 3
    vision_layer_norm_eps: float = 1e-6
    layer_scale_init_value: float = 0.1
    vision_drop_path_rate: float = 0.1
    # "patch": one Conv2d with kernel = stride = patch_size (BEiT / X2-VLM, every official checkpoint);
    # "conv": a convolutional stem of log2(patch_size) stride-2 3x3 convolutions (BatchNorm + GELU between them)
    # giving the same token grid (Xiao et al. 2021, "Early convolutions help transformers see better"): for
    # small randomly initialised models, which a linear patch embedding leaves slow to learn colour and texture;
    # "cnn": a hybrid ViT (Dosovitskiy et al. 2021, section 3.1): a small CNN (3x3 conv + BatchNorm + ReLU +
    # 2x2 max-pool blocks) whose last feature map is the same token grid; learns fastest from random weights
    vision_stem: str = "patch"
    # learned absolute position embeddings added to the tokens after the stem (zero-initialised, so a fresh model
    # computes what it would without them); the official BEiT-v2 tower has only relative position bias (False)
    vision_abs_pos: bool = False
    # horizontal stripes (PCB part pooling, Sun et al. 2018): the mean token of each of this many bands of
    # grid rows, through a zero-initialised Linear(stripes x vision_width -> vision_width), is added to the
    # pooled image token, so the image feature can tell where along the height something is (a logo high or
    # low); 0 = off, as in every official checkpoint; must divide the grid (image_res / patch_size)
    vision_stripes: int = 0
    # text-only BERT layers and fusion layers (self-attention -> cross-attention to image tokens -> FFN)
    text_width: int = 768
    text_heads: int = 12
    text_ffn: int = 3072
    text_layers: int = 12
    fusion_layers: int = 6
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    text_layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    pad_token_id: int | None = 0
    unk_token_id: int | None = 100
    cls_token_id: int | None = 101
    sep_token_id: int | None = 102
    mask_token_id: int | None = 103
    # heads
    embed_dim: int = 256
    temp: float = 0.07
    has_itm_head: bool = True
    has_bbox_head: bool = True
    has_mlm_head: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self) -> None:
        """Raise a ``ValueError`` naming the field when the numbers cannot build a model."""
        checks = [
            (self.vision_width % self.vision_heads == 0,
             f"vision_width {self.vision_width} is not divisible by vision_heads {self.vision_heads}"),
            (self.text_width % self.text_heads == 0,
             f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}"),
            (self.image_res % self.patch_size == 0,
             f"image_res {self.image_res} is not a multiple of patch_size {self.patch_size}"),
            (self.vision_layers >= 1 and self.text_layers >= 1 and self.fusion_layers >= 1,
             "vision_layers, text_layers and fusion_layers must each be >= 1"),
            (self.vision_stem in VISION_STEMS, f"vision_stem must be one of {VISION_STEMS}, got {self.vision_stem!r}"),
            (self.vision_stem == "patch" or (self.patch_size >= 2 and self.patch_size & (self.patch_size - 1) == 0),
             f"vision_stem {self.vision_stem!r} needs a power-of-two patch_size >= 2, got {self.patch_size}"),
            (self.vision_stripes >= 0 and (self.vision_stripes == 0 or self.grid_size % self.vision_stripes == 0),
             f"vision_stripes {self.vision_stripes} must be 0 or divide the {self.grid_size}-row token grid"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"X2VLMConfig: {message}")
        for name in ("pad_token_id", "unk_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"X2VLMConfig: {name}={value} is outside the vocabulary (vocab_size "
                                 f"{self.vocab_size})")

    # ------------------------------------------------------------------ presets and derived numbers
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "X2VLMConfig":
        """A registered preset (``base``, ``large``, ``tiny``, ``demo``: :data:`PRESETS`) with optional overrides
        (e.g. ``image_res=384``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown X2-VLM preset {name!r}; choose one of {sorted(PRESETS)}")
        values = dict(PRESETS[name])
        values.update(overrides)
        return cls(**values)

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_res // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        """Length of ``image_embeds``: pooled token 0 + one token per patch."""
        return 1 + self.grid_size**2

    @property
    def rel_pos_table_rows(self) -> int:
        """Rows of each block's relative-position-bias table: (2S-1)^2 + 3."""
        return (2 * self.grid_size - 1) ** 2 + 3

    # ------------------------------------------------------------------ HF sub-configs
    def beit_config(self) -> BeitConfig:
        """The ``BeitConfig`` of the vision tower (own rel-pos table in every block; absolute positions only with
        ``vision_abs_pos``)."""
        return BeitConfig(
            image_size=self.image_res, patch_size=self.patch_size, num_channels=self.num_channels,
            hidden_size=self.vision_width, num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads, intermediate_size=self.vision_mlp, hidden_act="gelu",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=self.vision_layer_norm_eps,
            use_absolute_position_embeddings=self.vision_abs_pos, use_relative_position_bias=True,
            use_shared_relative_position_bias=False, layer_scale_init_value=self.layer_scale_init_value,
            drop_path_rate=self.vision_drop_path_rate, use_mean_pooling=True, use_mask_token=False,
            initializer_range=self.initializer_range, attn_implementation=self._attn_implementation,
        )

    def bert_config(self, fusion: bool = False) -> BertConfig:
        """``BertConfig`` of the text-only layers, or (``fusion=True``) of the cross-attention fusion layers."""
        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.text_width,
            num_hidden_layers=self.fusion_layers if fusion else self.text_layers,
            num_attention_heads=self.text_heads, intermediate_size=self.text_ffn, hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.text_layer_norm_eps, pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
            # HF BertLayer only builds cross-attention for decoders; capret never relies on causal masking:
            # the fusion layers get explicit bidirectional masks and their is_causal flags are cleared.
            is_decoder=fusion, add_cross_attention=fusion, use_cache=False,
            tie_word_embeddings=False, attn_implementation=self._attn_implementation,
        )

    def describe(self) -> str:
        """One line with the sizes, for logs and reports."""
        return (f"X2-VLM vision {self.vision_width}w/{self.vision_layers}L/{self.vision_heads}h patch "
                f"{self.patch_size} @ {self.image_res}px; text {self.text_width}w/{self.text_heads}h "
                f"{self.text_layers}+{self.fusion_layers} layers, vocab {self.vocab_size}; embed {self.embed_dim}; "
                f"heads itm={self.has_itm_head} bbox={self.has_bbox_head} mlm={self.has_mlm_head}")
