"""X2-VLM embedding throughput (images/s, texts/s, ITM pairs/s) and, optionally, one LoRA training step.

Random weights built from a preset (no download), or an official checkpoint with ``--checkpoint``. bf16
autocast on CUDA (``--dtype auto``), fp32 on CPU. Prints one JSON object. Examples::

    python benchmarks/bench_x2vlm.py --preset tiny --batch-size 32 --device cpu
    python benchmarks/bench_x2vlm.py --preset base --image-res 384 --batch-size 32 --device cuda --train-step
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from typing import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from capret_utils.x2vlm import (  # noqa: E402
    PRESETS,
    LoraSettings,
    X2VLMConfig,
    X2VLMModel,
    apply_lora,
    estimate_training_memory,
    measure_saved_activations,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (random weights)")
    p.add_argument("--checkpoint", default="", help="official .th file instead of random weights")
    p.add_argument("--text-heads", type=int, default=None, help="text heads for --checkpoint (default hidden/64)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-res", type=int, default=0, help="0 = the preset's / checkpoint's resolution")
    p.add_argument("--text-len", type=int, default=40, help="tokens per caption (official max_tokens 40)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--iters", type=int, default=5, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--train-step", action="store_true", help="also time one LoRA training step (and memory)")
    p.add_argument("--lora-rank", type=int, default=16)
    return p.parse_args(argv)


def timed(fn: Callable[[], object], iters: int, warmup: int, device: str, label: str) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in tqdm(range(iters), desc=label, leave=False, file=sys.stderr):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def build_model(args: argparse.Namespace) -> X2VLMModel:
    if args.checkpoint:
        return X2VLMModel.from_official(args.checkpoint, text_num_attention_heads=args.text_heads,
                                        image_res=args.image_res or None, attn_implementation=args.attn)
    overrides = {"image_res": args.image_res} if args.image_res else {}
    with torch.device(args.device):
        return X2VLMModel(X2VLMConfig.preset(args.preset, attn_implementation=args.attn, **overrides))


def train_step_report(model: X2VLMModel, args: argparse.Namespace, pixels, ids, mask, autocast) -> dict:
    """One LoRA step with the fine-tuning losses (ITC + ITM on B positives and 2B negatives + box L1)."""
    peft_model = apply_lora(model, LoraSettings(r=args.lora_rank)).train()
    base = peft_model.get_base_model()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    b = pixels.shape[0]

    def loss_fn() -> torch.Tensor:
        with autocast():
            out = peft_model(pixel_values=pixels, input_ids=ids, attention_mask=mask, fuse=False)
            target = torch.arange(b, device=pixels.device)
            neg = torch.roll(target, 1)
            fusion = base.get_fusion_embeds(torch.cat([out.text_embeds, out.text_embeds, out.text_embeds[neg]]),
                                            torch.cat([mask, mask, mask[neg]]),
                                            torch.cat([out.image_embeds, out.image_embeds[neg], out.image_embeds]))
            labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(pixels.device)
            loss = F.cross_entropy(out.itc_logits.float(), target) + F.cross_entropy(
                base.itm_logits(fusion).float(), labels)
            if base.bbox_head is not None:
                loss = loss + base.predict_bbox(fusion[:b]).float().sub(0.5).abs().sum(1).mean()
        return loss

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
        base.clamp_temp_()

    dtype = "bf16" if args.dtype_resolved == "bf16" else "fp32"
    estimate = estimate_training_memory(base.config, b, dtype=dtype, lora_rank=args.lora_rank,
                                        text_len=args.text_len, attention=args.attn)
    report = {"lora_rank": args.lora_rank, "estimate_total_gb": round(estimate.total_gb, 3),
              "estimate_allocated_gb": round(estimate.allocated_gb, 3)}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    report["train_step_s"] = round(timed(step, max(1, args.iters // 2), 1, args.device, "train step"), 4)
    if args.device == "cuda":
        report["measured_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        report["measured_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1024**3, 3)
    else:
        saved = measure_saved_activations(peft_model, loss_fn)
        report["measured_saved_activations_gb"] = round(saved / 1024**3, 4)
        report["estimated_saved_activations_gb"] = round(
            estimate.vision_activations_gb + estimate.text_activations_gb + estimate.fusion_activations_gb
            + estimate.autocast_weight_copies_gb, 4)
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA GPU is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype_resolved = ("bf16" if args.device == "cuda" else "fp32") if args.dtype == "auto" else args.dtype
    torch.manual_seed(0)
    model = build_model(args).to(args.device).eval()
    cfg = model.config
    if args.text_len > cfg.max_position_embeddings:
        raise SystemExit(f"--text-len {args.text_len} exceeds the model's {cfg.max_position_embeddings} positions")
    b = args.batch_size
    pixels = torch.randn(b, 3, cfg.image_res, cfg.image_res, device=args.device)
    ids = torch.randint(5, cfg.vocab_size, (b, args.text_len), device=args.device)
    ids[:, 0] = cfg.cls_token_id
    mask = torch.ones_like(ids)

    def autocast() -> contextlib.AbstractContextManager:
        if args.dtype_resolved == "bf16":
            return torch.autocast(args.device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    with torch.inference_mode():
        def images() -> None:
            with autocast():
                model.get_image_embeds(pixels)

        def texts() -> None:
            with autocast():
                model.get_text_feat(model.get_text_embeds(ids, mask))

        with autocast():
            image_embeds, _ = model.get_image_embeds(pixels)
            text_embeds = model.get_text_embeds(ids, mask)

        def pairs() -> None:
            with autocast():
                model.itm_logits(model.get_fusion_embeds(text_embeds, mask, image_embeds))

        t_img = timed(images, args.iters, args.warmup, args.device, "images")
        t_txt = timed(texts, args.iters, args.warmup, args.device, "texts")
        t_itm = timed(pairs, args.iters, args.warmup, args.device, "itm pairs")
    result = {
        "benchmark": "x2vlm_embedding_throughput",
        "preset": "checkpoint" if args.checkpoint else args.preset,
        "params_m": round(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) / 1e6, 2),
        "image_res": cfg.image_res, "image_tokens": cfg.num_image_tokens, "text_len": args.text_len,
        "batch_size": b, "device": args.device, "dtype": args.dtype_resolved, "attention": args.attn,
        "threads": torch.get_num_threads(),
        "images_per_s": round(b / t_img, 2), "texts_per_s": round(b / t_txt, 2), "itm_pairs_per_s": round(b / t_itm, 2),
        "image_batch_s": round(t_img, 4), "text_batch_s": round(t_txt, 4), "itm_batch_s": round(t_itm, 4),
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    if args.train_step:
        result["train"] = train_step_report(model, args, pixels, ids, mask, autocast)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
