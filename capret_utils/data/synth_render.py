"""Rendering one planned image of the synthetic benchmark with PIL: people, garments with their colour and pattern,
lighting, occluders, camera framing, and the DeepFashion2 annotation (boxes, landmarks, polygons, attributes) of
what ends up visible."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from capret_utils.data.df2 import CATEGORY_NAMES, LANDMARK_COUNTS
from capret_utils.data.synth_spec import (
    _HAIR,
    _SKIN,
    COLOURS,
    DRESS,
    LOWER,
    OUTWEAR,
    PALETTE,
    SPLIT_CODES,
    UPPER,
    ImagePlan,
    Look,
    SynthConfig,
    apply_homography,
    clip_polygon,
    garment_outline,
    outline_landmarks,
    polygon_area,
)

# ----------------------------------------------------------------------------------------------- render


def _pattern_rgb(look: Look, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """RGB (h × w × 3 float) of the look's fabric at person-unit coordinates ``xs`` (w,), ``ys`` (h,)."""
    base = np.asarray(PALETTE[look.colour], np.float32)
    out = np.broadcast_to(base, (len(ys), len(xs), 3)).copy()
    if look.pattern == "solid" or look.pattern_colour is None:
        return out
    pc = np.asarray(PALETTE[look.pattern_colour], np.float32)
    p, ph = look.drawn_period, look.phase
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


def accent_colour(look: Look) -> str:
    """The colour of a look's trim and logo: the palette colour farthest from both of its fabrics (a function of
    the captionable tuple, so look-alikes share it and differ only in where it is drawn)."""
    fabrics = [np.asarray(PALETTE[c], np.float32) for c in (look.colour, look.pattern_colour) if c]
    return max(COLOURS, key=lambda c: min(float(np.linalg.norm(np.asarray(PALETTE[c]) - f)) for f in fabrics))


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
        if look.trim == "hem band":  # the lowest 12 % of the garment's height in the accent colour
            top, bottom = outline[:, 1].min(), outline[:, 1].max()
            rgb[ys >= bottom - 0.12 * (bottom - top)] = PALETTE[accent_colour(look)]
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
            self._logo(d, look, outline, to)
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
        self._logo(d, look, outline, to)

    @staticmethod
    def _logo(d: ImageDraw.ImageDraw, look: Look, outline: np.ndarray, to) -> None:
        """A square patch in the accent colour, 30 % (upper) or 68 % (lower) of the way down the garment, on the
        centre line (one leg of shorts / trousers, one front panel of outwear)."""
        if look.logo == "none":
            return
        top, bottom = outline[:, 1].min(), outline[:, 1].max()
        height = bottom - top
        y = top + (0.3 if look.logo == "upper" else 0.68) * height
        x = 0.065 * look.shape[1] if look.category_id in (3, 4, 7, 8) else 0.0
        r = float(np.clip(0.13 * height, 0.035, 0.06)) / 2
        d.rectangle(sorted_box(to([(x - r, y - r), (x + r, y + r)])), fill=PALETTE[accent_colour(look)])


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
                      "pattern_colour": look.pattern_colour,
                      "uncaptioned": {"trim": look.trim, "logo": look.logo, "print_scale": look.print_scale}})
    if n_item == 0:  # cannot happen with the camera retry above; never write an annotation without items
        raise RuntimeError(f"{split} image {plan.image_id}: no garment could be annotated")
    return _jpeg_bytes(scene_rgb, cfg.jpeg_quality), anno, attrs


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    import io

    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    return out.getvalue()


