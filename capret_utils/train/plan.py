"""GPU memory planned before the first step, not discovered minutes in.

:func:`step_passes` turns a :class:`~capret_utils.train.config.TrainConfig` into the passes one micro-batch makes
(crops, recoloured copies, box photos, texts, ITM pairs; :class:`~capret_utils.x2vlm.memory.StepPasses`);
:func:`architecture` reads the model's sizes without building it (presets, capret / ``save_pretrained`` folders,
official checkpoints through a memory map); :func:`plan_memory` estimates the step
(:func:`~capret_utils.x2vlm.memory.estimate_training_memory`) at the precision and attention kernels the device
will use; :func:`check_fits` stops a CUDA run at once, naming what to lower, when the plan exceeds the free GPU
memory. :func:`synthetic_batch` is a random batch of the right shapes (planner checks, ``benchmarks/bench_gpu.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from capret_utils.common import resolve_device
from capret_utils.train import precision as P
from capret_utils.train.config import INFO_FILE, TrainConfig, leading_rows
from capret_utils.x2vlm import PRESETS, X2VLMConfig
from capret_utils.x2vlm.memory import (
    GB,
    MemoryEstimate,
    StepPasses,
    estimate_training_memory,
    measure_saved_activations,
)

TEXT_LEN = 40  # X2VLMTokenizer's max_tokens: the longest a training batch pads its texts to
CATEGORIES = 13


class MemoryPlanError(RuntimeError):
    """The planned training step does not fit the GPU's free memory."""


def step_passes(config: TrainConfig) -> StepPasses:
    """The passes one micro-batch of ``config`` makes in :func:`~capret_utils.train.criterion.compute_losses`."""
    b, w = config.batch_size, config.weights()
    return StepPasses(
        crops=b,
        recoloured=min(config.category_recolour, b) if (w.category and config.category_recolour > 0) else 0,
        box_images=leading_rows(b, config.box_fraction) if w.box else 0,
        texts=b if (w.itc or w.itm or w.box) else 0,
        itm_pairs=3 * leading_rows(b, config.itm_share) if w.itm else 0)


def architecture(config: TrainConfig) -> X2VLMConfig:
    """The sizes of the model ``config.model`` names, without building it (an official file is memory-mapped)."""
    if config.model in PRESETS:
        from capret_utils.train.model import model_config

        return model_config(config)
    path = Path(config.model).expanduser()
    if path.is_dir() and (path / INFO_FILE).is_file():
        return X2VLMConfig.from_pretrained(path / "model")
    if path.is_dir() and (path / "config.json").is_file():
        return X2VLMConfig.from_pretrained(path)
    if path.is_file():
        from capret_utils.x2vlm.convert import (
            config_from_official,
            read_official_checkpoint,
        )

        state, ckpt_config, source = read_official_checkpoint(path)
        return config_from_official(state, ckpt_config, image_res=config.image_res or 384, source=source,
                                    has_itm_head=True, has_bbox_head=True)
    raise FileNotFoundError(f"model={config.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                            f"checkpoint file or folder")


def plan_memory(config: TrainConfig, model_config: X2VLMConfig | None = None,
                device: torch.device | str | None = None, identities: int = 0,
                precision: str | None = None) -> MemoryEstimate:
    """Estimated peak memory of one training step of ``config`` on ``device`` (default ``config.device``): its
    passes, LoRA or full, the precision the device gets (:func:`~capret_utils.train.precision.resolve_precision`,
    or ``precision``; fp16 counts as bf16), fused attention on CUDA and torch's CPU kernels otherwise, gradient
    checkpointing, and the ArcFace class weights of ``identities`` classes when given."""
    model_config = model_config or architecture(config)
    device = resolve_device(config.device) if device is None else torch.device(device)
    precision = precision or P.resolve_precision(device, config.bf16)
    classes = identities * int(bool(config.w_arcface or config.w_arcface_fused))
    classes += CATEGORIES if config.weights().category else 0
    return estimate_training_memory(
        model_config, config.batch_size, dtype="fp32" if precision == "fp32" else "bf16",
        lora_rank=config.lora_r if config.mode == "lora" else 0,
        text_len=min(TEXT_LEN, int(model_config.max_position_embeddings)),
        attention="sdpa" if device.type == "cuda" else "cpu", lora_dropout=config.lora_dropout,
        gradient_checkpointing=config.gradient_checkpointing, passes=step_passes(config),
        extra_trainable=classes * int(model_config.embed_dim))


def _alternatives(config: TrainConfig, model_config: X2VLMConfig, device: torch.device, free_gb: float) -> str:
    """What fits instead, each with its plan: checkpointing, half the batch with twice the accumulation, 224 px."""
    options = []
    if not config.gradient_checkpointing:
        options.append(("gradient_checkpointing=True", replace(config, gradient_checkpointing=True), model_config))
    if config.batch_size // config.per_identity >= 4:
        half = max(config.per_identity * 2, config.batch_size // 2 // config.per_identity * config.per_identity)
        options.append((f"batch_size={half} with grad_accum={config.grad_accum * 2} (same items per optimizer "
                        f"step)", replace(config, batch_size=half, grad_accum=config.grad_accum * 2), model_config))
    if model_config.image_res > 224:
        options.append(("image_res=224", config, X2VLMConfig(**{**model_config.to_dict(), "image_res": 224})))
    lines = []
    for label, cfg, mcfg in options:
        gb = plan_memory(cfg, mcfg, device).total_gb
        lines.append(f"  {label}: {gb:.1f} GiB{' (fits)' if gb < free_gb else ''}")
    return "\n".join(lines)


def check_fits(config: TrainConfig, plan: MemoryEstimate, model_config: X2VLMConfig | None = None,
               device: torch.device | str | None = None) -> str:
    """On CUDA: raise :class:`MemoryPlanError` naming what to lower (batch_size, image_res,
    gradient_checkpointing, grad_accum) when ``plan`` exceeds the free GPU memory; else (and on CPU, where
    nothing is checked) return one line saying so."""
    device = resolve_device(config.device) if device is None else torch.device(device)
    if device.type != "cuda":
        return f"memory plan: {plan.total_gb:.2f} GiB on {device} (not checked against system memory)"
    free, total = torch.cuda.mem_get_info(device)
    if plan.total_gb * GB <= free:
        return f"memory plan: {plan.total_gb:.1f} GiB of {free / GB:.1f} GiB free on {device}: fits"
    model_config = model_config or architecture(config)
    raise MemoryPlanError(
        f"the training step needs about {plan.total_gb:.1f} GiB but {torch.cuda.get_device_name(device)} has "
        f"{free / GB:.1f} GiB free ({total / GB:.1f} GiB in all). Lower batch_size (now {config.batch_size}; "
        f"raise grad_accum, now {config.grad_accum}, to keep the items per optimizer step), image_res (now "
        f"{model_config.image_res}), or set gradient_checkpointing=True (now {config.gradient_checkpointing}). "
        f"Planned alternatives:\n{_alternatives(config, model_config, device, free / GB)}")


def synthetic_batch(model_config: X2VLMConfig, config: TrainConfig, text_len: int = TEXT_LEN,
                    seed: int = 0) -> dict[str, Any]:
    """A random training batch of ``config.batch_size`` items with every key ``compute_losses`` reads (distinct
    identities, texts and categories; box photos for the box task), on CPU."""
    g = torch.Generator().manual_seed(seed)
    b, res = config.batch_size, model_config.image_res
    text_len = min(text_len, int(model_config.max_position_embeddings))
    ids = torch.randint(5, int(model_config.vocab_size), (b, text_len), generator=g)
    ids[:, 0] = int(model_config.cls_token_id)
    nb = leading_rows(b, config.box_fraction)
    return {"pixel_values": torch.randn(b, 3, res, res, generator=g), "input_ids": ids,
            "attention_mask": torch.ones(b, text_len, dtype=torch.long), "labels": torch.arange(b),
            "categories": torch.arange(b) % CATEGORIES, "itc_ids": torch.arange(b), "text_ids": torch.arange(b),
            "box_pixel_values": torch.randn(nb, 3, res, res, generator=g),
            "box_targets": 0.25 + 0.5 * torch.rand(nb, 4, generator=g)}


def measure_step(net: torch.nn.Module, criterion: torch.nn.Module, batch: dict[str, Any]) -> int:
    """Bytes autograd keeps for backward in one forward of ``criterion(net, batch)`` (one micro-batch; the ArcFace
    weights and the model's parameters and buffers excluded): what the plan's activation and autocast-copy terms
    (``activations_gb + autocast_weight_copies_gb``) estimate."""
    return measure_saved_activations(net, lambda: criterion(net, batch), [criterion])
