"""How long do the FiftyOne layer and the 01_explore figures take at the size of the released validation split?
Prints JSON.

The items table is the synthetic demo benchmark's validation split (loaded with ``df2.load_items``, real files),
tiled to ``--images`` images (default 32,153, the released validation size; about 52k items) with fresh image ids
and keys, so every row is real and the image files exist (tiles share files). Measured: ``fo.build_dataset``
(one sample per image, boxes, landmarks as keypoints, saved views), ``fo.item_index``, writing a per-query results
table for every query (top-20 keys and scores, first-hit rank, hit@1/10, AP; ``--variants`` of them) with ``fo.attach_results``, loading
the ``query-items`` patches view, and each figure of ``capret_utils.viz.plots``. The database is a temporary one
(``FIFTYONE_DATABASE_DIR``) and the dataset is deleted afterwards.

    python benchmarks/bench_fo.py                  # 32,153 images
    python benchmarks/bench_fo.py --images 5000
    python benchmarks/bench_fo.py --variants 21    # notebook 04's demo writes 21 variants
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid

os.environ.setdefault("FIFTYONE_DATABASE_DIR", tempfile.mkdtemp(prefix="capret-bench-fo-db-"))
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def tiled_items(base: pd.DataFrame, n_images: int) -> pd.DataFrame:
    """Repeat ``base``'s images up to ``n_images`` images: user images first, then shop (like the release),
    in the base's user:shop ratio; tile k offsets ``pair_id`` by k * max(pair_id) so identities stay per tile."""
    images = base.drop_duplicates("image_id")[["image_id", "source"]]
    user = images[images["source"] == "user"]["image_id"].to_numpy()
    shop = images[images["source"] == "shop"]["image_id"].to_numpy()
    n_user = round(n_images * len(user) / (len(user) + len(shop)))
    order = np.concatenate([np.resize(user, n_user), np.resize(shop, n_images - n_user)])  # old id per new id
    tiles = np.concatenate([np.arange(n_user) // len(user), np.arange(n_images - n_user) // len(shop)])
    rows_of = base.groupby("image_id").indices
    positions = np.concatenate([rows_of[i] for i in order])
    counts = np.asarray([len(rows_of[i]) for i in order])
    out = base.iloc[positions].reset_index(drop=True)
    out["image_id"] = np.repeat(np.arange(1, n_images + 1), counts)
    out["pair_id"] = out["pair_id"].to_numpy() + np.repeat(tiles, counts) * int(base["pair_id"].max())
    out["key"] = [f"validation/{i:06d}/{item}" for i, item in zip(out["image_id"], out["item"])]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32153, help="images in the tiled split")
    parser.add_argument("--topk", type=int, default=20, help="length of the per-query top-k lists")
    parser.add_argument("--variants", type=int, default=1,
                        help="result tables attached, one per variant (notebook 04's demo writes 21), declared once")
    args = parser.parse_args(argv)

    from capret_utils.data import df2
    from capret_utils.runs import paths
    from capret_utils.viz import plots
    from capret_utils.viz import fo as cfo

    t = time.perf_counter()
    base = df2.load_items(paths.split_dir(paths.data_root("", smoke=False), "validation"))
    items = tiled_items(base, args.images)
    out: dict = {"images": int(items["image_id"].nunique()), "items": int(len(items)),
                 "queries": int(((items["source"] == "user") & (items["style"] > 0)).sum()),
                 "prepare_s": round(time.perf_counter() - t, 2), "cpu_count": os.cpu_count(),
                 "loadavg_1min": round(os.getloadavg()[0], 2)}

    import fiftyone  # noqa: F401  (import time is not part of the build)

    name = f"capret-bench-fo-{uuid.uuid4().hex[:8]}"
    try:
        t = time.perf_counter()
        dataset = cfo.build_dataset(items, name, cfo.BuildConfig(persistent=False))
        out["build_s"] = round(time.perf_counter() - t, 2)
        out["build_images_per_s"] = round(out["images"] / out["build_s"], 1)

        t = time.perf_counter()
        index = cfo.item_index(dataset)
        out["item_index_s"] = round(time.perf_counter() - t, 2)
        assert len(index) == len(items)

        rng = np.random.default_rng(0)
        queries = items[(items["source"] == "user") & (items["style"] > 0)]["key"].tolist()
        gallery = items[items["source"] == "shop"]["key"].to_numpy()
        results = pd.DataFrame({
            "key": queries,
            "topk_keys": [gallery[rng.integers(0, len(gallery), args.topk)].tolist() for _ in queries],
            "topk_scores": [np.sort(rng.random(args.topk))[::-1].round(4).tolist() for _ in queries],
            "first_hit_rank": rng.integers(1, 50, len(queries)),
            "hit_at_1": rng.random(len(queries)) < 0.2,
            "hit_at_10": rng.random(len(queries)) < 0.5,
            "ap": rng.random(len(queries)),
        })
        t = time.perf_counter()
        fields = []
        for v in range(args.variants):  # like variant_views.write_fiftyone: declared and refreshed once at the end
            name = "bench" if v == 0 else f"bench{v}"
            fields += cfo.attach_results(dataset, results, variant=name, refresh=False, declare=False, index=index)
        declared = cfo.declare_item_fields(dataset)
        cfo.refresh_saved_views(dataset)
        assert len(declared) == len(fields), (len(declared), len(fields))
        out["attach_results_s"] = round(time.perf_counter() - t, 2)
        out["attach_results_variants"] = args.variants
        out["attach_results_fields"] = len(fields)

        t = time.perf_counter()
        patches = dataset.load_saved_view("query-items")
        n_patches = len(patches)
        aps = patches.values("items.bench_ap")
        out["query_items_view_s"] = round(time.perf_counter() - t, 2)
        assert n_patches == len(queries) and sum(a is not None for a in aps) == len(queries)
    finally:
        cfo.delete_dataset(name)

    figure_s = {}
    for fig_name, fn in (("categories", plots.category_counts), ("attributes", plots.attribute_distributions),
                         ("pairs", plots.pair_statistics), ("box_sizes", plots.box_sizes),
                         ("examples", plots.pair_examples)):
        t = time.perf_counter()
        fig = fn(items)
        plots.inline(fig)
        figure_s[fig_name] = round(time.perf_counter() - t, 2)
    out["figures_s"] = figure_s
    out["figures_total_s"] = round(sum(figure_s.values()), 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
