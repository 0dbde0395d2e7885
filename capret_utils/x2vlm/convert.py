"""Official X2-VLM checkpoints <-> capret's model: strict loading, both namings, rel-pos table resize.

The official loader (``models/xvlm.py::load_pretrained``) is non-strict and, with ``is_eval=True``, skips every
rename and resize, which silently leaves weights random. Here (x2vlm.md §3.6):

1. ``torch.load`` on CPU; ``ckpt['model']`` if present, else the whole dict; ``ckpt['config']`` is kept.
2. ``text_encoder.bert.`` / ``text_encoder.roberta.`` -> ``text_encoder.`` (pre-training naming -> retrieval).
3. Recomputed buffers are dropped *after checking* them: every ``relative_position_index`` (must equal the
   BEiT index at the checkpoint's resolution) and ``text_encoder.embeddings.position_ids`` (must be arange).
4. Heads the caller does not want are dropped only when named (``drop=("mlm_head", "bbox_head", ...)``).
5. Relative-position tables are resized when the checkpoint's grid differs from the model's (224 -> 384), on
   BEiT's geometric source grid with a bicubic spline (:func:`resize_rel_pos_table`).
6. Names are mapped onto the HF modules: ``qkv.weight`` is split into q/k/v, ``q_bias`` / ``v_bias`` become
   the query / value biases (HF BEiT's key projection has no bias).
7. ``load_state_dict(strict=True)``; every leftover, missing or mis-shaped key is an error that names it.

:func:`to_official_state_dict` is the inverse map (used for the manifest tests and for exporting).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from scipy.interpolate import RectBivariateSpline
from transformers.models.beit.modeling_beit import BeitRelativePositionBias

from capret_utils.x2vlm.config import X2VLMConfig

log = logging.getLogger(__name__)

HEADS = ("itm_head", "bbox_head", "mlm_head")
DROPPABLE = HEADS + ("absolute_frame_pos_embed",)
# official key prefix of each droppable part (after the bert. stripping)
_DROP_PREFIX = {"itm_head": "itm_head.", "bbox_head": "bbox_head.", "mlm_head": "text_encoder.cls.",
                "absolute_frame_pos_embed": "absolute_frame_pos_embed"}

_V = "vision_encoder."
# official vision block sub-name -> HF BeitLayer sub-name (qkv / q_bias / v_bias are handled separately)
_BLOCK_MAP = {
    "norm1.weight": "layernorm_before.weight", "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight", "norm2.bias": "layernorm_after.bias",
    "gamma_1": "lambda_1", "gamma_2": "lambda_2",
    "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
    "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
}
_BLOCK_MAP_INV = {v: k for k, v in _BLOCK_MAP.items()}
_VISION_TOP = {
    "cls_token": "embeddings.cls_token",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "fc_norm.weight": "pooler.layernorm.weight", "fc_norm.bias": "pooler.layernorm.bias",
}
_VISION_TOP_INV = {v: k for k, v in _VISION_TOP.items()}


class OfficialCheckpointError(ValueError):
    """An official checkpoint does not fit the model; the message names the file and the keys."""


@dataclass
class LoadReport:
    """What :func:`load_official_checkpoint` did, for logs and notebooks."""

    source: str
    naming: str  # "pretrain" (text_encoder.bert.*) or "retrieval" (text_encoder.*)
    checkpoint_image_res: int
    model_image_res: int
    resized: list[str] = field(default_factory=list)  # rel-pos tables resized (official names)
    dropped: list[str] = field(default_factory=list)  # keys dropped because the caller named them
    recomputed: list[str] = field(default_factory=list)  # buffers checked and dropped (HF recomputes them)
    new_heads: list[str] = field(default_factory=list)  # model keys left at fresh initialisation (add_heads)
    unmapped: list[str] = field(default_factory=list)  # checkpoint keys with no place (an error when loading)
    checkpoint_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.naming} naming, {self.checkpoint_image_res}px checkpoint -> "
                 f"{self.model_image_res}px model"]
        if self.resized:
            parts.append(f"{len(self.resized)} rel-pos tables resized (bicubic spline, geometric grid)")
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} keys by request")
        if self.new_heads:
            parts.append(f"{len(self.new_heads)} new head tensors initialised fresh")
        return "; ".join(parts + self.notes)


# ---------------------------------------------------------------------------------------------- reading
def read_official_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                             trust_checkpoint: bool = False) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """Return ``(state_dict, checkpoint config or None, source name)`` of an official file or dict.

    Files are read with ``torch.load(weights_only=True)``; a file that needs full unpickling (e.g. a config
    stored as a custom yaml class) is refused unless ``trust_checkpoint=True``.
    """
    if isinstance(path_or_state_dict, Mapping):
        obj, source = path_or_state_dict, "<state dict>"
    else:
        path = Path(path_or_state_dict)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"official X2-VLM checkpoint {path} does not exist")
        try:
            try:  # memory-map zip-format files: no second copy of a 1-2 GB checkpoint in RAM
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - the unpickler raises several types
            if not trust_checkpoint:
                raise OfficialCheckpointError(
                    f"{path}: torch.load(weights_only=True) failed ({type(err).__name__}: {err}). If you trust "
                    f"this file, pass trust_checkpoint=True to unpickle it fully.") from err
            obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, Mapping):
        raise OfficialCheckpointError(f"{source}: expected a dict ({{'model': state_dict, 'config': ...}} or a "
                                      f"bare state dict), got {type(obj).__name__}")
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
    state = obj["model"] if "model" in obj else obj
    if not isinstance(state, Mapping):
        raise OfficialCheckpointError(f"{source}: field 'model' is {type(state).__name__}, not a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in state if k not in tensors and k != "config")
    if others:
        raise OfficialCheckpointError(f"{source}: non-tensor entries in the state dict: {others[:10]}")
    if not tensors:
        raise OfficialCheckpointError(f"{source}: the state dict is empty")
    return dict(tensors), (dict(config) if config is not None else None), source


def official_naming(state_dict: Mapping[str, Any]) -> str:
    """``"pretrain"`` when the text encoder is stored as ``text_encoder.bert.*``, else ``"retrieval"``."""
    return "pretrain" if any(k.startswith(("text_encoder.bert.", "text_encoder.roberta."))
                             for k in state_dict) else "retrieval"


def normalise_official_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``bert.`` / ``roberta.`` after ``text_encoder.`` (the official loader's rename)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = re.sub(r"^text_encoder\.(bert|roberta)\.", "text_encoder.", key)
        if new in out:
            raise OfficialCheckpointError(f"both {key} and {new} are present in the checkpoint")
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------------- geometry
def grid_from_table_rows(rows: int, key: str = "relative_position_bias_table") -> int:
    """Patches per side S from a table with (2S-1)^2 + 3 rows."""
    side = math.isqrt(max(rows - 3, 0))
    if side * side != rows - 3 or side % 2 == 0:
        raise OfficialCheckpointError(f"{key} has {rows} rows, not (2S-1)^2 + 3 for an integer S")
    return (side + 1) // 2


def relative_position_index(grid: int) -> torch.Tensor:
    """BEiT's (S*S+1, S*S+1) relative-position index (HF's layout; the official one is the same)."""
    return BeitRelativePositionBias.generate_relative_position_index((grid, grid)).clone()


def geometric_source_grid(src_side: int, dst_side: int) -> np.ndarray:
    """Source coordinates of BEiT's table resize: 0 at the centre, then on each side ``src_side // 2`` points at
    cumulative distances 1, 1+q, 1+q+q^2, ...; q is found by bisection in [1.01, 1.5] so that the progression's
    sum (1 - q^n) / (1 - q) just exceeds the target half-width ``dst_side // 2``."""
    n, target = src_side // 2, dst_side // 2
    low, high = 1.01, 1.5
    while high - low > 1e-6:
        q = (low + high) / 2.0
        if (1.0 - q**n) / (1.0 - q) > target:
            high = q
        else:
            low = q
    steps = q ** np.arange(n)  # 1, q, q^2, ...
    dist = np.cumsum(steps)
    return np.concatenate([-dist[::-1], [0.0], dist])


def resize_rel_pos_table(table: torch.Tensor, dst_grid: int) -> torch.Tensor:
    """Resize one block's relative-position-bias table to a new patch grid (e.g. 14 -> 24 for 224 -> 384 px).

    Method (BEiT's fine-tuning recipe, as in the official ``beit2.interpolate_pos_embed``): the 3 last rows
    (cls->token, token->cls, cls->cls) are copied unchanged; the rest, a (2S-1)x(2S-1) grid per head, is
    sampled on BEiT's geometric source grid (:func:`geometric_source_grid`) and evaluated at the integers
    -(D-1) ... (D-1) with an interpolating bicubic spline, ``scipy.interpolate.RectBivariateSpline(kx=3, ky=3,
    s=0)``, the exact regular-grid replacement of the ``interp2d(kind='cubic')`` the official code calls (removed
    in SciPy 1.14; both evaluate through FITPACK, which clamps points outside the source range to its edge).
    Not HF/timm's uniform-grid bilinear or bicubic resize. Same grid: returned unchanged. Grids with fewer than
    4 points per axis (toy models) use the highest spline degree they support.
    """
    rows, heads = table.shape
    src_grid = grid_from_table_rows(rows)
    if src_grid == dst_grid:
        return table
    src_side, dst_side = 2 * src_grid - 1, 2 * dst_grid - 1
    x = geometric_source_grid(src_side, dst_side)
    t = dst_side // 2
    dx = np.arange(-t, t + 0.1, 1.0)
    degree = min(3, src_side - 1)
    body = table[: src_side * src_side].detach().to(torch.float64).cpu().numpy()
    new = np.empty((dst_side * dst_side, heads), dtype=np.float64)
    for h in range(heads):
        z = body[:, h].reshape(src_side, src_side)  # z[row = y index, col = x index]
        # interp2d(x, y, z)(dx, dy) == RectBivariateSpline(y, x, z)(dy, dx); both grids are the same on each axis
        spline = RectBivariateSpline(x, x, z, kx=degree, ky=degree, s=0)
        new[:, h] = spline(dx, dx).reshape(-1)
    out = torch.from_numpy(new).to(dtype=table.dtype)
    return torch.cat([out, table[src_side * src_side:].detach().cpu()], dim=0)


# ---------------------------------------------------------------------------------------------- config
def _layer_indices(keys: Iterable[str], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise OfficialCheckpointError(f"{source}: required key {key} is missing; cannot infer the architecture")
    return tuple(state[key].shape)


def _recorded_text_heads(ckpt_config: Mapping[str, Any] | None) -> int | None:
    """A text head count recorded in the checkpoint's config (the fixture stores the BERT config json)."""
    if not ckpt_config:
        return None
    for key in ("text_config_json", "text_config"):
        sub = ckpt_config.get(key)
        if isinstance(sub, Mapping) and isinstance(sub.get("num_attention_heads"), int):
            return int(sub["num_attention_heads"])
    value = ckpt_config.get("text_num_attention_heads")
    return int(value) if isinstance(value, int) else None


def config_from_official(state_dict: Mapping[str, torch.Tensor], checkpoint_config: Mapping[str, Any] | None = None,
                         text_num_attention_heads: int | None = None, image_res: int | None = None,
                         source: str = "<state dict>", **overrides: Any) -> X2VLMConfig:
    """Build an :class:`X2VLMConfig` from an official state dict's tensor shapes.

    Widths, depths, vision heads (from the rel-pos tables), patch size, training resolution, vocab, positions,
    text-only vs fusion layers, embed dim and the heads present are read from the shapes. Text heads default to
    a count recorded in the checkpoint config, else hidden / 64 as in BERT; ``image_res`` defaults to the
    checkpoint's own resolution (another value makes the loader resize the rel-pos tables).
    """
    sd = normalise_official_names(state_dict)
    keys = list(sd)
    width = _shape(sd, _V + "cls_token", source)[-1]
    patch = _shape(sd, _V + "patch_embed.proj.weight", source)
    blocks = _layer_indices(keys, _V + "blocks.")
    if not blocks or blocks != list(range(len(blocks))):
        raise OfficialCheckpointError(f"{source}: vision blocks are not numbered 0..n-1: {blocks}")
    rows, vision_heads = _shape(sd, _V + "blocks.0.attn.relative_position_bias_table", source)
    grid = grid_from_table_rows(rows, _V + "blocks.0.attn.relative_position_bias_table")
    ckpt_res = grid * patch[-1]
    t = "text_encoder."
    vocab, text_width = _shape(sd, t + "embeddings.word_embeddings.weight", source)
    layers = _layer_indices(keys, t + "encoder.layer.")
    if not layers or layers != list(range(len(layers))):
        raise OfficialCheckpointError(f"{source}: text layers are not numbered 0..n-1: {layers}")
    fusion = [i for i in layers if f"{t}encoder.layer.{i}.crossattention.self.query.weight" in sd]
    if not fusion:
        raise OfficialCheckpointError(f"{source}: no text layer has cross-attention; not an X2-VLM checkpoint")
    start = fusion[0]
    if fusion != list(range(start, len(layers))):
        raise OfficialCheckpointError(f"{source}: cross-attention layers {fusion} are not the last layers")
    kv_in = _shape(sd, f"{t}encoder.layer.{start}.crossattention.self.key.weight", source)[1]
    if kv_in != width:
        raise OfficialCheckpointError(f"{source}: cross-attention key input width {kv_in} differs from the vision "
                                      f"width {width}")
    recorded = _recorded_text_heads(checkpoint_config)
    if text_num_attention_heads is None:
        text_num_attention_heads = recorded if recorded is not None else text_width // 64
        if recorded is None and (text_width % 64 or text_num_attention_heads == 0):
            raise OfficialCheckpointError(
                f"{source}: text width {text_width} is not a multiple of 64, so the BERT default head count "
                f"(hidden / 64) does not apply; pass text_num_attention_heads=")
    elif recorded is not None and recorded != text_num_attention_heads:
        raise OfficialCheckpointError(
            f"{source}: text_num_attention_heads={text_num_attention_heads} contradicts the checkpoint config, "
            f"which records {recorded} heads")
    if text_num_attention_heads <= 0 or text_width % text_num_attention_heads:
        raise OfficialCheckpointError(f"{source}: text width {text_width} is not divisible by "
                                      f"text_num_attention_heads={text_num_attention_heads}")
    values: dict[str, Any] = dict(
        vision_width=width, vision_layers=len(blocks), vision_heads=vision_heads,
        vision_mlp=_shape(sd, _V + "blocks.0.mlp.fc1.weight", source)[0], patch_size=patch[-1],
        num_channels=patch[1], image_res=int(image_res or ckpt_res),
        layer_scale_init_value=0.1 if _V + "blocks.0.gamma_1" in sd else 0.0,
        text_width=text_width, text_heads=text_num_attention_heads,
        text_ffn=_shape(sd, t + "encoder.layer.0.intermediate.dense.weight", source)[0],
        text_layers=start, fusion_layers=len(layers) - start, vocab_size=vocab,
        max_position_embeddings=_shape(sd, t + "embeddings.position_embeddings.weight", source)[0],
        type_vocab_size=_shape(sd, t + "embeddings.token_type_embeddings.weight", source)[0],
        embed_dim=sd["vision_proj.weight"].shape[0] if "vision_proj.weight" in sd else X2VLMConfig.embed_dim,  # VQA: none
        has_itm_head="itm_head.0.weight" in sd, has_bbox_head="bbox_head.0.weight" in sd,
        has_mlm_head=any(k.startswith(t + "cls.") for k in sd),
    )
    if checkpoint_config and isinstance(checkpoint_config.get("temp"), (int, float)):
        values["temp"] = float(checkpoint_config["temp"])
    if vocab <= 103:  # not a BERT vocabulary: the special ids are unknown (set them with overrides)
        values.update(unk_token_id=None, cls_token_id=None, sep_token_id=None, mask_token_id=None)
    values.update(overrides)
    if checkpoint_config and isinstance(checkpoint_config.get("image_res"), int) and \
            checkpoint_config["image_res"] != ckpt_res:
        log.warning("%s: config says image_res %s but the rel-pos tables are for %s px; using the tables",
                    source, checkpoint_config["image_res"], ckpt_res)
    return X2VLMConfig(**values)


# ---------------------------------------------------------------------------------------------- mapping
def official_to_capret(state_dict: Mapping[str, torch.Tensor], config: X2VLMConfig,
                       drop: Iterable[str] = (), source: str = "<state dict>", strict: bool = True,
                       ) -> tuple[dict, LoadReport]:
    """Map an official state dict onto capret's names (no loading yet). Keys with no place in the model raise
    (``strict``) or are listed in ``report.unmapped``."""
    drop = tuple(drop)
    bad = [d for d in drop if d not in DROPPABLE]
    if bad:
        raise ValueError(f"cannot drop {bad}: droppable parts are {DROPPABLE}")
    naming = official_naming(state_dict)
    sd = normalise_official_names(state_dict)
    rows = _shape(sd, _V + "blocks.0.attn.relative_position_bias_table", source)[0]
    ckpt_grid = grid_from_table_rows(rows)
    report = LoadReport(source=source, naming=naming, checkpoint_image_res=ckpt_grid * config.patch_size,
                        model_image_res=config.image_res)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    qkv_parts: dict[int, dict[str, torch.Tensor]] = {}
    t, start = "text_encoder.", config.text_layers
    for key, value in sd.items():
        if any(key.startswith(_DROP_PREFIX[d]) for d in drop):
            report.dropped.append(key)
            continue
        if key.startswith(_V):
            sub = key[len(_V):]
            if sub in _VISION_TOP:
                out[_V + _VISION_TOP[sub]] = value
                continue
            m = re.match(r"blocks\.(\d+)\.(.+)$", sub)
            if not m:
                unknown.append(key)
                continue
            i, rest = int(m.group(1)), m.group(2)
            if rest in ("attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.qkv.bias"):
                qkv_parts.setdefault(i, {})[rest] = value
            elif rest == "attn.relative_position_index":
                expected = relative_position_index(ckpt_grid)
                if tuple(value.shape) != tuple(expected.shape) or (
                        not value.is_meta and not torch.equal(value.long(), expected)):
                    raise OfficialCheckpointError(f"{source}: {key} does not match BEiT's relative position "
                                                  f"index for a {ckpt_grid}x{ckpt_grid} grid")
                report.recomputed.append(key)
            elif rest == "attn.relative_position_bias_table":
                if grid_from_table_rows(value.shape[0], key) != config.grid_size:
                    value = resize_rel_pos_table(value, config.grid_size)
                    report.resized.append(key)
                out[f"{_V}layers.{i}.{_BLOCK_MAP[rest]}"] = value
            elif rest in _BLOCK_MAP:
                out[f"{_V}layers.{i}.{_BLOCK_MAP[rest]}"] = value
            else:
                unknown.append(key)
        elif key == t + "embeddings.position_ids":
            if not value.is_meta and not torch.equal(value.reshape(-1).long(), torch.arange(value.numel())):
                raise OfficialCheckpointError(f"{source}: {key} is not 0..{value.numel() - 1}")
            report.recomputed.append(key)
        elif key.startswith(t + "embeddings."):
            out[key] = value
        elif key.startswith(t + "encoder.layer."):
            m = re.match(r"text_encoder\.encoder\.layer\.(\d+)\.(.+)$", key)
            i, rest = int(m.group(1)), m.group(2)
            out[f"{t}encoder.layer.{i}.{rest}" if i < start else f"fusion.{i - start}.{rest}"] = value
        elif key.startswith(t + "cls."):
            out["mlm_head." + key[len(t + "cls."):]] = value
        elif key.split(".")[0] in ("vision_proj", "text_proj", "itm_head", "bbox_head", "temp"):
            out[key] = value
        else:
            unknown.append(key)
    for i, parts in sorted(qkv_parts.items()):
        prefix = f"{_V}layers.{i}.attention."
        if "attn.qkv.weight" not in parts:
            unknown.extend(f"{_V}blocks.{i}.{p}" for p in parts)  # biases without weight: reported below
            continue
        if "attn.qkv.bias" in parts:
            unknown.append(f"{_V}blocks.{i}.attn.qkv.bias (a key bias; HF BEiT has none)")
        q, k, v = parts["attn.qkv.weight"].chunk(3, dim=0)
        out[prefix + "q_proj.weight"], out[prefix + "k_proj.weight"], out[prefix + "v_proj.weight"] = q, k, v
        for name, target in (("attn.q_bias", "q_proj.bias"), ("attn.v_bias", "v_proj.bias")):
            if name in parts:
                out[prefix + target] = parts[name]
    report.unmapped = sorted(unknown)
    if unknown and strict:
        raise OfficialCheckpointError(f"{source}: {len(unknown)} checkpoint keys have no place in the X2-VLM "
                                      f"model: {sorted(unknown)}; name unwanted parts in drop= ({DROPPABLE})")
    # the official MLM decoder is tied to the word embeddings and its bias to predictions.bias
    if "mlm_head.predictions.decoder.weight" in out:
        word = out.get(t + "embeddings.word_embeddings.weight")
        decoder = out["mlm_head.predictions.decoder.weight"]
        if word is not None and not word.is_meta and not torch.equal(decoder, word):
            raise OfficialCheckpointError(f"{source}: text_encoder.cls.predictions.decoder.weight is not tied to the "
                                          f"word embeddings; capret's MLM head is tied")
    dec_bias, bias = out.get("mlm_head.predictions.decoder.bias"), out.get("mlm_head.predictions.bias")
    if dec_bias is not None and bias is not None and not bias.is_meta and not torch.equal(dec_bias, bias):
        raise OfficialCheckpointError(f"{source}: text_encoder.cls.predictions.decoder.bias differs from "
                                      f"text_encoder.cls.predictions.bias; capret's MLM head ties them")
    return out, report


def load_official_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, Any], config: X2VLMConfig,
                             drop: Iterable[str] = (), add_heads: Iterable[str] = (), model: Any = None,
                             trust_checkpoint: bool = False, model_class: type | None = None):
    """Load an official checkpoint (file or state dict, either naming) into a model built from ``config``.

    Strict: every checkpoint key must find its place and every model key must be filled. Checkpoint parts the
    model does not have must be named in ``drop`` (``"mlm_head"``, ``"bbox_head"``, ``"itm_head"``,
    ``"absolute_frame_pos_embed"``); model heads the checkpoint lacks (e.g. a box head on a retrieval file) must
    be named in ``add_heads`` and keep their fresh initialisation. Returns the model; what happened is in
    ``model.official_load_report`` (:class:`LoadReport`).
    """
    state, ckpt_config, source = read_official_checkpoint(path_or_state_dict, trust_checkpoint)
    return _load_state(state, ckpt_config, source, config, drop=drop, add_heads=add_heads, model=model,
                       model_class=model_class)


def _registered_model_class() -> type:
    """The model class registered for :class:`X2VLMConfig` with ``AutoModel`` (``X2VLMModel``, registered when
    :mod:`capret_utils.x2vlm` is imported); looked up here so this module does not import the modeling module."""
    from transformers import AutoModel

    return AutoModel._model_mapping[X2VLMConfig]


def _load_state(state: Mapping[str, torch.Tensor], ckpt_config: dict | None, source: str, config: X2VLMConfig,
                drop: Iterable[str] = (), add_heads: Iterable[str] = (), model: Any = None,
                model_class: type | None = None):
    add_heads = tuple(add_heads)
    bad = [h for h in add_heads if h not in HEADS]
    if bad:
        raise ValueError(f"add_heads {bad}: new heads can be {HEADS}")
    mapped, report = official_to_capret(state, config, drop=drop, source=source, strict=False)
    report.checkpoint_config = ckpt_config
    if model is None:
        model = (model_class or _registered_model_class())(config)
    expected = model.state_dict()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    unexpected = sorted(k for k in mapped if k not in expected)
    missing = sorted(k for k in expected if k not in mapped and k not in tied)
    fresh = [k for k in missing if k.split(".")[0] in add_heads]
    missing = [k for k in missing if k not in fresh]
    mismatched = [f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in mapped if k in expected and tuple(mapped[k].shape) != tuple(expected[k].shape)]
    problems = []
    if report.unmapped:
        problems.append(f"{len(report.unmapped)} checkpoint keys have no place in the X2-VLM model (name unwanted "
                        f"parts in drop={DROPPABLE}): {report.unmapped}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint keys the model does not have (name the part in drop=): "
                        f"{_official_names(unexpected, config, report.naming)}")
    if missing:
        problems.append(f"{len(missing)} model keys missing from the checkpoint: "
                        f"{_official_names(missing, config, report.naming)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {mismatched}")
    if problems:
        raise OfficialCheckpointError(f"{source}: strict load failed: " + "; ".join(problems))
    for key in tied:  # tied copies (MLM decoder) are the same tensors as their sources
        if key not in mapped and key in expected:
            source_key = model.all_tied_weights_keys[key]
            if source_key in mapped:
                mapped[key] = mapped[source_key]
    for key in fresh:
        mapped[key] = expected[key]
    report.new_heads = fresh
    result = model.load_state_dict(mapped, strict=True)
    if result.missing_keys or result.unexpected_keys:  # pragma: no cover - strict=True raises first
        raise OfficialCheckpointError(f"{source}: {result}")
    model.tie_weights()
    model.official_load_report = report
    log.info("%s", report.summary())
    return model


def _official_names(keys: list[str], config: X2VLMConfig, naming: str = "pretrain") -> list[str]:
    """Show capret keys with their official names where they differ (for error messages)."""
    shown = []
    for key in keys:
        official = capret_key_to_official(key, config, naming)
        shown.append(key if official == key else f"{key} (official {official})")
    return shown


def capret_key_to_official(key: str, config: X2VLMConfig, naming: str = "pretrain") -> str:
    """The official name of one capret key (q/k/v map to the fused ``attn.qkv.weight``)."""
    bert = "bert." if naming == "pretrain" else ""
    if key.startswith(_V):
        sub = key[len(_V):]
        if sub in _VISION_TOP_INV:
            return _V + _VISION_TOP_INV[sub]
        m = re.match(r"layers\.(\d+)\.(.+)$", sub)
        if m:
            i, rest = m.groups()
            if rest in _BLOCK_MAP_INV:
                return f"{_V}blocks.{i}.{_BLOCK_MAP_INV[rest]}"
            qkv = {"attention.q_proj.weight": "attn.qkv.weight", "attention.k_proj.weight": "attn.qkv.weight",
                   "attention.v_proj.weight": "attn.qkv.weight", "attention.q_proj.bias": "attn.q_bias",
                   "attention.v_proj.bias": "attn.v_bias"}
            if rest in qkv:
                return f"{_V}blocks.{i}.{qkv[rest]}"
        return key
    if key.startswith("text_encoder."):
        return "text_encoder." + bert + key[len("text_encoder."):]
    m = re.match(r"fusion\.(\d+)\.(.+)$", key)
    if m:
        return f"text_encoder.{bert}encoder.layer.{int(m.group(1)) + config.text_layers}.{m.group(2)}"
    if key.startswith("mlm_head."):
        return "text_encoder.cls." + key[len("mlm_head."):]
    return key


def to_official_state_dict(model_or_state_dict: Any, config: X2VLMConfig, naming: str = "pretrain",
                           ) -> "OrderedDict[str, torch.Tensor]":
    """Inverse map: capret state dict -> the official class's state dict (names, fused qkv, recomputed buffers,
    tied decoder copies), ``naming`` ``"pretrain"`` (``XVLM``) or ``"retrieval"`` (``XVLMForRetrieval``).
    Works on meta tensors, so manifests can be checked without memory."""
    if naming not in ("pretrain", "retrieval"):
        raise ValueError(f"naming must be 'pretrain' or 'retrieval', got {naming!r}")
    if config.vision_stem != "patch":
        raise ValueError(f"vision_stem={config.vision_stem!r} has no official X2-VLM counterpart (the official "
                         f"vision tower embeds patches with one convolution); only 'patch' models convert")
    if config.vision_abs_pos:
        raise ValueError("vision_abs_pos=True has no official X2-VLM counterpart (the official vision tower has "
                         "only relative position bias)")
    if config.vision_stripes:
        raise ValueError("vision_stripes > 0 has no official X2-VLM counterpart (the official image token 0 is the "
                         "plain mean of the patch tokens)")
    sd = model_or_state_dict.state_dict() if hasattr(model_or_state_dict, "state_dict") else model_or_state_dict
    if naming == "retrieval" and (config.has_mlm_head or config.has_bbox_head):
        raise ValueError("the official retrieval class has no MLM or box head; build the config with "
                         "has_mlm_head=False, has_bbox_head=False")
    bert = "bert." if naming == "pretrain" else ""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    index = relative_position_index(config.grid_size)
    for key, value in sd.items():
        if key.startswith(_V):
            m = re.match(r"layers\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$", key[len(_V):])
            if m:
                i, which, kind = m.groups()
                if kind == "weight" and which == "q":
                    p = f"{_V}layers.{i}.attention."
                    out[f"{_V}blocks.{i}.attn.qkv.weight"] = torch.cat(
                        [sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]], dim=0)
                elif kind == "bias":
                    out[f"{_V}blocks.{i}.attn.{which}_bias"] = value
                continue
            official = capret_key_to_official(key, config, naming)
            out[official] = value
            if official.endswith("attn.relative_position_bias_table"):
                out[official.replace("relative_position_bias_table", "relative_position_index")] = index
        elif key == "text_encoder.embeddings.word_embeddings.weight":
            out[f"text_encoder.{bert}embeddings.position_ids"] = torch.arange(
                config.max_position_embeddings).unsqueeze(0)
            out[capret_key_to_official(key, config, naming)] = value
        else:
            out[capret_key_to_official(key, config, naming)] = value
    return out


def model_from_official(path: str | os.PathLike | Mapping[str, Any], text_num_attention_heads: int | None = None,
                        image_res: int | None = None, drop: Iterable[str] = (), add_heads: Iterable[str] = (),
                        trust_checkpoint: bool = False, model_class: type | None = None,
                        attn_implementation: str | None = None, **config_overrides: Any):
    """Config from the checkpoint's shapes (:func:`config_from_official`), then a strict load.

    ``absolute_frame_pos_embed`` (video pre-training files) is always dropped and reported; other parts are
    dropped only when named in ``drop``, which also removes them from the built model.
    """
    state, ckpt_config, source = read_official_checkpoint(path, trust_checkpoint)
    drop = tuple(drop)
    if "absolute_frame_pos_embed" in state and "absolute_frame_pos_embed" not in drop:
        drop += ("absolute_frame_pos_embed",)
        log.warning("%s: dropping absolute_frame_pos_embed (video frame positions; capret encodes images)", source)
    for head in HEADS:
        if head in drop:
            config_overrides.setdefault(f"has_{head}", False)
        if head in tuple(add_heads):
            config_overrides.setdefault(f"has_{head}", True)
    if attn_implementation is not None:
        config_overrides["attn_implementation"] = attn_implementation
    config = config_from_official(state, ckpt_config, text_num_attention_heads=text_num_attention_heads,
                                  image_res=image_res, source=source, **config_overrides)
    return _load_state(state, ckpt_config, source, config, drop=drop, add_heads=add_heads, model_class=model_class)
