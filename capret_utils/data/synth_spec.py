"""What the synthetic benchmark is made of: the generator's constants (palette, patterns, split codes, version), its
:class:`SynthConfig`, the garment geometry (13 DeepFashion2 category silhouettes, landmarks, clipping) and the plan
types (:class:`Look`, :class:`ItemPlan`, :class:`ImagePlan`). :mod:`capret_utils.data.synth` re-exports them."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

SYNTH_VERSION = 4
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

# Uncaptioned factors: drawn, recorded in attributes.jsonl under "uncaptioned", never asked about or captioned
TRIMS = ("none", "hem band")  # a band in a contrasting shade along the hem
LOGOS = ("none", "upper", "lower")  # a contrasting patch high or low on the garment (mirror-invariant places)
PRINT_SCALES = ("fine", "bold")  # pattern period x0.7 / x1.6 (patterned garments only; None for solid)
PRINT_SCALE_FACTOR = {"fine": 0.7, "bold": 1.6}

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

    Captions cannot identify an item alone: ``shared_tuple_fraction`` (0 ≤ f < 1; 0 = every identity has its own
    captionable tuple, as in version 3) is the share of identities in every split, at least, that share their
    whole captionable tuple (category, colour, pattern, pattern colour — everything a template caption or a
    dialogue question covers) with other identities of the same split and differ from them only in uncaptioned
    factors (:data:`TRIMS`, :data:`LOGOS`, :data:`PRINT_SCALES`: a hem band, a logo patch high or low, a fine or
    bold print). Groups form inside a category and hold ``shared_group_size`` (inclusive min, max; 2 ≤ min ≤ max
    ≤ 6) identities; a tiny split (a few identities per category, e.g. ``smoke``) may fall short of f. An
    exact-tuple matcher then finds the right item among g look-alikes with chance 1/g: with the defaults its
    hit@1 is about 0.6 (:func:`capret_utils.evaluation.tuple_matcher.tuple_matcher`). Look-alikes only recolour
    planned identities, so images, pairs, categories and counts are those of ``shared_tuple_fraction=0``.
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
    shared_tuple_fraction: float = 0.6  # share of identities per split whose captionable tuple is not unique
    shared_group_size: tuple[int, int] = (2, 4)  # identities per group sharing one captionable tuple (min, max)

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
        if not 0 <= self.shared_tuple_fraction < 1:
            raise ValueError(f"SynthConfig.shared_tuple_fraction must be in [0, 1), got {self.shared_tuple_fraction}")
        lo, hi = self.shared_group_size
        if not 2 <= lo <= hi <= len(TRIMS) * len(LOGOS):
            raise ValueError(f"SynthConfig.shared_group_size must be (min, max) with 2 <= min <= max <= "
                             f"{len(TRIMS) * len(LOGOS)}, got {(lo, hi)}")


# ------------------------------------------------------------------------------------- garment geometry


@dataclass(frozen=True)
class Look:
    """The appearance of one garment: what makes an identity (captionable :attr:`factors` + uncaptioned
    :attr:`hidden` factors, plus shape jitter and pattern phase)."""

    category_id: int
    colour: str
    pattern: str
    pattern_colour: str | None
    shape: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0)  # length, width, sleeve, neck, flare
    period: float = 0.03  # pattern period before the print scale, person-height units
    phase: float = 0.0  # pattern phase, fraction of a period
    trim: str = "none"  # one of TRIMS
    logo: str = "none"  # one of LOGOS
    print_scale: str | None = None  # one of PRINT_SCALES (None: as drawn by ``period``, the only value for solids)

    @property
    def factors(self) -> tuple[int, str, str, str | None]:
        """The captionable tuple: everything a template caption or a dialogue answer can say about the garment."""
        return (self.category_id, self.colour, self.pattern, self.pattern_colour)

    @property
    def hidden(self) -> tuple[str, str, str | None]:
        """The uncaptioned factors (no question or template covers them)."""
        return (self.trim, self.logo, self.print_scale)

    @property
    def drawn_period(self) -> float:
        """The pattern period as drawn (``period`` times the print scale's factor)."""
        return self.period * (PRINT_SCALE_FACTOR[self.print_scale] if self.print_scale else 1.0)


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

