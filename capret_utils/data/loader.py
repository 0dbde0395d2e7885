"""Torch datasets over the items table: image views, texts, identity labels, box targets and P×K batches.

What one training sample is (:class:`ItemDataset`), for an items-table row:

* the **view** the retrieval embedding sees: the item crop (GT box grown by ``context`` × its width/height on
  each side, clamped to the image) or the whole photo (``view="image"``), through
  :class:`~capret_utils.x2vlm.X2VLMImageProcessor` (random resized crop + flip + optional random erasing when
  training, square bicubic resize + CLIP normalisation always);
* the **text** paired with it for ITC / ITM / the box head: the category name (``use_captions="none"``), the
  study's template caption (``"template"``) or the caption-store caption (``"dialogue"``);
* the **identity label**: ``(pair_id, style > 0)`` mapped to a contiguous class id over the *training* split
  (:func:`identity_classes`); ``-1`` for items without an identity (``style == 0``) or an identity unseen in
  training;
* the **category label**: ``category_id - 1`` (0–12, every item; :func:`category_labels`), for the category
  ArcFace term, which also sees colour-scrambled copies of the views (:func:`recolour`);
* optionally the **box target** for the box head: the whole photo (eval preprocessing) and the item box as
  (cx, cy, w, h) relative to it.

Batches come from :class:`PKBatchSampler` (P identities × K items each, so every batch holds positives for
ArcFace, ITC's soft targets and ITM's positive exclusion). It yields ``(row, augmentation seed)`` pairs: each
sample's randomness is a pure function of ``(seed, epoch, batch, slot)``, so batches are identical whatever the
number of workers and after a resume (the sampler's position is part of the training checkpoint).

Decoded pixels go through :class:`~capret_utils.data.decode.ImageStore`, which decodes JPEGs at the size needed,
crops and shrinks each view to at most ``cache_side`` pixels (longest side) before the processor resizes it, with
or without a RAM-bounded cache, so training, evaluation and notebook 04 see the same pixels.

The one DataLoader recipe lives here too (:func:`build_loader`: workers, pinned memory, persistent workers,
prefetch; :func:`resolve_workers` = the ``num_workers`` parameter of notebooks 02-04), with :class:`ViewDataset`,
the evaluation-side dataset (one processed view per row, in order). Datasets keep their rows in compact columns
(:class:`~capret_utils.data.decode.ItemColumns`), so forked workers share them instead of copying Python objects.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from capret_utils.data.boxes import CROP_CONTEXT, crop_box  # noqa: F401 - crop_box re-exported: D.crop_box
from capret_utils.data.decode import ON_ERROR, ImageStore, ItemColumns, StringColumn  # noqa: F401 - re-exported
from capret_utils.data.df2 import CAPTION_MODES, CATEGORY_NAMES, identity_key
from capret_utils.x2vlm.processing import (
    ImageSettings,
    X2VLMImageProcessor,
    X2VLMTokenizer,
)

VIEWS = ("crop", "image")


@dataclass
class DataConfig:
    """How items become training samples."""

    image_res: int = 64  # square input side of the model, pixels
    view: str = "crop"  # "crop": GT box + context margin | "image": the whole photo
    context: float = CROP_CONTEXT  # crop context on each side, as a fraction of the box width / height
    use_captions: str = "none"  # text per item: "none" (category name) | "template" | "dialogue" (caption store)
    box_task: bool = True  # also return the whole photo + item box for the box head
    # 0: every sample carries its whole-photo box view; n > 0: only the first n samples of a batch need one (the
    # training loop's box_fraction), so samples carry none and Collator(box_source=dataset) adds n per batch
    box_per_batch: int = 0
    augment: bool = True  # random resized crop + horizontal flip (+ erasing) of the view (training only)
    crop_scale: tuple[float, float] = (0.6, 1.0)  # area fraction of the random resized crop
    # aspect-ratio jitter (3:4 to 4:3) relative to the view's own aspect ratio (True), or the crop's absolute
    # aspect ratio as in the official whole-photo recipe (False; it cuts every elongated item crop to a band)
    crop_ratio_relative: bool = True
    hflip_prob: float = 0.5
    erase_prob: float = 0.0  # random erasing: share of training views with one rectangle painted a random colour
    # photometric jitter strength s (0 = off): brightness gain 1 +- s, contrast 1 +- s / 2, colour cast 1 +- s / 4
    photometric: float = 0.0
    cache_mb: float = 512.0  # RAM budget of the decoded-view cache, MB, shared by the loader's workers; 0 = no cache
    cache_side: int = 0  # longest side a view is shrunk to before the processor; 0 = 2 x image_res
    draft: bool = True  # decode JPEGs at reduced size (DCT scaling) when the view is shrunk by 2x or more
    bad_images: str = "raise"  # unreadable image: "raise" (error naming the file) | "skip" (dropped, counted)
    identities_per_batch: int = 32  # P of the P×K sampler
    per_identity: int = 2  # K of the P×K sampler (drawn with replacement when an identity has fewer items)

    def validate(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"DataConfig.view must be one of {VIEWS}, got {self.view!r}")
        if self.use_captions not in CAPTION_MODES:
            raise ValueError(f"DataConfig.use_captions must be one of {CAPTION_MODES}, got {self.use_captions!r}")
        if not 0 <= self.context <= 2:
            raise ValueError(f"DataConfig.context must be in [0, 2], got {self.context}")
        if self.box_per_batch < 0:
            raise ValueError(f"DataConfig.box_per_batch must be >= 0, got {self.box_per_batch}")
        if self.identities_per_batch < 2 or self.per_identity < 1:
            raise ValueError("DataConfig needs identities_per_batch >= 2 and per_identity >= 1 (got "
                             f"{self.identities_per_batch}, {self.per_identity})")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"DataConfig.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 <= self.erase_prob <= 1:
            raise ValueError(f"DataConfig.erase_prob must be in [0, 1], got {self.erase_prob}")
        if not 0 <= self.photometric < 1:
            raise ValueError(f"DataConfig.photometric must be in [0, 1), got {self.photometric}")
        if self.bad_images not in ON_ERROR:
            raise ValueError(f"DataConfig.bad_images must be one of {ON_ERROR}, got {self.bad_images!r}")
        if self.cache_mb < 0:
            raise ValueError(f"DataConfig.cache_mb is a RAM budget in MB (0 = off), got {self.cache_mb}")

    @property
    def batch_size(self) -> int:
        return self.identities_per_batch * self.per_identity

    @property
    def store_side(self) -> int:
        return self.cache_side or 2 * self.image_res


# ------------------------------------------------------------------------------------------ labels and texts


def identity_classes(items: pd.DataFrame) -> list[str]:
    """Sorted identity keys ``"pair:style"`` (style > 0) of an items table: class id = position in the list."""
    keys = {identity_key(p, s) for p, s in zip(items["pair_id"].to_numpy(), items["style"].to_numpy())}
    return sorted(k for k in keys if k is not None)


def identity_labels(items: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Class id per row (``classes`` from :func:`identity_classes`); -1 for style 0 or an unknown identity."""
    code = {k: i for i, k in enumerate(classes)}
    out = [code.get(identity_key(p, s), -1) if int(s) > 0 else -1
           for p, s in zip(items["pair_id"].to_numpy(), items["style"].to_numpy())]
    return np.asarray(out, dtype=np.int64)


def category_labels(items: pd.DataFrame) -> np.ndarray:
    """``category_id - 1`` per row (0 … 12, the DeepFashion2 categories); a missing column or an id outside 1–13
    raises a ``ValueError`` naming the first offending item."""
    if "category_id" not in items.columns:
        raise ValueError("the items table has no 'category_id' column (needed for the category labels)")
    cats = pd.to_numeric(items["category_id"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(cats, list(CATEGORY_NAMES))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        key = items["key"].iloc[i] if "key" in items.columns else i
        raise ValueError(f"{int(bad.sum())} item(s) have a category_id outside 1-{len(CATEGORY_NAMES)}; first: "
                         f"item {key!r} with category_id {items['category_id'].iloc[i]}")
    return cats.astype(np.int64) - 1


def text_ids(texts: Sequence[str], tokenizer: X2VLMTokenizer | None = None) -> np.ndarray:
    """An int per text, equal for texts that are identical after the tokenizer's caption cleaning."""
    cleaned = [tokenizer.clean(t) if tokenizer is not None else t for t in texts]
    table: dict[str, int] = {}
    return np.asarray([table.setdefault(t, len(table)) for t in cleaned], dtype=np.int64)


# ------------------------------------------------------------------------------------------ pixels


def recolour(pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Colour-scrambled copies of normalised views ``(n, 3, H, W)``: the garment's shape stays, its colours do not.

    Per view, from ``generator`` (CPU; three draws of ``n`` values each, in this order): a rotation of the colour
    space by a uniform angle about the grey axis (a hue rotation), a random order of the output channels and, for
    half of the views, an inversion through the mean colour. All three act on the CLIP-normalised values, whose
    origin is the mean colour and whose channel scales differ by under 6 %, so each map is orthogonal there and
    keeps every pixel's distance from the mean colour. The category term trains on these (``TrainConfig
    .category_recolour``): categories do not depend on colour, so a classifier that has to work on recoloured views
    cannot learn a training garment's category from its colour and pattern.
    """
    if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"recolour needs (n, 3, H, W) pixel values, got shape {tuple(pixel_values.shape)}")
    n = pixel_values.shape[0]
    theta = torch.rand(n, generator=generator, dtype=torch.float64) * (2 * np.pi)
    order = torch.argsort(torch.rand(n, 3, generator=generator), dim=1)
    invert = torch.rand(n, generator=generator) < 0.5
    k = torch.full((3,), 1 / np.sqrt(3), dtype=torch.float64)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=torch.float64)
    sin, cos = torch.sin(theta)[:, None, None], torch.cos(theta)[:, None, None]
    rot = torch.eye(3, dtype=torch.float64) + sin * cross + (1 - cos) * (cross @ cross)  # Rodrigues, (n, 3, 3)
    rot = rot[torch.arange(n)[:, None], order]  # output channel c takes row order[c]
    rot = torch.where(invert[:, None, None], -rot, rot)
    return torch.einsum("nij,njhw->nihw", rot.to(pixel_values.device, pixel_values.dtype), pixel_values)


def build_processor(config: DataConfig) -> X2VLMImageProcessor:
    return X2VLMImageProcessor(ImageSettings(image_res=config.image_res, crop_scale=tuple(config.crop_scale),
                                             crop_ratio_relative=config.crop_ratio_relative,
                                             hflip_prob=config.hflip_prob, erase_prob=config.erase_prob,
                                             brightness=config.photometric, contrast=config.photometric / 2,
                                             colour_cast=config.photometric / 4))


# ------------------------------------------------------------------------------------------ dataset


class ItemDataset(torch.utils.data.Dataset):
    """Training samples over an items table; indexed by ``(row, seed)`` pairs from :class:`PKBatchSampler`
    (an int row means no augmentation randomness: evaluation preprocessing).

    With ``config.bad_images="skip"`` an unreadable image gives ``{"skipped": key, "path": ..., "row": i}`` instead
    of a sample; :class:`Collator` drops it from the batch and lists it in ``batch["skipped"]``.
    """

    def __init__(self, items: pd.DataFrame, texts: Sequence[str], labels: np.ndarray, config: DataConfig,
                 store: ImageStore | None = None, processor: X2VLMImageProcessor | None = None,
                 text_group: np.ndarray | None = None) -> None:
        config.validate()
        if not (len(items) == len(texts) == len(labels)):
            raise ValueError(f"items ({len(items)}), texts ({len(texts)}) and labels ({len(labels)}) differ in length")
        items = items.reset_index(drop=True)
        self.columns = ItemColumns(items)
        self.texts = StringColumn(texts)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.categories = category_labels(items)
        self.text_group = (np.asarray(text_group, dtype=np.int64) if text_group is not None
                           else text_ids(list(texts)))
        self.config = config
        self.store = store if store is not None else ImageStore(config.store_side, config.cache_mb, config.draft,
                                                                config.bad_images)
        self.processor = processor or build_processor(config)

    def __len__(self) -> int:
        return len(self.columns)

    def row(self, i: int) -> dict[str, Any]:
        """The fields of row ``i`` a view needs (key, path, box, size)."""
        return self.columns.row(int(i))

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        row_idx, seed = (index, None) if isinstance(index, (int, np.integer)) else index
        row_idx = int(row_idx)
        row = self.columns.row(row_idx)
        cfg = self.config
        train = cfg.augment and seed is not None
        view = self.store.view(row, cfg.view, cfg.context)
        if view is None:
            return {"skipped": row["key"], "path": row["path"], "row": row_idx}
        rng = np.random.default_rng(int(seed)) if train else None
        pixels, _ = self.processor.process_one(view, train=train, rng=rng)
        label = int(self.labels[row_idx])
        sample = {"pixel_values": torch.from_numpy(pixels), "text": self.texts[row_idx], "label": label,
                  "category": int(self.categories[row_idx]),
                  # ITC/ITM positives: same identity; an item without one only matches itself
                  "itc_id": label if label >= 0 else -1 - row_idx,
                  "text_id": int(self.text_group[row_idx]), "row": row_idx, "key": row["key"]}
        if cfg.box_task and not cfg.box_per_batch:
            box = self.box_sample(row_idx)
            if box is None:
                return {"skipped": row["key"], "path": row["path"], "row": row_idx}
            sample.update(box)
        return sample

    def box_sample(self, row_idx: int) -> dict[str, torch.Tensor] | None:
        """The box task's input for one row: the whole photo and the item box relative to it (cx, cy, w, h);
        None for an unreadable photo with ``bad_images="skip"``."""
        row = self.columns.row(int(row_idx))
        got = self.store.image(row)
        if got is None:
            return None
        image, factor = got
        box = [float(row[k]) * factor for k in ("x1", "y1", "x2", "y2")]
        box_pixels, target = self.processor.process_one(image, train=False, box=box)
        return {"box_pixel_values": torch.from_numpy(box_pixels), "box_target": torch.from_numpy(target)}


class Collator:
    """Stack a list of samples; tokenise the texts (``padding="longest"``, official training call).

    With ``box_source`` (a dataset whose ``config.box_per_batch`` is n > 0), the box task's inputs are built here
    for the first n samples of the batch only, instead of for every sample. Skipped samples (unreadable images with
    ``bad_images="skip"``) are left out; their keys and paths are listed in ``batch["skipped"]``.
    """

    def __init__(self, tokenizer: X2VLMTokenizer, box_source: ItemDataset | None = None) -> None:
        self.tokenizer = tokenizer
        self.box_source = box_source

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        skipped = [{"key": s["skipped"], "path": s["path"]} for s in samples if "skipped" in s]
        samples = [s for s in samples if "skipped" not in s]
        if not samples:
            return {"skipped": skipped, "empty": True}
        enc = self.tokenizer([s["text"] for s in samples], padding="longest")
        batch: dict[str, Any] = {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([s["label"] for s in samples], dtype=torch.long),
            "categories": torch.tensor([s["category"] for s in samples], dtype=torch.long),
            "itc_ids": torch.tensor([s["itc_id"] for s in samples], dtype=torch.long),
            "text_ids": torch.tensor([s["text_id"] for s in samples], dtype=torch.long),
            "rows": torch.tensor([s["row"] for s in samples], dtype=torch.long),
            "keys": [s["key"] for s in samples],
            "skipped": skipped,
        }
        boxes = [s for s in samples if "box_pixel_values" in s]
        src = self.box_source
        if src is not None and src.config.box_task and src.config.box_per_batch and not boxes:
            for s in samples[:src.config.box_per_batch]:
                box = src.box_sample(s["row"])
                if box is None:  # unreadable photo (skip mode): the box task uses the rows before it
                    skipped.append({"key": s["key"], "path": src.row(s["row"])["path"]})
                    break
                boxes.append(box)
        if boxes:
            batch["box_pixel_values"] = torch.stack([s["box_pixel_values"] for s in boxes])
            batch["box_targets"] = torch.stack([s["box_target"] for s in boxes])
        return batch


# ------------------------------------------------------------------------------------------ evaluation views


class ViewDataset(torch.utils.data.Dataset):
    """One processed view per row of an items table, in order (evaluation preprocessing): ``(row, pixel array)``.

    ``view``: ``"crop"`` (the box given by ``boxes`` or the table's GT box, grown by ``context``) or ``"image"``.
    An unreadable image with ``store.on_error="skip"`` yields a grey placeholder view and is listed in the batch's
    ``"skipped"`` (so every row still gets an embedding and stays in the evaluation's denominator).
    ``tta_contexts`` (crop view only): further contexts cut from the same decode; the pixel array is then
    ``(1 + len(tta_contexts), 3, H, W)``, the ``context`` view first (test-time augmentation).
    """

    def __init__(self, items: pd.DataFrame, store: ImageStore, processor: X2VLMImageProcessor, view: str = "crop",
                 context: float = CROP_CONTEXT, boxes: np.ndarray | None = None,
                 tta_contexts: Sequence[float] = ()) -> None:
        if view not in VIEWS:
            raise ValueError(f"ViewDataset view must be one of {VIEWS}, got {view!r}")
        self.columns = ItemColumns(items, boxes)
        self.store, self.processor, self.view, self.context = store, processor, view, float(context)
        self.tta_contexts = tuple(float(c) for c in tta_contexts) if view == "crop" else ()

    def __len__(self) -> int:
        return len(self.columns)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.columns.row(int(i))
        out: dict[str, Any] = {"row": int(i)}
        if self.tta_contexts:
            images = self.store.crop_contexts(row, (self.context, *self.tta_contexts))
        else:
            image = self.store.view(row, self.view, self.context)
            images = None if image is None else [image]
        if images is None:
            images = [Image.new("RGB", (self.store.side, self.store.side), (128, 128, 128))] * (
                1 + len(self.tta_contexts))
            out["skipped"] = {"key": row["key"], "path": row["path"]}
        pixels = [torch.from_numpy(self.processor.process_one(im, train=False)[0]) for im in images]
        out["pixel_values"] = torch.stack(pixels) if self.tta_contexts else pixels[0]
        return out


def collate_views(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack :class:`ViewDataset` samples: ``pixel_values``, ``rows`` and the ``skipped`` list."""
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "rows": torch.tensor([s["row"] for s in samples], dtype=torch.long),
            "skipped": [s["skipped"] for s in samples if "skipped" in s]}


# ------------------------------------------------------------------------------------------ DataLoader


def resolve_workers(num_workers: int) -> int:
    """The ``num_workers`` parameter: -1 = auto (all cores but one, at most 8), 0 = load in the main process,
    n > 0 = n worker processes."""
    if num_workers < -1:
        raise ValueError(f"num_workers must be -1 (auto), 0 (in-process) or a worker count, got {num_workers}")
    if num_workers == -1:
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, cores - 1))
    return int(num_workers)


def build_loader(dataset: torch.utils.data.Dataset, collate_fn: Any, num_workers: int = -1, *,
                 batch_sampler: Any = None, batch_size: int | None = None, pin_memory: bool = False,
                 persistent: bool = True, prefetch_factor: int = 4, seed: int = 0) -> torch.utils.data.DataLoader:
    """The one DataLoader recipe: ``num_workers`` (:func:`resolve_workers`), pinned memory (CUDA), persistent
    workers, ``prefetch_factor`` batches per worker, a private seeded generator (worker seeds never move the
    global RNG), and the dataset's image-cache budget split across the workers. Batches come from
    ``batch_sampler`` or, in order, ``batch_size`` rows at a time (None: each dataset item is a batch)."""
    workers = resolve_workers(num_workers)
    store = getattr(dataset, "store", None)
    if isinstance(store, ImageStore):
        store.split_budget(workers)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra.update(persistent_workers=persistent, prefetch_factor=prefetch_factor)
    if batch_sampler is not None:
        extra["batch_sampler"] = batch_sampler
    else:  # batch_size None: the dataset's items are batches already (no automatic batching)
        extra.update(batch_size=batch_size, shuffle=False)
    return torch.utils.data.DataLoader(dataset, collate_fn=collate_fn, num_workers=workers, pin_memory=pin_memory,
                                       generator=torch.Generator().manual_seed(seed), **extra)


# ------------------------------------------------------------------------------------------ P×K sampling


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])


class PKBatchSampler(torch.utils.data.Sampler):
    """Batches of P identities × K items (rows with label >= 0 only), resumable.

    Epoch ``e``: the identities are shuffled with a generator seeded by ``(seed, e)`` and cut into groups of P
    (the remainder is dropped); each identity contributes K of its rows (without replacement when it has at
    least K, else with replacement). Every yielded batch is a list of ``(row, augmentation seed)`` pairs.
    ``state_dict()`` / ``load_state_dict()`` hold ``epoch`` and ``position`` (batches already consumed in the
    epoch); iteration resumes from there, and :meth:`advance` is called by the training loop after each step.
    """

    def __init__(self, labels: np.ndarray, identities_per_batch: int, per_identity: int, seed: int = 0) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        members: dict[int, list[int]] = {}
        for row, lab in enumerate(labels):
            if lab >= 0:
                members.setdefault(int(lab), []).append(row)
        if len(members) < identities_per_batch:
            raise ValueError(f"P×K sampling needs at least P={identities_per_batch} identities with style > 0, "
                             f"the training items hold {len(members)}; lower identities_per_batch")
        self.members = {k: np.asarray(v, dtype=np.int64) for k, v in sorted(members.items())}
        self.classes = np.asarray(sorted(self.members), dtype=np.int64)
        self.P, self.K, self.seed = int(identities_per_batch), int(per_identity), int(seed)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return len(self.classes) // self.P

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Every batch of ``epoch`` (deterministic)."""
        rng = np.random.default_rng(_seed_of(self.seed, epoch, 0x5EED))
        order = self.classes[rng.permutation(len(self.classes))]
        out = []
        for b in range(len(self)):
            rows: list[int] = []
            for cls in order[b * self.P:(b + 1) * self.P]:
                pool = self.members[int(cls)]
                rows.extend(rng.choice(pool, self.K, replace=len(pool) < self.K).tolist())
            out.append([(r, _seed_of(self.seed, epoch, b, j)) for j, r in enumerate(rows)])
        return out

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def advance(self) -> None:
        self.position += 1

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        yield from self.batches(self.epoch)[self.position:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses seed {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def text_hash(text: str) -> int:
    """A stable 31-bit hash of a text (for logs and cache keys; Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8")) & 0x7FFFFFFF
