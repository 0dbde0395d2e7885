"""Fine-tuning X2-VLM for consumer-to-shop retrieval: one ``finetune`` call, resumable, evaluated as it goes.

What the notebook calls (``notebooks/03_finetune.ipynb``)::

    cfg = TrainConfig(model="demo", use_captions="dialogue", margin=0.15, ...)
    setup = prepare(cfg, train_items, captions=caps)           # model + tokenizer + data, seeded
    zero = evaluate(setup.bundle, val_items, cfg)               # zero-shot metrics of the same initial model
    result = finetune(setup, run_dir, val_items=val_items)      # trains, evaluates every N steps, checkpoints
    bundle = load_finetuned(run_dir / "checkpoint")             # what notebook 04 loads

Training (``finetune``): LoRA via peft (``finetune_mode="lora"``; the default for ``base`` / ``large`` / official
checkpoints) or full fine-tuning (``"full"``; the default of the randomly initialised ``demo`` / ``tiny`` presets,
which have no pre-trained features for adapters to steer); losses from :mod:`capret_utils.losses` with one
weight each (ITC, ITM, box, ArcFace over the identities and a second ArcFace over the 13 garment categories on
the same retrieval embedding, ``w_category``, trained on colour-scrambled copies of the crops,
``category_recolour``); AdamW with parameter groups (backbone, heads at
``lr * head_lr_mult``, ArcFace class weights at ``lr_arcface``; no weight decay on biases, norms and the
temperature); linear warm-up then cosine or linear decay; bf16 autocast on CUDA; gradient accumulation; gradient
clipping; a NaN/inf guard that stops naming the step and the loss terms; the ITC temperature clamped to
[0.001, 0.5] after every step; tqdm progress.

Checkpoints (``<run_dir>/train_state/step-NNNNNN/``, written to a temporary folder and renamed, then
``latest.json`` is replaced atomically): the trainable weights (LoRA adapters + heads, or every weight), the
ArcFace class weights (identities and categories), optimizer, scheduler, RNG states (python, numpy, torch, CUDA,
the generator of the ITM negatives and the recoloured views), the P×K sampler position and the history so far.
``resume=True`` continues from the latest one; on CPU with a fixed seed a killed and resumed run ends with the same weights and metrics as an
uninterrupted one (``tests/test_train.py`` kills a real subprocess). History: ``history.csv`` /
``history.json`` in the run folder.

The final model goes to ``<run_dir>/checkpoint/``: the merged X2-VLM (``save_pretrained``, safetensors), the
tokenizer, the image-processor settings, the ArcFace class weights and ``finetune_info.json`` (config,
identity classes, crop context, metrics); :func:`load_finetuned` rebuilds the :class:`~capret_utils.embed.ModelBundle`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from capret_utils import data as D
from capret_utils import embed as E
from capret_utils import losses as L
from capret_utils.df2 import CATEGORY_NAMES
from capret_utils.runs import atomic_path, write_json
from capret_utils.x2vlm import (
    BERT_SPECIAL_IDS,
    COMPACT_SPECIAL_IDS,
    LoraSettings,
    X2VLMConfig,
    X2VLMImageProcessor,
    X2VLMModel,
    X2VLMTokenizer,
    apply_lora,
    build_wordpiece_tokenizer,
    check_tokenizer,
    fashion_caption_corpus,
    merge_lora,
    trainable_parameters,
)
from capret_utils.x2vlm.processing import ImageSettings

DEMO_PRESET: dict[str, Any] = dict(
    vision_width=128, vision_layers=4, vision_heads=4, vision_mlp=512, patch_size=16, image_res=64,
    text_width=128, text_heads=4, text_ffn=512, text_layers=2, fusion_layers=2, vocab_size=512,
    max_position_embeddings=64, embed_dim=128, vision_drop_path_rate=0.0, vision_stem="conv",
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
"""The ``demo`` model: small enough to learn the synthetic benchmark from random weights on 2 CPU cores in minutes
(64 px item crops, a convolutional stem onto a 4 x 4 token grid, 4 + 2 + 2 layers of width 128, no dropout, a
512-entry WordPiece vocabulary)."""
RANDOM_INIT_PRESETS = ("tiny", "demo")
HEAD_NAMES = ("vision_proj", "text_proj", "itm_head", "bbox_head")
STATE_DIR = "train_state"
CHECKPOINT_DIR = "checkpoint"
INFO_FILE = "finetune_info.json"
ARCFACE_FILE = "arcface.safetensors"
HISTORY_CSV, HISTORY_JSON = "history.csv", "history.json"
EVAL_KS = (1, 5, 10, 15, 20)
HEADLINE = ("top1", "top5", "top10", "top20", "mAP")
_CONFIG_VOLATILE = ("transformers_version", "name_or_path", "dtype", "torch_dtype", "output_attentions",
                    "output_hidden_states", "return_dict", "use_cache")
# fields that may change between a killed run and its resume without changing the trajectory
_RESUME_FREE = ("resume", "num_workers", "eval_every", "ckpt_every", "keep_checkpoints", "progress", "device",
                "eval_image_level", "threads")


@dataclass
class TrainConfig:
    """Everything ``finetune`` needs; the notebook's parameters map onto these fields one to one."""

    # model
    model: str = "demo"  # "tiny" | "demo" | "base" | "large" | official checkpoint file | our checkpoint folder
    image_res: int = 0  # input side in pixels; 0 = the model's default (demo 64, tiny 32, base/large 384)
    tokenizer: str = ""  # "" = auto (built WordPiece for tiny/demo, bert-base-uncased otherwise) | "build" | name/path
    finetune_mode: str = "auto"  # "auto" (full for random-init tiny/demo, lora otherwise) | "lora" | "full"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # data
    use_captions: str = "dialogue"  # text per item: "none" (category name) | "template" | "dialogue"
    use_boxes: bool = True  # item crops (+ box loss) vs whole photos (no box loss)
    # crop margin per side, fraction of the box width / height. Less context fine-tunes the demo better but lets the
    # random-weight model match more boxes by colour alone (zero-shot hit@1 0.057 / 0.071 / 0.124 at 0.1 / 0.05 / 0;
    # fine-tuned, with erasing and the category term, 960 steps, seeds 0 / 1: 0.868 / 0.862 at 0.1, 0.883 / 0.887
    # at 0.05, 2026-11-25). 0.05 keeps the zero-shot under the benchmark's 0.10 ceiling
    context: float = 0.05
    batch_size: int = 64  # items per step = identities per batch x per_identity
    # K of the P x K sampler. 1 (every item of a batch a different identity) trains the demo's retrieval embedding
    # better than 2 (val hit@1 0.776 / 0.765 vs 0.738 / 0.734 with seeds 0 / 1, 720 steps, 2026-11-25); K >= 2 puts
    # positives in each batch (soft ITC targets)
    per_identity: int = 1
    box_fraction: float = 0.25  # share of each batch that also trains the box head on the whole photo
    # share of each batch (its first rows) whose ITM pairs (1 positive + 2 hard negatives) go through the fusion
    # encoder; negatives are still drawn from the whole batch. 0 = auto: 0.25 for the random-init demo / tiny
    # presets (the CPU budget: ITM on every row cost ~0.2 s of a ~0.85 s demo step), 1 (official) otherwise
    itm_fraction: float = 0.0
    # random resized crop area range (training augmentation). (0.9, 1) beats (0.6, 1) on the demo (val hit@1
    # 0.795 / 0.803 vs 0.776 / 0.765 with seeds 0 / 1, 2026-11-25): cutting 40 % of an item removes the shape that
    # tells shorts from a skirt or a long sleeve from a short one; (1, 1) overfits the training identities
    crop_scale: tuple[float, float] = (0.9, 1.0)
    # aspect jitter relative to the crop's own shape (True) or absolute 3:4..4:3 as in the official whole-photo
    # recipe (False: cuts elongated items, e.g. trousers, to a band)
    crop_ratio_relative: bool = True
    # random erasing: share of training views with one rectangle (2-25 % of the area) painted a random flat colour,
    # like the occluders of shopper photos. 0.5 vs 0 on the demo, 720 steps: val hit@1 0.839 / 0.839 vs 0.795 /
    # 0.803 (seeds 0 / 1, 2026-11-25)
    erase_prob: float = 0.5
    # losses
    margin: float = 0.15  # ArcFace angular margin, radians
    scale: float = 30.0  # ArcFace logit scale
    w_itc: float = 1.0
    w_itm: float = 1.0
    w_box: float = 1.0
    w_arcface: float = 1.0
    w_arcface_fused: float = 0.0  # ArcFace on text_proj(fusion [CLS]) of the ITM positives (cross-fusion embed)
    # ArcFace over the 13 garment categories on the retrieval embedding (same margin / scale). On the demo, 960
    # steps, 1 thread (2026-11-25): context 0.05, seeds 0 / 1: val hit@1 0.883 / 0.887 vs 0.822 / 0.824 without;
    # context 0.1, seeds 0 / 1 / 2: 0.868 / 0.862 / 0.872 vs 0.847 / 0.845 / 0.826. 3 is too strong (0.769)
    w_category: float = 1.0
    # additive angular margin of the category ArcFace, radians (the identity ArcFace keeps ``margin``). On the demo,
    # 960 steps, 1 thread, seed 0 (2026-12-02): 0 / 0.15 / 0.5 gave val hit@1 0.889 / 0.876 / 0.809. With 13 classes
    # and every item labelled, a margin pulls each category into a tight cone that crowds out colour and pattern
    category_margin: float = 0.0
    # the category term trains on colour-scrambled copies (``data.recolour``: hue rotation, channel order, inversion)
    # of the first N crops of each batch (all of them when N >= batch_size); 0 = on the crops as they are.
    # Categories do not depend on colour, so this stops the term from learning a training garment's category from
    # its colour and pattern (on the plain crops the category head recognised 0.49 of the demo's validation user
    # crops, with N = 64 and "both" 0.65). Demo, 960 steps, 1 thread, seeds 0 / 1 / 2 (2026-12-03), val hit@1:
    # "recoloured" N = 64 0.901 / 0.899, "both" N = 64 0.901 / 0.893 / 0.885, N = 32 0.897 / 0.885,
    # off 0.889 / 0.891 / 0.870. Costs a second vision pass (~+30 % step time at N = 64)
    category_recolour: int = 64
    # "recoloured": the category term on the recoloured copies only; "both": the mean of the term on the crops and
    # on their copies
    category_views: str = "recoloured"
    # optimisation
    lr: float = 2e-3
    lr_arcface: float = 1e-2  # ArcFace class weights
    head_lr_mult: float = 2.0  # projections / ITM / box heads (official lr_mult 2)
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of the optimizer steps
    schedule: str = "cosine"  # "cosine" | "linear" decay after warm-up
    # passes over the train identities (one pass = identities // P batches; demo: 5 steps, so 960 steps). With random
    # erasing the demo keeps learning past 720 steps (val hit@1 0.857 vs 0.839 at 960 / 720 steps, 2026-11-25)
    epochs: int = 192
    max_steps: int = 0  # optimizer steps; > 0 overrides epochs
    grad_accum: int = 1
    clip_grad: float = 1.0  # max gradient norm; 0 = off
    # runtime
    seed: int = 0
    device: str = "auto"  # "auto" (cuda if available) | "cpu" | "cuda"
    bf16: bool = True  # bf16 autocast on CUDA (CPU always runs float32)
    num_workers: int = 0  # DataLoader workers (0 = in the main process, deterministic and fine on CPU)
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    # torch.use_deterministic_algorithms while training on CPU: repeated runs at one thread count are bitwise
    # identical (without it, two 2-thread runs of the demo drifted apart in the 6th digit of the loss within 5
    # steps; another thread count changes the sums); CUDA: untouched
    deterministic: bool = True
    eval_every: int = 0  # optimizer steps between validation evaluations; 0 = only at the end
    eval_image_level: bool = False  # also evaluate image-level retrieval
    ckpt_every: int = 100  # optimizer steps between training checkpoints (and always at the end)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from <run_dir>/train_state/latest.json when present
    progress: bool = True

    def validate(self) -> None:
        if self.finetune_mode not in ("auto", "lora", "full"):
            raise ValueError(f"finetune_mode must be auto | lora | full, got {self.finetune_mode!r}")
        if self.use_captions not in D.CAPTION_MODES:
            raise ValueError(f"use_captions must be one of {D.CAPTION_MODES}, got {self.use_captions!r}")
        if self.schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be cosine | linear, got {self.schedule!r}")
        if self.batch_size % self.per_identity or self.batch_size // self.per_identity < 2:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of per_identity {self.per_identity} "
                             f"holding at least 2 identities")
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("set epochs >= 1 or max_steps >= 1")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 < self.box_fraction <= 1:
            raise ValueError(f"box_fraction must be in (0, 1], got {self.box_fraction}")
        if not 0 <= self.itm_fraction <= 1:
            raise ValueError(f"itm_fraction must be in [0, 1] (0 = auto), got {self.itm_fraction}")
        if not 0 <= self.category_margin < math.pi / 2:
            raise ValueError(f"category_margin is in radians and must lie in [0, pi/2), got {self.category_margin}")
        if self.category_views not in ("recoloured", "both"):
            raise ValueError(f"category_views must be recoloured | both, got {self.category_views!r}")
        if self.category_recolour < 0:
            raise ValueError(f"category_recolour counts crops of a batch (0 = off), got {self.category_recolour}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"erase_prob must be in [0, 1], got {self.erase_prob}")
        if self.lr <= 0 or self.lr_arcface <= 0:
            raise ValueError("learning rates must be > 0")
        self.weights().validate()

    def weights(self) -> L.LossWeights:
        return L.LossWeights(itc=self.w_itc, itm=self.w_itm, box=self.w_box if self.use_boxes else 0.0,
                             arcface=self.w_arcface, arcface_fused=self.w_arcface_fused if self.w_itm else 0.0,
                             category=self.w_category)

    @property
    def itm_share(self) -> float:
        """``itm_fraction`` with 0 (auto) resolved."""
        if self.itm_fraction:
            return self.itm_fraction
        return 0.25 if self.model in RANDOM_INIT_PRESETS else 1.0

    @property
    def mode(self) -> str:
        if self.finetune_mode != "auto":
            return self.finetune_mode
        return "full" if self.model in RANDOM_INIT_PRESETS else "lora"

    def data_config(self, image_res: int) -> D.DataConfig:
        return D.DataConfig(image_res=image_res, view="crop" if self.use_boxes else "image", context=self.context,
                            use_captions=self.use_captions, box_task=bool(self.use_boxes and self.w_box),
                            box_per_batch=leading_rows(self.batch_size, self.box_fraction),
                            crop_scale=tuple(self.crop_scale), crop_ratio_relative=self.crop_ratio_relative,
                            erase_prob=self.erase_prob, identities_per_batch=self.batch_size // self.per_identity,
                            per_identity=self.per_identity)

    def trajectory_digest(self, model_config: Any = None) -> str:
        """Hash of the fields that determine the training trajectory (checked on resume), and of the model's
        architecture when given (a preset changed in code changes the digest too)."""
        d = {k: v for k, v in asdict(self).items() if k not in _RESUME_FREE}
        if model_config is not None:
            d["model_config"] = {k: v for k, v in model_config.to_dict().items()
                                 if not k.startswith("_") and k not in _CONFIG_VOLATILE}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ runtime helpers


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no CUDA GPU")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "itm": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["itm"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """The architecture of a preset model (``tiny`` / ``demo`` / ``base`` / ``large``)."""
    overrides: dict[str, Any] = {}
    if config.image_res:
        overrides["image_res"] = config.image_res
    if config.model == "demo":
        values = {**DEMO_PRESET, **COMPACT_SPECIAL_IDS_FIELDS, **overrides}
        return X2VLMConfig(**values)
    if config.model in ("tiny", "base", "large"):
        if config.model != "tiny" and not config.image_res:
            overrides["image_res"] = 384  # retrieval fine-tuning resolution (docs/x2vlm.md §6)
        return X2VLMConfig.preset(config.model, **overrides)
    raise ValueError(f"{config.model!r} is not a preset (tiny, demo, base, large)")


COMPACT_SPECIAL_IDS_FIELDS = {"pad_token_id": 0, "unk_token_id": 1, "cls_token_id": 2, "sep_token_id": 3,
                              "mask_token_id": 4}


def build_model(config: TrainConfig, texts: Sequence[str]) -> tuple[X2VLMModel, X2VLMTokenizer, dict[str, Any]]:
    """Model + tokenizer for ``config.model``; random presets are initialised from ``config.seed``."""
    source: dict[str, Any] = {"model": config.model}
    path = Path(config.model).expanduser()
    if config.model in ("tiny", "demo", "base", "large"):
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
            warm_cache: bool = True) -> TrainSetup:
    """Build the (seeded) initial model, tokenizer, processor, texts, identity classes and the dataset.

    Identity classes are the ``(pair_id, style > 0)`` pairs of the training items; style-0 items have no
    identity (DeepFashion2 never pairs them), so they are not sampled for training (queries never contain them;
    as gallery distractors they are still scored at evaluation).
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    texts = D.item_texts(train_items, config.use_captions, captions)
    model, tokenizer, source = build_model(config, texts)
    image_res = int(model.config.image_res)
    dcfg = config.data_config(image_res)
    processor = D.build_processor(dcfg)
    classes = D.identity_classes(train_items)
    labels = D.identity_labels(train_items, classes)
    store = D.ImageStore(dcfg.store_side, dcfg.cache)
    dataset = D.ItemDataset(train_items, texts, labels, dcfg, store=store, processor=processor,
                            text_group=D.text_ids(texts, tokenizer))
    if warm_cache and dcfg.cache:
        store.warm(train_items[labels >= 0], dcfg.view, dcfg.context, whole_images=dcfg.box_task,
                   progress=config.progress, desc="decode train")
    device = resolve_device(config.device)
    model.to(device)
    info = {"context": config.context, "cache_side": dcfg.store_side, "use_captions": config.use_captions,
            "view": dcfg.view, "image_res": image_res}
    bundle = E.ModelBundle(model=model, tokenizer=tokenizer, processor=X2VLMImageProcessor(
        ImageSettings(image_res=image_res)), info=info)
    return TrainSetup(config, bundle, train_items.reset_index(drop=True), texts, classes, labels, dataset, dcfg,
                      source)


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(bundle: E.ModelBundle, items: pd.DataFrame, config: TrainConfig | None = None,
             store: D.ImageStore | None = None, image_level: bool = False, progress: bool = False,
             ) -> dict[str, Any]:
    """Item-level retrieval metrics on a split (official sets): hit@k for k in 1, 5, 10, 15, 20 and mAP.

    The view follows ``config.use_boxes`` (item crops, or whole photos for every item); with ``image_level`` also
    image-level metrics (whole photos) under ``"image_level"``.
    """
    from capret_utils import metrics

    config = config or TrainConfig()
    view = "crop" if config.use_boxes else "image"
    ecfg = E.EmbedConfig(view=view, context=config.context, batch_size=128, bf16=config.bf16, progress=progress)
    store = store or bundle.store(cache=True)
    queries, gallery = metrics.item_sets(items)
    _, q = E.embed_items(queries, bundle, ecfg, store=store)
    _, g = E.embed_items(gallery, bundle, ecfg, store=store)
    res = metrics.evaluate_items(q, g, queries, gallery, ks=EVAL_KS,
                                 config=metrics.EvalConfig(progress=False, device="cpu"))
    out = {k: float(res.metrics[k]) for k in [f"top{k}" for k in EVAL_KS] + ["mAP"]}
    out["n_queries"], out["n_gallery"] = int(res.metrics["n_evaluated"]), int(res.metrics["n_gallery"])
    if image_level:
        qi, gi = metrics.image_sets(items)
        _, qe = E.embed_images(qi, bundle, ecfg, store=store)
        _, ge = E.embed_images(gi, bundle, ecfg, store=store)
        r2 = metrics.evaluate_images(qe, ge, qi, gi, ks=EVAL_KS,
                                     config=metrics.EvalConfig(progress=False, device="cpu"))
        out["image_level"] = {k: float(r2.metrics[k]) for k in [f"top{k}" for k in EVAL_KS] + ["mAP"]}
    return out


def headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The five numbers notebook 03 reports: top1, top5, top10, top20, mAP."""
    return {k: float(metrics[k]) for k in HEADLINE}


# ------------------------------------------------------------------------------------------ optimisation


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or name.endswith("temp")


def build_arcfaces(config: TrainConfig, num_identities: int, embed_dim: int) -> tuple[L.ArcFace, L.ArcFace | None]:
    """The identity ArcFace (``margin``) and, when ``w_category`` is on, the category ArcFace (``category_margin``),
    both with ``scale``."""
    arcface = L.ArcFace(num_identities, embed_dim, config.margin, config.scale)
    category = (L.ArcFace(len(CATEGORY_NAMES), embed_dim, config.category_margin, config.scale)
                if config.weights().category else None)
    return arcface, category


def build_optimizer(model: torch.nn.Module, arcface: L.ArcFace, config: TrainConfig,
                    category: L.ArcFace | None = None) -> torch.optim.AdamW:
    """AdamW (betas 0.9 / 0.98, eps 1e-8 as the official optim.py) with groups: backbone decay / no decay,
    heads (``head_lr_mult``) decay / no decay, ArcFace class weights of the identities and, when given, of the
    categories (``lr_arcface``, no decay)."""
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = any(f"{h}." in name or name.startswith(h) for h in HEAD_NAMES)
        key = ("head" if head else "body") + ("_nd" if _no_decay(name, param) else "")
        g = groups.setdefault(key, {"params": [], "lr": config.lr * (config.head_lr_mult if head else 1.0),
                                    "weight_decay": 0.0 if key.endswith("_nd") else config.weight_decay,
                                    "name": key})
        g["params"].append(param)
    heads = [arcface] if config.w_arcface or config.w_arcface_fused else []
    if category is not None:
        heads.append(category)
    if heads:
        groups["arcface"] = {"params": [p for h in heads for p in h.parameters()], "lr": config.lr_arcface,
                             "weight_decay": 0.0, "name": "arcface"}
    ordered = [groups[k] for k in ("body", "body_nd", "head", "head_nd", "arcface") if k in groups]
    return torch.optim.AdamW(ordered, betas=(0.9, 0.98), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: TrainConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` × steps, then cosine or linear decay to 0 at ``total_steps``."""
    warm = int(round(config.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total_steps - warm)
        progress = min(max(progress, 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_steps_for(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.max_steps > 0:
        return int(config.max_steps)
    return max(1, (config.epochs * batches_per_epoch) // config.grad_accum)


# ------------------------------------------------------------------------------------------ one step


def leading_rows(batch_size: int, fraction: float) -> int:
    """How many samples of a batch (the first ones, at least 1) a partial task uses: the box task
    (``box_fraction``) and the fused ITM pairs (``itm_fraction``)."""
    return max(1, int(math.ceil(batch_size * fraction)))


def compute_losses(net: X2VLMModel, arcface: L.ArcFace, batch: Mapping[str, Any], weights: L.LossWeights,
                   generator: torch.Generator, box_fraction: float = 0.25, device: torch.device | None = None,
                   bf16: bool = True, itm_fraction: float = 1.0, category: L.ArcFace | None = None,
                   category_recolour: int = 0, category_views: str = "recoloured") -> dict[str, torch.Tensor]:
    """Every active loss term of one batch (unweighted). ``net`` is the plain X2-VLM (LoRA layers, if any,
    are injected in its modules). The box loss uses the first ``leading_rows(B, box_fraction)`` samples; ITM
    fuses the pairs of the first ``leading_rows(B, itm_fraction)`` texts and images (negatives drawn from all B).
    The category term (``weights.category``) needs ``category``, the category ArcFace, and ``batch["categories"]``;
    with ``category_recolour`` > 0 it is the term on :func:`data.recolour` copies of the first ``category_recolour``
    views (a second vision pass, drawn from ``generator`` after the ITM negatives), or with ``category_views="both"``
    the mean of that and the term on the views."""
    device = device or next(net.parameters()).device
    pv = batch["pixel_values"].to(device)
    labels = batch["labels"].to(device)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    terms: dict[str, torch.Tensor] = {}
    with E.autocast(device, bf16):
        image_embeds, image_feat = net.get_image_embeds(pv)
        need_text = weights.itc or weights.itm or weights.box
        text_embeds = net.get_text_embeds(ids, mask) if need_text else None
        text_feat = net.get_text_feat(text_embeds) if (weights.itc or weights.itm) else None
    if weights.arcface:
        terms["arcface"] = arcface(image_feat, labels)
    if weights.category:
        if category is None or "categories" not in batch:
            raise ValueError("the category loss is on but no category ArcFace or batch['categories'] was given")
        categories = batch["categories"].to(device)
        terms["category"] = category(image_feat, categories)
    pos = L.positive_mask(batch["itc_ids"].to(device), batch["text_ids"].to(device))
    if weights.itc:
        terms["itc"] = L.itc_loss(image_feat.float(), text_feat.float(), net.temp, pos)
    if weights.itm:
        with torch.no_grad():
            sim = image_feat.float() @ text_feat.float().t() / net.temp
        negs = L.sample_hard_negatives(sim, pos, generator)
        n_itm = leading_rows(pv.shape[0], itm_fraction)
        images, texts, masks, itm_labels = L.itm_pairs(image_embeds, text_embeds, mask, *negs, rows=n_itm)
        with E.autocast(device, bf16):
            fused = net.get_fusion_embeds(texts, masks, images)
            logits = net.itm_logits(fused)
        terms["itm"] = L.itm_loss(logits, itm_labels)
        if weights.arcface_fused:
            with E.autocast(device, bf16):
                fused_emb = net.text_proj(fused[:n_itm, 0, :])
            terms["arcface_fused"] = arcface(F.normalize(fused_emb.float(), dim=-1), labels[:n_itm])
    if weights.box:
        if "box_pixel_values" not in batch:
            raise ValueError("the box loss is on but the batch has no box targets (DataConfig.box_task)")
        nb = leading_rows(pv.shape[0], box_fraction)
        if batch["box_pixel_values"].shape[0] < nb:
            raise ValueError(f"the batch holds {batch['box_pixel_values'].shape[0]} box samples, the box loss needs "
                             f"{nb} (box_fraction {box_fraction} of {pv.shape[0]})")
        with E.autocast(device, bf16):
            box_embeds, _ = net.get_image_embeds(batch["box_pixel_values"][:nb].to(device))
            fused_box = net.get_fusion_embeds(text_embeds[:nb], mask[:nb], box_embeds)
            pred = net.predict_bbox(fused_box)
        l1, giou = L.box_loss(pred, batch["box_targets"][:nb].to(device))
        terms["box_l1"], terms["box_giou"] = l1, giou
    if weights.category and category_recolour > 0:
        n = min(category_recolour, pv.shape[0])
        with E.autocast(device, bf16):
            _, recoloured_feat = net.get_image_embeds(D.recolour(pv[:n], generator))
        recoloured = category(recoloured_feat, categories[:n])
        terms["category"] = 0.5 * (terms["category"] + recoloured) if category_views == "both" else recoloured
    return terms


# ------------------------------------------------------------------------------------------ checkpoints


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _running_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm statistics (``vision_stem="conv"`` / ``"cnn"``): buffers that training changes, saved with the
    weights."""
    return {n: b.detach().cpu().contiguous() for n, b in model.named_buffers() if n.endswith(_RUNNING_STATS)}


def save_train_state(run_dir: Path, step: int, model: torch.nn.Module, arcface: L.ArcFace,
                     optimizer: torch.optim.Optimizer, scheduler: Any, sampler: D.PKBatchSampler,
                     generator: torch.Generator, state: dict[str, Any], keep: int = 2,
                     category: L.ArcFace | None = None) -> Path:
    """Write ``train_state/step-NNNNNN`` atomically (temp folder + rename), then point ``latest.json`` at it."""
    from safetensors.torch import save_file

    root = Path(run_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    if stats := _running_stats(model):
        save_file(stats, str(tmp / "buffers.safetensors"))
    save_file(_class_weights(arcface, category), str(tmp / ARCFACE_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(generator)}, tmp / "optim_rng.pt")
    write_json(tmp / "state.json", {**state, "step": step, "sampler": sampler.state_dict()})
    for f in tmp.iterdir():  # make the files durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(root / "latest.json", {"step": step, "path": final.name})
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_train_state(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest.json`` points at, or None."""
    root = Path(run_dir) / STATE_DIR
    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    path = root / json.loads(pointer.read_text())["path"]
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which holds no complete checkpoint")
    return path


def load_train_state(path: Path, model: torch.nn.Module, arcface: L.ArcFace, optimizer: torch.optim.Optimizer,
                     scheduler: Any, sampler: D.PKBatchSampler, generator: torch.Generator,
                     category: L.ArcFace | None = None) -> dict[str, Any]:
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    if unknown or missing:
        raise ValueError(f"{path}: trainable weights do not match the model (unknown {unknown[:5]}, missing "
                         f"{missing[:5]}); was it written with another finetune_mode or model?")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
        heads = load_file(str(path / ARCFACE_FILE))
        arcface.W.copy_(heads["W"])
        if category is not None:
            if "category_W" not in heads:
                raise ValueError(f"{path / ARCFACE_FILE} holds no category ArcFace weights (category_W)")
            category.W.copy_(heads["category_W"])
        expected = _running_stats(model)
        saved = load_file(str(path / "buffers.safetensors")) if (path / "buffers.safetensors").is_file() else {}
        if set(saved) != set(expected):
            raise ValueError(f"{path}: saved BatchNorm statistics {sorted(saved)[:3]} do not match the model's "
                             f"{sorted(expected)[:3]}")
        buffers = dict(model.named_buffers())
        for name, tensor in saved.items():
            buffers[name].copy_(tensor)
    blob = torch.load(path / "optim_rng.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    state = json.loads((path / "state.json").read_text())
    sampler.load_state_dict(state["sampler"])
    _set_rng_state(blob["rng"], generator)
    return state


# ------------------------------------------------------------------------------------------ the final model


def _class_weights(arcface: L.ArcFace, category: L.ArcFace | None) -> dict[str, torch.Tensor]:
    """The ArcFace class weights to save: ``W`` (identities) and, when trained, ``category_W``."""
    out = {"W": arcface.W.detach().cpu().contiguous()}
    if category is not None:
        out["category_W"] = category.W.detach().cpu().contiguous()
    return out


def save_finetuned(bundle: E.ModelBundle, path: str | os.PathLike, arcface: L.ArcFace | None = None,
                   info: Mapping[str, Any] | None = None, category: L.ArcFace | None = None) -> Path:
    """Write the plain (merged) model, tokenizer, processor settings, ArcFace weights (identities ``W``, categories
    ``category_W`` when trained) and ``finetune_info.json`` into ``path`` (replaced atomically: written next to it,
    then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bundle.model.save_pretrained(tmp / "model")
    bundle.tokenizer.save_pretrained(tmp / "tokenizer")
    bundle.processor.save_pretrained(tmp / "processor")
    if arcface is not None:
        save_file(_class_weights(arcface, category), str(tmp / ARCFACE_FILE))
    write_json(tmp / INFO_FILE, {**bundle.info, **dict(info or {})})
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_finetuned(path: str | os.PathLike, device: str = "auto") -> E.ModelBundle:
    """Rebuild the :class:`~capret_utils.embed.ModelBundle` that :func:`save_finetuned` wrote (``checkpoint/``)."""
    path = Path(path)
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{path} is not a fine-tuned capret checkpoint ({INFO_FILE} missing; written by "
                                f"notebooks/03_finetune.ipynb into <run_dir>/{CHECKPOINT_DIR})")
    info = json.loads(info_file.read_text())
    model = X2VLMModel.from_pretrained(path / "model")
    model.set_attn_implementation("sdpa")
    tokenizer = X2VLMTokenizer.from_pretrained(path / "tokenizer")
    check_tokenizer(model.config, tokenizer)
    processor = X2VLMImageProcessor.from_pretrained(path / "processor")
    model.to(resolve_device(device)).eval()
    return E.ModelBundle(model=model, tokenizer=tokenizer, processor=processor, info=info)


def load_arcface(path: str | os.PathLike) -> torch.Tensor:
    """The ArcFace class weights (embedding_size × classes) saved with a fine-tuned checkpoint."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / ARCFACE_FILE))["W"]


# ------------------------------------------------------------------------------------------ history


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    write_json(run_dir / HISTORY_JSON, history)
    frame = pd.json_normalize(history) if history else pd.DataFrame()
    with atomic_path(run_dir / HISTORY_CSV) as tmp:
        frame.to_csv(tmp, index=False)


def read_history(run_dir: str | os.PathLike) -> pd.DataFrame:
    """``history.json`` as a flat frame: one row per logged step (``kind`` "train") or evaluation ("eval")."""
    data = json.loads((Path(run_dir) / HISTORY_JSON).read_text())
    return pd.json_normalize(data)


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns."""

    bundle: E.ModelBundle  # the fine-tuned (merged, eval-mode) model
    history: pd.DataFrame  # per-step losses and the evaluations
    metrics: dict[str, Any]  # final validation metrics (None when no val_items)
    checkpoint: Path  # <run_dir>/checkpoint
    steps: int
    train_seconds: float  # wall time spent in training steps (this process and resumed ones)
    resumed_from: int | None  # optimizer step the run resumed from
    info: dict[str, Any]


def _log_row(step: int, epoch: int, terms: Mapping[str, float], loss: float, lr: float, temp: float,
             elapsed: float) -> dict[str, Any]:
    return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, **{f"loss_{k}": v for k, v in terms.items()},
            "lr": lr, "temp": temp, "elapsed_s": round(elapsed, 3)}


def finetune(setup: TrainSetup, run_dir: str | os.PathLike, val_items: pd.DataFrame | None = None,
             callback: Callable[[dict[str, Any]], None] | None = None, stop_after: int | None = None,
             ) -> FinetuneResult:
    """Train ``setup.bundle.model`` with the configured losses; evaluate on ``val_items`` every ``eval_every``
    steps and at the end; checkpoint every ``ckpt_every`` steps and at the end; resume when asked.

    ``callback(row)`` receives every history row (train rows every step, eval rows after each evaluation), e.g. to
    update a live plot. ``stop_after`` ends the loop after that many optimizer steps *in this call* without
    saving the final model (tests use it to simulate an interruption).
    """
    on_cpu = setup.bundle.device.type == "cpu"
    with deterministic_algorithms(setup.config.deterministic and on_cpu):
        return _finetune(setup, run_dir, val_items, callback, stop_after)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` inside the block when ``enabled``; the previous
    setting is restored afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def _finetune(setup: TrainSetup, run_dir: str | os.PathLike, val_items: pd.DataFrame | None,
              callback: Callable[[dict[str, Any]], None] | None, stop_after: int | None) -> FinetuneResult:
    config, bundle = setup.config, setup.bundle
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = bundle.device
    weights = config.weights()
    base = bundle.model
    mode = config.mode
    peft_model = None
    if mode == "lora":
        peft_model = apply_lora(base, LoraSettings(r=config.lora_r, alpha=config.lora_alpha,
                                                   dropout=config.lora_dropout,
                                                   trainable_heads=tuple(h for h in HEAD_NAMES
                                                                         if getattr(base, h, None) is not None)))
        train_module: torch.nn.Module = peft_model
        net = peft_model.get_base_model()
    else:
        train_module = net = base
        for p in net.parameters():
            p.requires_grad_(True)
    net.train()
    counts = trainable_parameters(train_module)
    arcface, category = build_arcfaces(config, len(setup.classes), int(net.config.embed_dim))
    arcface = arcface.to(device)
    category = category.to(device) if category is not None else None
    sampler = D.PKBatchSampler(setup.labels, setup.data_config.identities_per_batch, config.per_identity,
                               seed=config.seed)
    total = total_steps_for(config, len(sampler))
    optimizer = build_optimizer(train_module, arcface, config, category)
    scheduler = build_scheduler(optimizer, total, config)
    generator = torch.Generator().manual_seed(config.seed + 1)
    collate = D.Collator(bundle.tokenizer, box_source=setup.dataset)
    history: list[dict[str, Any]] = []
    step, train_seconds, resumed_from = 0, 0.0, None
    digest = config.trajectory_digest(net.config)
    val_store = bundle.store(cache=True)
    if config.resume and (latest := latest_train_state(run_dir)) is not None:
        saved_digest = json.loads((latest / "state.json").read_text()).get("digest")
        if saved_digest != digest:
            raise ValueError(f"{latest} was written with another training configuration or model architecture "
                             f"(digest {saved_digest} vs {digest}); use a new run_dir or resume=False")
        state = load_train_state(latest, train_module, arcface, optimizer, scheduler, sampler, generator, category)
        step, train_seconds, history = int(state["step"]), float(state["train_seconds"]), list(state["history"])
        resumed_from = step
    elif not config.resume and (run_dir / STATE_DIR).exists():
        shutil.rmtree(run_dir / STATE_DIR)

    def state_blob() -> dict[str, Any]:
        return {"digest": digest, "train_seconds": train_seconds, "history": history, "total_steps": total,
                "config": asdict(config)}

    def run_eval(at_step: int) -> dict[str, Any] | None:
        if val_items is None:
            return None
        net.eval()
        res = evaluate(bundle if mode == "full" else E.ModelBundle(net, bundle.tokenizer, bundle.processor,
                                                                   bundle.info),
                       val_items, config, store=val_store, image_level=config.eval_image_level)
        net.train()
        row = {"kind": "eval", "step": at_step, **{k: v for k, v in res.items() if not isinstance(v, dict)}}
        if "image_level" in res:
            row.update({f"image_{k}": v for k, v in res["image_level"].items()})
        history.append(row)
        if callback:
            callback(row)
        return res

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc=f"fine-tune ({mode})", disable=not config.progress, unit="step")
    done_here = 0
    loader_epoch = sampler.epoch
    batches: Any = None
    last_eval: dict[str, Any] | None = None
    while step < total and (stop_after is None or done_here < stop_after):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        loss_sum = 0.0
        for _ in range(config.grad_accum):
            batch = None
            while batch is None:
                if batches is None:
                    sampler.set_epoch(loader_epoch)
                    # a private generator: creating a loader iterator draws a worker seed, and drawing it from
                    # the global RNG would shift dropout after a mid-epoch resume (augmentation is seeded per sample)
                    batches = iter(torch.utils.data.DataLoader(setup.dataset, batch_sampler=sampler,
                                                               collate_fn=collate, num_workers=config.num_workers,
                                                               generator=torch.Generator().manual_seed(config.seed)))
                try:
                    batch = next(batches)
                except StopIteration:
                    batches, loader_epoch = None, loader_epoch + 1
            sampler.advance()
            terms = compute_losses(net, arcface, batch, weights, generator, config.box_fraction, device, config.bf16,
                                   config.itm_share, category, config.category_recolour, config.category_views)
            loss = L.total_loss(terms, weights, step + 1) / config.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / config.grad_accum
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if config.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
            if not torch.isfinite(norm):
                raise L.NonFiniteLossError(step + 1, {"grad_norm": float(norm)})
        optimizer.step()
        scheduler.step()
        net.clamp_temp_()
        step += 1
        done_here += 1
        train_seconds += time.perf_counter() - t0
        row = _log_row(step, sampler.epoch, sums, loss_sum, optimizer.param_groups[0]["lr"], net.temp.item(),
                       train_seconds)
        history.append(row)
        if callback:
            callback(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}", epoch=sampler.epoch)
        if config.eval_every and step % config.eval_every == 0 and step < total:
            last_eval = run_eval(step)
        if step % config.ckpt_every == 0 or step == total:
            save_train_state(run_dir, step, train_module, arcface, optimizer, scheduler, sampler, generator,
                             state_blob(), config.keep_checkpoints, category)
            write_history(run_dir, history)
    bar.close()
    if stop_after is not None and step < total:
        write_history(run_dir, history)
        return FinetuneResult(bundle, pd.json_normalize(history), {}, run_dir / CHECKPOINT_DIR, step, train_seconds,
                              resumed_from, {})
    # final evaluation (skipped when a finished run is re-entered and its last row already is the final eval)
    final_eval = next((r for r in reversed(history) if r.get("kind") == "eval" and r["step"] == total), None)
    if final_eval is None:
        last_eval = run_eval(total)
        save_train_state(run_dir, total, train_module, arcface, optimizer, scheduler, sampler, generator,
                         state_blob(), config.keep_checkpoints, category)
    else:
        last_eval = {k: v for k, v in final_eval.items() if k not in ("kind", "step")}
    write_history(run_dir, history)
    final_model = merge_lora(peft_model) if peft_model is not None else net
    final_model.eval()
    for p in final_model.parameters():
        p.requires_grad_(False)
    final_bundle = E.ModelBundle(final_model, bundle.tokenizer, bundle.processor, dict(bundle.info))
    info = {"config": asdict(config), "finetune_mode": mode, "source": setup.source, "identity_classes": setup.classes,
            "steps": step, "total_steps": total, "train_seconds": round(train_seconds, 2),
            "trainable_parameters": counts, "metrics": last_eval, "arcface_margin_rad": config.margin,
            "arcface_margin_deg": math.degrees(config.margin), "category_margin_rad": config.category_margin,
            "resumed_from": resumed_from}
    final_bundle.info.update({k: v for k, v in info.items() if k in ("config", "finetune_mode", "identity_classes")})
    ckpt = save_finetuned(final_bundle, run_dir / CHECKPOINT_DIR, arcface, info, category)
    return FinetuneResult(final_bundle, pd.json_normalize(history), last_eval or {}, ckpt, step, train_seconds,
                          resumed_from, info)


# ------------------------------------------------------------------------------------------ notebook helpers


def load_splits(root: str | os.PathLike, max_train_items: int = 0, seed: int = 0
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train items, validation items)`` of a data root; ``max_train_items`` > 0 keeps a seeded subset of
    whole training identities (plus nothing else) for quick runs."""
    from capret_utils import df2, paths

    train = df2.load_items(paths.split_dir(root, "train"))
    val = df2.load_items(paths.split_dir(root, "validation"))
    if max_train_items and len(train) > max_train_items:
        ident = [df2.identity_key(p, s) for p, s in zip(train["pair_id"], train["style"])]
        keys = sorted({i for i in ident if i is not None})
        rng = np.random.default_rng(seed)
        keep: set[str] = set()
        count = 0
        by_id = pd.Series(ident).value_counts()
        for k in rng.permutation(keys):
            if count >= max_train_items:
                break
            keep.add(k)
            count += int(by_id[k])
        train = train[[i in keep for i in ident]].reset_index(drop=True)
    return train, val


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


def smoke_config(config: TrainConfig) -> TrainConfig:
    """Notebook 03's smoke mode: tiny preset, a few steps, CPU, no mid-run evaluation."""
    return replace(config, model="tiny", image_res=0, max_steps=min(config.max_steps or 3, 3), epochs=1,
                   batch_size=8, per_identity=2, eval_every=0, ckpt_every=2, device="cpu", threads=1)


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def suppress_known_warnings() -> None:
    """Silence third-party warnings that say nothing about this run (peft on custom models, PML stats)."""
    warnings.filterwarnings("ignore", message=".*Unable to fetch remote file.*")
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
