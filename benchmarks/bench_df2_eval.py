"""Benchmark: the official DeepFashion2 top-k evaluator on the 2019 validation GT with 20-entry lists.

Usage::

    python benchmarks/bench_df2_eval.py [--gt-dir ../shared/data/df2_val_gt_2019] [--repeats 3]

Builds a seeded synthetic submission for every style > 0 query of the 2019 ground truth (12,550 queries,
24,012 gallery records): jittered query boxes, 10 % wrong classes, 30 % extra spurious (0, 0, 30, 30)
detections, 20 gallery entries each with an 8 % chance of being a (jittered) positive. Times
``capret_utils.evaluation.df2_eval.evaluate_df2`` on the parsed JSON lists (parsing/validation included) and the
whole CLI path (JSON files read from disk). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from capret_utils.evaluation import df2_eval as E
from capret_utils.common import repo_root


def make_results(qgt: list[dict], ggt: list[dict], seed: int, length: int) -> list[dict]:
    rnd = random.Random(seed)
    pos = defaultdict(list)
    for p in ggt:
        pos[(p["pair_id"], p["style"])].append(p)

    def jitter(b, s):
        return [b[0] + rnd.uniform(-s, s), b[1] + rnd.uniform(-s, s), b[2] + rnd.uniform(-s, s),
                b[3] + rnd.uniform(-s, s)]

    out = []
    for g in qgt:
        if g["style"] <= 0:
            continue
        ids, boxes = [], []
        for _ in range(length):
            if rnd.random() < 0.08:
                p = rnd.choice(pos[(g["pair_id"], g["style"])])
                ids.append(p["gallery_image_id"])
                boxes.append(jitter(p["bbox"], 25))
            else:
                f = rnd.choice(ggt)
                ids.append(f["gallery_image_id"])
                boxes.append(f["bbox"])
        cls = g["cls"] if rnd.random() > 0.1 else rnd.randint(1, 13)
        out.append({"query_image_id": g["query_image_id"], "query_bbox": jitter(g["bbox"], 8),
                    "query_cls": cls, "query_score": rnd.random(), "gallery_image_id": ids,
                    "gallery_bbox": boxes})
        if rnd.random() < 0.3:
            out.append({"query_image_id": g["query_image_id"], "query_bbox": [0, 0, 30, 30],
                        "query_cls": rnd.randint(1, 13), "query_score": rnd.random(),
                        "gallery_image_id": ids[::-1], "gallery_bbox": boxes[::-1]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gt-dir", default=str(repo_root().parent / "shared" / "data" / "df2_val_gt_2019"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--length", type=int, default=20, help="gallery entries per results record")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    gt = Path(args.gt_dir)
    t = time.perf_counter()
    qgt = E.load_json(gt / "query_gt.json", "query GT")
    ggt = E.load_json(gt / "gallery_gt.json", "gallery GT")
    load_gt_s = time.perf_counter() - t
    results = make_results(qgt, ggt, args.seed, args.length)
    runs, cli_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        res_path = E.write_results(Path(tmp) / "results.json", results)
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = E.evaluate_df2(results, qgt, ggt)
            runs.append(time.perf_counter() - t)
            t = time.perf_counter()
            E.evaluate_files(res_path, gt / "query_gt.json", gt / "gallery_gt.json")
            cli_runs.append(time.perf_counter() - t)
    print(json.dumps({
        "n_queries": out.metrics["n_queries"], "n_results": out.metrics["n_results"],
        "list_length": out.metrics["list_length"], "n_gallery_gt": len(ggt),
        "evaluate_s": round(min(runs), 3), "evaluate_s_median": round(statistics.median(runs), 3),
        "files_to_metrics_s": round(min(cli_runs), 3),
        "files_to_metrics_s_median": round(statistics.median(cli_runs), 3),
        "load_gt_s": round(load_gt_s, 3),
        "metrics": {f"top{k}": round(out.metrics[f"top{k}"], 4) for k in E.DEFAULT_KS},
    }, indent=2))


if __name__ == "__main__":
    main()
