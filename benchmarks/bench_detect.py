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

import numpy as np

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


def load() -> list[float]:
    """The 1 / 5 / 15-minute load averages (the machine is shared: timings scale with it)."""
    return [round(x, 2) for x in os.getloadavg()]


def timing(root: Path, n: int, layout: int, workers: int) -> dict:
    """Seconds per photo of the detection stage (photo pass + crop passes + selection) with the tiny model, per
    scoring family, extrapolated to ``layout`` photos (the JSON says so: ``extrapolated_from``)."""
    import torch

    items, _ = splits.load_role(root, "test")
    photos = detect.photo_table(items).iloc[:n].reset_index(drop=True)
    bundle = analysis.fresh_bundle("tiny", 0, ["a"], device="cpu")
    head = torch.randn(int(bundle.model.config.embed_dim), 13)  # the tiny model has no head: cost stand-in
    out = {"model": "tiny (random init)", "image_res": bundle.image_res, "photos": len(photos),
           "extrapolated_from": f"{len(photos)} test-split photos (speed only) -> {layout} photos",
           "threads": torch.get_num_threads(), "load_before": load(), "rows": []}
    for scoring, k, m in TIMED:
        cfg = detect.DetectConfig(scoring=scoring, crop_candidates=k, classes_per_box=m, max_detections=min(4, k),
                                  num_workers=workers, progress=False)
        detect.detect_photos(photos.iloc[:8], bundle, cfg, head=head)  # warm-up
        started = time.perf_counter()
        detect.detect_photos(photos, bundle, cfg, head=head)
        per = (time.perf_counter() - started) / len(photos)
        out["rows"].append({"scoring": scoring, "crop_candidates": k, "seconds_per_photo": round(per, 5),
                            "layout_minutes": round(per * layout / 60, 2), "load": load()})
    return out


TIMED = (("itm-photo", 13, 1), ("itc-crop", 13, 1), ("itc-crop", 4, 1), ("head+itc-class", 4, 2),
         ("head+itc-class", 2, 2))
SELECT_GRID = ([(s, k, 1) for s in detect.ASKED_SCORINGS for k in (13, 4)]
               + [(s, k, m) for s in detect.CLASS_SCORINGS for k in (4, 6) for m in (1, 2, 3, 13)])


def restrict(cands: dict, k: int, nms_iou: float) -> dict:
    """:func:`detect.candidates` output with all 13 crops -> as if only ``k`` had been cropped."""
    slots, valid = detect.crop_slots(cands["boxes"], cands["itm-photo"], k, nms_iou)
    out = {"boxes": cands["boxes"], "itm-photo": cands["itm-photo"], "slots": slots, "valid": valid}
    for name in ("itc_probs", "head_probs", "crop_feat"):
        if name in cands:
            out[name] = np.take_along_axis(cands[name], slots[..., None], axis=1)
    for name in ("itc-crop", "itm-crop"):
        mask = np.zeros(cands[name].shape, bool)
        np.put_along_axis(mask, slots, valid, axis=1)
        out[name] = np.where(mask, cands[name], np.nan)
    return out


def official(dets, photos, feats, items, folder: Path, name: str):
    """Score detections with ``df2_eval``, each detection embedded by its candidate's crop feature (the crop pass
    already computed the ``crop`` view of that box)."""
    from capret_utils.data import df2
    from capret_utils.evaluation import df2_eval
    from capret_utils.evaluation.retrieval import exact_search

    pos = {k: i for i, k in enumerate(photos["key"])}
    q = dets[dets["source"] == "user"].reset_index(drop=True)
    g = dets[dets["source"] == "shop"].reset_index(drop=True)
    vec = [feats[[pos[k] for k in f["photo_key"]], f["candidate"].to_numpy()] for f in (q, g)]
    res = exact_search(np.ascontiguousarray(vec[0]), np.ascontiguousarray(vec[1]), min(20, len(g)))
    if not (folder / "query_gt.json").is_file():
        df2.write_official_gt(items, folder, query_name="query_gt.json", gallery_name="gallery_gt.json")
    path = df2_eval.write_results(folder / f"{name}.results.json", df2_eval.detection_results(q, g, res.indices))
    return df2_eval.evaluate_files(path, folder / "query_gt.json", folder / "gallery_gt.json")


def gt_box_accuracy(items, bundle, head, workers: int) -> dict:
    """Diagnostic (reads labels): top-1 accuracy of each crop classifier on the GT boxes of the query items, i.e.
    the classification error that remains with perfect boxes."""
    import torch

    from capret_utils.evaluation import crop_scores

    q = items[(items["source"] == "user") & (items["style"] > 0)].reset_index(drop=True)
    with torch.no_grad():
        _, _, text_feat = detect._category_texts(bundle)
    got = crop_scores.crop_scores(q, q[["x1", "y1", "x2", "y2"]].to_numpy()[:, None], np.ones((len(q), 1), bool),
                                  bundle, text_feat, head, num_workers=workers)
    truth = q["category_id"].to_numpy() - 1
    probs = {"itc": got["itc"][:, 0]}
    if "head" in got:
        probs.update({"head": got["head"][:, 0], "head+itc": (got["head"][:, 0] + got["itc"][:, 0]) / 2})
    out = {"n": len(q)}
    for name, pr in probs.items():
        rank = (pr > pr[np.arange(len(q)), truth][:, None]).sum(1)
        out[name] = {f"top{k}": round(float((rank < k).mean()), 4) for k in (1, 2, 3)}
    return out


def select(root: Path, bundle, head, workers: int) -> dict:
    """Every scoring on the select split from one candidate pass (all 13 crops scored, subsets taken for fewer
    crop candidates); max_detections 4 boxes per photo, NMS IoU 0.5."""
    items, folder = splits.load_role(root, "select")
    photos = detect.photo_table(items)
    base = detect.DetectConfig(crop_candidates=13, num_workers=workers, progress=False)
    started = time.perf_counter()
    full = detect.candidates(photos, bundle, base, crops=True, head=head, itm_crop=True)
    out = {"split": folder, "photos": len(photos), "candidate_seconds": round(time.perf_counter() - started, 1),
           "max_detections": 4, "rows": []}
    out["gt_box_class_accuracy"] = gt_box_accuracy(items, bundle, head, workers)
    with tempfile.TemporaryDirectory() as tmp:
        for scoring, k, m in SELECT_GRID:
            if "head" in scoring and head is None:
                continue
            cfg = replace(base, scoring=scoring, crop_candidates=k, classes_per_box=m, max_detections=4)
            cands = restrict(full, k, cfg.nms_iou)
            dets = detect.select_detections(photos, cands, cfg)
            _, summary = detect.detection_report(dets, items, photos)
            ev = official(dets, photos, full["crop_feat"], items, Path(tmp), f"{scoring}-{k}-{m}".replace("*", "x"))
            out["rows"].append({"scoring": scoring, "crop_candidates": k, "classes_per_box": m,
                                **{c: round(summary[c], 4) for c in ("recall_iou50", "box_recall_iou50", "lost_share",
                                                                     "detections_per_photo")},
                                "official_top1": round(ev.metrics["top1"], 4),
                                "official_top20": round(ev.metrics["top20"], 4)})
    return out


def official_interval(per_query, k: int) -> list[float]:
    return list(stats.wilson_interval(per_query[f"hit@{k}"].astype(float)))


def test(root: Path, bundle, head, label: str, cfg: detect.DetectConfig, workers: int) -> dict:
    items, folder = splits.load_role(root, "test")
    data = analysis.RetrievalData.build(items)
    acfg = analysis.AnalysisConfig(num_workers=workers, progress=False, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        modes = detect.run_box_modes({label: bundle}, data, acfg, replace(cfg, num_workers=workers), run_dir=tmp,
                                     heads={label: head})
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
    parser.add_argument("--timing-photos", type=int, default=200, help="photos timed per scoring (0: no timing)")
    parser.add_argument("--layout-photos", type=int, default=LAYOUT_PHOTOS, help="photos of the layout to extrapolate to")
    parser.add_argument("--num-workers", type=int, default=0, help="image-loading workers (0: in-process)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    default = detect.DetectConfig()
    parser.add_argument("--scoring", default=default.scoring, choices=detect.SCORINGS)
    parser.add_argument("--max-detections", type=int, default=default.max_detections)
    parser.add_argument("--crop-candidates", type=int, default=default.crop_candidates)
    parser.add_argument("--classes-per-box", type=int, default=default.classes_per_box)
    parser.add_argument("--select", action="store_true", help="measure every scoring on the select split")
    parser.add_argument("--test", action="store_true", help="detected vs GT boxes on the test split (the default)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    root = paths.data_root(args.data_root, False)
    out: dict = {"data_root": str(root), "load_start": load(), "threads": args.threads or "default"}
    if args.timing_photos:
        out["timing"] = timing(root, args.timing_photos, args.layout_photos, args.num_workers)
    if args.select or args.test:
        from capret_utils.evaluation.crop_scores import load_category_head

        label, bundle = model_bundle(args.checkpoint, ["a"])
        head = load_category_head(repo_root() / args.checkpoint) if label.startswith("fine") else None
        out["model"], out["category_head"] = label, head is not None
        if args.select:
            out["select"] = select(root, bundle, head, args.num_workers)
        if args.test:
            cfg = detect.DetectConfig(scoring=args.scoring, max_detections=args.max_detections,
                                      crop_candidates=args.crop_candidates, classes_per_box=args.classes_per_box,
                                      progress=False)
            out["test"] = test(root, bundle, head, "fine-tuned" if label.startswith("fine") else "zero-shot", cfg,
                               args.num_workers)
    out["load_end"] = load()
    json.dump(out, sys.stdout, indent=1, default=float)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
