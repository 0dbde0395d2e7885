"""Building what training starts from: the tokenizer, the X2-VLM model (preset, hub folder or official checkpoint),
the training dataset and sampler labels (:func:`prepare` -> :class:`TrainSetup`), and the notebook's split loading."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from capret_utils.captions.template import item_texts
from capret_utils.common import resolve_device
from capret_utils.data import loader as D
from capret_utils.data.df2 import CATEGORY_NAMES
from capret_utils.evaluation import embed as E
from capret_utils.train.checkpoint import load_finetuned
from capret_utils.train.config import (
    INFO_FILE,
    RANDOM_INIT_PRESETS,
    TrainConfig,
)
from capret_utils.x2vlm import (
    BERT_SPECIAL_IDS,
    COMPACT_SPECIAL_IDS,
    PRESETS,
    X2VLMConfig,
    X2VLMImageProcessor,
    X2VLMModel,
    X2VLMTokenizer,
    build_wordpiece_tokenizer,
    check_tokenizer,
    fashion_caption_corpus,
)
from capret_utils.x2vlm.processing import ImageSettings

# ------------------------------------------------------------------------------------------ model building


def tokenizer_corpus(texts: Sequence[str]) -> list[str]:
    """What the offline WordPiece vocabulary of ``tiny`` / ``demo`` is trained on: the fashion caption corpus,
    the DeepFashion2 category names and the training texts."""
    return fashion_caption_corpus() + list(CATEGORY_NAMES.values()) + [str(t) for t in texts]


def build_tokenizer(config: TrainConfig, texts: Sequence[str], vocab_size: int,
                    special_ids: Mapping[str, int] | None = None) -> X2VLMTokenizer:
    """The tokenizer for ``config.tokenizer`` (see :class:`TrainConfig`)."""
    name = config.tokenizer or ("build" if config.model in RANDOM_INIT_PRESETS else "bert-base-uncased")
    if name == "build":
        return build_wordpiece_tokenizer(tokenizer_corpus(texts), vocab_size,
                                         special_ids=special_ids or COMPACT_SPECIAL_IDS)
    try:
        return X2VLMTokenizer.from_pretrained(name)
    except OSError as err:
        raise OSError(f"cannot load the tokenizer {name!r} ({err}); X2-VLM checkpoints use bert-base-uncased: "
                      f"connect to the Hugging Face hub once, pass a local folder with vocab.txt, or set "
                      f"tokenizer='build' to train a WordPiece vocabulary (random-weight models only)") from err


def model_config(config: TrainConfig, vocab_size: int | None = None) -> X2VLMConfig:
    """The architecture of a preset model (``tiny`` / ``demo`` / ``base`` / ``large``, from the one registry
    :data:`capret_utils.x2vlm.PRESETS`); ``base`` / ``large`` default to the retrieval resolution, 384 px."""
    if config.model not in PRESETS:
        raise ValueError(f"{config.model!r} is not a preset ({', '.join(PRESETS)})")
    overrides: dict[str, Any] = {}
    if config.image_res:
        overrides["image_res"] = config.image_res
    elif config.model not in RANDOM_INIT_PRESETS:
        overrides["image_res"] = 384  # retrieval fine-tuning resolution (docs/x2vlm.md §6)
    return X2VLMConfig.preset(config.model, **overrides)


def build_model(config: TrainConfig, texts: Sequence[str]) -> tuple[X2VLMModel, X2VLMTokenizer, dict[str, Any]]:
    """Model + tokenizer for ``config.model``; random presets are initialised from ``config.seed``."""
    source: dict[str, Any] = {"model": config.model}
    path = Path(config.model).expanduser()
    if config.model in PRESETS:
        torch.manual_seed(config.seed)
        mcfg = model_config(config)
        special = COMPACT_SPECIAL_IDS if config.model == "demo" else BERT_SPECIAL_IDS
        tokenizer = build_tokenizer(config, texts, mcfg.vocab_size, special)
        check_tokenizer(mcfg, tokenizer)
        model = X2VLMModel(mcfg)
        source["init"] = f"random (seed {config.seed})"
    elif path.is_dir() and (path / INFO_FILE).is_file():
        bundle = load_finetuned(path, device="cpu")
        model, tokenizer = bundle.model, bundle.tokenizer
        source["init"] = f"capret checkpoint {path}"
    elif path.is_dir() and (path / "config.json").is_file():
        model = X2VLMModel.from_pretrained(path)
        tokenizer = build_tokenizer(config, texts, model.config.vocab_size)
        source["init"] = f"save_pretrained folder {path}"
    elif path.is_file():
        from capret_utils.x2vlm.convert import read_official_checkpoint

        state, _, _ = read_official_checkpoint(path)
        missing_heads = tuple(h for h in ("itm_head", "bbox_head")
                              if not any(k.startswith(h + ".") for k in state))
        model = X2VLMModel.from_official(state, image_res=config.image_res or 384, add_heads=missing_heads)
        tokenizer = build_tokenizer(config, texts, model.config.vocab_size)
        source["init"] = f"official checkpoint {path}" + (f" (new heads: {list(missing_heads)})"
                                                          if missing_heads else "")
    else:
        raise FileNotFoundError(f"model={config.model!r} is neither a preset (tiny, demo, base, large) nor an "
                                f"existing checkpoint file or folder")
    check_tokenizer(model.config, tokenizer)
    model.set_attn_implementation("sdpa")
    return model, tokenizer, source


# ------------------------------------------------------------------------------------------ setup


@dataclass
class TrainSetup:
    """What :func:`prepare` builds: the bundle (model, tokenizer, processor), the data and the label space."""

    config: TrainConfig
    bundle: E.ModelBundle
    train_items: pd.DataFrame
    texts: list[str]
    classes: list[str]
    labels: np.ndarray
    dataset: D.ItemDataset
    data_config: D.DataConfig
    source: dict[str, Any] = field(default_factory=dict)


def prepare(config: TrainConfig, train_items: pd.DataFrame, captions: Mapping[str, str] | None = None,
            ) -> TrainSetup:
    """Build the (seeded) initial model, tokenizer, processor, texts, identity classes and the dataset.

    Identity classes are the ``(pair_id, style > 0)`` pairs of the training items; style-0 items have no
    identity (DeepFashion2 never pairs them), so they are not sampled for training (queries never contain them;
    as gallery distractors they are still scored at evaluation).
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    texts = item_texts(train_items, config.use_captions, captions)
    model, tokenizer, source = build_model(config, texts)
    image_res = int(model.config.image_res)
    dcfg = config.data_config(image_res)
    processor = D.build_processor(dcfg)
    classes = D.identity_classes(train_items)
    labels = D.identity_labels(train_items, classes)
    store = D.ImageStore(dcfg.store_side, dcfg.cache_mb, dcfg.draft, dcfg.bad_images)
    dataset = D.ItemDataset(train_items, texts, labels, dcfg, store=store, processor=processor,
                            text_group=D.text_ids(texts, tokenizer))
    device = resolve_device(config.device)
    model.to(device)
    info = {"context": config.context, "tta_contexts": list(config.tta_contexts), "cache_side": dcfg.store_side,
            "use_captions": config.use_captions,
            "view": dcfg.view, "image_res": image_res, "bad_images": config.bad_images}
    bundle = E.ModelBundle(model=model, tokenizer=tokenizer, processor=X2VLMImageProcessor(
        ImageSettings(image_res=image_res)), info=info)
    return TrainSetup(config, bundle, train_items.reset_index(drop=True), texts, classes, labels, dataset, dcfg,
                      source)


# ------------------------------------------------------------------------------------------ notebook helpers


def caption_texts(config: TrainConfig, root: str | os.PathLike, run_dir: str | os.PathLike,
                  captions_path: str = "", progress: bool = True) -> dict[str, str] | None:
    """The caption store for ``use_captions="dialogue"``: ``captions_path`` (notebook 02's ``captions.jsonl``),
    or, when empty, dialogue captions generated here with notebook 02's offline captioner (scripted questions
    answered from the benchmark's ``attributes.jsonl``) into ``<run_dir>/captions.jsonl``. None otherwise."""
    if config.use_captions != "dialogue":
        return None
    from capret_utils import captions

    if captions_path:
        return captions.load_captions(captions_path)
    root = Path(root)
    splits = [s for s in ("train", "validation") if (root / s).is_dir()]
    items = captions.load_split_items(root, splits)
    attributes = captions.load_attributes([root / s for s in splits])
    if not attributes:
        raise FileNotFoundError(f"use_captions='dialogue' without captions_path needs the synthetic benchmark's "
                                f"attributes.jsonl under {root}; run notebooks/02_captions.ipynb and pass its "
                                f"captions.jsonl as captions_path")
    captioner = captions.build_captioner(captions.CaptionSetup(captioner="dialogue"), attributes)
    store = captions.CaptionStore(Path(run_dir) / captions.CAPTIONS_FILE)
    captions.run_captioning(items, store, captioner, batch_size=256, progress=progress)
    return captions.load_captions(store.path)


