"""The embedded default data: a synthetic benchmark in the exact DeepFashion2 layout and schema.

``generate(out_dir, config)`` writes ``<out>/{train,validation,test}/{image,annos}/NNNNNN.{jpg,json}`` (read unchanged
by :func:`capret_utils.data.df2.load_items`), ``<out>/<split>/attributes.jsonl`` (per item: ``key``, ``colour``,
``colour_rgb``, ``pattern``, ``pattern_colour`` — ground truth the DeepFashion2 schema has no field for — and
``uncaptioned``: ``{"trim", "logo", "print_scale"}``, drawn factors no caption or question covers) and
``<out>/synth.json`` (config + counts, written last). :func:`ensure_benchmark` generates only when needed, into a
temporary sibling folder renamed into place under a lock file, so a killed run never leaves a half benchmark
that looks complete and two processes can call it at once. CLI: ``python -m capret_utils.data.synth --out DIR``.

What a benchmark is made of (constants, :class:`SynthConfig`, geometry, plan types) lives in
:mod:`capret_utils.data.synth_spec` and is re-exported here; drawing one image lives in
:mod:`capret_utils.data.synth_render`.

What is drawn (all with PIL, in the 13 DeepFashion2 category silhouettes):

* an **identity** ``(pair_id, style > 0)`` is a fixed category + colour + pattern + pattern colour (the
  *captionable tuple*: all that a template caption or a dialogue answer says about the garment) + uncaptioned
  factors (a hem band in an accent colour or none, a logo patch high / low / none, a fine or bold print) + a small
  shape jitter, unique within a split; about half of the identities are near-duplicates of an earlier one that
  differ in exactly one captionable factor (same fabric as another garment, same colour different pattern …), so
  colour statistics alone cannot solve retrieval; and ``shared_tuple_fraction`` (default 0.6) of them are
  look-alikes that share their whole captionable tuple with 1–3 others of their category and differ only in
  uncaptioned factors, so captions alone cannot identify an item either (they are recoloured after planning, so
  images and counts do not depend on the fraction);
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
import collections
import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from capret_utils.data.synth_render import render_image
from capret_utils.data.synth_spec import (  # noqa: F401 - re-exported: synth.SynthConfig, synth.SPLITS, ...
    ATTRIBUTES_FILE,
    COLOURS,
    DRESS,
    LOGOS,
    LOWER,
    MARKER,
    OUTWEAR,
    PALETTE,
    PATTERNS,
    PRINT_SCALES,
    SPLIT_CODES,
    SPLITS,
    SYNTH_VERSION,
    TRIMS,
    UPPER,
    ImagePlan,
    ItemPlan,
    Look,
    SynthConfig,
    apply_homography,
    clip_polygon,
    garment_outline,
    outline_landmarks,
    polygon_area,
)

# ------------------------------------------------------------------------------------------------- plan



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


def hidden_options(look: Look) -> list[tuple[str, str, str | None]]:
    """Every uncaptioned tuple (trim, logo, print scale) a garment with this captionable tuple can have."""
    scales: tuple[str | None, ...] = (None,) if look.pattern == "solid" else PRINT_SCALES
    return [(t, lg, ps) for t in TRIMS for lg in LOGOS for ps in scales]


def _with_hidden(rng: np.random.Generator, look: Look, taken: Sequence[tuple] = ()) -> Look:
    """``look`` with uncaptioned factors drawn uniformly from those not in ``taken``."""
    options = [h for h in hidden_options(look) if h not in set(taken)]
    trim, logo, scale = options[int(rng.integers(len(options)))]
    return replace(look, trim=trim, logo=logo, print_scale=scale)


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
            extra_outwear: float, hidden_rng: np.random.Generator) -> list[ItemPlan]:
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
        items.append(ItemPlan(0, _with_hidden(hidden_rng, look)))
    return sorted(items, key=lambda it: _layer(it.look.category_id))


def identity_factors(plans: Sequence[ImagePlan]) -> set:
    """The captionable tuples of the identities (style > 0 garments) in a split's plan."""
    return {it.look.factors for plan in plans for it in plan.items if it.style > 0}


def shared_tuple_share(plans: Sequence[ImagePlan]) -> float:
    """Share of a split's identities whose captionable tuple another identity of the split has too."""
    looks = {(plan.pair_id, it.style): it.look.factors for plan in plans for it in plan.items if it.style > 0}
    sizes = collections.Counter(looks.values())
    return sum(n for n in sizes.values() if n > 1) / max(len(looks), 1)


def plan_split(config: SynthConfig, split: str) -> list[ImagePlan]:
    """Decide every image of a split: identities per pair, which garments each image shows, image order.

    Train images are ordered by pair with user and shop images mixed inside a pair; validation lists all user
    images first, then all shop images (as in the released splits). Then :func:`_look_alikes` regroups identities
    so that ``shared_tuple_fraction`` of them share their captionable tuple.
    """
    plans, hidden_rng = _base_plan(config, split)
    return _look_alikes(plans, config, hidden_rng)


def _look_alikes(plans: list[ImagePlan], config: SynthConfig, hidden_rng: np.random.Generator) -> list[ImagePlan]:
    """Give every identity its uncaptioned factors and turn some into look-alikes (see :class:`SynthConfig`).

    Groups form inside one category (so outfits, images and counts stay as planned): a random category, weighted
    by its identities not yet grouped, gives ``shared_group_size`` of them (fewer when it has fewer, or when the
    target is nearly met), which take the first one's colour, pattern and pattern colour and get distinct
    uncaptioned factors; repeated until ``ceil(shared_tuple_fraction * identities)`` are grouped or no category
    has two left (a tiny split may then stay below the fraction). Look-alikes keep their own shape jitter,
    pattern period and phase.
    """
    looks = {(p.pair_id, it.style): it.look for p in plans for it in p.items if it.style > 0}
    idents = sorted(looks)
    free: dict[int, list[tuple[int, int]]] = {}
    for n in hidden_rng.permutation(len(idents)):
        ident = idents[int(n)]
        free.setdefault(looks[ident].category_id, []).append(ident)
    need = math.ceil(config.shared_tuple_fraction * len(idents) - 1e-9)
    new: dict[tuple[int, int], Look] = {}
    shared = 0
    while shared < need:
        cats = sorted(c for c, ids in free.items() if len(ids) >= 2)
        if not cats:
            break
        weights = np.asarray([len(free[c]) for c in cats], np.float64)
        cat = cats[int(hidden_rng.choice(len(cats), p=weights / weights.sum()))]
        size = int(hidden_rng.integers(config.shared_group_size[0], config.shared_group_size[1] + 1))
        base = looks[free[cat][0]]
        size = min(size, len(free[cat]), len(hidden_options(base)), max(2, need - shared))
        members, free[cat] = free[cat][:size], free[cat][size:]
        options = hidden_options(base)
        for ident, k in zip(members, hidden_rng.choice(len(options), size=size, replace=False)):
            trim, logo, scale = options[int(k)]
            new[ident] = replace(looks[ident], colour=base.colour, pattern=base.pattern,
                                 pattern_colour=base.pattern_colour, trim=trim, logo=logo, print_scale=scale)
        shared += size
    for ident in idents:
        if ident not in new:
            new[ident] = _with_hidden(hidden_rng, looks[ident])
    return [replace(p, items=tuple(ItemPlan(it.style, new[(p.pair_id, it.style)]) if it.style > 0 else it
                                   for it in p.items)) for p in plans]


def _base_plan(config: SynthConfig, split: str) -> tuple[list[ImagePlan], np.random.Generator]:
    """The plan before look-alikes (every identity its own captionable tuple; fillers already have their
    uncaptioned factors) and the random stream of the uncaptioned factors."""
    rng = np.random.default_rng([config.seed, SPLIT_CODES[split], 0])
    hidden_rng = np.random.default_rng([config.seed, SPLIT_CODES[split], 0, 1])
    used: set = set()
    if split == "test":  # held-out identities: no test identity (captionable tuple) is a train or validation one
        used = identity_factors(_base_plan(config, "train")[0]) | identity_factors(_base_plan(config, "validation")[0])
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
                items = _outfit(rng, styles, used, fillers, extra_outwear=0.05, hidden_rng=hidden_rng)
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
            items = _outfit(rng, shown, used, fillers, extra_outwear=0.06, hidden_rng=hidden_rng)
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
            for n, (src, pid, kind, items, tgt, tucked) in enumerate(order)], hidden_rng


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
