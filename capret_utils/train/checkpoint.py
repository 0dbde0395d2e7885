"""What a run writes to disk: the resumable train state, the final merged model with its ArcFace weights and
``finetune_info.json``, and the loss/metric history."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from capret_utils.common import atomic_path, resolve_device, write_json
from capret_utils.data import loader as D
from capret_utils.evaluation import embed as E
from capret_utils.train import losses as L
from capret_utils.train.config import (
    ARCFACE_FILE,
    CHECKPOINT_DIR,
    HISTORY_CSV,
    HISTORY_JSON,
    INFO_FILE,
    STATE_DIR,
)
from capret_utils.x2vlm import (
    X2VLMImageProcessor,
    X2VLMModel,
    X2VLMTokenizer,
    check_tokenizer,
)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """The RNG states a resumable checkpoint keeps: python, numpy, torch (+ CUDA) and ``generator``."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "itm": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["itm"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



# ------------------------------------------------------------------------------------------ checkpoints


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _running_stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """BatchNorm statistics (``vision_stem="conv"`` / ``"cnn"``): buffers that training changes, saved with the
    weights."""
    return {n: b.detach().cpu().contiguous() for n, b in model.named_buffers() if n.endswith(_RUNNING_STATS)}


def save_train_state(run_dir: Path, step: int, model: torch.nn.Module, arcface: L.ArcFace,
                     optimizer: torch.optim.Optimizer, scheduler: Any, sampler: D.PKBatchSampler,
                     generator: torch.Generator, state: dict[str, Any], keep: int = 2,
                     category: L.ArcFace | None = None, rank_rngs: list[Any] | None = None) -> Path:
    """Write ``train_state/step-NNNNNN`` atomically (temp folder + rename), then point ``latest.json`` at it.

    ``rank_rngs``: with several processes, every rank's RNG states (:func:`capret_utils.train.distributed
    .gather_rng_states`), stored as ``rng_ranks`` next to this process's ``rng``."""
    from safetensors.torch import save_file

    root = Path(run_dir) / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_trainable_state(model), str(tmp / "trainable.safetensors"))
    if stats := _running_stats(model):
        save_file(stats, str(tmp / "buffers.safetensors"))
    save_file(_class_weights(arcface, category), str(tmp / ARCFACE_FILE))
    blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(generator)}
    if rank_rngs:
        blob["rng_ranks"] = list(rank_rngs)
    torch.save(blob, tmp / "optim_rng.pt")
    write_json(tmp / "state.json", {**state, "step": step, "sampler": sampler.state_dict()})
    for f in tmp.iterdir():  # make the files durable before the rename publishes them
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json(root / "latest.json", {"step": step, "path": final.name})
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_train_state(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest.json`` points at, or None."""
    root = Path(run_dir) / STATE_DIR
    pointer = root / "latest.json"
    if not pointer.is_file():
        return None
    path = root / json.loads(pointer.read_text())["path"]
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} points at {path}, which holds no complete checkpoint")
    return path


def load_train_state(path: Path, model: torch.nn.Module, arcface: L.ArcFace, optimizer: torch.optim.Optimizer,
                     scheduler: Any, sampler: D.PKBatchSampler, generator: torch.Generator,
                     category: L.ArcFace | None = None, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Restore what :func:`save_train_state` wrote into the given objects; returns ``state.json``'s content.

    With several processes (``rank`` of ``world_size``) each rank takes its own saved RNG states when the
    checkpoint was written by as many ranks; otherwise ranks other than 0 get rank 0's and ``state["rng_restored"]``
    is False (the caller reseeds them, :func:`capret_utils.train.distributed.decorrelate`)."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    if unknown or missing:
        raise ValueError(f"{path}: trainable weights do not match the model (unknown {unknown[:5]}, missing "
                         f"{missing[:5]}); was it written with another finetune_mode or model?")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
        heads = load_file(str(path / ARCFACE_FILE))
        arcface.W.copy_(heads["W"])
        if category is not None:
            if "category_W" not in heads:
                raise ValueError(f"{path / ARCFACE_FILE} holds no category ArcFace weights (category_W)")
            category.W.copy_(heads["category_W"])
        expected = _running_stats(model)
        saved = load_file(str(path / "buffers.safetensors")) if (path / "buffers.safetensors").is_file() else {}
        if set(saved) != set(expected):
            raise ValueError(f"{path}: saved BatchNorm statistics {sorted(saved)[:3]} do not match the model's "
                             f"{sorted(expected)[:3]}")
        buffers = dict(model.named_buffers())
        for name, tensor in saved.items():
            buffers[name].copy_(tensor)
    blob = torch.load(path / "optim_rng.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    state = json.loads((path / "state.json").read_text())
    sampler.load_state_dict(state["sampler"])
    per_rank = blob.get("rng_ranks") or []
    own = len(per_rank) == world_size and rank < len(per_rank)
    _set_rng_state(per_rank[rank] if own else blob["rng"], generator)
    state["rng_restored"] = own or rank == 0
    return state


# ------------------------------------------------------------------------------------------ the final model


def _class_weights(arcface: L.ArcFace, category: L.ArcFace | None) -> dict[str, torch.Tensor]:
    """The ArcFace class weights to save: ``W`` (identities) and, when trained, ``category_W``."""
    out = {"W": arcface.W.detach().cpu().contiguous()}
    if category is not None:
        out["category_W"] = category.W.detach().cpu().contiguous()
    return out


def save_finetuned(bundle: E.ModelBundle, path: str | os.PathLike, arcface: L.ArcFace | None = None,
                   info: Mapping[str, Any] | None = None, category: L.ArcFace | None = None) -> Path:
    """Write the plain (merged) model, tokenizer, processor settings, ArcFace weights (identities ``W``, categories
    ``category_W`` when trained) and ``finetune_info.json`` into ``path`` (replaced atomically: written next to it,
    then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    bundle.model.save_pretrained(tmp / "model")
    bundle.tokenizer.save_pretrained(tmp / "tokenizer")
    bundle.processor.save_pretrained(tmp / "processor")
    if arcface is not None:
        save_file(_class_weights(arcface, category), str(tmp / ARCFACE_FILE))
    write_json(tmp / INFO_FILE, {**bundle.info, **dict(info or {})})
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_finetuned(path: str | os.PathLike, device: str = "auto") -> E.ModelBundle:
    """Rebuild the :class:`~capret_utils.evaluation.embed.ModelBundle` that :func:`save_finetuned` wrote (``checkpoint/``)."""
    path = Path(path)
    info_file = path / INFO_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{path} is not a fine-tuned capret checkpoint ({INFO_FILE} missing; written by "
                                f"notebooks/03_finetune.ipynb into <run_dir>/{CHECKPOINT_DIR})")
    info = json.loads(info_file.read_text())
    model = X2VLMModel.from_pretrained(path / "model")
    model.set_attn_implementation("sdpa")
    tokenizer = X2VLMTokenizer.from_pretrained(path / "tokenizer")
    check_tokenizer(model.config, tokenizer)
    processor = X2VLMImageProcessor.from_pretrained(path / "processor")
    model.to(resolve_device(device)).eval()
    return E.ModelBundle(model=model, tokenizer=tokenizer, processor=processor, info=info)


def load_arcface(path: str | os.PathLike) -> torch.Tensor:
    """The ArcFace class weights (embedding_size × classes) saved with a fine-tuned checkpoint."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / ARCFACE_FILE))["W"]


# ------------------------------------------------------------------------------------------ history


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    write_json(run_dir / HISTORY_JSON, history)
    frame = pd.json_normalize(history) if history else pd.DataFrame()
    with atomic_path(run_dir / HISTORY_CSV) as tmp:
        frame.to_csv(tmp, index=False)


def read_history(run_dir: str | os.PathLike) -> pd.DataFrame:
    """``history.json`` as a flat frame: one row per logged step (``kind`` "train") or evaluation ("eval")."""
    data = json.loads((Path(run_dir) / HISTORY_JSON).read_text())
    return pd.json_normalize(data)


