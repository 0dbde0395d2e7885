"""LoRA fine-tuning of any peer encoder (:class:`capret_utils.encoders.Encoder`) with the identity ArcFace, plus
ITC where the encoder has a text tower — the losses of :mod:`capret_utils.train.losses`, so a GPU user can compare
X2-VLM with FashionCLIP / SigLIP / SigLIP 2 / DINOv2 at an equal budget.

One step: a seeded batch of item crops with an identity (``style > 0``; crops by
:func:`capret_utils.data.boxes.crop_box` through :class:`~capret_utils.data.loader.ImageStore`, no augmentation),
the encoder's own preprocessing, ``image_features`` through the LoRA-wrapped model, ArcFace over the training
identities on the L2-normalised features (margin in radians, :class:`~capret_utils.train.losses.ArcFace`) and, with
``w_itc > 0`` and a text tower, :func:`~capret_utils.train.losses.itc_loss` against the items' texts (template
captions or category names; identical texts and same identities are positives) at the temperature
``1 / logit_scale`` of the model (clamped to X2-VLM's [0.001, 0.5]); AdamW on the LoRA weights (``lr``) and the
ArcFace class weights (``lr_arcface``), with X2-VLM's warm-up and decay (:func:`capret_utils.train.loop.build_scheduler`)
unless ``schedule="constant"``. Batches are X2-VLM's P×K identity batches
(:class:`~capret_utils.data.loader.PKBatchSampler`: ``batch_size / per_identity`` identities × ``per_identity``
items). The base weights stay frozen. :func:`save_encoder` merges the adapters and writes a folder
:func:`capret_utils.encoders.load_encoder` reads back (``weights: fine-tuned``; transformers or open_clip), which
notebook 04 evaluates with ``-p encoders <folder>``.

:func:`run_peer_finetune` is notebook 03's ``encoder`` parameter: the whole run of a peer encoder from the
notebook's parameters — zero-shot on the select and test splits, training on the train split (select-split
evaluations every ``eval_every`` steps), the fine-tuned folder ``<run_dir>/checkpoint/<label>-ft``, the test split
once at the end — scored by :func:`capret_utils.train.loop.score_item_sets` as X2-VLM is, into ``params.json``,
``metrics.json`` and ``history.csv``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from capret_utils.data.boxes import CROP_CONTEXT
from capret_utils.data.loader import ImageStore, PKBatchSampler, identity_classes, identity_labels
from capret_utils.encoders import Encoder
from capret_utils.encoders.hf import MARKER
from capret_utils.train.config import TrainConfig
from capret_utils.train.loop import build_scheduler, headline, score_item_sets
from capret_utils.train.losses import ArcFace, LossWeights, itc_loss, positive_mask, total_loss
from capret_utils.x2vlm.lora import LORA_TARGETS
from capret_utils.x2vlm.modeling import TEMP_MAX, TEMP_MIN

LORA_TARGETS_BY_FAMILY: dict[str, str] = {
    "clip": r".*\.(q_proj|v_proj)",
    "siglip": r".*\.(q_proj|v_proj)",
    "siglip2": r".*\.(q_proj|v_proj)",
    "dinov2": r".*\.(q_proj|v_proj)",
    "open_clip": r".*\.(c_fc|c_proj|qkv)",
    "x2vlm": f"(?:{LORA_TARGETS['vision']})|(?:{LORA_TARGETS['text']})",
}
"""Module-name regex (full match) LoRA wraps per encoder family: query and value projections of every attention
layer (transformers 5 names them ``q_proj`` / ``v_proj`` in CLIP, SigLIP and DINOv2); open_clip's MLP and fused
``qkv`` linears (its ``nn.MultiheadAttention`` has no separate linears); X2-VLM's vision and text groups of
:data:`capret_utils.x2vlm.lora.LORA_TARGETS`."""


@dataclass
class PeerTrainConfig:
    """One or a few LoRA steps on a peer encoder."""

    steps: int = 1  # optimiser steps
    batch_size: int = 8  # item crops per step: batch_size / per_identity identities x per_identity items (P×K)
    per_identity: int = 1  # items per identity in a batch (K); 1 = all different identities, as X2-VLM's default
    lr: float = 1e-3  # AdamW learning rate of the LoRA weights
    lr_arcface: float = 1e-2  # learning rate of the ArcFace class weights
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA branch input
    target_regex: str = ""  # module-name regex for LoRA; "" = LORA_TARGETS_BY_FAMILY[encoder.family]
    margin: float = 0.15  # ArcFace additive angular margin, radians
    scale: float = 30.0  # ArcFace logit scale
    w_arcface: float = 1.0  # ArcFace weight (> 0)
    w_itc: float = 1.0  # ITC weight; 0 = off; ignored for encoders without a text tower
    text: str = "template"  # ITC text per item: "template" | "category" (category name) | "dialogue" (captions)
    context: float = CROP_CONTEXT  # crop margin per side, fraction of box w/h
    schedule: str = "constant"  # learning rate: "constant" | "cosine" | "linear" (decay to 0 after the warm-up)
    warmup: float = 0.0  # linear warm-up, fraction of the steps in [0, 1) (cosine / linear only)
    weight_decay: float = 0.0  # AdamW weight decay of the LoRA weights
    eval_every: int = 0  # steps between evaluations (run_peer_finetune: on the select split); 0 = none mid-run
    seed: int = 0  # batch draws, LoRA and ArcFace initialisation

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"PeerTrainConfig: steps >= 1 and batch_size >= 2 needed, got {self.steps}, "
                             f"{self.batch_size}")
        if self.per_identity < 1 or self.batch_size % self.per_identity:
            raise ValueError(f"PeerTrainConfig.per_identity must be >= 1 and divide batch_size ({self.batch_size}), "
                             f"got {self.per_identity}")
        if self.text not in ("template", "category", "dialogue"):
            raise ValueError(f"PeerTrainConfig.text must be 'template', 'category' or 'dialogue', got {self.text!r}")
        if self.schedule not in ("constant", "cosine", "linear") or not 0 <= self.warmup < 1:
            raise ValueError(f"PeerTrainConfig: schedule must be constant | cosine | linear and 0 <= warmup < 1, got "
                             f"{self.schedule!r}, {self.warmup}")
        if not self.w_arcface > 0:
            raise ValueError(f"PeerTrainConfig.w_arcface must be > 0, got {self.w_arcface}")
        if self.lr <= 0 or self.lr_arcface <= 0 or self.lora_r < 1:
            raise ValueError("PeerTrainConfig: lr, lr_arcface and lora_r must be positive")


def apply_lora(encoder: Encoder, cfg: PeerTrainConfig) -> dict[str, int]:
    """Wrap ``encoder.module`` with peft LoRA in place (base weights frozen); returns trainable / total counts."""
    import re

    from peft import LoraConfig, get_peft_model

    regex = cfg.target_regex or LORA_TARGETS_BY_FAMILY.get(encoder.family, r".*\.(q_proj|v_proj)")
    names = [n for n, _ in encoder.module.named_modules() if re.fullmatch(regex, n)]
    if not names:
        raise ValueError(f"{encoder.name}: no module matches the LoRA target regex {regex!r}")
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=regex, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder.module = get_peft_model(encoder.module, config)
    for name, param in encoder.module.named_parameters():
        param.requires_grad_("lora_" in name)
    total = sum(p.numel() for p in encoder.module.parameters())
    trainable = sum(p.numel() for p in encoder.module.parameters() if p.requires_grad)
    return {"trainable": int(trainable), "total": int(total), "lora_modules": len(names)}


def _texts(batch: pd.DataFrame, kind: str, captions: Mapping[str, str] | None = None) -> list[str]:
    from capret_utils.captions import item_texts

    return item_texts(batch, {"category": "none"}.get(kind, kind), captions)


def _batches(sampler: PKBatchSampler, steps: int) -> Any:
    """``steps`` batches of rows, epoch after epoch of the P×K sampler."""
    epoch, done = 0, 0
    while done < steps:
        sampler.set_epoch(epoch)
        for batch in sampler:
            yield [row for row, _ in batch]
            done += 1
            if done >= steps:
                return
        epoch += 1


def finetune_encoder(encoder: Encoder, items: pd.DataFrame, cfg: PeerTrainConfig | None = None,
                     store: ImageStore | None = None, captions: Mapping[str, str] | None = None,
                     evaluate: Callable[[Encoder], Mapping[str, Any]] | None = None,
                     callback: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Apply LoRA to ``encoder`` and run ``cfg.steps`` ArcFace (+ ITC) steps on the items with an identity.

    ``captions``: ``{key: caption}`` for ``cfg.text="dialogue"``; ``evaluate(encoder)``: metrics taken every
    ``cfg.eval_every`` steps (an ``"eval"`` history row); ``callback(row)`` sees every history row. Returns
    ``{"history": [{kind: "train", step, loss, loss_arcface, loss_itc?, lr, seconds} | {kind: "eval", step,
    **metrics}], "lora": counts, "classes": n identities, "itc": bool, "config"}``; the encoder keeps its
    (unmerged) adapters — :func:`save_encoder` merges and writes them.
    """
    cfg = cfg or PeerTrainConfig()
    cfg.validate()
    labelled = items[items["style"] > 0].reset_index(drop=True)
    classes = identity_classes(labelled)
    per_batch = cfg.batch_size // cfg.per_identity
    if len(labelled) < cfg.batch_size or len(classes) < max(2, per_batch):
        raise ValueError(f"finetune_encoder needs >= {cfg.batch_size} items with an identity (style > 0) and >= "
                         f"{max(2, per_batch)} identities (batch_size / per_identity); got {len(labelled)} items, "
                         f"{len(classes)} identities")
    labels = identity_labels(labelled, classes)
    lora = apply_lora(encoder, cfg)
    device = encoder.device
    use_itc = bool(cfg.w_itc) and encoder.has_text
    weights = LossWeights(itc=cfg.w_itc if use_itc else 0.0, itm=0.0, box=0.0, arcface=cfg.w_arcface)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        arcface = ArcFace(len(classes), encoder.embed_dim, margin=cfg.margin, scale=cfg.scale).to(device)
    lora_params = [p for p in encoder.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                                   {"params": list(arcface.parameters()), "lr": cfg.lr_arcface, "weight_decay": 0.0}])
    scheduler = build_scheduler(optimizer, cfg.steps, cfg) if cfg.schedule != "constant" else None
    store = store if store is not None else ImageStore(max(2 * encoder.image_size, 64))
    sampler = PKBatchSampler(labels, per_batch, cfg.per_identity, seed=cfg.seed)
    history: list[dict[str, Any]] = []

    def log(row: dict[str, Any]) -> None:
        history.append(row)
        if callback is not None:
            callback(row)

    for step, rows in enumerate(_batches(sampler, cfg.steps), start=1):
        started = time.time()
        rows = np.asarray(rows, dtype=np.int64)
        batch = labelled.iloc[rows]
        ids = torch.as_tensor(labels[rows], device=device)
        encoder.module.train()
        with encoder.autocast():
            image = encoder.image_features(encoder.preprocess([store.crop(r, cfg.context)
                                                              for r in batch.to_dict("records")]))
            terms = {"arcface": arcface(F.normalize(image.float(), dim=-1), ids)}
            if use_itc:
                texts = _texts(batch, cfg.text, captions)
                text = encoder.text_features(encoder.tokenize(texts))
                text_ids = torch.as_tensor(pd.factorize(pd.Series(texts))[0], device=device)
                scale = encoder.logit_scale()
                temp = (1.0 / scale.detach().float().reshape(-1)[0]).clamp(TEMP_MIN, TEMP_MAX) if scale is not None \
                    else 0.07
                terms["itc"] = itc_loss(F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1), temp,
                                        positive_mask(ids, text_ids))
        loss = total_loss(terms, weights, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        log({"kind": "train", "step": step, "loss": float(loss.detach()),
             **{f"loss_{k}": float(v.detach()) for k, v in terms.items()}, "lr": lr,
             "seconds": time.time() - started})
        if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            log({"kind": "eval", "step": step, **evaluate(encoder)})
    encoder.module.eval()
    encoder.weights = "fine-tuned"
    return {"history": history, "lora": lora, "classes": len(classes), "itc": use_itc, "config": asdict(cfg)}


def save_encoder(encoder: Encoder, folder: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Merge the LoRA adapters and write the encoder to ``folder`` with a ``capret_encoder.json`` note (``weights:
    fine-tuned``, ``base``, ``info``); load it back with :func:`capret_utils.encoders.load_encoder`. Transformers
    encoders (:class:`~capret_utils.encoders.HFEncoder`: model, image processor, tokenizer) and open_clip ones
    (:func:`capret_utils.encoders.save_open_clip`: ``open_clip_config.json`` + weights)."""
    from capret_utils.encoders import HFEncoder, OpenCLIPEncoder, save_open_clip

    if not isinstance(encoder, (HFEncoder, OpenCLIPEncoder)):
        raise TypeError(f"save_encoder writes transformers and open_clip encoders; {encoder.name} is a "
                        f"{type(encoder).__name__}")
    folder = Path(folder)
    module = encoder.module
    merged = module.merge_and_unload() if hasattr(module, "merge_and_unload") else module
    encoder.module = merged
    note = {"family": encoder.family, "weights": "fine-tuned", "base": encoder.name, "info": dict(info or {})}
    if isinstance(encoder, OpenCLIPEncoder):
        return save_open_clip(encoder, folder, note=note)
    merged.save_pretrained(folder)
    encoder.processor.save_pretrained(folder)
    if encoder.tokenizer is not None:
        encoder.tokenizer.save_pretrained(folder)
    (folder / MARKER).write_text(json.dumps(note, default=str) + "\n")
    return folder


def trainable_names(module: torch.nn.Module) -> Sequence[str]:
    """Names of the parameters that receive gradients (tests, reports)."""
    return [n for n, p in module.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------ notebook 03's run

PEER_PARAMS = ("epochs", "max_steps", "batch_size", "per_identity", "lr", "lr_arcface", "lora_r", "lora_alpha",
               "margin", "arcface_scale", "w_arcface", "w_itc", "use_captions", "eval_every", "eval_items", "seed",
               "device", "resume")
"""Notebook 03 parameters a peer run uses (everything else about the run: data, splits, run folder)."""
X2VLM_ONLY = ("model", "image_res", "recipe", "finetune_mode", "use_boxes", "w_itm", "w_box", "w_category",
              "category_margin", "category_recolour", "category_views", "grad_accum", "gradient_checkpointing",
              "nproc", "threads", "num_workers", "cache_mb", "bad_images")
"""Notebook 03 parameters of the X2-VLM path a peer run ignores (recorded in ``params.json`` as ``ignored``;
peers always train LoRA on item crops with ArcFace + ITC)."""
WARMUP, SCHEDULE = 0.1, "cosine"  # X2-VLM's default warm-up and decay (TrainConfig), for notebook runs


@dataclass
class PeerRunResult:
    """What :func:`run_peer_finetune` returns (and wrote to the run folder)."""

    encoder: Encoder  # the fine-tuned encoder (adapters merged, eval mode)
    checkpoint: Path  # the folder notebook 04 loads with -p encoders <folder>
    history: pd.DataFrame  # train rows (losses, lr) and eval rows (select-split metrics)
    comparison: dict[str, dict[str, dict[str, float]]]  # {select|test: {zero_shot|finetuned: headline}}
    metrics: dict[str, Any]  # what metrics.json holds
    config: PeerTrainConfig  # the resolved training config (params.json: peer_config)


def peer_config(params: Mapping[str, Any], n_items: int, overrides: str | Mapping[str, Any] | None = "",
                smoke: bool = False) -> PeerTrainConfig:
    """The :class:`PeerTrainConfig` of notebook 03's parameters (``globals()``; :data:`PEER_PARAMS`):
    ``max_steps`` or ``epochs`` x ``ceil(n_items / batch_size)`` steps (as X2-VLM counts them), ``arcface_scale``
    -> ``scale``, ``use_captions`` -> ``text`` (``none`` = category names), X2-VLM's warm-up 0.1 and cosine decay;
    then ``overrides`` (:func:`capret_utils.train.config.parse_overrides`) for any :class:`PeerTrainConfig` field
    (unknown names raise). ``smoke``: at most 3 steps of 8 crops (4 identities x 2), no mid-run evaluation."""
    from dataclasses import fields, replace

    from capret_utils.train.config import parse_overrides

    p = {**{"epochs": 30, "max_steps": 0, "batch_size": 64, "per_identity": 1, "seed": 0, "eval_every": 0},
         **dict(params)}
    steps = int(p["max_steps"]) if int(p["max_steps"]) > 0 else int(p["epochs"]) * -(-n_items // int(p["batch_size"]))
    values = {"steps": max(1, steps), "batch_size": int(p["batch_size"]), "per_identity": int(p["per_identity"]),
              "seed": int(p["seed"]), "eval_every": int(p["eval_every"]), "schedule": SCHEDULE, "warmup": WARMUP,
              "text": {"none": "category"}.get(str(p.get("use_captions", "template")),
                                               str(p.get("use_captions", "template")))}
    for src, dst in (("lr", "lr"), ("lr_arcface", "lr_arcface"), ("lora_r", "lora_r"), ("lora_alpha", "lora_alpha"),
                     ("margin", "margin"), ("arcface_scale", "scale"), ("w_arcface", "w_arcface"), ("w_itc", "w_itc")):
        if src in p:
            values[dst] = type(getattr(PeerTrainConfig, dst))(p[src])
    extra = parse_overrides(overrides)
    known = {f.name for f in fields(PeerTrainConfig)}
    if unknown := sorted(set(extra) - known):
        raise ValueError(f"overrides: {unknown} are not PeerTrainConfig fields (a peer encoder run); known: "
                         f"{sorted(known)}")
    cfg = PeerTrainConfig(**{**values, **extra})
    if smoke:
        cfg = replace(cfg, steps=min(cfg.steps, 3), batch_size=8, per_identity=2,  # as train.smoke_config
                      eval_every=0)
    cfg.validate()
    return cfg


def evaluate_encoder(encoder: Encoder, items: pd.DataFrame, context: float, store: ImageStore | None = None,
                     batch_size: int = 64) -> dict[str, Any]:
    """Notebook 03's retrieval numbers of an encoder on a split: the items' crops
    (:func:`capret_utils.evaluation.peers.embed_crops`, as notebook 04's peer rows) scored by
    :func:`~capret_utils.train.loop.score_item_sets` (as X2-VLM's :func:`~capret_utils.train.loop.evaluate`)."""
    from capret_utils.evaluation import metrics
    from capret_utils.evaluation.peers import embed_crops

    store = store if store is not None else ImageStore(max(2 * encoder.image_size, 64))
    queries, gallery = metrics.item_sets(items)
    q = embed_crops(encoder, queries, store, context, batch_size)
    g = embed_crops(encoder, gallery, store, context, batch_size)
    return score_item_sets(q, g, queries, gallery)


def run_peer_finetune(params: Mapping[str, Any], run_dir: str | os.PathLike, root: str | os.PathLike | None = None,
                      overrides: str | Mapping[str, Any] | None = None, log: Callable[[str], None] = print,
                      ) -> PeerRunResult:
    """Notebook 03 with ``encoder`` set: LoRA-fine-tune that peer encoder (a ``tiny-*`` alias, transformers hub
    id or folder, ``hf-hub:`` open_clip id or folder) with ArcFace (+ ITC where it has a text tower) on the train
    split, select on the select split, and evaluate the test split once at the end.

    ``params``: the notebook's parameters (``globals()``: ``encoder``, :data:`PEER_PARAMS`, ``data_root``,
    ``select_fraction``, ``bad_annotations``, ``captions_path``, ``smoke``, ``overrides``); ``root``: the resolved
    data root (default: from ``data_root`` / ``smoke``). Writes ``params.json`` (``encoder``, ``weights`` of the
    base, the :class:`PeerTrainConfig`, ``ignored`` X2-VLM parameters), ``history.csv`` / ``history.json``,
    ``metrics.json`` (``select`` and ``test``, each ``zero_shot`` and ``finetuned``; ``encoder``, ``weights``,
    ``checkpoint``) and the fine-tuned folder ``<run_dir>/checkpoint/<label>-ft``. With ``resume`` and a
    finished folder of the same config there, it is loaded instead of trained again (no mid-run resume).
    """
    from capret_utils import runs
    from capret_utils.common import resolve_device
    from capret_utils.data import splits
    from capret_utils.data.splits import eval_subset
    from capret_utils.encoders import load_encoder, row_label
    from capret_utils.encoders.hf import read_marker
    from capret_utils.runs import paths
    from capret_utils.train.checkpoint import write_history
    from capret_utils.train.config import CHECKPOINT_DIR

    started = time.time()
    p = dict(params)
    spec = str(p.get("encoder") or "")
    if not spec:
        raise ValueError("run_peer_finetune: parameter 'encoder' is empty (the X2-VLM path runs without it)")
    smoke = bool(p.get("smoke", False))
    out = Path(run_dir)
    root = Path(root) if root is not None else paths.data_root(str(p.get("data_root", "")), smoke)
    sp = splits.load_splits(root, float(p.get("select_fraction", splits.SELECT_FRACTION)), int(p.get("seed", 0)),
                            errors=p.get("bad_annotations", "raise"))
    labelled = int((sp.train["style"] > 0).sum())
    cfg = peer_config(p, labelled, p.get("overrides", "") if overrides is None else overrides, smoke=smoke)
    device = str(resolve_device("cpu" if smoke else str(p.get("device", "auto"))))
    model_dir = out / "tiny-models"
    encoder = load_encoder(spec, device=device, model_dir=model_dir)
    base = encoder.describe()
    label = row_label(spec)
    folder = out / CHECKPOINT_DIR / f"{label}-ft"
    runs.write_params(out, {"encoder": spec, "weights": encoder.weights, "base": base, "peer_config": asdict(cfg),
                            "finetune_mode_effective": "lora", "data_root": str(root), "run_dir": str(out),
                            "captions_path": p.get("captions_path", ""), "overrides": p.get("overrides", ""),
                            "select_fraction": p.get("select_fraction"), "bad_annotations": p.get("bad_annotations"),
                            "smoke": smoke, "device": device,
                            "ignored": [n for n in X2VLM_ONLY if n in p]}, notebook="03_finetune")
    log(f"data: {root}\nrun:  {out}\nLoRA fine-tuning of the peer encoder {spec!r} ({base['family']}, "
        f"{base['weights']}, {base['params'] / 1e6:.2f} M parameters): {cfg.steps} steps of {cfg.batch_size} crops")
    captions = None
    if cfg.text == "dialogue" and encoder.has_text and cfg.w_itc:
        from capret_utils.train.model import caption_texts

        captions = caption_texts(TrainConfig(use_captions="dialogue"), root, out, str(p.get("captions_path", "")),
                                 progress=False)
    store = ImageStore(max(2 * encoder.image_size, 64))
    select_eval = eval_subset(sp.select, int(p.get("eval_items", 0)), cfg.seed)
    zero_shot = {role: evaluate_encoder(encoder, items, cfg.context, store)
                 for role, items in (("select", sp.select), ("test", sp.test))}
    note = read_marker(folder) if folder.is_dir() else {}
    reuse = bool(p.get("resume", True)) and (note.get("info") or {}).get("config") == json.loads(
        json.dumps(asdict(cfg), default=str)) and (note.get("info") or {}).get("finished")
    train_started = time.time()
    if reuse:
        log(f"resume: {folder} holds a finished fine-tune of the same config; loaded, not trained again")
        encoder = load_encoder(str(folder), device=device)
        history = pd.read_csv(out / "history.csv") if (out / "history.csv").is_file() else pd.DataFrame()
        info: dict[str, Any] = dict(note["info"])
    else:
        def evaluate(enc: Encoder) -> dict[str, Any]:
            return headline(evaluate_encoder(enc, select_eval, cfg.context, store))

        info = finetune_encoder(encoder, sp.train, cfg, store=store, captions=captions, evaluate=evaluate)
        info.update(finished=True, base=base)
        history_rows = info.pop("history")
        write_history(out, history_rows)
        history = pd.json_normalize(history_rows)
        save_encoder(encoder, folder, info=json.loads(json.dumps(info, default=str)))
    train_seconds = time.time() - train_started
    select_ft = evaluate_encoder(encoder, sp.select, cfg.context, store)
    test_ft = evaluate_encoder(encoder, sp.test, cfg.context, store)  # the one evaluation on test
    comparison = {"select": {"zero_shot": headline(zero_shot["select"]), "finetuned": headline(select_ft)},
                  "test": {"zero_shot": headline(zero_shot["test"]), "finetuned": headline(test_ft)}}
    metrics = {**comparison, "encoder": spec, "weights": "fine-tuned", "base_weights": base["weights"],
               "family": base["family"], "finetune_mode": "lora", "steps": cfg.steps,
               "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - started, 1),
               "resumed_from": "finished checkpoint" if reuse else None,
               "trainable_parameters": (info.get("lora") or {}).get("trainable"), "lora": info.get("lora"),
               "itc": bool(info.get("itc")), "identities": info.get("classes"), "checkpoint": str(folder),
               "reported_checkpoint": "last step", "splits": sp.names,
               "sizes": {role: {k: zero_shot[role][k] for k in ("n_queries", "n_gallery")} for role in zero_shot}}
    runs.write_metrics(out, metrics)
    log(f"wrote {out / 'metrics.json'} and the fine-tuned encoder to {folder} (notebook 04: -p encoders {folder})")
    return PeerRunResult(encoder, folder, history, comparison, metrics, cfg)
