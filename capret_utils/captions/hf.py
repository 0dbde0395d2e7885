"""Loading Hugging Face checkpoints for captioning: dtype and device choice, 4-bit NF4 quantisation, generation lengths."""

from __future__ import annotations

from typing import (
    Any,
)

# ------------------------------------------------------------------------------------- HF loading helpers


def _torch_dtype(dtype: Any, device: str) -> Any:
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    return dtype


def quantization_config(compute_dtype: Any = "bfloat16") -> Any:
    """4-bit NF4 with double quantisation and (by default) bf16 compute, as a ``BitsAndBytesConfig``.

    In transformers 5.x this must be passed as ``quantization_config=``; ``load_in_4bit=True`` as a
    ``from_pretrained`` keyword raises ``TypeError``. Works on CUDA and, with bitsandbytes ≥ 0.48, on CPU.
    """
    import logging

    import torch
    from transformers import BitsAndBytesConfig

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # harmless 'kernels' notice
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def _load_model(cls: Any, model_id: str, device: str, dtype: Any, load_in_4bit: bool, compute_dtype: Any,
                revision: str | None = None) -> Any:
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype, device)}
    if revision:
        kwargs["revision"] = revision
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(compute_dtype)
        kwargs["device_map"] = {"": device}
        model = cls.from_pretrained(model_id, **kwargs)
    else:
        model = cls.from_pretrained(model_id, **kwargs).to(device)
    return model.eval()


def _generated_lengths(new_ids: Any, stop_ids: set[int]) -> list[int]:
    """Tokens each row really generated: up to and including its first stop token."""
    lengths = []
    for row in new_ids.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in stop_ids:
                n = i + 1
                break
        lengths.append(n)
    return lengths


