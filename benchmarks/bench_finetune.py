"""Fine-tuning benchmark: the demo configuration of notebook 03 on the synthetic benchmark; prints JSON.

Measures what ``papermill notebooks/03_finetune.ipynb out.ipynb`` does with its defaults — zero-shot and
fine-tuned item-level hit@1 / mAP on the validation split, wall time (data, zero-shot evaluation, training with
its periodic evaluations, final evaluation, checkpoint) — through the same ``capret_utils.train`` calls.

    python benchmarks/bench_finetune.py                         # demo configuration (targets: hit@1 >= 0.90,
                                                                #   mAP >= 0.80 in <= 10 min, zero-shot hit@1 <= 0.10)
    python benchmarks/bench_finetune.py --ablate                # + one run per loss switched off (w = 0)
    python benchmarks/bench_finetune.py --preset base --image-res 384 --device cuda --steps 300 --no-eval
                                                                # GPU throughput: steps/s, images/s, peak memory
    python benchmarks/bench_finetune.py --preset base --image-res 384 --steps 2 --batch-size 4 --no-eval
                                                                # CPU smoke of the base / LoRA path (slow, ~GBs)

Random-weight ``base`` / ``large`` models use a WordPiece vocabulary built offline (``tokenizer="build"``) unless
``--tokenizer`` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {"finetuned_top1": 0.90, "finetuned_mAP": 0.80, "wall_s": 600.0, "zero_shot_top1_max": 0.10}
ABLATIONS = ("w_itc", "w_itm", "w_box", "w_arcface", "w_category")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="", help="DeepFashion2-format root (default: the synthetic demo)")
    p.add_argument("--preset", default="demo", help="model: demo | tiny | base | large | checkpoint path")
    p.add_argument("--image-res", type=int, default=0, help="input side in pixels (0 = the preset's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0 = the notebook default: epochs)")
    p.add_argument("--batch-size", type=int, default=0, help="items per step (0 = notebook default)")
    p.add_argument("--use-captions", default="dialogue", help="none | template | dialogue")
    p.add_argument("--captions-path", default="", help="captions.jsonl of notebook 02 (default: generate offline)")
    p.add_argument("--finetune-mode", default="auto", help="auto | lora | full")
    p.add_argument("--tokenizer", default="", help="tokenizer for base/large/paths (default: build offline)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--eval-every", type=int, default=-1, help="steps between evaluations (-1 = notebook default)")
    p.add_argument("--no-eval", action="store_true", help="skip the validation evaluations (throughput runs)")
    p.add_argument("--ablate", action="store_true", help="also run once per loss with its weight set to 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="run folder (default: a temporary folder)")
    return p.parse_args(argv)


def base_config(a: argparse.Namespace):
    from capret_utils import train

    cfg = train.TrainConfig(model=a.preset, image_res=a.image_res, device=a.device, use_captions=a.use_captions,
                            finetune_mode=a.finetune_mode, threads=a.threads, seed=a.seed, resume=False,
                            eval_every=250)
    if a.steps:
        cfg = replace(cfg, max_steps=a.steps)
    if a.batch_size:
        cfg = replace(cfg, batch_size=a.batch_size)
    if a.eval_every >= 0:
        cfg = replace(cfg, eval_every=a.eval_every)
    if a.no_eval:
        cfg = replace(cfg, eval_every=0)
    if a.preset not in train.RANDOM_INIT_PRESETS:
        cfg = replace(cfg, tokenizer=a.tokenizer or "build")
    return cfg


def run_once(cfg, a: argparse.Namespace, root: Path, out: Path, label: str) -> dict:
    import torch

    from capret_utils import train
    from capret_utils.data.splits import load_splits

    started = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_items, val_items = load_splits(root)[:2]  # train, select
    caps = train.caption_texts(cfg, root, out, a.captions_path, progress=False)
    setup = train.prepare(cfg, train_items, captions=caps)
    prepared = time.perf_counter()
    zero = None if a.no_eval else train.evaluate(setup.bundle, val_items, cfg)
    zero_done = time.perf_counter()
    result = train.finetune(setup, out, val_items=None if a.no_eval else val_items)
    wall = time.perf_counter() - started
    steps = result.steps
    images_per_step = (cfg.batch_size + (train.leading_rows(cfg.batch_size, cfg.box_fraction)
                                         if cfg.use_boxes and cfg.w_box else 0)
                       + (min(cfg.category_recolour, cfg.batch_size) if cfg.w_category else 0))  # vision passes
    record = {
        "label": label,
        "wall_s": round(wall, 1),
        "setup_s": round(prepared - started, 1),
        "zero_shot_eval_s": round(zero_done - prepared, 1),
        "train_s": round(result.train_seconds, 1),
        "steps": steps,
        "steps_per_s": round(steps / max(result.train_seconds, 1e-9), 3),
        "images_per_s": round(steps * images_per_step / max(result.train_seconds, 1e-9), 1),
        "images_per_step": images_per_step,
        "finetune_mode": cfg.mode,
        "trainable_parameters": result.info["trainable_parameters"]["trainable"],
        "total_parameters": result.info["trainable_parameters"]["total"],
    }
    if zero is not None:
        record["zero_shot"] = {k: round(zero[k], 4) for k in ("top1", "top5", "top10", "mAP")}
        record["finetuned"] = {k: round(result.metrics[k], 4) for k in ("top1", "top5", "top10", "mAP")}
        evals = result.history[result.history["kind"] == "eval"]
        record["eval_curve"] = [{"step": int(r.step), "top1": round(float(r.top1), 4), "mAP": round(float(r.mAP), 4)}
                                for r in evals.itertuples()]
    if torch.cuda.is_available():
        record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        record["device"] = torch.cuda.get_device_name(0)
    else:
        record["device"] = "cpu"
    print(f"[bench_finetune] {label}: {json.dumps(record)}", file=sys.stderr)
    return record


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    from capret_utils.runs import paths
    from capret_utils import train

    train.suppress_known_warnings()
    root = paths.data_root(a.data_root)
    cfg = base_config(a)
    report: dict = {"benchmark": "finetune", "data_root": str(root), "config": asdict(cfg),
                    "torch_threads": torch.get_num_threads() if not a.threads else a.threads,
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="capret-bench-ft-") as tmp:
        base_out = Path(a.out) if a.out else Path(tmp)
        main_run = run_once(cfg, a, root, base_out / "demo", "default")
        report.update(main_run)
        if "finetuned" in main_run:
            report["targets"] = {
                "finetuned_top1>=0.90": main_run["finetuned"]["top1"] >= TARGETS["finetuned_top1"],
                "finetuned_mAP>=0.80": main_run["finetuned"]["mAP"] >= TARGETS["finetuned_mAP"],
                "wall<=600s": main_run["wall_s"] <= TARGETS["wall_s"],
                "zero_shot_top1<=0.10": main_run["zero_shot"]["top1"] <= TARGETS["zero_shot_top1_max"],
            }
        if a.ablate:
            report["ablation"] = {}
            for weight in ABLATIONS:
                run = run_once(replace(cfg, **{weight: 0.0}), a, root, base_out / f"no_{weight}", f"{weight}=0")
                report["ablation"][f"{weight}=0"] = {k: run[k] for k in ("finetuned", "zero_shot", "wall_s", "steps")
                                                     if k in run}
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
