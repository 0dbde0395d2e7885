"""The embedded default data: a synthetic benchmark in the exact DeepFashion2 layout and schema.

``generate(out_dir, config)`` writes ``<out>/{train,validation,test}/{image,annos}/NNNNNN.{jpg,json}`` (read unchanged
by :func:`capret_utils.data.df2.load_items`), ``<out>/<split>/attributes.jsonl`` (per item: ``key``, ``colour``,
``colour_rgb``, ``pattern``, ``pattern_colour`` — ground truth the DeepFashion2 schema has no field for) and
``<out>/synth.json`` (config + counts, written last). :func:`ensure_benchmark` generates only when needed, into a
temporary sibling folder renamed into place under a lock file, so a killed run never leaves a half benchmark
that looks complete and two processes can call it at once. CLI: ``python -m capret_utils.data.synth --out DIR``.

What is drawn (all with PIL, in the 13 DeepFashion2 category silhouettes):

* an **identity** ``(pair_id, style > 0)`` is a fixed category + colour + pattern + pattern colour (+ a small
  shape jitter), unique within a split; about half of the identities are near-duplicates of an earlier one that
  differ in exactly one of those factors (same fabric as another garment, same colour different pattern …), so
  colour statistics alone cannot solve retrieval;
* **shop** images: plain light background, centred, the garment laid flat (viewpoint 1) or worn by a frontal
  model (viewpoint 2), no lighting change;
* **user** images: a person wearing an outfit that holds one or both of the pair's identities plus style-0
  garments, on a cluttered background (shapes, some in garment colours), camera at three distances (scale), close
  shots cut by the frame (zoom-in), occluders (bags, arms, hair, objects) over the main garment (occlusion),
  mirrored / rotated / perspective-squeezed side or back views (viewpoint 3), and lighting changes (brightness,
  contrast, colour cast, light gradient, noise, blur). Brightness stays within x0.8-1.2 (cast +-6 %) so that
  palette colours differing mainly in lightness (white / grey, red / maroon, orange / brown) stay distinguishable.

Every label is measured from the rendered geometry, not asserted: ``scale`` from the box / image area ratio
(< 10 % → 1, < 40 % → 2, else 3), ``zoom_in`` from the fraction of the garment's area outside the frame (< 5 % →
1, < 30 % → 2, else 3), ``occlusion`` from the fraction of its in-frame pixels covered by later garments or
occluders (< 10 % → 1, < 40 % → 2, else 3). Landmarks are points at equal arc length along the garment outline
(v = 2 visible, 1 covered, 0 with x = y = 0 outside the frame); the segmentation is the outline clipped to the
image. Output is byte-identical for a seed: each image's randomness comes from ``(seed, split, image_id)``, JPEG
quality and chroma subsampling are fixed, and nothing depends on dict order, hashing or the worker count.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from capret_utils.data.df2 import CATEGORY_NAMES, LANDMARK_COUNTS

SYNTH_VERSION = 3
"""Bumped whenever the generator's output changes; a recorded different version triggers regeneration."""

MARKER = "synth.json"
ATTRIBUTES_FILE = "attributes.jsonl"
SPLIT_CODES = {"train": 1, "validation": 2, "test": 3}
SPLITS = tuple(SPLIT_CODES)  # train (fit), validation (select), test (report once)

PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (238, 238, 235),
    "grey": (130, 130, 134),
    "navy": (24, 36, 96),
    "blue": (36, 92, 200),
    "sky blue": (120, 182, 232),
    "red": (204, 30, 40),
    "maroon": (112, 22, 40),
    "pink": (240, 146, 182),
    "orange": (240, 128, 28),
    "yellow": (242, 210, 40),
    "green": (34, 140, 64),
    "olive": (112, 112, 36),
    "purple": (112, 48, 150),
    "beige": (222, 200, 158),
    "brown": (112, 70, 38),
}
"""Garment colours (name → sRGB as drawn, before lighting)."""
COLOURS = tuple(PALETTE)
PATTERNS = ("solid", "horizontal stripes", "vertical stripes", "polka dots", "checks")

UPPER, OUTWEAR, LOWER, DRESS = (1, 2, 5, 6), (3, 4), (7, 8, 9), (10, 11, 12, 13)
_SKIN = ((241, 194, 160), (224, 172, 120), (198, 134, 86), (141, 96, 60), (96, 62, 42))
_HAIR = ((20, 16, 14), (58, 38, 24), (110, 76, 44), (196, 160, 96))


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Every field changes the output (``generate``'s ``workers`` does not).

    Sizes: ``*_pairs`` pairs (= shop products) per split; each pair has 1 identity, or 2 with probability
    ``two_style_prob``; ``*_user_per_pair`` / ``shop_per_pair`` are inclusive (min, max) image counts per pair.
    ``image_size``: (min, max) long side of an image, pixels. ``near_duplicate_prob``: chance that a new identity
    copies an earlier one and changes one factor (category, colour, pattern or pattern colour).
    ``close_prob`` / ``small_prob``: share of user photos taken close (large, often cut by the frame) / from far
    (small garments); the rest are full-body. ``occlusion_probs``: chance of no / medium / heavy occluder on the
    main garment of a user photo. ``side_view_prob``: share of user photos seen from the side or back.
    """

    seed: int = 0
    # train: fewer identities, more user photos each. In the demo's fixed step budget ArcFace learns faster from
    # identities it sees often: 360 vision-only steps gave val hit@1 0.07 / 0.39 / 0.52 / 0.57 with 1200 / 450 /
    # 250 / 150 train pairs (the validation split does not depend on the train sizes)
    train_pairs: int = 250
    val_pairs: int = 110
    test_pairs: int = 110  # held-out identities (none of their garments is a train or validation identity)
    train_user_per_pair: tuple[int, int] = (4, 6)
    val_user_per_pair: tuple[int, int] = (3, 5)
    shop_per_pair: tuple[int, int] = (1, 3)
    two_style_prob: float = 0.3
    image_size: tuple[int, int] = (256, 320)
    near_duplicate_prob: float = 0.5
    # nuisance rates (tuned 2026-11-25; were 0.3 / 0.2 / (0.6, 0.32, 0.08) / 0.25): with the old rates a small CNN
    # trained to convergence stopped at val hit@1 0.874; with these it reaches 0.908 in 30 epochs while a random
    # ViT stays at 0.078 (benchmarks/bench_synth_baselines.py). Outfit layers still cover 39 % of the queries.
    close_prob: float = 0.15
    small_prob: float = 0.1
    occlusion_probs: tuple[float, float, float] = (0.9, 0.08, 0.02)
    side_view_prob: float = 0.15
    jpeg_quality: int = 90

    @classmethod
    def demo(cls, seed: int = 0) -> "SynthConfig":
        """The ``make demo`` size (the defaults): 250 train / 110 validation / 110 test pairs, long side 256–320
        px."""
        return cls(seed=seed)

    @classmethod
    def smoke(cls, seed: int = 0) -> "SynthConfig":
        """Tiny: 4 pairs per split, small images; generates in about a second (CI notebook smoke runs, tests)."""
        return cls(seed=seed, train_pairs=4, val_pairs=4, test_pairs=4, train_user_per_pair=(2, 2),
                   val_user_per_pair=(2, 3),
                   shop_per_pair=(1, 2), image_size=(128, 160))

    def pairs(self, split: str) -> int:
        return {"train": self.train_pairs, "validation": self.val_pairs, "test": self.test_pairs}[split]

    def user_per_pair(self, split: str) -> tuple[int, int]:
        return self.train_user_per_pair if split == "train" else self.val_user_per_pair

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def validate(self) -> None:
        for name in ("train_pairs", "val_pairs", "test_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"SynthConfig.{name} must be >= 1")
        for name in ("train_user_per_pair", "val_user_per_pair", "shop_per_pair", "image_size"):
            lo, hi = getattr(self, name)
            if not (1 <= lo <= hi):
                raise ValueError(f"SynthConfig.{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
        if self.image_size[0] < 64:
            raise ValueError("SynthConfig.image_size: the long side must be >= 64 px")
        if abs(sum(self.occlusion_probs) - 1) > 1e-6:
            raise ValueError("SynthConfig.occlusion_probs must sum to 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("SynthConfig.jpeg_quality must be in 1..100")


# ------------------------------------------------------------------------------------- garment geometry


@dataclass(frozen=True)
class Look:
    """The appearance of one garment: what makes an identity (plus shape jitter and pattern scale)."""

    category_id: int
    colour: str
    pattern: str
    pattern_colour: str | None
    shape: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0)  # length, width, sleeve, neck, flare
    period: float = 0.03  # pattern period, person-height units
    phase: float = 0.0  # pattern phase, fraction of a period

    @property
    def factors(self) -> tuple[int, str, str, str | None]:
        return (self.category_id, self.colour, self.pattern, self.pattern_colour)


def _mirror_close(right: list[tuple[float, float]], open_front: bool) -> np.ndarray:
    """Full outline from the right half (x >= 0), mirrored to the left.

    Closed garments: ``right`` runs from a point on the centre line (top) to one on the centre line (bottom).
    Open-front garments: ``right`` runs from the right neck point to the right inner edge of the opening.
    """
    if open_front:
        left = [(-x, y) for x, y in reversed(right)]
    else:
        left = [(-x, y) for x, y in reversed(right[1:-1])]
    return np.asarray(right + left, dtype=np.float64)


def _sleeve(shoulder: tuple[float, float], armpit: tuple[float, float], long: bool, f: float
            ) -> list[tuple[float, float]]:
    ang = math.radians(73 if long else 40)
    d = (math.cos(ang), math.sin(ang))
    lo, li = (0.30 * f, 0.20 * f) if long else (0.10 * f, 0.06 * f)
    return [(shoulder[0] + lo * d[0], shoulder[1] + lo * d[1]), (armpit[0] + li * d[0], armpit[1] + li * d[1])]


def garment_outline(category_id: int, shape: Sequence[float] = (1, 1, 1, 1, 1)) -> np.ndarray:
    """Outline polygon (N × 2, person-height units: x from the body's centre line, y down from the head top).

    The 13 silhouettes: tops with short / long sleeves; outwear the same but longer and open at the front;
    vest (no sleeves, cut-in armholes); sling (thin straps); shorts, trousers (crotch notch); skirt (flared
    trapezoid); dresses = the four upper bodies continued into a flared skirt.
    """
    length, width, sleeve, neck, flare = (float(v) for v in shape)
    w = width
    c = category_id
    if c in LOWER:
        waist = 0.45
        if c == 7:
            right = [(0, waist), (0.094 * w, waist), (0.113 * w, 0.52), (0.128 * w * flare, 0.45 + 0.18 * length),
                     (0.022 * w, 0.455 + 0.185 * length), (0, 0.575)]
        elif c == 8:
            hem = 0.45 + 0.47 * length
            right = [(0, waist), (0.094 * w, waist), (0.113 * w, 0.53), (0.104 * w * flare, 0.74),
                     (0.094 * w * flare, hem), (0.036 * w, hem), (0.03 * w, 0.74), (0, 0.585)]
        else:
            hem = 0.45 + 0.25 * length
            right = [(0, waist), (0.092 * w, waist), (0.116 * w, 0.53), (0.152 * w * flare, hem), (0, hem + 0.005)]
        return _mirror_close(right, open_front=False)

    nd = 0.035 * neck
    top_kind = {1: "short", 2: "long", 3: "short", 4: "long", 5: "vest", 6: "sling", 10: "short", 11: "long",
                12: "vest", 13: "sling"}[c]
    shoulder, armpit = (0.125 * w, 0.165), (0.104 * w, 0.258)
    if top_kind in ("short", "long"):
        body = [(0.045 * w, 0.138), shoulder, *_sleeve(shoulder, armpit, top_kind == "long", sleeve), armpit]
        head = (0.0, 0.14 + nd)
    elif top_kind == "vest":
        body = [(0.05 * w, 0.138), (0.086 * w, 0.148), (0.088 * w, 0.2), (0.108 * w, 0.255)]
        head = (0.0, 0.15 + nd)
    else:  # sling: neckline straight across the chest, thin straps
        body = [(0.052 * w, 0.226), (0.056 * w, 0.156), (0.068 * w, 0.155), (0.07 * w, 0.222), (0.104 * w, 0.232),
                (0.106 * w, 0.27)]
        head = (0.0, 0.236)
    if c in DRESS:
        hem = 0.45 + 0.33 * length
        lower = [(0.092 * w, 0.41), (0.116 * w, 0.5), (0.165 * w * flare, hem), (0.0, hem + 0.006)]
        return _mirror_close([head, *body, *lower], open_front=False)
    if c in OUTWEAR:  # longer than a top, hanging open: the front opening widens from the V to the hem
        hem = 0.45 + 0.14 * length
        right = [*body, (0.106 * w, 0.4), (0.12 * w, hem), (0.034 * w, hem + 0.004), (0.012 * w, 0.22 + 0.03 * neck)]
        return _mirror_close(right, open_front=True)
    hem = 0.42 + 0.08 * length
    return _mirror_close([head, *body, (0.098 * w, 0.4), (0.108 * w, hem), (0.0, hem + 0.004)], open_front=False)


def outline_landmarks(outline: np.ndarray, n: int) -> np.ndarray:
    """``n`` points at equal arc length along a closed outline, starting at its first vertex."""
    pts = np.vstack([outline, outline[:1]])
    seg = np.hypot(*np.diff(pts, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    targets = np.arange(n) * cum[-1] / n
    idx = np.clip(np.searchsorted(cum, targets, side="right") - 1, 0, len(seg) - 1)
    t = ((targets - cum[idx]) / np.maximum(seg[idx], 1e-12))[:, None]
    return pts[idx] * (1 - t) + pts[idx + 1] * t


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a simple polygon (N × 2)."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def clip_polygon(poly: np.ndarray, width: float, height: float) -> np.ndarray:
    """Sutherland–Hodgman clip of a polygon to the rectangle [0, width] × [0, height]."""
    out = [tuple(p) for p in poly]
    for axis, bound, keep_less in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        if not out:
            break
        src, out = out, []
        for i, cur in enumerate(src):
            prev = src[i - 1]
            cin = cur[axis] <= bound if keep_less else cur[axis] >= bound
            pin = prev[axis] <= bound if keep_less else prev[axis] >= bound
            if cin != pin:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append(tuple(prev[k] + t * (cur[k] - prev[k]) for k in (0, 1)))
            if cin:
                out.append(cur)
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def apply_homography(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Map N × 2 points through a 3 × 3 homography."""
    pts = np.asarray(pts, np.float64)
    p = pts @ h[:2, :2].T + h[:2, 2]
    wz = pts @ h[2, :2] + h[2, 2]
    return p / wz[:, None]


# ------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ItemPlan:
    style: int
    look: Look


@dataclass(frozen=True)
class ImagePlan:
    """One image: which garments it shows (in drawing order, lowest layer first) and how it is shot."""

    image_id: int
    source: str
    pair_id: int
    kind: str  # "flat" (laid flat, shop only) or "worn"
    items: tuple[ItemPlan, ...]
    target: int  # index in items of the main garment (the camera frames it; occluders go on it)
    tucked: bool = False  # upper garment tucked into the lower one (lower drawn on top)


def _contrast(a: str, b: str) -> float:
    return float(np.linalg.norm(np.subtract(PALETTE[a], PALETTE[b])))


def _random_look(rng: np.random.Generator, category: int | None = None) -> Look:
    cat = int(category if category is not None else rng.integers(1, 14))
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=[0.36, 0.16, 0.16, 0.16, 0.16]))]
    pcol = None
    if pattern != "solid":
        options = [c for c in COLOURS if _contrast(c, colour) > 150]
        pcol = options[int(rng.integers(len(options)))]
    return _with_details(rng, Look(cat, colour, pattern, pcol))


def _with_details(rng: np.random.Generator, look: Look) -> Look:
    shape = tuple(float(round(v, 4)) for v in rng.uniform(0.88, 1.12, size=5))
    period = float(round(rng.uniform(0.03, 0.045), 5))
    return replace(look, shape=shape, period=period, phase=float(round(rng.random(), 4)))


def _near_duplicate(rng: np.random.Generator, base: Look, category: int | None) -> Look:
    """``base`` with exactly one factor changed (the category, when one is forced)."""
    if category is not None and category != base.category_id:
        return _with_details(rng, replace(base, category_id=category))
    options = ["colour", "pattern"] + (["pattern_colour"] if base.pattern_colour else [])
    if category is None:
        options.insert(0, "category")
    what = options[int(rng.integers(len(options)))]
    if what == "category":
        cats = [c for c in range(1, 14) if c != base.category_id]
        return _with_details(rng, replace(base, category_id=cats[int(rng.integers(len(cats)))]))
    if what == "colour":
        opts = [c for c in COLOURS if c != base.colour
                and (base.pattern_colour is None or _contrast(c, base.pattern_colour) > 150)]
        return _with_details(rng, replace(base, colour=opts[int(rng.integers(len(opts)))]))
    if what == "pattern":
        pats = [p for p in PATTERNS if p != base.pattern]
        pat = pats[int(rng.integers(len(pats)))]
        pcol = base.pattern_colour
        if pat == "solid":
            pcol = None
        elif pcol is None:
            opts = [c for c in COLOURS if _contrast(c, base.colour) > 150]
            pcol = opts[int(rng.integers(len(opts)))]
        return _with_details(rng, replace(base, pattern=pat, pattern_colour=pcol))
    opts = [c for c in COLOURS if c != base.pattern_colour and _contrast(c, base.colour) > 150]
    return _with_details(rng, replace(base, pattern_colour=opts[int(rng.integers(len(opts)))]))


def _compatible(cat: int) -> tuple[int, ...]:
    if cat in UPPER:
        return LOWER + OUTWEAR
    if cat in LOWER:
        return UPPER + OUTWEAR
    if cat in OUTWEAR:
        return UPPER + LOWER + DRESS
    return OUTWEAR


def _layer(cat: int) -> int:
    return 0 if cat in LOWER else 1 if cat in UPPER or cat in DRESS else 2


def _outfit(rng: np.random.Generator, worn: list[ItemPlan], used: set, fillers: set,
            extra_outwear: float) -> list[ItemPlan]:
    """Complete an outfit around the pair's garments with style-0 fillers; sorted into drawing layers.

    A filler never looks like an identity of the split (``used``); its factors go to ``fillers`` so that later
    identities avoid them too.
    """
    cats = {it.look.category_id for it in worn}
    fill: list[int] = []
    has = lambda group: any(c in group for c in cats)  # noqa: E731
    if not has(DRESS):
        if has(UPPER) and not has(LOWER):
            fill.append(int(rng.choice(LOWER)))
        elif has(LOWER) and not has(UPPER):
            fill.append(int(rng.choice(UPPER)))
        elif not has(UPPER) and not has(LOWER):  # outwear only
            fill += [int(rng.choice(DRESS))] if rng.random() < 0.3 else [int(rng.choice(UPPER)), int(rng.choice(LOWER))]
    if not has(OUTWEAR) and len(worn) + len(fill) < 3 and not has((6, 13)) and rng.random() < extra_outwear:
        fill.append(int(rng.choice(OUTWEAR)))
    items = list(worn)
    for cat in fill[: 3 - len(worn)]:
        look = _random_look(rng, cat)
        while look.factors in used:
            look = _random_look(rng, cat)
        fillers.add(look.factors)
        items.append(ItemPlan(0, look))
    return sorted(items, key=lambda it: _layer(it.look.category_id))


def identity_factors(plans: Sequence[ImagePlan]) -> set:
    """The factor tuples of the identities (style > 0 garments) in a split's plan."""
    return {it.look.factors for plan in plans for it in plan.items if it.style > 0}


def plan_split(config: SynthConfig, split: str) -> list[ImagePlan]:
    """Decide every image of a split: identities per pair, which garments each image shows, image order.

    Train images are ordered by pair with user and shop images mixed inside a pair; validation lists all user
    images first, then all shop images (as in the released splits).
    """
    rng = np.random.default_rng([config.seed, SPLIT_CODES[split], 0])
    used: set = set()
    if split == "test":  # held-out identities: no test identity is a train or validation identity
        used = identity_factors(plan_split(config, "train")) | identity_factors(plan_split(config, "validation"))
    fillers: set = set()
    identities: list[Look] = []

    def new_identity(category: int | None) -> Look:
        for _ in range(200):
            if identities and rng.random() < config.near_duplicate_prob:
                look = _near_duplicate(rng, identities[int(rng.integers(len(identities)))], category)
            else:
                look = _random_look(rng, category)
            if look.factors not in used and look.factors not in fillers:
                break
        else:  # pragma: no cover - the factor space (13 x 16 x ~50) is far larger than any split
            raise RuntimeError("could not find a new unique identity; reduce the number of pairs")
        used.add(look.factors)
        identities.append(look)
        return look

    pairs: list[tuple[list[ImagePlan], list[ImagePlan]]] = []
    for pair_id in range(1, config.pairs(split) + 1):
        styles = [ItemPlan(1, new_identity(None))]
        if rng.random() < config.two_style_prob:
            options = _compatible(styles[0].look.category_id)
            styles.append(ItemPlan(2, new_identity(int(options[int(rng.integers(len(options)))]))))
        n_shop = int(rng.integers(config.shop_per_pair[0], config.shop_per_pair[1] + 1))
        lo, hi = config.user_per_pair(split)
        n_user = int(rng.integers(lo, hi + 1))
        shop, user = [], []
        for j in range(n_shop):
            flat = rng.random() < 0.5 and not (len(styles) == 2 and n_shop == 1)
            if flat:
                shown = [styles[j % len(styles)]]
                shop.append(("flat", shown, 0, False))
            else:
                items = _outfit(rng, styles, used, fillers, extra_outwear=0.05)
                tgt = [n for n, it in enumerate(items) if it.style == styles[j % len(styles)].style][0]
                shop.append(("worn", items, tgt, bool(rng.random() < 0.4)))
        covered: set[int] = set()
        for k in range(n_user):
            if len(styles) == 2:
                pick = int(rng.choice(3, p=[0.3, 0.3, 0.4]))
                shown = [styles[0]] if pick == 0 else [styles[1]] if pick == 1 else list(styles)
                if k == n_user - 1 and len(covered | {it.style for it in shown}) < 2:
                    shown = list(styles)  # every identity is queried at least once
                covered |= {it.style for it in shown}
            else:
                shown = list(styles)
            items = _outfit(rng, shown, used, fillers, extra_outwear=0.06)
            pair_items = [n for n, it in enumerate(items) if it.style > 0]
            tgt = pair_items[int(rng.integers(len(pair_items)))]
            user.append(("worn", items, tgt, bool(rng.random() < 0.4)))
        pairs.append(([("shop", pair_id, *s) for s in shop], [("user", pair_id, *u) for u in user]))

    if split == "train":
        order = []
        for shop, user in pairs:
            imgs = shop + user
            perm = rng.permutation(len(imgs))
            order += [imgs[int(k)] for k in perm]
    else:
        order = [u for _, user in pairs for u in user] + [s for shop, _ in pairs for s in shop]
    return [ImagePlan(n + 1, src, pid, kind, tuple(items), tgt, tucked)
            for n, (src, pid, kind, items, tgt, tucked) in enumerate(order)]


# ----------------------------------------------------------------------------------------------- render


def _pattern_rgb(look: Look, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """RGB (h × w × 3 float) of the look's fabric at person-unit coordinates ``xs`` (w,), ``ys`` (h,)."""
    base = np.asarray(PALETTE[look.colour], np.float32)
    out = np.broadcast_to(base, (len(ys), len(xs), 3)).copy()
    if look.pattern == "solid" or look.pattern_colour is None:
        return out
    pc = np.asarray(PALETTE[look.pattern_colour], np.float32)
    p, ph = look.period, look.phase
    X, Y = np.meshgrid(xs / p + ph, ys / p + ph)
    if look.pattern == "horizontal stripes":
        m = (Y % 1.0) < 0.45
    elif look.pattern == "vertical stripes":
        m = (X % 1.0) < 0.45
    elif look.pattern == "polka dots":
        row = np.floor(Y * 0.8)
        fx = (X * 0.8 + 0.5 * (row % 2)) % 1.0 - 0.5
        fy = (Y * 0.8) % 1.0 - 0.5
        m = fx * fx + fy * fy < 0.22 ** 2
    else:  # checks (gingham): bands in both directions, crossings full colour
        a = ((X % 1.0) < 0.5).astype(np.float32)
        b = ((Y % 1.0) < 0.5).astype(np.float32)
        w = (0.5 * (a + b))[..., None]
        return out * (1 - w) + pc * w
    out[m] = pc
    return out


def _shade(colour: tuple[int, int, int] | np.ndarray, k: float) -> tuple[int, int, int]:
    c = np.asarray(colour, np.float32)
    if k < 1 and c.mean() < 60:  # dark fabrics get lighter seams instead of invisible ones
        c = c + 55 * (1 - k) / 0.3
    else:
        c = c * k
    return tuple(int(v) for v in np.clip(c, 0, 255))


class _Canvas:
    """The person (or a flat garment) drawn in person units before it is placed in the scene."""

    def __init__(self, ppu: float) -> None:
        self.ppu = ppu  # canvas pixels per person-height unit
        self.x0, self.y0 = -0.32, -0.02  # canvas origin in person units
        self.w, self.h = int(math.ceil(0.64 * ppu)), int(math.ceil(1.04 * ppu))
        self.img = Image.new("RGBA", (self.w, self.h), (0, 0, 0, 0))

    def px(self, pts: np.ndarray) -> np.ndarray:
        return (np.asarray(pts, np.float64) - (self.x0, self.y0)) * self.ppu

    def draw_body(self, rng: np.random.Generator, back_view: bool) -> None:
        d = ImageDraw.Draw(self.img)
        skin = _SKIN[int(rng.integers(len(_SKIN)))] + (255,)
        hair = _HAIR[int(rng.integers(len(_HAIR)))] + (255,)
        u = self.ppu

        def line(a, b, width):
            p = self.px(np.asarray([a, b], np.float64))
            d.line([tuple(p[0]), tuple(p[1])], fill=skin, width=max(1, int(width * u)))

        for s in (-1, 1):
            line((0.055 * s, 0.5), (0.066 * s, 0.95), 0.05)  # legs
            line((0.118 * s, 0.18), (0.2 * s, 0.46), 0.036)  # arms
            foot = self.px(np.asarray([[0.066 * s - 0.03, 0.94], [0.066 * s + 0.03, 0.985]]))
            d.ellipse([tuple(foot[0]), tuple(foot[1])], fill=(40, 34, 30, 255))
        line((0, 0.1), (0, 0.17), 0.05)  # neck
        head = self.px(np.asarray([[-0.052, 0.012], [0.052, 0.122]]))
        d.ellipse([tuple(head[0]), tuple(head[1])], fill=hair if back_view else skin)
        if not back_view:
            cap = self.px(np.asarray([[-0.055, 0.005], [0.055, 0.07]]))
            d.chord([tuple(cap[0]), tuple(cap[1])], 180, 360, fill=hair)

    def draw_garment(self, look: Look) -> Image.Image:
        """Draw a garment; returns its own full mask (canvas-sized 'L' image)."""
        outline = garment_outline(look.category_id, look.shape)
        pts = self.px(outline)
        x1, y1 = np.floor(pts.min(0)).astype(int)
        x2, y2 = np.ceil(pts.max(0)).astype(int) + 1
        x1, y1 = max(x1, 0), max(y1, 0)
        x2, y2 = min(x2, self.w), min(y2, self.h)
        xs = (np.arange(x1, x2) + 0.5) / self.ppu + self.x0
        ys = (np.arange(y1, y2) + 0.5) / self.ppu + self.y0
        rgb = _pattern_rgb(look, xs, ys)
        # soft light from above-left: a gentle gradient over the garment
        gy = np.linspace(1.04, 0.9, len(ys), dtype=np.float32)[:, None, None]
        gx = np.linspace(1.02, 0.96, len(xs), dtype=np.float32)[None, :, None]
        patch = Image.fromarray(np.clip(rgb * gy * gx, 0, 255).astype(np.uint8), "RGB")
        local = [tuple(p) for p in (pts - [x1, y1])]
        mask = Image.new("L", patch.size, 0)
        ImageDraw.Draw(mask).polygon(local, fill=255)
        self._details(ImageDraw.Draw(patch), look, outline, np.asarray([x1, y1], np.float64))
        self.img.paste(patch, (int(x1), int(y1)), mask)
        full = Image.new("L", (self.w, self.h), 0)
        full.paste(mask, (int(x1), int(y1)))
        return full

    def _details(self, d: ImageDraw.ImageDraw, look: Look, outline: np.ndarray, off: np.ndarray) -> None:
        """Seams, neckline, waistband, lapels and folds, in a shade of the base colour."""
        base = PALETTE[look.colour]
        dark = _shade(base, 0.7) + ()
        lw = max(1, int(round(self.ppu / 140)))
        to = lambda a: [tuple(p) for p in (self.px(np.asarray(a, np.float64)) - off)]  # noqa: E731
        d.line(to(np.vstack([outline, outline[:1]])), fill=dark, width=lw)
        c, (length, w, _, neck, _) = look.category_id, look.shape
        if c in LOWER:
            d.line(to([(-0.092 * w, 0.462), (0.092 * w, 0.462)]), fill=dark, width=lw)
            if c != 9:
                d.line(to([(0.0, 0.45), (0.0, 0.56)]), fill=dark, width=lw)
            return
        if c in (1, 2, 10, 11):
            nd = 0.035 * neck
            d.line(to([(-0.045 * w, 0.138), (-0.02 * w, 0.14 + 0.8 * nd), (0.0, 0.14 + nd),
                       (0.02 * w, 0.14 + 0.8 * nd), (0.045 * w, 0.138)]), fill=dark, width=2 * lw)
        if c in OUTWEAR:  # lapels, buttons and pockets in a darker shade
            v = 0.22 + 0.03 * neck
            for s in (-1, 1):
                d.polygon(to([(0.045 * w * s, 0.138), (0.08 * w * s, 0.165), (0.04 * w * s, v - 0.01),
                              (0.012 * w * s, v)]), fill=dark)
                px0 = 0.06 * w * s
                d.rectangle(sorted_box(to([(px0 - 0.02 * w, 0.47), (px0 + 0.02 * w, 0.5)])), outline=dark, width=lw)
            for k in range(3):
                y = v + 0.05 + 0.07 * k
                r = 0.006
                b = to([(-0.03 * w - r, y - r), (-0.03 * w + r, y + r)])
                d.ellipse([b[0], b[1]], fill=dark)
        if c in DRESS:
            d.line(to([(-0.09 * w, 0.41), (0.09 * w, 0.41)]), fill=dark, width=lw)
        for k in (-1, 1):  # folds
            d.line(to([(0.05 * w * k, 0.3), (0.06 * w * k, 0.38)]), fill=_shade(base, 0.85), width=lw)


def sorted_box(pts: list[tuple[float, float]]) -> list[float]:
    """[x1, y1, x2, y2] with x1 <= x2 and y1 <= y2 from two corner points (PIL needs ordered boxes)."""
    (ax, ay), (bx, by) = pts
    return [min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)]


def _perspective_coeffs(h: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE data for the scene ← canvas mapping given canvas → scene homography ``h``."""
    inv = np.linalg.inv(h)
    inv = inv / inv[2, 2]
    return tuple(float(v) for v in inv.ravel()[:8])


def _warp_masks(masks: dict[int, Image.Image], size: tuple[int, int], coeffs: tuple[float, ...]
                ) -> dict[int, np.ndarray]:
    """Warp per-garment masks into the scene, up to three per transform (packed into RGB channels)."""
    out: dict[int, np.ndarray] = {}
    keys = sorted(masks)
    blank = Image.new("L", next(iter(masks.values())).size, 0)
    for start in range(0, len(keys), 3):
        group = keys[start:start + 3]
        bands = [masks[k] for k in group] + [blank] * (3 - len(group))
        warped = np.asarray(Image.merge("RGB", bands).transform(size, Image.Transform.PERSPECTIVE, coeffs,
                                                                 Image.Resampling.NEAREST))
        for c, k in enumerate(group):
            out[k] = warped[..., c] > 127
    return out


def _background(rng: np.random.Generator, size: tuple[int, int], shop: bool) -> Image.Image:
    w, h = size
    if shop:
        v = int(rng.integers(228, 252))
        tint = rng.integers(-4, 5, size=3)
        top = np.clip(v + tint, 0, 255)
        bottom = np.clip(top - rng.integers(0, 14), 0, 255)
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        arr = top[None, None, :] * (1 - t) + bottom[None, None, :] * t
        return Image.fromarray(np.broadcast_to(arr, (h, w, 3)).astype(np.uint8), "RGB")
    c1, c2 = rng.integers(40, 230, size=(2, 3))
    horizon = rng.uniform(0.45, 0.85)
    t = np.clip((np.linspace(0, 1, h, dtype=np.float32) - horizon) * 12 + 0.5, 0, 1)[:, None, None]
    arr = c1[None, None, :] * (1 - t) + c2[None, None, :] * t
    img = Image.fromarray(np.broadcast_to(arr, (h, w, 3)).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 16))):
        if rng.random() < 0.35:
            col = tuple(int(v) for v in np.clip(np.asarray(PALETTE[COLOURS[int(rng.integers(len(COLOURS)))]])
                                                * rng.uniform(0.8, 1.1), 0, 255))
        else:
            col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x, y = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        bw, bh = rng.uniform(0.05, 0.5) * w, rng.uniform(0.05, 0.5) * h
        kind = rng.random()
        if kind < 0.45:
            d.rectangle([x, y, x + bw, y + bh], fill=col)
        elif kind < 0.75:
            d.ellipse([x, y, x + bw, y + bh], fill=col)
        elif kind < 0.9:
            d.line([x, y, x + bw, y + bh], fill=col, width=int(rng.integers(2, 9)))
        else:
            pts = [(float(px), float(py)) for px, py in zip(rng.uniform(x, x + bw, 4), rng.uniform(y, y + bh, 4))]
            d.polygon(pts, fill=col)
    return img


def _occluder(rng: np.random.Generator, size: tuple[int, int], target_mask: np.ndarray, frac: float,
              skin: tuple[int, int, int]) -> Image.Image:
    """An RGBA occluder (bag, arm, hair, object) over ``frac`` of the target garment's area (approximately)."""
    w, h = size
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    ys, xs = np.nonzero(target_mask)
    if len(xs) == 0:
        return layer
    area = frac * len(xs)
    k = int(rng.integers(len(xs)))
    cx, cy = float(xs[k]), float(ys[k])
    d = ImageDraw.Draw(layer)
    kind = ("bag", "arm", "hair", "object")[int(rng.integers(4))]
    if kind == "bag":
        side = math.sqrt(area / 0.85)
        bw, bh = side * rng.uniform(0.8, 1.25), side / rng.uniform(0.8, 1.25)
        col = (PALETTE[COLOURS[int(rng.integers(len(COLOURS)))]] if rng.random() < 0.5
               else tuple(int(v) for v in rng.integers(0, 256, 3)))
        d.rounded_rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], radius=max(1, int(side / 8)),
                            fill=tuple(col) + (255,))
        d.line([cx - bw / 3, cy - bh / 2, cx, cy - bh, cx + bw / 3, cy - bh / 2], fill=(30, 30, 30, 255),
               width=max(1, int(side / 14)))
    elif kind == "arm":
        span = math.sqrt(len(xs)) * rng.uniform(1.0, 1.6)
        width = max(2.0, area / span)
        ang = rng.uniform(0, math.pi)
        dx, dy = math.cos(ang) * span / 2, math.sin(ang) * span / 2
        d.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=skin + (255,), width=int(width))
        r = width * 0.7
        d.ellipse([cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r], fill=skin + (255,))
    elif kind == "hair":
        rx = math.sqrt(area / math.pi) * rng.uniform(0.6, 0.9)
        ry = area / (math.pi * rx)
        col = _HAIR[int(rng.integers(len(_HAIR)))]
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=col + (255,))
    else:
        side = math.sqrt(area)
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        pts = [(cx + side * rng.uniform(-0.8, 0.8), cy + side * rng.uniform(-0.8, 0.8)) for _ in range(5)]
        d.polygon(pts, fill=col + (255,))
        d.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=col + (255,))
    return layer


def _lighting(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Brightness, contrast, colour cast, a light gradient, sensor noise and sometimes blur."""
    a = np.array(img, np.float32)
    h, w = a.shape[:2]
    gain = rng.uniform(0.8, 1.2) * rng.uniform(0.94, 1.06, size=3).astype(np.float32)  # brightness, cast
    contrast = rng.uniform(0.85, 1.12)
    mean = float(a.mean()) * float(gain.mean())
    a *= (gain * contrast).astype(np.float32)[None, None, :]
    a += np.float32(mean * (1 - contrast))
    ang = rng.uniform(0, 2 * math.pi)
    k = rng.uniform(0.0, 0.12)
    grad = (1 + k * np.linspace(-1, 1, w, dtype=np.float32)[None, :] * math.cos(ang)
            + k * np.linspace(-1, 1, h, dtype=np.float32)[:, None] * math.sin(ang)).astype(np.float32)
    a *= grad[..., None]
    sigma = rng.uniform(0, 5)
    if sigma > 0.5:  # luminance noise
        a += (np.float32(sigma) * rng.standard_normal((h, w), dtype=np.float32))[..., None]
    np.clip(a, 0, 255, out=a)
    out = Image.fromarray(a.astype(np.uint8), "RGB")
    if rng.random() < 0.2:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return out


def _level(value: float, cuts: tuple[float, float]) -> int:
    return 1 if value < cuts[0] else 2 if value < cuts[1] else 3


SCALE_CUTS = (0.10, 0.40)  # box / image area
ZOOM_CUTS = (0.05, 0.30)  # share of the garment's area outside the frame
OCCLUSION_CUTS = (0.10, 0.40)  # share of the in-frame garment covered by later garments or occluders


def _scene_size(rng: np.random.Generator, cfg: SynthConfig, shop: bool) -> tuple[int, int]:
    long_side = int(rng.integers(cfg.image_size[0], cfg.image_size[1] + 1))
    aspect = float(rng.choice([0.75, 0.8, 1.0] if shop else [0.6, 0.75, 0.8, 1.0]))
    return max(16, int(round(long_side * aspect))), long_side


def _camera(rng: np.random.Generator, plan: ImagePlan, cfg: SynthConfig, size: tuple[int, int],
            outlines: list[np.ndarray], side_view: bool) -> tuple[np.ndarray, float]:
    """Person units → scene pixels homography (scale, placement, mirror, rotation, side-view squeeze and
    perspective) and the person's height in scene pixels."""
    w, h = size
    tgt = outlines[plan.target]
    tmin, tmax = tgt.min(0), tgt.max(0)
    ext = tmax - tmin
    shop = plan.source == "shop"
    if plan.kind == "flat":
        person_px = min(w / ext[0], h / ext[1]) * rng.uniform(0.68, 0.86)
        anchor = (tmin + tmax) / 2
        dest = np.asarray([w / 2, h / 2]) + rng.uniform(-0.03, 0.03, 2) * [w, h]
    else:
        if shop:  # close-ups only when one identity is shown, so no identity loses its shop photo to the crop
            single = sum(it.style > 0 for it in plan.items) == 1
            mode = "close" if rng.random() < 0.3 and single else "full"
        else:
            r = rng.random()
            mode = "close" if r < cfg.close_prob else "small" if r < cfg.close_prob + cfg.small_prob else "full"
        if mode == "full":
            person_px = h * rng.uniform(0.82, 1.0)
            anchor = np.asarray([0.0, 0.5])
            dest = np.asarray([w / 2, h / 2]) + rng.uniform(-0.06, 0.06, 2) * [w, h]
        elif mode == "small":
            person_px = h * rng.uniform(0.5, 0.66)
            anchor = np.asarray([0.0, 0.5])
            dest = np.asarray([rng.uniform(0.3, 0.7) * w, rng.uniform(0.4, 0.6) * h])
        else:
            fill = rng.uniform(0.7, 1.15) if not shop else rng.uniform(0.7, 0.9)
            person_px = min(w / ext[0], h / ext[1]) * fill
            anchor = (tmin + tmax) / 2 + (rng.uniform(-0.2, 0.2, 2) * ext if not shop else 0.0)
            dest = np.asarray([w / 2, h / 2])
    mirror = -1.0 if (not shop and rng.random() < 0.5) else 1.0
    squeeze = rng.uniform(0.62, 0.85) if side_view else 1.0
    theta = math.radians(float(np.clip(rng.normal(0, 5), -12, 12))) if not shop else 0.0
    t_in = np.asarray([[1, 0, -anchor[0]], [0, 1, -anchor[1]], [0, 0, 1]], np.float64)
    scale = np.diag([person_px * squeeze * mirror, person_px, 1.0])
    g = (rng.uniform(0.12, 0.3) * rng.choice([-1, 1]) / max(person_px * 0.3, 1)) if side_view else 0.0
    persp = np.asarray([[1, 0, 0], [0, 1, 0], [g, 0, 1]], np.float64)
    rot = np.asarray([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    t_out = np.asarray([[1, 0, dest[0]], [0, 1, dest[1]], [0, 0, 1]], np.float64)
    return t_out @ rot @ persp @ scale @ t_in, float(person_px)


def render_image(plan: ImagePlan, split: str, cfg: SynthConfig) -> tuple[bytes, dict[str, Any], list[dict[str, Any]]]:
    """Render one planned image: JPEG bytes, its DeepFashion2 annotation and its attribute records."""
    rng = np.random.default_rng([cfg.seed, SPLIT_CODES[split], plan.image_id, 7])
    shop = plan.source == "shop"
    size = _scene_size(rng, cfg, shop)
    w, h = size
    side_view = (not shop) and plan.kind == "worn" and rng.random() < cfg.side_view_prob
    back_view = side_view and rng.random() < 0.5
    viewpoint = 1 if plan.kind == "flat" else 3 if side_view else 2
    outlines = [garment_outline(it.look.category_id, it.look.shape) for it in plan.items]

    # camera: retry until the main garment is at least 60 % inside the frame
    for _attempt in range(8):
        h_person, person_px = _camera(rng, plan, cfg, size, outlines, side_view)
        tp = apply_homography(h_person, outlines[plan.target])
        full_area = polygon_area(tp)
        if full_area > 0 and polygon_area(clip_polygon(tp, w, h)) / full_area >= 0.6:
            break

    # draw the person / flat garment on a canvas at about the scene's resolution, then warp it into the scene
    canvas = _Canvas(float(np.clip(person_px, 96, 1.6 * max(w, h))))
    if plan.kind == "worn":
        canvas.draw_body(np.random.default_rng([cfg.seed, SPLIT_CODES[split], plan.image_id, 11]), back_view)
    order = list(range(len(plan.items)))
    if plan.tucked:  # lower garments drawn over the upper ones
        order.sort(key=lambda i: (0 if plan.items[i].look.category_id in UPPER else 1, i))
    masks_c: dict[int, Image.Image] = {}
    for i in order:
        masks_c[i] = canvas.draw_garment(plan.items[i].look)
    to_person = np.asarray([[1 / canvas.ppu, 0, canvas.x0], [0, 1 / canvas.ppu, canvas.y0], [0, 0, 1]])
    hmat = h_person @ to_person
    coeffs = _perspective_coeffs(hmat)
    scene = _background(rng, size, shop).convert("RGBA")
    layer = canvas.img.convert("RGBa").transform(size, Image.Transform.PERSPECTIVE, coeffs,
                                                 Image.Resampling.BILINEAR)
    scene.alpha_composite(layer.convert("RGBA"))
    masks = _warp_masks(masks_c, size, coeffs)

    # occluders on the main garment (user photos only)
    occ = np.zeros((h, w), bool)
    if not shop:
        level = int(rng.choice(3, p=list(cfg.occlusion_probs)))
        if level:
            frac = rng.uniform(0.15, 0.3) if level == 1 else rng.uniform(0.4, 0.55)
            layer_o = _occluder(rng, size, masks[plan.target], frac, _SKIN[int(rng.integers(len(_SKIN)))])
            scene.alpha_composite(layer_o)
            occ = np.asarray(layer_o.getchannel("A")) > 127
    scene_rgb = scene.convert("RGB")
    if not shop:
        scene_rgb = _lighting(rng, scene_rgb)
    else:
        arr = np.asarray(scene_rgb, np.float32) * rng.uniform(0.97, 1.03)
        scene_rgb = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")

    # labels, measured from the rendered geometry
    above: dict[int, np.ndarray] = {}
    cover = occ.copy()
    for i in reversed(order):
        above[i] = cover.copy()
        cover |= masks[i]
    anno: dict[str, Any] = {"source": plan.source, "pair_id": plan.pair_id}
    attrs: list[dict[str, Any]] = []
    n_item = 0
    for i, it in enumerate(plan.items):
        poly = apply_homography(h_person, outlines[i])
        full_area = polygon_area(poly)
        clipped = clip_polygon(poly, w, h)
        in_area = polygon_area(clipped)
        in_px = int(masks[i].sum())
        visible_px = int((masks[i] & ~above[i]).sum())
        if i != plan.target and (full_area <= 0 or in_area / full_area < 0.2 or visible_px < 60):
            continue  # mostly outside the frame or hidden: drawn, not annotated (as in real photos)
        if len(clipped) < 3 or in_px == 0 or full_area <= 0:
            continue
        x1, y1 = (int(v) for v in np.floor(clipped.min(0)))
        x2, y2 = (int(v) for v in np.ceil(clipped.max(0)))
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if x2 <= x1 or y2 <= y1:
            continue
        cat = it.look.category_id
        lm_scene = apply_homography(h_person, outline_landmarks(outlines[i], LANDMARK_COUNTS[cat]))
        lms: list[int] = []
        for x, y in lm_scene:
            if 0 <= x < w and 0 <= y < h:
                covered = bool(above[i][int(y), int(x)])
                lms += [int(round(x)), int(round(y)), 1 if covered else 2]
            else:
                lms += [0, 0, 0]
        n_item += 1
        anno[f"item{n_item}"] = {
            "category_id": cat,
            "category_name": CATEGORY_NAMES[cat],
            "style": it.style,
            "bounding_box": [x1, y1, x2, y2],
            "landmarks": lms,
            "segmentation": [np.round(clipped, 1).ravel().tolist()],
            "scale": _level((x2 - x1) * (y2 - y1) / (w * h), SCALE_CUTS),
            "occlusion": _level(1 - visible_px / in_px, OCCLUSION_CUTS),
            "zoom_in": _level(1 - in_area / full_area, ZOOM_CUTS),
            "viewpoint": viewpoint,
        }
        look = it.look
        attrs.append({"key": f"{split}/{plan.image_id:06d}/item{n_item}", "colour": look.colour,
                      "colour_rgb": list(PALETTE[look.colour]), "pattern": look.pattern,
                      "pattern_colour": look.pattern_colour})
    if n_item == 0:  # cannot happen with the camera retry above; never write an annotation without items
        raise RuntimeError(f"{split} image {plan.image_id}: no garment could be annotated")
    return _jpeg_bytes(scene_rgb, cfg.jpeg_quality), anno, attrs


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    import io

    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    return out.getvalue()


# -------------------------------------------------------------------------------------- writing a split


def _render_job(args: tuple[ImagePlan, str, SynthConfig, str]) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    plan, split, cfg, split_dir = args
    jpg, anno, attrs = render_image(plan, split, cfg)
    stem = f"{plan.image_id:06d}"
    Path(split_dir, "image", f"{stem}.jpg").write_bytes(jpg)
    Path(split_dir, "annos", f"{stem}.json").write_text(json.dumps(anno))
    return plan.image_id, anno, attrs


def _counts(annos: dict[int, dict[str, Any]]) -> dict[str, Any]:
    user_ids = sorted(i for i, a in annos.items() if a["source"] == "user")
    shop_ids = sorted(i for i, a in annos.items() if a["source"] == "shop")
    items = [(a["source"], a["pair_id"], v["style"]) for a in annos.values() for k, v in a.items()
             if k.startswith("item")]
    return {
        "images": len(annos), "user_images": len(user_ids), "shop_images": len(shop_ids), "items": len(items),
        "user_items": sum(s == "user" for s, _, _ in items), "shop_items": sum(s == "shop" for s, _, _ in items),
        "queries": sum(s == "user" and st > 0 for s, _, st in items),
        "gallery": sum(s == "shop" for s, _, _ in items),
        "pair_ids": len({p for _, p, _ in items}), "style0_items": sum(st == 0 for _, _, st in items),
        "identities": len({(p, st) for _, p, st in items if st > 0}),
        "user_id_range": [user_ids[0], user_ids[-1]] if user_ids else None,
        "shop_id_range": [shop_ids[0], shop_ids[-1]] if shop_ids else None,
    }


def _write_tree(out: Path, cfg: SynthConfig, workers: int, progress: bool) -> dict[str, Any]:
    """Render both splits into ``out`` (an empty folder); returns the counts per split."""
    from tqdm.auto import tqdm

    jobs = []
    for split in SPLITS:
        split_dir = out / split
        (split_dir / "image").mkdir(parents=True)
        (split_dir / "annos").mkdir()
        jobs += [(p, split, cfg, str(split_dir)) for p in plan_split(cfg, split)]
    results: dict[str, dict[int, tuple[dict, list]]] = {split: {} for split in SPLITS}
    bar = tqdm(total=len(jobs), desc="synthetic benchmark", unit="img", disable=not progress, leave=False)
    try:
        if workers <= 1:
            for job in jobs:
                iid, anno, attrs = _render_job(job)
                results[job[1]][iid] = (anno, attrs)
                bar.update(1)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            with ctx.Pool(workers) as pool:
                for job, (iid, anno, attrs) in zip(jobs, pool.imap(_render_job, jobs, chunksize=8)):
                    results[job[1]][iid] = (anno, attrs)
                    bar.update(1)
    finally:
        bar.close()
    counts = {}
    for split, res in results.items():
        lines = [json.dumps(a) for iid in sorted(res) for a in res[iid][1]]
        (out / split / ATTRIBUTES_FILE).write_text("\n".join(lines) + "\n")
        counts[split] = _counts({iid: v[0] for iid, v in res.items()})
    return counts


# ------------------------------------------------------------------------------ generate / ensure (atomic)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on ``<parent>/.<name>.lock`` (blocks until the other holder is done)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_marker(root: str | os.PathLike) -> dict[str, Any] | None:
    """``<root>/synth.json`` as a dict, or None when missing / unreadable."""
    try:
        return json.loads((Path(root) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _matches(marker: dict[str, Any] | None, config: SynthConfig) -> bool:
    return bool(marker) and marker.get("version") == SYNTH_VERSION and marker.get("config") == config.to_json()


def _default_workers(config: SynthConfig) -> int:
    n_img = (config.train_pairs + config.val_pairs + config.test_pairs) * 6
    return 1 if n_img < 300 else max(1, min(os.cpu_count() or 1, 8))


def _clean_stale(root: Path) -> None:
    for p in root.parent.glob(f".{root.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.parent.glob(f".{root.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _generate_locked(root: Path, config: SynthConfig, workers: int | None, progress: bool | None,
                     overwrite: bool) -> Path:
    _clean_stale(root)  # only the lock holder generates, so any temp sibling is from a killed run
    if root.exists():
        marker = read_marker(root)
        empty = root.is_dir() and not any(root.iterdir())
        if not empty and marker is None:
            raise FileExistsError(f"{root} exists and is not a synthetic benchmark (no {MARKER}); refusing to replace it")
        if not empty and not overwrite:
            raise FileExistsError(f"{root} already holds a synthetic benchmark; pass overwrite=True to replace it")
    workers = workers if workers is not None else _default_workers(config)
    show = progress if progress is not None else workers > 1
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        counts = _write_tree(tmp, config, workers, show)
        marker = {"generator": "capret_utils.data.synth", "version": SYNTH_VERSION, "config": config.to_json(),
                  "counts": counts}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: completion marker
        old = None
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(root, old)
        os.rename(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if show:
        print(f"[synth] generated {root} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return root


def generate(out_dir: str | os.PathLike, config: SynthConfig | None = None, *, workers: int | None = None,
             overwrite: bool = False, progress: bool | None = None) -> Path:
    """Generate the benchmark into ``out_dir`` (atomically: temp sibling folder + rename, under a lock).

    ``workers``: render processes (default: 1 for tiny configs, else the CPU count up to 8; the output does not
    depend on it). An existing benchmark is replaced only with ``overwrite=True``; a folder that is not a
    synthetic benchmark is never replaced.
    """
    config = config or SynthConfig.demo()
    config.validate()
    root = Path(out_dir).expanduser().resolve()
    with _locked(root):
        return _generate_locked(root, config, workers, progress, overwrite)


def ensure_benchmark(root: str | os.PathLike, config: SynthConfig | None = None, *, workers: int | None = None,
                     progress: bool | None = None) -> Path:
    """Return ``root`` holding the benchmark for ``config``, generating it when ``synth.json`` is missing or
    records a different config / generator version. Safe to call from several processes at once."""
    config = config or SynthConfig.demo()
    config.validate()
    root = Path(root).expanduser().resolve()
    if _matches(read_marker(root), config):
        return root
    with _locked(root):
        if _matches(read_marker(root), config):  # another process finished it while we waited
            return root
        return _generate_locked(root, config, workers, progress, overwrite=True)


def read_attributes(split_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``<split>/attributes.jsonl`` as {items-table key: record}."""
    out = {}
    with open(Path(split_dir) / ATTRIBUTES_FILE) as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                out[rec["key"]] = rec
    return out


# ----------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m capret_utils.data.synth",
                                description="Generate the synthetic DeepFashion2-format benchmark.")
    p.add_argument("--out", required=True, help="output folder (becomes <out>/{train,validation,test}/, synth.json)")
    p.add_argument("--preset", choices=("demo", "smoke"), default="demo", help="base configuration")
    p.add_argument("--pairs", type=int, help="pairs per split (sets --train-pairs, --val-pairs and --test-pairs)")
    p.add_argument("--train-pairs", type=int, help="train pairs (overrides --pairs)")
    p.add_argument("--val-pairs", type=int, help="validation pairs (overrides --pairs)")
    p.add_argument("--test-pairs", type=int, help="test pairs (overrides --pairs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed → identical files)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("MIN", "MAX"), help="long side range, pixels")
    p.add_argument("--workers", type=int, help="render processes (output does not depend on it)")
    p.add_argument("--force", action="store_true", help="replace an existing benchmark with a different config")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = SynthConfig.smoke(a.seed) if a.preset == "smoke" else SynthConfig.demo(a.seed)
    updates: dict[str, Any] = {}
    if a.pairs is not None:
        updates.update(train_pairs=a.pairs, val_pairs=a.pairs, test_pairs=a.pairs)
    if a.train_pairs is not None:
        updates["train_pairs"] = a.train_pairs
    if a.val_pairs is not None:
        updates["val_pairs"] = a.val_pairs
    if a.test_pairs is not None:
        updates["test_pairs"] = a.test_pairs
    if a.image_size:
        updates["image_size"] = tuple(a.image_size)
    cfg = replace(cfg, **updates)
    root = Path(a.out)
    t0 = time.perf_counter()
    marker = read_marker(root)
    if _matches(marker, cfg):
        print(json.dumps({"out": str(root.resolve()), "status": "up to date", "counts": marker["counts"]}, indent=2))
        return 0
    try:
        generate(root, cfg, workers=a.workers, overwrite=a.force, progress=not a.quiet)
    except FileExistsError as exc:
        print(f"error: {exc} (on the command line: --force)", file=sys.stderr)
        return 2
    marker = read_marker(root) or {}
    print(json.dumps({"out": str(root.resolve()), "status": "generated", "seconds": round(time.perf_counter() - t0, 2),
                      "counts": marker.get("counts")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
