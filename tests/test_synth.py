"""capret_utils.data.synth: the synthetic benchmark is valid DeepFashion2, its labels match the drawn geometry,
it is deterministic, and generation is atomic, idempotent, lock-protected and recovers from a kill."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageFilter

from capret_utils.data import df2, synth

TINY = replace(synth.SynthConfig.smoke(), train_pairs=3, val_pairs=3)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "bench", synth.SynthConfig.smoke(), workers=1)


@pytest.fixture(scope="module")
def tables(bench: Path) -> dict[str, pd.DataFrame]:
    return {s: df2.load_items(bench / s, errors="raise", check_images="full") for s in ("train", "validation")}


# ------------------------------------------------------------------------------------ geometry helpers


def test_polygon_area_and_clip_hand_computed():
    sq = np.asarray([[-5, -5], [5, -5], [5, 5], [-5, 5]], float)
    assert synth.polygon_area(sq) == 100
    clipped = synth.clip_polygon(sq, 10, 10)  # only the quarter [0, 5] x [0, 5] is inside
    assert synth.polygon_area(clipped) == pytest.approx(25)
    assert clipped.min() >= 0 and clipped.max() <= 5
    assert len(synth.clip_polygon(sq + 100, 10, 10)) == 0
    tri = np.asarray([[0, 0], [20, 0], [0, 20]], float)  # cut by x <= 10 and y <= 10
    assert synth.polygon_area(synth.clip_polygon(tri, 10, 10)) == pytest.approx(100 - 0)  # the square 10x10 fits
    assert synth.polygon_area(synth.clip_polygon(tri, 10, 30)) == pytest.approx(200 - 50)


def test_homography_identity_and_translation():
    pts = np.asarray([[1.0, 2.0], [3.0, -4.0]])
    assert np.allclose(synth.apply_homography(np.eye(3), pts), pts)
    t = np.asarray([[2, 0, 5], [0, 2, -1], [0, 0, 1]], float)
    assert np.allclose(synth.apply_homography(t, pts), pts * 2 + [5, -1])


@pytest.mark.parametrize("cat", range(1, 14))
def test_outlines_are_symmetric_and_landmarks_lie_on_them(cat: int):
    poly = synth.garment_outline(cat)
    assert len(poly) >= 6 and synth.polygon_area(poly) > 0.005
    mirrored = {(round(-x, 9), round(y, 9)) for x, y in poly}
    assert mirrored == {(round(x, 9), round(y, 9)) for x, y in poly}
    n = df2.LANDMARK_COUNTS[cat]
    lm = synth.outline_landmarks(poly, n)
    assert lm.shape == (n, 2)
    closed = np.vstack([poly, poly[:1]])
    for p in lm:  # every landmark lies on some edge of the outline
        a, b = closed[:-1], closed[1:]
        t = np.clip(np.einsum("ij,ij->i", p - a, b - a) / np.einsum("ij,ij->i", b - a, b - a), 0, 1)
        assert np.min(np.linalg.norm(a + t[:, None] * (b - a) - p, axis=1)) < 1e-9


def test_silhouettes_differ_where_the_categories_do():
    area = {c: synth.polygon_area(synth.garment_outline(c)) for c in range(1, 14)}
    height = {c: np.ptp(synth.garment_outline(c)[:, 1]) for c in range(1, 14)}
    width = {c: np.ptp(synth.garment_outline(c)[:, 0]) for c in range(1, 14)}
    assert height[8] > 2 * height[7]  # trousers vs shorts
    assert width[2] > width[5] and width[1] > width[5]  # sleeves vs vest
    assert height[11] > height[2] and height[13] > height[6]  # dresses are long
    assert area[6] < area[5]  # sling (thin straps) smaller than vest
    assert width[4] == pytest.approx(width[2]) and height[4] > height[2]  # outwear longer than top


# ------------------------------------------------------------------------------- the generated data


def test_df2_reads_benchmark_unchanged(tables: dict[str, pd.DataFrame], bench: Path):
    marker = json.loads((bench / "synth.json").read_text())
    assert marker["version"] == synth.SYNTH_VERSION and marker["config"] == synth.SynthConfig.smoke().to_json()
    for split, df in tables.items():
        assert len(df) > 0 and df.attrs["skipped"] == [] and df.attrs["clamped"] == 0
        assert df.attrs["landmarks_outside"] == 0
        counts = marker["counts"][split]
        assert counts["items"] == len(df) and counts["images"] == df["image_id"].nunique()
        rep = df2.check_release(bench / split, items=df)
        assert rep.ok, str(rep)  # synth.json's counts are the expected ones for a synthetic split


def test_boxes_segmentation_landmarks_inside_images(tables):
    for df in tables.values():
        assert (df["x1"] >= 0).all() and (df["y1"] >= 0).all()
        assert (df["x2"] <= df["width"]).all() and (df["y2"] <= df["height"]).all()
        for seg, lms, w, h, x1, y1, x2, y2 in df[["segmentation", "landmarks", "width", "height", "x1", "y1", "x2",
                                                  "y2"]].itertuples(index=False):
            poly = np.asarray(seg[0]).reshape(-1, 2)
            assert poly[:, 0].min() >= x1 - 0.1 and poly[:, 0].max() <= x2 + 0.1
            assert poly[:, 1].min() >= y1 - 0.1 and poly[:, 1].max() <= y2 + 0.1
            pts = np.asarray(lms).reshape(-1, 3)
            vis = pts[pts[:, 2] > 0]
            assert ((vis[:, 0] >= 0) & (vis[:, 0] <= w) & (vis[:, 1] >= 0) & (vis[:, 1] <= h)).all()
            assert (pts[pts[:, 2] == 0][:, :2] == 0).all()
            assert (pts[:, 2] > 0).any()  # some landmark is in the frame


def test_scale_label_matches_area_ratio(tables):
    for df in tables.values():
        ratio = (df["x2"] - df["x1"]) * (df["y2"] - df["y1"]) / (df["width"] * df["height"])
        expect = np.where(ratio < 0.10, 1, np.where(ratio < 0.40, 2, 3))
        assert (df["scale"].to_numpy() == expect).all()


def test_zoom_and_viewpoint_labels_are_consistent(tables):
    for df in tables.values():
        zoomed = df[df["zoom_in"] > 1]
        touches = ((zoomed["x1"] <= 0) | (zoomed["y1"] <= 0) | (zoomed["x2"] >= zoomed["width"])
                   | (zoomed["y2"] >= zoomed["height"]))
        assert touches.all()  # cut by the frame ⇒ the box reaches the border
        assert set(df.loc[df["source"] == "user", "viewpoint"]) <= {2, 3}
        assert set(df.loc[df["source"] == "shop", "viewpoint"]) <= {1, 2}
        for col in ("scale", "occlusion", "zoom_in", "viewpoint"):
            assert df[col].between(1, 3).all()


def test_items_per_image_and_pairs(tables):
    cfg = synth.SynthConfig.smoke()
    for split, df in tables.items():
        per_image = df.groupby("image_id").size()
        assert per_image.between(1, 3).all()
        img = df.drop_duplicates("image_id")
        shop_per_pair = img[img["source"] == "shop"].groupby("pair_id").size()
        assert shop_per_pair.between(*cfg.shop_per_pair).all() and len(shop_per_pair) == cfg.pairs(split)
        user_per_pair = img[img["source"] == "user"].groupby("pair_id").size()
        assert user_per_pair.between(*cfg.user_per_pair(split)).all()
    v = tables["validation"].drop_duplicates("image_id").sort_values("image_id")
    first_shop = v.loc[v["source"] == "shop", "image_id"].min()
    assert (v.loc[v["source"] == "user", "image_id"] < first_shop).all()  # validation: user images first


def test_attributes_file_matches_items_and_identities_are_unique(tables, bench: Path):
    for split, df in tables.items():
        attrs = synth.read_attributes(bench / split)
        assert list(attrs) == list(df["key"])  # one record per item, same order
        lines = (bench / split / synth.ATTRIBUTES_FILE).read_text().splitlines()
        assert set(json.loads(lines[0])) == {"key", "colour", "colour_rgb", "pattern", "pattern_colour",
                                             "uncaptioned"}
        a = pd.DataFrame(attrs.values())
        assert a["colour"].isin(list(synth.PALETTE)).all() and a["pattern"].isin(synth.PATTERNS).all()
        assert all(list(synth.PALETTE[c]) == rgb for c, rgb in zip(a["colour"], a["colour_rgb"]))
        assert ((a["pattern"] == "solid") == a["pattern_colour"].isna()).all()
        full = df.merge(a, on="key")
        full["factors"] = list(zip(full["category_id"], full["colour"], full["pattern"],
                                   full["pattern_colour"].fillna("-")))
        full["hidden"] = [tuple(h[n] for n in ("trim", "logo", "print_scale")) for h in full["uncaptioned"]]
        assert all(h in synth.hidden_options(synth.Look(1, "red", p, None)) for h, p in zip(full["hidden"],
                                                                                          full["pattern"]))
        full["look"] = list(zip(full["factors"], full["hidden"]))
        ident = full[full["style"] > 0]
        per_identity = ident.groupby(["pair_id", "style"])["look"].nunique()
        assert (per_identity == 1).all()  # an identity always looks the same
        looks = ident.drop_duplicates(["pair_id", "style"])
        assert looks["look"].is_unique  # and no two identities look alike (look-alikes differ in hidden factors)
        assert not set(full.loc[full["style"] == 0, "factors"]) & set(looks["factors"])  # style 0 never copies one


def _identity_tuples(bench: Path, split: str) -> pd.DataFrame:
    """One row per identity of a generated split: its captionable tuple and its uncaptioned factors."""
    df = df2.load_items(bench / split)
    attrs = synth.read_attributes(bench / split)
    rows = [(p, s, (c, attrs[k]["colour"], attrs[k]["pattern"], attrs[k]["pattern_colour"]),
             tuple(attrs[k]["uncaptioned"][n] for n in ("trim", "logo", "print_scale")))
            for k, p, s, c in df[["key", "pair_id", "style", "category_id"]].itertuples(index=False) if s > 0]
    return pd.DataFrame(rows, columns=["pair_id", "style", "tuple", "hidden"]).drop_duplicates(["pair_id", "style"])


@pytest.fixture(scope="module")
def small_bench(tmp_path_factory) -> Path:
    """Smoke-sized images, 10 pairs per split: enough identities per category for look-alike groups."""
    cfg = replace(synth.SynthConfig.smoke(), train_pairs=10, val_pairs=10, test_pairs=10)
    return synth.generate(tmp_path_factory.mktemp("synth-small") / "bench", cfg, workers=1)


def test_look_alikes_share_the_captionable_tuple_in_every_split(small_bench: Path):
    """>= 1/3 of the identities of each split share their whole captionable tuple with another identity of the
    split and differ from it only in uncaptioned factors."""
    for split in synth.SPLITS:
        ids = _identity_tuples(small_bench, split)
        shared = ids.groupby("tuple")["tuple"].transform("size") > 1
        assert shared.mean() >= 1 / 3, (split, shared.mean())
        assert not ids[shared].duplicated(["tuple", "hidden"]).any()  # look-alikes differ in uncaptioned factors


@pytest.mark.parametrize("fraction", [0.0, 1 / 3, 0.6, 0.8])
def test_shared_tuple_fraction_is_met_on_a_planned_split(fraction: float):
    cfg = replace(synth.SynthConfig.smoke(), train_pairs=30, val_pairs=20, test_pairs=20,
                  shared_tuple_fraction=fraction, shared_group_size=(2, 3))
    for split in synth.SPLITS:
        plans = synth.plan_split(cfg, split)
        looks = {(p.pair_id, it.style): it.look for p in plans for it in p.items if it.style > 0}
        share = synth.shared_tuple_share(plans)
        assert share >= fraction - 1 / len(looks), (split, share)
        if fraction == 0:
            assert share == 0  # version 3's rule: every identity has its own captionable tuple
        sizes = pd.Series([lk.factors for lk in looks.values()]).value_counts()
        assert sizes.max() <= 3
    # look-alikes only recolour identities: images, pairs and categories are those of fraction 0 (version 3's plan)
    base = synth.plan_split(replace(cfg, shared_tuple_fraction=0.0), "validation")
    same = synth.plan_split(cfg, "validation")
    assert [(p.source, p.pair_id, [it.look.category_id for it in p.items]) for p in same] == [
        (p.source, p.pair_id, [it.look.category_id for it in p.items]) for p in base]


def test_uncaptioned_factors_never_reach_a_caption(small_bench: Path):
    """Template and dialogue captions (every scripted question, answered from attributes.jsonl) are the same
    whatever the uncaptioned factors are, and never mention them."""
    from capret_utils import captions as C

    items = pd.concat([df2.load_items(small_bench / s) for s in synth.SPLITS], ignore_index=True)
    attrs = C.load_attributes([small_bench / s for s in synth.SPLITS])
    assert all("uncaptioned" in a for a in attrs.values())
    swapped = {k: {**a, "uncaptioned": {"trim": "hem band", "logo": "upper", "print_scale": "bold"}}
               for k, a in attrs.items()}
    stripped = {k: {f: v for f, v in a.items() if f != "uncaptioned"} for k, a in attrs.items()}
    rows = items.to_dict("records")
    rounds = len(C.DEFAULT_QUESTIONS) + 1

    def run(a):
        cap = C.DialogueCaptioner(C.ScriptedQuestioner(), C.AttributeAnswerer(a), C.DialogueConfig(rounds=rounds))
        out = cap.caption_batch(rows)
        return [(r["caption"], [t["answer"] for t in r["dialogue"]]) for r in out]

    dialogue = run(attrs)
    assert all(a["colour"] in c for (c, _), a in zip(dialogue, (attrs[r["key"]] for r in rows)))  # answered
    assert dialogue == run(swapped) == run(stripped)
    texts = [c for c, _ in dialogue] + [a for _, ans in dialogue for a in ans] + list(
        C.template_captions(items).values())
    words = {"band", "trim", "logo", "upper", "lower", "fine", "bold", "print", "uncaptioned"}
    assert not [t for t in texts if words & set(t.lower().replace(",", " ").split())]


def test_every_query_has_a_positive(tables):
    for df in tables.values():
        rs = df2.item_retrieval_set(df)
        assert len(rs.queries) > 0 and (rs.queries["n_positives"] >= 1).all()
        ri = df2.image_retrieval_set(df)
        assert (ri.queries["n_positives"] >= 1).all()


@pytest.mark.parametrize("pattern", ["solid", "vertical stripes"])
def test_drawn_colours_match_attributes(pattern: str):
    """Each palette colour, rendered as a flat shop garment (no lighting change), shows that colour."""
    import io

    cfg = synth.SynthConfig.smoke()
    names = list(synth.PALETTE)
    for k, colour in enumerate(names):
        pcol = None if pattern == "solid" else ("black" if synth._contrast(colour, "black") > 150 else "white")
        look = synth.Look(1 + k % 13, colour, pattern, pcol, period=0.2)  # wide stripes: the base colour dominates
        plan = synth.ImagePlan(k + 1, "shop", 1, "flat", (synth.ItemPlan(1, look),), 0)
        jpg, anno, attrs = synth.render_image(plan, "validation", cfg)
        assert attrs[0]["colour"] == colour and attrs[0]["colour_rgb"] == list(synth.PALETTE[colour])
        im = Image.open(io.BytesIO(jpg)).convert("RGB")
        mask = Image.new("L", im.size, 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in np.asarray(anno["item1"]["segmentation"][0]).reshape(-1, 2)],
                                     fill=255)
        inside = np.asarray(mask.filter(ImageFilter.MinFilter(5))) > 0
        px = np.asarray(im)[inside].astype(float)
        pal = np.asarray([synth.PALETTE[n] for n in names], float)
        share = np.bincount(np.argmin(((px[:, None, :] - pal[None]) ** 2).sum(-1), axis=1), minlength=len(names))
        share = share / share.sum()
        if pattern == "solid":
            assert names[int(share.argmax())] == colour and share.max() > 0.6, (colour, share.round(2))
        else:  # both fabrics are drawn: base colour and pattern colour each cover a good share of the garment
            assert share[names.index(colour)] > 0.3 and share[names.index(pcol)] > 0.2, (colour, share.round(2))
        assert anno["item1"]["viewpoint"] == 1 and anno["item1"]["scale"] >= 2


# ------------------------------------------------------------------------------------- determinism


def _digest(root: Path) -> dict[str, bytes]:
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_same_seed_same_bytes_any_worker_count(tmp_path: Path, bench: Path):
    again = synth.generate(tmp_path / "again", synth.SynthConfig.smoke(), workers=2)
    a, b = _digest(bench), _digest(again)
    assert a.keys() == b.keys() and len(a) > 20
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]


def test_different_seed_differs(tmp_path: Path, bench: Path):
    other = synth.generate(tmp_path / "other", replace(synth.SynthConfig.smoke(), seed=1), workers=1)
    for rel in ("validation/image/000001.jpg", "validation/annos/000001.json", "train/image/000002.jpg"):
        assert (bench / rel).read_bytes() != (other / rel).read_bytes()


def test_render_is_a_pure_function_of_plan():
    cfg = synth.SynthConfig.smoke()
    plans = synth.plan_split(cfg, "validation")
    assert plans == synth.plan_split(cfg, "validation")
    a = synth.render_image(plans[1], "validation", cfg)
    synth.render_image(plans[0], "validation", cfg)  # rendering another image first changes nothing
    assert synth.render_image(plans[1], "validation", cfg) == a


# ------------------------------------------------------------------------- ensure / atomic generation


def test_ensure_benchmark_is_idempotent_and_follows_config(tmp_path: Path):
    root = tmp_path / "data" / "synthetic"
    synth.ensure_benchmark(root, TINY, workers=1)
    stamp = (root / "synth.json").stat().st_mtime_ns
    first = _digest(root)
    synth.ensure_benchmark(root, TINY, workers=1)
    assert (root / "synth.json").stat().st_mtime_ns == stamp  # up to date: nothing regenerated
    synth.ensure_benchmark(root, replace(TINY, seed=5), workers=1)
    assert json.loads((root / "synth.json").read_text())["config"]["seed"] == 5
    synth.ensure_benchmark(root, TINY, workers=1)
    assert _digest(root) == first
    assert sorted(p.name for p in root.parent.iterdir()) == [".synthetic.lock", "synthetic"]


def test_generate_refuses_to_replace_foreign_folders(tmp_path: Path):
    root = tmp_path / "mine"
    (root / "validation").mkdir(parents=True)
    (root / "validation" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not a synthetic benchmark"):
        synth.ensure_benchmark(root, TINY, workers=1)
    assert (root / "validation" / "keep.txt").read_text() == "user data"
    done = synth.generate(tmp_path / "b", TINY, workers=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        synth.generate(done, TINY, workers=1)


def test_recovers_from_a_killed_generation(tmp_path: Path):
    root = tmp_path / "bench"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "capret_utils.data.synth", "--out", str(root), "--preset", "smoke",
                             "--pairs", "60", "--workers", "1", "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 60
    tmp_dirs: list[Path] = []
    while time.time() < deadline:  # wait until it has written some images into its temp folder
        tmp_dirs = list(tmp_path.glob(".bench.tmp-*"))
        if tmp_dirs and len(list((tmp_dirs[0] / "train" / "image").glob("*.jpg"))) > 5:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp_dirs and tmp_dirs[0].exists() and not root.exists()  # no half benchmark under the real name
    synth.ensure_benchmark(root, TINY, workers=1)
    assert (root / "synth.json").is_file() and not list(tmp_path.glob(".bench.tmp-*"))
    assert len(df2.load_items(root / "validation")) > 0


def _ensure_in_process(root: str, q) -> None:
    t0 = time.time()
    synth.ensure_benchmark(root, TINY, workers=1)
    q.put((os.getpid(), time.time() - t0, (Path(root) / "synth.json").stat().st_mtime_ns))


def test_concurrent_ensure_generates_once(tmp_path: Path):
    root = str(tmp_path / "shared")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_process, args=(root, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = [q.get(timeout=5) for _ in procs]
    assert len({r[2] for r in results}) == 1  # both saw the same (single) generation
    assert len(df2.load_items(Path(root) / "train")) > 0


def test_cli(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert synth.main(["--out", str(out), "--preset", "smoke", "--pairs", "2", "--seed", "3", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["status"] == "generated" and rep["counts"]["validation"]["pair_ids"] == 2
    cfg = json.loads((out / "synth.json").read_text())["config"]
    assert cfg["seed"] == 3 and cfg["train_pairs"] == cfg["val_pairs"] == 2
    assert synth.main(["--out", str(out), "--preset", "smoke", "--pairs", "2", "--seed", "3", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "up to date"


def test_config_validation():
    with pytest.raises(ValueError):
        synth.generate("/nonexistent/never", replace(TINY, val_pairs=0))
    with pytest.raises(ValueError):
        replace(TINY, occlusion_probs=(0.5, 0.5, 0.5)).validate()
    assert synth.SynthConfig.demo().val_pairs > synth.SynthConfig.smoke().val_pairs


def test_demo_plan_sizes_and_identity_coverage():
    """The demo configuration (planned, not rendered): a few hundred train identities, ~100-150 validation
    identities with several user photos each, unique looks, every identity in a shop and a user photo."""
    cfg = synth.SynthConfig.demo()
    for split, (lo, hi) in {"train": (300, 700), "validation": (100, 150)}.items():
        plans = synth.plan_split(cfg, split)
        looks: dict[tuple[int, int], synth.Look] = {}
        seen: dict[str, set] = {"user": set(), "shop": set()}
        for p in plans:
            assert 1 <= len(p.items) <= 3 and p.items[p.target].style > 0
            for it in p.items:
                if it.style > 0:
                    ident = (p.pair_id, it.style)
                    assert looks.setdefault(ident, it.look) == it.look
                    seen[p.source].add(ident)
        assert lo <= len(looks) <= hi, (split, len(looks))
        assert seen["user"] == seen["shop"] == set(looks)
        assert len({(lk.factors, lk.hidden) for lk in looks.values()}) == len(looks)
        # look-alikes: >= shared_tuple_fraction of the identities share their captionable tuple with another
        assert synth.shared_tuple_share(plans) >= cfg.shared_tuple_fraction - 1 / len(looks)
        user_photos = pd.Series([p.pair_id for p in plans if p.source == "user"]).value_counts()
        assert user_photos.min() >= cfg.user_per_pair(split)[0]


def test_cli_refuses_to_replace_without_force(tmp_path: Path, capsys):
    out = tmp_path / "cli"
    assert synth.main(["--out", str(out), "--preset", "smoke", "--pairs", "1", "--quiet"]) == 0
    assert synth.main(["--out", str(out), "--preset", "smoke", "--pairs", "2", "--quiet"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert synth.main(["--out", str(out), "--preset", "smoke", "--pairs", "2", "--quiet", "--force"]) == 0
    assert json.loads((out / "synth.json").read_text())["config"]["val_pairs"] == 2


def test_test_split_holds_unseen_identities_and_leaves_train_and_validation_alone():
    from dataclasses import replace as _replace

    cfg = synth.SynthConfig.smoke()
    plans = {s: synth.plan_split(cfg, s) for s in synth.SPLITS}
    test_ids = synth.identity_factors(plans["test"])
    assert test_ids and test_ids.isdisjoint(synth.identity_factors(plans["train"]) |
                                             synth.identity_factors(plans["validation"]))
    # train and validation do not depend on the test split's size
    bigger = _replace(cfg, test_pairs=9)
    for split in ("train", "validation"):
        assert synth.plan_split(bigger, split) == plans[split]
    assert len({p.pair_id for p in synth.plan_split(bigger, "test")}) == 9
