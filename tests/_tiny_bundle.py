"""A fresh tiny X2-VLM bundle (seeded random weights, offline WordPiece vocabulary) for the embedding tests."""

from __future__ import annotations

import torch

from capret_utils.evaluation import embed as E
from capret_utils.x2vlm import (
    BERT_SPECIAL_IDS,
    ImageSettings,
    X2VLMConfig,
    X2VLMImageProcessor,
    X2VLMModel,
    build_wordpiece_tokenizer,
    fashion_caption_corpus,
)


def make_tiny_bundle(seed: int = 0) -> E.ModelBundle:
    """The ``tiny`` preset in eval mode, crops with 10 % context, views shrunk to 64 px."""
    torch.manual_seed(seed)
    config = X2VLMConfig.preset("tiny")
    model = X2VLMModel(config).eval()
    tok = build_wordpiece_tokenizer(fashion_caption_corpus(), config.vocab_size, special_ids=BERT_SPECIAL_IDS)
    proc = X2VLMImageProcessor(ImageSettings(image_res=config.image_res))
    return E.ModelBundle(model, tok, proc, {"context": 0.1, "cache_side": 64})
