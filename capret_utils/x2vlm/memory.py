"""Analytic GPU memory estimate of one X2-VLM LoRA training step (ITC + ITM with hard negatives + box).

Terms (bytes): fp32 master weights; under bf16 autocast, the bf16 weight copies that frozen linears keep for
the input gradient; LoRA / head parameters with their fp32 gradients and AdamW states; the activations
autograd keeps for backward, counted tensor by tensor per layer (pre-norm BEiT blocks over 1 + N image tokens
for the batch; text-only BERT layers over the text tokens; fusion layers over 3 x batch pairs, B positives and
2B hard negatives, cross-attending to 1 + N image tokens); a backward transient of two layers' activations;
and a CUDA context + allocator margin. Under bf16 autocast, matmul inputs are stored in bf16 while LayerNorm
inputs and the residual stream stay fp32. With ``attention="sdpa"`` the memory-efficient kernel keeps only its
output and log-sum-exp; ``"eager"`` keeps the softmax probabilities (fp32 and a bf16 copy). Frozen linears
keep no input (their weight gradient is not needed); LoRA branches keep their (dropout) input.
:func:`measure_saved_activations` counts what autograd really saves, to check the activation terms on CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from capret_utils.x2vlm.config import X2VLMConfig

GB = 1024**3
CUDA_CONTEXT_BYTES = 0.6 * GB  # CUDA context + cuBLAS workspace, outside torch's allocator statistics
ALLOCATOR_MARGIN = 0.10  # caching-allocator fragmentation


@dataclass
class MemoryEstimate:
    """Estimated memory of a training step, GiB except the parameter counts."""

    total_params: int
    trainable_params: int
    weights_gb: float
    autocast_weight_copies_gb: float  # bf16 weight copies kept by frozen linears for backward
    trainable_state_gb: float  # gradients + AdamW moments of the trainable parameters
    vision_activations_gb: float
    text_activations_gb: float
    fusion_activations_gb: float
    backward_transient_gb: float
    allocated_gb: float  # comparable to torch.cuda.max_memory_allocated()
    total_gb: float  # + CUDA context and allocator margin (comparable to nvidia-smi)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_parameters(config: X2VLMConfig) -> int:
    """Parameters of the model built from ``config`` (counted on the meta device, no memory)."""
    from capret_utils.x2vlm.modeling import X2VLMModel

    with torch.device("meta"):
        model = X2VLMModel(config)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _attention_bytes(q_len: int, kv_len: int, width: int, heads: int, act: int, eager: bool) -> float:
    """q, k, v projections (outputs) + the attention core's saved tensors + output-projection input."""
    qkv = act * (q_len * width + 2 * kv_len * width)
    core = heads * q_len * kv_len * (4 + act) if eager else act * q_len * width + 4 * heads * q_len
    return qkv + core + act * q_len * width


def _block_bytes(tokens: int, width: int, heads: int, ffn: int, act: int, eager: bool, lora_in: float,
                 cross_tokens: int = 0, cross_width: int = 0) -> float:
    """Saved activations of one transformer layer for one sample."""
    ln = 4 * tokens * width  # fp32 LayerNorm inputs (one per sub-block)
    total = ln + act * tokens * width + _attention_bytes(tokens, tokens, width, heads, act, eager)
    if cross_tokens:
        total += ln + act * tokens * width + _attention_bytes(tokens, cross_tokens, width, heads, act, eager)
        total += act * cross_tokens * cross_width  # bf16 copy of the image tokens feeding key/value
    total += ln + act * tokens * width + 2 * act * tokens * ffn  # FFN: fc1 input, GELU input, fc2 input
    return total + lora_in


def estimate_training_memory(config: X2VLMConfig, batch_size: int, image_res: int | None = None,
                             dtype: str = "bf16", lora_rank: int = 16, text_len: int = 40,
                             attention: str = "sdpa", lora_dropout: float = 0.05, itm_pairs_factor: int = 3,
                             gradient_checkpointing: bool = False) -> MemoryEstimate:
    """Estimate peak GPU memory of one LoRA training step (LoRA on vision/text/fusion query+value, heads
    trained, AdamW). ``dtype`` ``"bf16"`` (autocast, fp32 weights) or ``"fp32"``; ``attention`` ``"sdpa"`` or
    ``"eager"``; ``lora_rank`` 0 = full fine-tuning of every parameter."""
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    if image_res is not None and image_res != config.image_res:
        config = X2VLMConfig(**{**config.to_dict(), "image_res": image_res})
    act = 2 if dtype == "bf16" else 4
    eager = attention == "eager"
    b, s_v, s_t = batch_size, config.num_image_tokens, text_len
    hv, ht = config.vision_width, config.text_width
    total_params = count_parameters(config)
    heads = (2 * hv * config.embed_dim + 2 * ht * config.embed_dim
             + (2 * ht * 2 * ht + 4 * ht + 2 * ht * 2) * (int(config.has_itm_head) + int(config.has_bbox_head)))
    if lora_rank > 0:
        lora = (config.vision_layers * 2 * lora_rank * 2 * hv + config.text_layers * 2 * lora_rank * 2 * ht
                + config.fusion_layers * (2 * lora_rank * 2 * ht + lora_rank * (ht + ht) + lora_rank * (hv + ht)))
        trainable = lora + heads + 1
        drop = 1 + act if lora_dropout > 0 else act  # dropout mask + dropped input per LoRA branch
        lora_v, lora_t = 2 * drop * s_v * hv, 2 * drop * s_t * ht
        lora_f = 3 * drop * s_t * ht + drop * s_v * hv
    else:
        trainable = total_params
        lora_v = lora_t = lora_f = 0.0
    weights = 4 * total_params
    # under autocast every frozen linear keeps the bf16 copy of its weight for the input gradient
    weight_copies = 2 * total_params if dtype == "bf16" else 0
    state = 12 * trainable  # fp32 gradient + AdamW exp_avg + exp_avg_sq

    vis_layer = _block_bytes(s_v, hv, config.vision_heads, config.vision_mlp, act, eager, lora_v)
    txt_layer = _block_bytes(s_t, ht, config.text_heads, config.text_ffn, act, eager, lora_t)
    fus_layer = _block_bytes(s_t, ht, config.text_heads, config.text_ffn, act, eager, lora_f,
                             cross_tokens=s_v, cross_width=hv)
    pairs = itm_pairs_factor * b
    if gradient_checkpointing:  # only each layer's input is kept, one layer is recomputed at a time
        vision = b * (config.vision_layers * 4 * s_v * hv + vis_layer)
        text = b * (config.text_layers * 4 * s_t * ht + txt_layer)
        fusion = pairs * (config.fusion_layers * 4 * s_t * ht + fus_layer)
    else:
        vision = b * config.vision_layers * vis_layer
        text = b * config.text_layers * txt_layer
        fusion = pairs * config.fusion_layers * fus_layer
    fusion += pairs * 4 * (s_v * hv + s_t * ht)  # gathered image / text embeddings of positives + negatives
    transient = 2 * max(b * vis_layer, pairs * fus_layer)
    allocated = weights + weight_copies + state + vision + text + fusion + transient
    total = allocated * (1 + ALLOCATOR_MARGIN) + CUDA_CONTEXT_BYTES
    return MemoryEstimate(
        total_params=total_params, trainable_params=int(trainable), weights_gb=weights / GB,
        autocast_weight_copies_gb=weight_copies / GB,
        trainable_state_gb=state / GB, vision_activations_gb=vision / GB, text_activations_gb=text / GB,
        fusion_activations_gb=fusion / GB, backward_transient_gb=transient / GB, allocated_gb=allocated / GB,
        total_gb=total / GB)


def measure_saved_activations(model: torch.nn.Module, fn: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs a forward pass of
    ``model`` (its parameters excluded) — the measured counterpart of the estimate's activation terms."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(storages.values()))
