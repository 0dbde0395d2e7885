"""Analytic memory plan of one X2-VLM training step, pass by pass, and the measurement that checks it.

One step of capret's fine-tuning makes these passes (:class:`StepPasses`): the item crops through the vision tower;
the colour-scrambled copies of the category term through it again; the whole photos of the box task through the
vision tower and, paired with their texts, through the fusion layers; the texts through the text-only layers; and
the ITM pairs (positives and hard negatives) through the fusion layers. For every pass the estimate counts, layer by
layer and per sample, the tensors autograd keeps for backward, following what torch saves:

* LayerNorm inputs (float32: the residual stream stays float32 under autocast), GELU inputs, dropout masks (BERT's
  hidden and attention dropout, LoRA's input dropout) and BEiT's layer-scale operands (full fine-tuning only);
* a linear layer's input only when its weight trains (every linear in full fine-tuning, the LoRA A / B matrices
  otherwise): in float32 a tensor read by several linears is kept once, under autocast each keeps its bf16 cast;
* attention: a fused kernel (``attention="sdpa"``: CUDA's flash / memory-efficient kernels) keeps q, k, v, its
  output and the log-sum-exp; the math path keeps q, k, v and the probabilities in float32 (plus the dropout mask
  and the dropped probabilities): ``"eager"`` everywhere, ``"cpu"`` where torch's CPU SDPA falls back to it
  (attention dropout on, or a mask that needs a gradient: BEiT's relative-position bias in full fine-tuning);
* a fused kernel also keeps BEiT's relative-position bias (heads x tokens^2, once per layer and vision pass, not
  per sample);
* under autocast the bf16 copy of every weight matrix a pass multiplies with: trained weights once per autocast
  region (capret's step opens one per pass), frozen weights once per call;
* with gradient checkpointing only each transformer layer's inputs (one layer is recomputed at a time).

Other terms: float32 master weights, float32 gradients + AdamW moments of the trainable parameters, a backward
transient (two layers' activations of the largest pass) and a CUDA context + allocator margin. fp16 autocast keeps
the same 2-byte copies as bf16 (plan it as ``dtype="bf16"``). :func:`measure_saved_activations` counts what autograd
really keeps (and, under checkpointing, each checkpointed layer's inputs), to check the activation terms on CPU.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch

from capret_utils.x2vlm.config import X2VLMConfig

GB = 1024**3
CUDA_CONTEXT_BYTES = 0.6 * GB  # CUDA context + cuBLAS workspace, outside torch's allocator statistics
ALLOCATOR_MARGIN = 0.10  # caching-allocator fragmentation
ATTENTION_KINDS = ("sdpa", "eager", "cpu")


@dataclass(frozen=True)
class StepPasses:
    """Samples each pass of one training step (one micro-batch) carries."""

    crops: int  # training views through the vision tower (the batch)
    recoloured: int = 0  # colour-scrambled copies through the vision tower again (category term)
    box_images: int = 0  # whole photos through the vision tower, then with their texts through the fusion layers
    texts: int = 0  # texts through the text-only layers
    itm_pairs: int = 0  # ITM positives + negatives through the fusion layers

    @classmethod
    def itc_itm(cls, batch_size: int, itm_pairs_factor: int = 3) -> "StepPasses":
        """ITC + ITM over the whole batch: B crops, B texts, ``itm_pairs_factor`` x B fused pairs."""
        return cls(crops=batch_size, texts=batch_size, itm_pairs=itm_pairs_factor * batch_size)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class MemoryEstimate:
    """Estimated memory of a training step, GiB except the parameter counts."""

    total_params: int
    trainable_params: int
    weights_gb: float
    autocast_weight_copies_gb: float  # bf16 weight copies kept for backward under autocast
    trainable_state_gb: float  # gradients + AdamW moments of the trainable parameters
    vision_activations_gb: float  # every vision-tower pass (crops, recoloured copies, box photos)
    text_activations_gb: float
    fusion_activations_gb: float  # every fusion pass (ITM pairs, box pairs)
    backward_transient_gb: float
    allocated_gb: float  # comparable to torch.cuda.max_memory_allocated()
    total_gb: float  # + allocator margin and (not with attention "cpu") the CUDA context (comparable to nvidia-smi)
    activations_gb: float = 0.0  # vision + text + fusion + attention bias
    attention_bias_gb: float = 0.0  # BEiT's relative-position bias kept by fused attention, per layer and vision pass
    by_pass_gb: dict[str, float] = field(default_factory=dict)  # activations of each pass of StepPasses
    passes: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # dtype, attention, lora_rank, checkpointing, ...

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for logs: the total, its terms and the activations of each pass."""
        s = self.settings
        mode = f"LoRA r={s.get('lora_rank')}" if s.get("lora_rank") else "full"
        passes = ", ".join(f"{k} {v}" for k, v in self.passes.items() if v)
        by_pass = ", ".join(f"{k} {v:.2f}" for k, v in self.by_pass_gb.items() if v)
        if self.attention_bias_gb:
            by_pass += f"; relative-position bias {self.attention_bias_gb:.2f}"
        return (f"memory plan ({mode}, {s.get('dtype')}, {s.get('image_res')} px, attention {s.get('attention')}, "
                f"checkpointing {'on' if s.get('gradient_checkpointing') else 'off'}): {self.total_gb:.2f} GiB "
                f"(allocated {self.allocated_gb:.2f})\n"
                f"  weights {self.weights_gb:.2f} + autocast copies {self.autocast_weight_copies_gb:.2f} + "
                f"grads/AdamW {self.trainable_state_gb:.2f} + activations {self.activations_gb:.2f} + backward "
                f"{self.backward_transient_gb:.2f} GiB; {self.trainable_params / 1e6:.1f} M of "
                f"{self.total_params / 1e6:.1f} M parameters train\n"
                f"  passes per micro-batch: {passes}\n  activations by pass (GiB): {by_pass}")


@functools.lru_cache(maxsize=16)
def _counts(config_json: str, lora_rank: int) -> dict[str, int]:
    """Parameter counts of the model described by ``config_json`` (built on the meta device)."""
    from capret_utils.x2vlm.lora import LORA_TARGETS
    from capret_utils.x2vlm.modeling import X2VLMModel

    with torch.device("meta"):
        model = X2VLMModel(X2VLMConfig.from_dict(__import__("json").loads(config_json)))
    lora = re.compile("|".join(f"(?:{p})" for p in LORA_TARGETS.values()))
    out = {"total": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
           "vision": 0, "stem": 0, "vision_frozen_free": 0, "text": 0, "text_frozen_free": 0, "fusion": 0,
           "vision_proj": 0, "text_proj": 0, "itm_head": 0, "bbox_head": 0, "other": 0, "lora": 0,
           "head_params": 1}  # + temp
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            n = module.weight.numel()
            prefix = {"vision_encoder": "vision", "text_encoder": "text"}.get(name.split(".")[0], name.split(".")[0])
            tower = prefix if prefix in out else "other"
            out[tower] += n
            # weights whose input never needs a gradient in LoRA training: the stem and layer 0's q / k / v
            if name.startswith("vision_encoder.embeddings."):
                out["stem"] += n
            if (name.startswith("vision_encoder.embeddings.") or
                    re.fullmatch(r"vision_encoder\.layers\.0\.attention\.\w_proj", name)):
                out["vision_frozen_free"] += n
            if re.fullmatch(r"text_encoder\.encoder\.layer\.0\.attention\.self\.(query|key|value)", name):
                out["text_frozen_free"] += n
            if isinstance(module, torch.nn.Linear) and lora.fullmatch(name):
                out["lora"] += lora_rank * (module.in_features + module.out_features)
    for head in ("vision_proj", "text_proj", "itm_head", "bbox_head"):
        module = getattr(model, head, None)
        if module is not None:
            out["head_params"] += sum(p.numel() for p in module.parameters())
    return out


def count_parameters(config: X2VLMConfig) -> int:
    """Parameters of the model built from ``config`` (counted on the meta device, no memory)."""
    return _counts(config.to_json_string(use_diff=False), 0)["total"]


@dataclass(frozen=True)
class _Mode:
    autocast: bool
    full: bool
    lora_rank: int
    lora_dropout: bool
    attention: str

    @property
    def act(self) -> int:
        return 2 if self.autocast else 4

    def linear_inputs(self, elems: int, linears: int = 1) -> int:
        """Input kept by ``linears`` trained linears reading one float32 tensor (once, or one cast each)."""
        return elems * (2 * linears if self.autocast else 4)

    def lora(self, tokens: int, width: int, grad_in: bool) -> int:
        """One LoRA branch: the dropout mask (when its input needs a gradient), A's input, B's input."""
        mask = 4 * tokens * width if (self.lora_dropout and grad_in) else 0
        return mask + self.act * tokens * width + self.act * tokens * self.lora_rank

    def attention_core(self, q_len: int, kv_len: int, width: int, heads: int, dropout: bool,
                       mask_grad: bool = False) -> int:
        math = self.attention == "eager" or (self.attention == "cpu" and (dropout or mask_grad))
        if math:  # q, k, v and the probabilities (+ dropout mask and dropped probabilities), float32
            return 4 * (q_len * width + 2 * kv_len * width) + 4 * heads * q_len * kv_len * (3 if dropout else 1)
        return self.act * (2 * q_len * width + 2 * kv_len * width) + 4 * heads * q_len  # q, k, v, out, lse


def _stem_bytes(c: X2VLMConfig, m: _Mode) -> int:
    """Per image: what the patch embedding / convolutional stem keeps (nothing when it is frozen)."""
    if not m.full:
        return 0
    a, side = m.act, c.image_res
    total = a * 3 * side * side  # the first convolution's input
    n = c.patch_size.bit_length() - 1
    if c.vision_stem == "conv":  # per stride-2 stage: BatchNorm input, GELU input, next convolution's input
        for i in range(n - 1):
            side //= 2
            total += 3 * a * min(32 * 2**i, c.vision_width) * side * side
    elif c.vision_stem == "cnn":  # BatchNorm input and ReLU output per block, max-pool indices and outputs
        side //= 2
        total += 2 * a * 32 * side * side
        for i in range(1, n):
            ch = 32 * (i + 1)
            total += 2 * a * ch * side * side
            side //= 2
            total += (8 + a) * ch * side * side
    return total


def _vision_layer(c: X2VLMConfig, m: _Mode, first: bool) -> int:
    t, d, h, f = c.num_image_tokens, c.vision_width, c.vision_heads, c.vision_mlp
    a, full = m.act, m.full
    grad_in = full or not first
    total = (4 * t * d + 8 * t) if grad_in else 0  # LayerNorm 1 input (+ mean, rstd)
    total += m.linear_inputs(t * d, 3) if full else 2 * m.lora(t, d, grad_in)  # q, k, v (or q, v adapters)
    total += m.attention_core(t, t, d, h, dropout=False, mask_grad=full)  # + relative-position bias
    if full:
        total += 2 * a * t * d  # output-projection input, layer-scale operand
    total += 4 * t * d + 8 * t  # LayerNorm 2 input
    if full:
        total += m.linear_inputs(t * d)  # fc1 input
    total += a * t * f  # GELU input
    if full:
        total += a * t * f + a * t * d  # fc2 input, layer-scale operand
    return total


def _bert_layer(c: X2VLMConfig, m: _Mode, tokens: int, grad_in: bool, cross: bool = False) -> int:
    t, d, h, f = tokens, c.text_width, c.text_heads, c.text_ffn
    a, full = m.act, m.full
    hidden_drop, attn_drop = c.hidden_dropout_prob > 0, c.attention_probs_dropout_prob > 0

    def block(core: int) -> int:  # attention output dense input, dropout mask, LayerNorm input
        return core + (a * t * d if full else 0) + (a * t * d if hidden_drop else 0) + 4 * t * d + 8 * t

    total = (m.linear_inputs(t * d, 3) if full else 2 * m.lora(t, d, grad_in))
    total += block(m.attention_core(t, t, d, h, attn_drop))
    if cross:
        ti, dv = c.num_image_tokens, c.vision_width
        if full:  # query input; under autocast key and value each cast the image tokens (float32: once per call)
            total += m.linear_inputs(t * d) + (2 * 2 * ti * dv if m.autocast else 0)
        else:
            total += m.lora(t, d, True) + m.lora(ti, dv, True)
        total += block(m.attention_core(t, ti, d, h, attn_drop))
    if full:
        total += m.linear_inputs(t * d) + a * t * f  # fc1, fc2 inputs
    total += a * t * f + (a * t * d if hidden_drop else 0) + 4 * t * d + 8 * t  # GELU, dropout, LayerNorm
    return total


def _per_sample(c: X2VLMConfig, m: _Mode, text_len: int, checkpointing: bool) -> dict[str, int]:
    """Saved bytes per image (vision), per text (text) and per fused pair (fusion), and of one layer of each."""
    t, d = c.num_image_tokens, c.vision_width
    s, w = text_len, c.text_width
    layers_v = [_vision_layer(c, m, i == 0) for i in range(c.vision_layers)]
    layers_t = [_bert_layer(c, m, s, m.full or i > 0) for i in range(c.text_layers)]
    layer_f = _bert_layer(c, m, s, True, cross=True)
    # tails: pooler LayerNorm over the patches; the projections / heads read token 0 of a stored tensor, which in
    # float32 keeps the whole tensor alive (under autocast only a small bf16 cast)
    vision_tail = 4 * (t - 1) * d + (4 * t * d if not m.autocast else 2 * d)
    text_head = 4 * s * w + (4 * s * w if c.hidden_dropout_prob > 0 else 0) if m.full else 0  # embeddings
    text_tail = 4 * s * w if not m.autocast else 2 * w
    fusion_tail = 4 * s * w if not m.autocast else 2 * w
    image_tokens = 4 * t * d  # the image tokens the fusion layers read (float32: one tensor per call)
    if checkpointing:  # each layer keeps its inputs only
        vision = _stem_bytes(c, m) + c.vision_layers * 4 * t * d + vision_tail
        text = text_head + c.text_layers * 4 * s * w + text_tail
        fusion = c.fusion_layers * 4 * s * w + image_tokens + fusion_tail
    else:
        vision = _stem_bytes(c, m) + sum(layers_v) + vision_tail
        text = text_head + sum(layers_t) + text_tail
        fusion = c.fusion_layers * layer_f + fusion_tail + (image_tokens if (m.full and not m.autocast) else 0)
    return {"vision": vision, "text": text, "fusion": fusion, "vision_layer": max(layers_v),
            "text_layer": max(layers_t), "fusion_layer": layer_f}


def estimate_training_memory(config: X2VLMConfig, batch_size: int, image_res: int | None = None,
                             dtype: str = "bf16", lora_rank: int = 16, text_len: int = 40,
                             attention: str = "sdpa", lora_dropout: float = 0.05, itm_pairs_factor: int = 3,
                             gradient_checkpointing: bool = False, passes: StepPasses | None = None,
                             extra_trainable: int = 0) -> MemoryEstimate:
    """Estimate the peak memory of one training step: AdamW, every pass of ``passes`` (default: ITC + ITM over
    ``batch_size``, :meth:`StepPasses.itc_itm`); ``lora_rank`` > 0 = LoRA on the vision / text / fusion query and
    value (heads trained), 0 = full fine-tuning of every parameter. ``dtype`` ``"bf16"`` (autocast, float32
    weights; also right for fp16 autocast) or ``"fp32"``; ``attention`` ``"sdpa"`` (fused CUDA kernels),
    ``"eager"`` or ``"cpu"`` (torch's CPU SDPA, see the module docstring); ``extra_trainable``: parameters outside
    the model trained with AdamW (e.g. the ArcFace class weights)."""
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if image_res is not None and image_res != config.image_res:
        config = X2VLMConfig(**{**config.to_dict(), "image_res": image_res})
    passes = passes or StepPasses.itc_itm(batch_size, itm_pairs_factor)
    m = _Mode(autocast=dtype == "bf16", full=lora_rank <= 0, lora_rank=max(lora_rank, 0),
              lora_dropout=lora_dropout > 0, attention=attention)
    counts = _counts(config.to_json_string(use_diff=False), m.lora_rank)
    total_params = counts["total"]
    trainable = total_params if m.full else counts["lora"] + counts["head_params"]
    trainable += extra_trainable
    weights = 4 * (total_params + extra_trainable)
    state = 12 * trainable  # float32 gradient + AdamW exp_avg + exp_avg_sq

    per = _per_sample(config, m, text_len, gradient_checkpointing)
    images = passes.crops + passes.recoloured + passes.box_images
    pairs = passes.itm_pairs + passes.box_images
    by_pass = {"crops": passes.crops * per["vision"], "recoloured": passes.recoloured * per["vision"],
               "box_images": passes.box_images * (per["vision"] + per["fusion"]),
               "texts": passes.texts * per["text"], "itm_pairs": passes.itm_pairs * per["fusion"]}
    vision, text, fusion = images * per["vision"], passes.texts * per["text"], pairs * per["fusion"]
    vision_passes = sum(1 for n in (passes.crops, passes.recoloured, passes.box_images) if n)
    fused_vision = attention == "sdpa" or (attention == "cpu" and not m.full)  # else the math path adds the bias
    bias = (vision_passes * config.vision_layers * config.vision_heads * config.num_image_tokens ** 2 * m.act
            if fused_vision and not gradient_checkpointing else 0)

    weight_copies = 0
    if m.autocast:
        vision_calls = sum(1 for n in (passes.crops, passes.recoloured, passes.box_images) if n)
        fusion_calls = sum(1 for n in (passes.itm_pairs, passes.box_images) if n)
        weight_copies = 2 * (vision_calls * ((counts["stem"] if m.full else 0) + counts["vision_proj"])
                             + (counts["text_proj"] if passes.texts else 0)
                             + (counts["itm_head"] if passes.itm_pairs else 0)
                             + (counts["bbox_head"] if passes.box_images else 0))
        if not gradient_checkpointing:  # checkpointed layers keep no copies (they are cast again when recomputed)
            v = counts["vision"] - counts["stem"] - (0 if m.full else counts["vision_frozen_free"] - counts["stem"])
            t = counts["text"] - (0 if m.full else counts["text_frozen_free"])
            weight_copies += 2 * (vision_calls * v + (t if passes.texts else 0) + fusion_calls * counts["fusion"])
    transient = 2 * max(max(passes.crops, passes.recoloured, passes.box_images) * per["vision_layer"],
                        passes.texts * per["text_layer"], max(passes.itm_pairs, passes.box_images)
                        * per["fusion_layer"])
    allocated = weights + weight_copies + state + vision + text + fusion + bias + transient
    total = allocated * (1 + ALLOCATOR_MARGIN) + (CUDA_CONTEXT_BYTES if attention != "cpu" else 0)
    settings = {"dtype": dtype, "attention": attention, "lora_rank": m.lora_rank, "image_res": config.image_res,
                "text_len": text_len, "gradient_checkpointing": gradient_checkpointing}
    return MemoryEstimate(
        total_params=total_params, trainable_params=int(trainable), weights_gb=weights / GB,
        autocast_weight_copies_gb=weight_copies / GB, trainable_state_gb=state / GB,
        vision_activations_gb=vision / GB, text_activations_gb=text / GB, fusion_activations_gb=fusion / GB,
        backward_transient_gb=transient / GB, allocated_gb=allocated / GB, total_gb=total / GB,
        activations_gb=(vision + text + fusion + bias) / GB, attention_bias_gb=bias / GB, by_pass_gb={k: v / GB for k, v in by_pass.items()},
        passes=passes.as_dict(), settings=settings)


def measure_saved_activations(model: torch.nn.Module, fn: Callable[[], Any],
                              extra_modules: Iterable[torch.nn.Module] = ()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs a forward pass of ``model``
    (parameters and buffers of ``model`` and ``extra_modules`` excluded) — the measured counterpart of the
    estimate's activation (+ autocast weight copy) terms. Under gradient checkpointing, the inputs every
    checkpointed layer keeps for its recomputation are counted too."""
    modules = [model, *extra_modules]
    owned = {t.untyped_storage().data_ptr() for mod in modules for t in (*mod.parameters(), *mod.buffers())}
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        keep(tensor)
        return tensor

    def layer_inputs(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor):
                keep(value)

    from transformers.modeling_layers import GradientCheckpointingLayer

    handles = [mod.register_forward_pre_hook(layer_inputs, with_kwargs=True) for mod in model.modules()
               if isinstance(mod, GradientCheckpointingLayer) and mod.gradient_checkpointing and mod.training]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return int(sum(storages.values()))
