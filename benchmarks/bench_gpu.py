"""GPU benchmark of X2-VLM fine-tuning steps: base at 384 px, LoRA and full, speed and peak memory against the plan.

    .venv/bin/python benchmarks/bench_gpu.py                 # about 2 minutes on an H100 / H200; prints JSON
    .venv/bin/python benchmarks/bench_gpu.py --checkpointing # also each mode with gradient checkpointing

Random weights (speed and memory do not depend on them) and synthetic batches with the x2vlm recipe's settings
(batch 20, ITC + ITM + ArcFace, 384 px; ``--recipe demo`` adds the box photos and the recoloured copies), at the
precision the GPU gets (bf16 autocast, fp16 + gradient scaler without bf16). Per mode: the memory plan
(``capret_utils.train.plan_memory``), the bytes autograd keeps in one forward against the plan's activation terms,
then ``--steps`` timed optimizer steps after ``--warmup`` (steps/s, items/s, vision-tower images/s) and the peak
memory torch.cuda saw against the planned ``allocated_gb``. Without CUDA it exits with status 2; ``--device cpu
--preset demo --image-res 64`` runs the same code as a smoke check.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from typing import Any

import torch

from capret_utils import train
from capret_utils.train import precision as P
from capret_utils.x2vlm import LoraSettings, X2VLMModel, apply_lora

GIB = 1024**3
N_CLASSES = 1000  # ArcFace identity classes (their weights are part of the optimizer state)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base", help="X2-VLM preset (random weights)")
    p.add_argument("--image-res", type=int, default=384)
    p.add_argument("--recipe", default="x2vlm", choices=sorted(train.RECIPES))
    p.add_argument("--batch-size", type=int, default=0, help="0 = the recipe's (x2vlm: 20)")
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--checkpointing", action="store_true", help="also run every mode with gradient checkpointing")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(args: argparse.Namespace, mode: str, checkpointing: bool, device: torch.device) -> dict[str, Any]:
    given = {"model": args.preset, "recipe": args.recipe, "finetune_mode": mode, "image_res": args.image_res,
             "gradient_checkpointing": checkpointing, "device": str(device), "progress": False}
    if args.batch_size:
        given["batch_size"] = args.batch_size
    cfg = train.apply_recipe(train.TrainConfig(**given), user_set=given).config
    mcfg = train.model_config(cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = X2VLMModel(mcfg)
    model.set_attn_implementation("sdpa")
    module, net = model, model
    if mode == "lora":
        module = apply_lora(model, LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout))
        net = module.get_base_model()
    net.set_layer_checkpointing(checkpointing)
    net.train()
    arcface, category = train.build_arcfaces(cfg, N_CLASSES, int(mcfg.embed_dim))
    arcface, category = arcface.to(device), category.to(device) if category is not None else None
    criterion = train.Criterion(cfg, arcface, category, torch.Generator().manual_seed(0), device)
    optimizer = train.build_optimizer(module, arcface, cfg, category)
    scheduler = train.build_scheduler(optimizer, 10_000, cfg)
    precision = P.resolve_precision(device, cfg.bf16)
    scaler = P.grad_scaler(precision, device)
    batch = {k: v.to(device) for k, v in train.synthetic_batch(mcfg, cfg).items()}
    batch["labels"] = batch["labels"] % N_CLASSES
    plan = train.plan_memory(cfg, mcfg, device, identities=N_CLASSES)
    planned_act = plan.activations_gb + plan.autocast_weight_copies_gb
    measured_act = train.measure_step(net, criterion, batch) / GIB
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    batches = itertools.repeat(batch)
    for step in range(args.warmup):
        train.train_step(net, criterion, optimizer, scheduler, batches, cfg, step, scaler)
    _sync(device)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        train.train_step(net, criterion, optimizer, scheduler, batches, cfg, step, scaler)
    _sync(device)
    seconds = time.perf_counter() - start
    passes = plan.passes
    images = passes["crops"] + passes["recoloured"] + passes["box_images"]
    out: dict[str, Any] = {
        "model": f"{args.preset} (random weights)", "mode": mode, "gradient_checkpointing": checkpointing,
        "precision": precision, "image_res": int(mcfg.image_res), "batch_size": cfg.batch_size,
        "recipe": args.recipe, "passes": passes, "trainable_params": plan.trainable_params,
        "steps_per_s": round(args.steps / seconds, 3),
        "items_per_s": round(args.steps * cfg.batch_size * cfg.grad_accum / seconds, 1),
        "vision_images_per_s": round(args.steps * images * cfg.grad_accum / seconds, 1),
        "planned_activation_gb": round(planned_act, 3), "measured_activation_gb": round(measured_act, 3),
        "activation_plan_ratio": round(planned_act / measured_act, 3) if measured_act else None,
        "planned_allocated_gb": round(plan.allocated_gb, 3), "planned_total_gb": round(plan.total_gb, 3)}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / GIB
        out.update(peak_allocated_gb=round(peak, 3),
                   peak_reserved_gb=round(torch.cuda.max_memory_reserved(device) / GIB, 3),
                   allocated_plan_ratio=round(plan.allocated_gb / peak, 3))
    del model, module, net, optimizer, scheduler, criterion, batch, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU is visible to torch; this benchmark measures GPU speed and memory and does "
              "not run without one (use --device cpu --preset demo --image-res 64 for a smoke check of the code)",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = [run_one(args, mode, ckpt, device) for ckpt in ([False, True] if args.checkpointing else [False])
               for mode in args.modes]
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "results": results, "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
