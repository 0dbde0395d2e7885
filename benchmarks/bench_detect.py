"""Detection from pixels alone (capret_utils.evaluation.detect): speed, the choice of scoring, and detected- vs
GT-box retrieval on the official protocol; prints JSON.

* ``timing``: detection seconds per photo with the tiny random model on CPU (``--timing-photos`` photos of the test
  split, each scoring family: ``itm-photo`` = 1 vision pass + 13 fusion passes per photo, the crop scorings + 13
  crop passes), extrapolated to the validation-sized layout (``--layout-photos`` = 32,153 photos).
* ``select`` (with ``--select``): on the select split (synthetic validation) with the model below, every scoring
  × ``max_detections`` in 1-4 (NMS IoU 0.5): same-class recall at IoU 0.5, any-class box recall, the share of
  queries lost before retrieval, detections per photo, and the official detected-box top-1 / top-20.
* ``test`` (with ``--test``): on the synthetic test split, the ``crop`` variant under GT, oracle (category-given
  box head) and detected boxes, official top-1 / top-20 with 95 % Wilson intervals, and the gap table.

The model is the fine-tuned demo checkpoint (``runs/demo/03_finetune/checkpoint``) when it exists, else the
zero-shot demo model (the JSON says which).

    python benchmarks/bench_detect.py                    # timing only (~1 min)
    python benchmarks/bench_detect.py --select --test    # + selection and test numbers (~4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from capret_utils.common import repo_root  # noqa: E402
from capret_utils.data import splits  # noqa: E402
from capret_utils.evaluation import analysis, detect, stats  # noqa: E402
from capret_utils.runs import paths  # noqa: E402

DEMO_CHECKPOINT = "runs/demo/03_finetune/checkpoint"
LAYOUT_PHOTOS = 32_153  # DeepFashion2 validation: 10,844 consumer + 21,309 shop images


def model_bundle(checkpoint: str, texts: list[str], seed: int = 0) -> tuple[str, object]:
    path = Path(checkpoint)
    path = path if path.is_absolute() else repo_root() / path
    if (path / "finetune_info.json").is_file():
        from capret_utils import train

        return f"fine-tuned ({checkpoint})", train.load_finetuned(path, device="cpu")
    return "zero-shot demo (no fine-tuned checkpoint found)", analysis.fresh_bundle("demo", seed, texts, device="cpu")


def timing(root: Path, n: int, layout: int, workers: int) -> dict:
    items, _ = splits.load_role(root, "test")
    photos = detect.photo_table(items).iloc[:n].reset_index(drop=True)
    bundle = analysis.fresh_bundle("tiny", 0, ["a"], device="cpu")
    out = {"model": "tiny (random init)", "image_res": bundle.image_res, "photos": len(photos),
           "threads": __import__("torch").get_num_threads()}
    for scoring in ("itm-photo", "itm-crop"):
        cfg = detect.DetectConfig(scoring=scoring, num_workers=workers, progress=False)
        detect.detect_photos(photos.iloc[:8], bundle, cfg)  # warm-up
        started = time.perf_counter()
        detect.detect_photos(photos, bundle, cfg)
        per = (time.perf_counter() - started) / len(photos)
        out[scoring] = {"seconds_per_photo": per, "layout_photos": layout, "layout_minutes": per * layout / 60}
    return out


def official_interval(per_query, k: int) -> list[float]:
    return list(stats.wilson_interval(per_query[f"hit@{k}"].astype(float)))


def select(root: Path, bundle, workers: int) -> dict:
    items, folder = splits.load_role(root, "select")
    photos = detect.photo_table(items)
    base = detect.DetectConfig(num_workers=workers, progress=False)
    started = time.perf_counter()
    cands = detect.candidates(photos, bundle, base, crops=True)
    out = {"split": folder, "photos": len(photos), "candidate_seconds": time.perf_counter() - started, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for scoring in detect.SCORINGS:
            for max_det in (1, 2, 3, 4):
                cfg = replace(base, scoring=scoring, max_detections=max_det)
                dets = detect.select_detections(photos, cands, cfg)
                _, summary = detect.detection_report(dets, items, photos)
                ev = detect.detected_submission(bundle, dets, items, Path(tmp), f"{scoring}-{max_det}".replace("*", "x"),
                                                num_workers=workers, progress=False)
                out["rows"].append({"scoring": scoring, "max_detections": max_det,
                                    **{k: summary[k] for k in ("recall_iou50", "box_recall_iou50", "lost_share",
                                                               "detections_per_photo")},
                                    "official_top1": ev.metrics["top1"], "official_top20": ev.metrics["top20"]})
    return out


def test(root: Path, bundle, label: str, cfg: detect.DetectConfig, workers: int) -> dict:
    items, folder = splits.load_role(root, "test")
    data = analysis.RetrievalData.build(items)
    acfg = analysis.AnalysisConfig(num_workers=workers, progress=False, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        modes = detect.run_box_modes({label: bundle}, data, acfg, replace(cfg, num_workers=workers), run_dir=tmp)
    out = {"split": folder, "n_queries": None, "modes": {}}
    for name, ev in modes.official.items():
        pq = modes.per_query[name]
        out["n_queries"] = ev["n_queries"]
        out["modes"][name.split("@")[1]] = {"top1": ev["top1"], "top1_ci95": official_interval(pq, 1),
                                            "top20": ev["top20"], "top20_ci95": official_interval(pq, 20),
                                            "n_matched": ev["n_matched"]}
    out["detection"] = modes.summary[label]
    out["recall_by_category"] = modes.recall[label][["category_name", "n", "recall", "box_recall"]].to_dict("records")
    out["gap"] = modes.gaps[label].to_dict("records")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default="", help="DeepFashion2-format root; empty: the synthetic benchmark")
    parser.add_argument("--checkpoint", default=DEMO_CHECKPOINT, help="fine-tuned checkpoint folder (notebook 03)")
    parser.add_argument("--timing-photos", type=int, default=120, help="photos timed per scoring")
    parser.add_argument("--layout-photos", type=int, default=LAYOUT_PHOTOS, help="photos of the layout to extrapolate to")
    parser.add_argument("--num-workers", type=int, default=0, help="image-loading workers (0: in-process)")
    parser.add_argument("--scoring", default=detect.DetectConfig.scoring, choices=detect.SCORINGS)
    parser.add_argument("--max-detections", type=int, default=detect.DetectConfig.max_detections)
    parser.add_argument("--select", action="store_true", help="measure every scoring on the select split")
    parser.add_argument("--test", action="store_true", help="detected vs GT boxes on the test split")
    args = parser.parse_args(argv)
    root = paths.data_root(args.data_root, False)
    out: dict = {"data_root": str(root)}
    out["timing"] = timing(root, args.timing_photos, args.layout_photos, args.num_workers)
    if args.select or args.test:
        label, bundle = model_bundle(args.checkpoint, ["a"])
        out["model"] = label
        if args.select:
            out["select"] = select(root, bundle, args.num_workers)
        if args.test:
            cfg = detect.DetectConfig(scoring=args.scoring, max_detections=args.max_detections, progress=False)
            out["test"] = test(root, bundle, "fine-tuned" if label.startswith("fine") else "zero-shot", cfg,
                               args.num_workers)
    json.dump(out, sys.stdout, indent=1, default=float)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
