"""X2-VLM preprocessing: the image processor (no torchvision), caption cleaning and the tokenizer wrapper.

Images (x2vlm.md §5): evaluation = square bicubic resize to ``image_res`` (aspect ratio not kept, no crop),
[0, 1] scaling, CLIP mean/std. Training adds a random resized crop (scale (0.5, 1.0), ratio (3/4, 4/3) — the
crop's own aspect, or relative to the input's with ``crop_ratio_relative`` — bicubic) and a horizontal flip,
drawn from an explicit ``numpy.random.Generator`` for determinism; boxes can be carried through the same crop
and flip. Optional random erasing (``erase_prob``; Zhong et al. 2020, *Random Erasing Data Augmentation*) paints
one rectangle of a random flat colour over the training view, like the occluders of shopper photos. (The official
training pipeline also applies RandAugment; it is not reproduced here.)

Text: :func:`pre_caption` is the official caption cleaning; :class:`X2VLMTokenizer` wraps a Hugging Face BERT
WordPiece tokenizer (``bert-base-uncased`` for real checkpoints) with that cleaning and ``max_tokens`` (40).
Offline, :func:`build_wordpiece_tokenizer` builds a small, deterministic WordPiece vocabulary and places
the special tokens at the ids the model config expects; it saves/loads through ``save_pretrained`` /
``from_pretrained`` like any HF tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from capret_utils.data.df2 import CATEGORY_NAMES
from capret_utils.x2vlm.config import CLIP_MEAN, CLIP_STD, X2VLMConfig

IMAGE_SETTINGS_FILE = "preprocessor_config.json"
TEXT_SETTINGS_FILE = "x2vlm_text_config.json"
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
COMPACT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
_CONFIG_ID_FIELDS = {"[PAD]": "pad_token_id", "[UNK]": "unk_token_id", "[CLS]": "cls_token_id",
                     "[SEP]": "sep_token_id", "[MASK]": "mask_token_id"}


# ---------------------------------------------------------------------------------------------- images
@dataclass
class ImageSettings:
    """Image preprocessing of the official code; ``train`` switches on the augmentation."""

    image_res: int = 384  # square side in pixels (the model's config.image_res)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    train: bool = False  # random resized crop + horizontal flip
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area fraction of the random crop (retrieval fine-tuning)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect-ratio range of the random crop
    # False: crop_ratio is the crop's own width / height (the official recipe, made for whole photos); True: it
    # multiplies the input's aspect ratio, so an elongated item crop (trousers ~1:2) keeps its whole length
    # instead of being cut to a 3:4 band, as evaluation (a square resize of the whole input) sees it
    crop_ratio_relative: bool = False
    hflip_prob: float = 0.5
    # random erasing of the training view: probability, area fraction range and log-uniform aspect range of the
    # rectangle; it is filled with one random colour (standard normal per channel, in normalised units)
    erase_prob: float = 0.0
    erase_area: tuple[float, float] = (0.02, 0.25)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    # photometric jitter of the training view, like the lighting of shopper photos (0 = off): a brightness gain
    # in [1 - brightness, 1 + brightness], a contrast factor about the view's mean in [1 - contrast, 1 + contrast]
    # and a per-channel gain (colour cast) in [1 - colour_cast, 1 + colour_cast], on [0, 1] pixel values
    brightness: float = 0.0
    contrast: float = 0.0
    colour_cast: float = 0.0


ImageInput = Image.Image | str | os.PathLike | np.ndarray


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image, a path or an (H, W[, 3]) uint8 array; errors name the file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"image array must be uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.5, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3),
                            relative: bool = False) -> tuple[int, int, int, int]:
    """``(left, top, crop_w, crop_h)`` of a random resized crop (the Inception-style recipe: 10 tries at a
    random area fraction and log-uniform aspect ratio, else a centre crop with the ratio clamped).
    ``relative``: the ratio range is taken relative to the input's own aspect ratio (``width / height``)."""
    if relative:
        ratio = (ratio[0] * width / height, ratio[1] * width / height)
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_erase_box(height: int, width: int, rng: np.random.Generator,
                     area: tuple[float, float] = (0.02, 0.25),
                     ratio: tuple[float, float] = (0.3, 3.3)) -> tuple[int, int, int, int] | None:
    """``(top, left, h, w)`` of a random-erasing rectangle (10 tries at a random area fraction and log-uniform
    height / width ratio that fits strictly inside the image), or None when no try fits."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = height * width * rng.uniform(area[0], area[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            return int(rng.integers(0, height - h)), int(rng.integers(0, width - w)), h, w
    return None


def photometric_jitter(arr: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                       colour_cast: float) -> np.ndarray:
    """Random brightness, contrast and colour cast of one (H, W, 3) image in [0, 1] (clipped back to [0, 1]):
    ``clip((x * gain * cast - m) * c + m)`` with ``m`` the mean of ``x * gain * cast``; draws 5 numbers."""
    gain = rng.uniform(1 - brightness, 1 + brightness) * rng.uniform(1 - colour_cast, 1 + colour_cast, size=3)
    c = rng.uniform(1 - contrast, 1 + contrast)
    out = arr * gain.astype(np.float32)
    m = np.float32(out.mean())
    return np.clip((out - m) * np.float32(c) + m, 0.0, 1.0, out=out)


class X2VLMImageProcessor:
    """PIL images / paths / arrays -> ``{"pixel_values": float32 (B, 3, res, res)}`` (+ ``"boxes"``)."""

    def __init__(self, settings: ImageSettings | None = None) -> None:
        self.settings = settings or ImageSettings()
        if len(self.settings.mean) != 3 or len(self.settings.std) != 3:
            raise ValueError("ImageSettings.mean and .std need 3 values (RGB)")

    @classmethod
    def for_config(cls, config: X2VLMConfig, **overrides: Any) -> "X2VLMImageProcessor":
        return cls(ImageSettings(image_res=config.image_res, **overrides))

    def to_array(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        """Resized RGB PIL image -> normalised float32 (3, H, W); with ``rng``, the settings' photometric jitter
        first (when any of its ranges is non-zero)."""
        s = self.settings
        arr = np.asarray(image, dtype=np.float32) / 255.0
        if rng is not None and (s.brightness or s.contrast or s.colour_cast):
            arr = photometric_jitter(arr, rng, s.brightness, s.contrast, s.colour_cast)
        arr = (arr - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def process_one(self, image: ImageInput, train: bool | None = None, rng: np.random.Generator | None = None,
                    box: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """One image (and optional xyxy pixel box) -> (3, res, res) array and the box as normalised
        (cx, cy, w, h) in the output frame (clipped to the crop), or None."""
        s = self.settings
        img = load_image(image)
        train = s.train if train is None else train
        left, top, cw, ch = 0, 0, img.width, img.height
        flip = False
        if train:
            if rng is None:
                raise ValueError("training augmentation needs an explicit rng=np.random.default_rng(seed)")
            left, top, cw, ch = random_resized_crop_box(img.width, img.height, rng, s.crop_scale, s.crop_ratio,
                                                         s.crop_ratio_relative)
            img = img.crop((left, top, left + cw, top + ch))
            flip = bool(rng.random() < s.hflip_prob)
        img = img.resize((s.image_res, s.image_res), Image.Resampling.BICUBIC)
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out_box = None
        if box is not None:
            x1, y1, x2, y2 = (float(v) for v in box)
            x1, x2 = (min(max(x1 - left, 0.0), cw) / cw, min(max(x2 - left, 0.0), cw) / cw)
            y1, y2 = (min(max(y1 - top, 0.0), ch) / ch, min(max(y2 - top, 0.0), ch) / ch)
            if flip:
                x1, x2 = 1.0 - x2, 1.0 - x1
            out_box = np.asarray([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=np.float32)
        arr = self.to_array(img, rng if train else None)
        if train and s.erase_prob > 0 and rng.random() < s.erase_prob:
            rect = random_erase_box(s.image_res, s.image_res, rng, s.erase_area, s.erase_ratio)
            if rect is not None:
                top_, left_, h, w = rect
                arr[:, top_:top_ + h, left_:left_ + w] = rng.normal(0.0, 1.0, (3, 1, 1)).astype(np.float32)
        return arr, out_box

    def __call__(self, images: ImageInput | Sequence[ImageInput], train: bool | None = None,
                 rng: np.random.Generator | None = None, boxes: Sequence[Sequence[float]] | None = None,
                 ) -> dict[str, torch.Tensor]:
        if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray)
                                                                   and images.ndim in (2, 3)):
            images = [images]
            boxes = None if boxes is None else [boxes]
        if boxes is not None and len(boxes) != len(images):
            raise ValueError(f"got {len(boxes)} boxes for {len(images)} images")
        arrays, out_boxes = [], []
        for i, image in enumerate(images):
            arr, box = self.process_one(image, train, rng, None if boxes is None else boxes[i])
            arrays.append(arr)
            out_boxes.append(box)
        result = {"pixel_values": torch.from_numpy(np.stack(arrays))}
        if boxes is not None:
            result["boxes"] = torch.from_numpy(np.stack(out_boxes))
        return result

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / IMAGE_SETTINGS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"processor_class": type(self).__name__, **asdict(self.settings)}, indent=2))
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **overrides: Any) -> "X2VLMImageProcessor":
        path = Path(folder) / IMAGE_SETTINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (saved by X2VLMImageProcessor.save_pretrained)")
        data = json.loads(path.read_text())
        data.pop("processor_class", None)
        known = set(ImageSettings.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown fields {unknown}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        data.update(overrides)
        return cls(ImageSettings(**data))


# ---------------------------------------------------------------------------------------------- captions
_PUNCT = re.compile(r"([,.'!?\"()*#:;~])")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """The official caption cleaning (``dataset/utils.py::pre_caption``): lower-case; replace
    ``, . ' ! ? " ( ) * # : ; ~`` and ``-`` ``/`` by spaces; ``<person>`` -> ``person``; collapse runs of 2+
    whitespace characters to one space; strip; keep at most ``max_words`` words. Empty -> ``ValueError``."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}: {caption!r}")
    text = _PUNCT.sub(" ", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = re.sub(r"\s{2,}", " ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise ValueError(f"caption {caption!r} is empty after cleaning (pre_caption)")
    return text


def clean_or_empty(caption: str, max_words: int = 30) -> str:
    """:func:`pre_caption`, but ``""`` for a caption that cleans to nothing (e.g. only punctuation) instead of a
    ``ValueError``: what the text side would see of it."""
    try:
        return pre_caption(caption, max_words)
    except ValueError:
        return ""


@dataclass
class TextSettings:
    """Caption cleaning and tokenisation limits (official retrieval values)."""

    max_tokens: int = 40  # [CLS] ... [SEP] truncated to this many tokens
    max_words: int = 30  # words kept by pre_caption
    clean: bool = True  # apply pre_caption before tokenising


class X2VLMTokenizer:
    """BERT WordPiece tokenizer with the official caption cleaning; returns ``input_ids`` and
    ``attention_mask`` tensors (token type ids are all zero in X2-VLM and are not returned)."""

    def __init__(self, tokenizer: Any, settings: TextSettings | None = None) -> None:
        self.tokenizer = tokenizer
        self.settings = settings or TextSettings()
        missing = [t for t in ("[PAD]", "[CLS]", "[SEP]") if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"tokenizer has no {missing} token; X2-VLM needs a BERT-style vocabulary")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **settings: Any) -> "X2VLMTokenizer":
        """``"bert-base-uncased"`` (needs the hub or its cache), a checkpoint folder with ``vocab.txt`` /
        ``tokenizer.json``, or a folder written by :meth:`save_pretrained`."""
        from transformers import AutoTokenizer, BertTokenizer

        folder = Path(name_or_path)
        data: dict[str, Any] = {}
        if (folder / TEXT_SETTINGS_FILE).is_file():
            data = json.loads((folder / TEXT_SETTINGS_FILE).read_text())
        data.update(settings)
        if folder.is_dir() and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            if not (folder / "vocab.txt").is_file():
                raise FileNotFoundError(f"{folder} holds neither tokenizer.json nor vocab.txt")
            tokenizer = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
        return cls(tokenizer, TextSettings(**data))

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        (folder / TEXT_SETTINGS_FILE).write_text(json.dumps(asdict(self.settings), indent=2))
        return folder

    # ids -------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer.get_vocab())

    def special_ids(self) -> dict[str, int | None]:
        vocab = self.tokenizer.get_vocab()
        return {tok: vocab.get(tok) for tok in _CONFIG_ID_FIELDS}

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.get_vocab()["[PAD]"]

    def clean(self, caption: str) -> str:
        return pre_caption(caption, self.settings.max_words) if self.settings.clean else caption

    def __call__(self, captions: str | Sequence[str], padding: str | bool = "longest",
                 max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Clean and tokenise; ``padding="longest"`` (training) or ``"max_length"`` (official evaluation)."""
        if isinstance(captions, str):
            captions = [captions]
        texts = [self.clean(c) for c in captions]
        enc = self.tokenizer(texts, padding=padding, truncation=True,
                             max_length=max_length or self.settings.max_tokens, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def check_tokenizer(config: X2VLMConfig, tokenizer: X2VLMTokenizer) -> None:
    """Raise a ``ValueError`` when tokenizer and model config disagree (vocab size, special-token ids)."""
    problems = []
    if tokenizer.vocab_size > config.vocab_size:
        problems.append(f"tokenizer has {tokenizer.vocab_size} tokens but the model vocab_size is "
                        f"{config.vocab_size}")
    for token, tok_id in tokenizer.special_ids().items():
        want = getattr(config, _CONFIG_ID_FIELDS[token])
        if tok_id is not None and want is not None and tok_id != want:
            problems.append(f"{token} is id {tok_id} in the tokenizer but config.{_CONFIG_ID_FIELDS[token]}={want}")
    if problems:
        raise ValueError("tokenizer and X2-VLM config disagree: " + "; ".join(problems))


def build_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int,
                              special_ids: Mapping[str, int] | None = None, min_frequency: int = 1,
                              settings: TextSettings | None = None) -> X2VLMTokenizer:
    """Train a lower-case WordPiece vocabulary of exactly ``vocab_size`` entries on ``texts`` (cleaned with
    :func:`pre_caption`), with the special tokens at ``special_ids`` (default compact ids 0-4; pass
    ``BERT_SPECIAL_IDS`` to match the ``tiny`` preset / bert-base ids). Unused slots become ``[unusedN]``."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import BertTokenizer

    settings = settings or TextSettings()
    special = dict(special_ids or COMPACT_SPECIAL_IDS)
    if set(special) != set(_CONFIG_ID_FIELDS):
        raise ValueError(f"special_ids must give ids for exactly {sorted(_CONFIG_ID_FIELDS)}, got {sorted(special)}")
    if len(set(special.values())) != len(special) or not all(0 <= i < vocab_size for i in special.values()):
        raise ValueError(f"special ids {special} must be distinct and below vocab_size={vocab_size}")
    cleaned = [pre_caption(t, settings.max_words) for t in texts]
    if not cleaned:
        raise ValueError("build_wordpiece_tokenizer needs at least one text")
    free = vocab_size - len(special)
    alphabet = sorted({ch for t in cleaned for ch in t if not ch.isspace()})
    if 2 * len(alphabet) > free:
        raise ValueError(f"vocab_size {vocab_size} leaves {free} slots, fewer than the {2 * len(alphabet)} "
                         f"characters and ##-continuations of the corpus alphabet; raise vocab_size")
    # The vocabulary is chosen here rather than by ``tokenizers.trainers.WordPieceTrainer``: that trainer breaks
    # frequency ties in hash-map order, so two calls in one process can give different vocabularies (different
    # token ids -> different random-init runs, and resume could not reproduce a run). Words are split exactly as
    # BertTokenizer splits them (BERT normaliser + pre-tokeniser); the vocabulary is every character and its
    # ##-continuation (so any word can be spelled) plus the most frequent whole words, ties broken by the word.
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in cleaned:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    alphabet = sorted({ch for word in counts for ch in word})
    learned = [t for t in alphabet + ["##" + ch for ch in alphabet] if t not in special]
    words = sorted((w for w, c in counts.items() if len(w) > 1 and c >= min_frequency), key=lambda w: (-counts[w], w))
    learned = (learned + [w for w in words if w not in special])[:free]
    fillers = iter(learned + [f"[unused{i}]" for i in range(free - len(learned))])
    by_id = {i: tok for tok, i in special.items()}
    vocab = {(by_id[i] if i in by_id else next(fillers)): i for i in range(vocab_size)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    return X2VLMTokenizer(tokenizer, settings)


def fashion_caption_corpus(colours: Sequence[str] = ("black", "white", "navy", "red", "grey", "beige", "green",
                                                     "blue", "pink", "brown", "yellow", "purple"),
                           ) -> list[str]:
    """A small corpus in the style of capret's captions (template + dialogue summaries) over the 13
    DeepFashion2 categories, for training an offline demo vocabulary when no caption file exists yet."""
    categories = list(CATEGORY_NAMES.values())
    levels = {"viewpoint": ["not worn", "frontal", "side or back"], "occlusion": ["slight", "medium", "heavy"],
              "scale": ["small", "moderate", "large"], "zoom": ["no", "medium", "large"]}
    patterns = ["solid", "horizontal stripes", "vertical stripes", "polka dots", "checks"]
    views = ["front", "side", "back"]
    texts = []
    for i, cat in enumerate(categories):
        for j in range(3):
            texts.append(f"An image of a {cat} with viewpoint {levels['viewpoint'][j]}, occlusion level "
                         f"{levels['occlusion'][(i + j) % 3]}, scale {levels['scale'][(i + 2 * j) % 3]}, and zoom "
                         f"in {levels['zoom'][(i + j + 1) % 3]}")
        for k, colour in enumerate(colours):
            pattern = patterns[(i + k) % len(patterns)]
            other = colours[(k + 3) % len(colours)]
            detail = "" if pattern == "solid" else f" with {other} {pattern}"
            texts.append(f"a {colour} {cat}{detail}, seen from the {views[(i + k) % 3]}")
    return texts
