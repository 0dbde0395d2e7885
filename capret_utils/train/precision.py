"""Mixed precision that fits the device: bf16 autocast on GPUs that support it, fp16 autocast with a gradient scaler
on older GPUs, float32 on CPU (and whenever ``TrainConfig.bf16`` is False). Weights, gradients and AdamW states stay
float32 in every case; CPU training is exactly the float32 computation (no autocast context at all)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

PRECISIONS = ("bf16", "fp16", "fp32")


def bf16_supported() -> bool:
    """Whether the current CUDA device runs bf16 natively (emulated bf16 on older GPUs does not count)."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # older torch without the keyword
        return bool(torch.cuda.is_bf16_supported())


def resolve_precision(device: torch.device | str, mixed: bool = True) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"`` for training on ``device``: mixed precision only on CUDA, bf16 where
    the GPU supports it, else fp16 (which needs :func:`grad_scaler`)."""
    if not mixed or torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if bf16_supported() else "fp16"


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for ``"fp32"``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device | str) -> Any:
    """A ``torch.amp.GradScaler`` for fp16 (whose small range underflows gradients without loss scaling), else
    None."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


def describe(precision: str, device: torch.device | str) -> str:
    """The one line a run prints about its precision."""
    device = torch.device(device)
    where = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        where += f" ({torch.cuda.get_device_name(device)})"
    if precision == "bf16":
        return f"precision: bf16 autocast on {where}, float32 weights and optimizer states"
    if precision == "fp16":
        return (f"precision: fp16 autocast + gradient scaler on {where} (this GPU has no native bf16), float32 "
                f"weights and optimizer states")
    reason = "CPU" if device.type == "cpu" else "mixed precision off (bf16=False)"
    return f"precision: float32 on {where} ({reason})"
