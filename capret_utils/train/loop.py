"""The fine-tuning loop: optimizer and schedule, ``train_step``, ``evaluate``, and :func:`finetune`, which builds the
loader and the criterion once, trains, evaluates, checkpoints and resumes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pandas as pd
import torch

from capret_utils.common import deterministic_algorithms
from capret_utils.data import loader as D
from capret_utils.data.df2 import CATEGORY_NAMES
from capret_utils.data.splits import eval_subset
from capret_utils.evaluation import embed as E
from capret_utils.train import distributed as DI
from capret_utils.train import losses as L
from capret_utils.train import precision as P
from capret_utils.train.checkpoint import (
    latest_train_state,
    load_train_state,
    rng_state,
    save_finetuned,
    save_train_state,
    write_history,
)
from capret_utils.train.config import (
    CHECKPOINT_DIR,
    EVAL_KS,
    HEAD_NAMES,
    HEADLINE,
    STATE_DIR,
    TrainConfig,
    leading_rows,
)
from capret_utils.train.criterion import Criterion
from capret_utils.train.model import TrainSetup
from capret_utils.x2vlm import (
    LoraSettings,
    X2VLMModel,
    apply_lora,
    merge_lora,
    trainable_parameters,
)

# ------------------------------------------------------------------------------------------ runtime helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(bundle: E.ModelBundle, items: pd.DataFrame, config: TrainConfig | None = None,
             store: D.ImageStore | None = None, image_level: bool = False, progress: bool = False,
             ranks: DI.DistContext | None = None) -> dict[str, Any]:
    """Item-level retrieval metrics on a split (official sets): hit@k for k in 1, 5, 10, 15, 20 and mAP.

    The view follows ``config.use_boxes`` (item crops, or whole photos for every item); with ``image_level`` also
    image-level metrics (whole photos) under ``"image_level"``. ``ranks`` (several processes): each embeds its
    shard of the rows, the embeddings are gathered on every rank (:func:`capret_utils.train.distributed.sharded`).
    """
    ranks = ranks or DI.SINGLE
    embed_items, embed_images = DI.sharded(E.embed_items, ranks), DI.sharded(E.embed_images, ranks)
    from capret_utils.evaluation import metrics

    config = config or TrainConfig()
    view = "crop" if config.use_boxes else "image"
    ecfg = E.EmbedConfig(view=view, context=config.context, tta_contexts=tuple(config.tta_contexts), batch_size=128,
                         bf16=config.bf16, progress=progress,
                         num_workers=config.num_workers)
    store = store if store is not None else bundle.store(cache=True)
    queries, gallery = metrics.item_sets(items)
    _, q = embed_items(queries, bundle, ecfg, store=store)
    _, g = embed_items(gallery, bundle, ecfg, store=store)
    out = score_item_sets(q, g, queries, gallery)
    if image_level:
        qi, gi = metrics.image_sets(items)
        _, qe = embed_images(qi, bundle, ecfg, store=store)
        _, ge = embed_images(gi, bundle, ecfg, store=store)
        r2 = metrics.evaluate_images(qe, ge, qi, gi, ks=EVAL_KS,
                                     config=metrics.EvalConfig(progress=False, device="cpu"))
        out["image_level"] = {k: float(r2.metrics[k]) for k in [f"top{k}" for k in EVAL_KS] + ["mAP"]}
    return out


def score_item_sets(q: np.ndarray, g: np.ndarray, queries: pd.DataFrame, gallery: pd.DataFrame) -> dict[str, Any]:
    """:func:`evaluate`'s numbers from item embeddings of ``metrics.item_sets``: hit@k (``top<k>``, k in
    :data:`EVAL_KS`), mAP, ``n_queries`` / ``n_gallery`` and the 95 % intervals (Wilson for top1, seeded
    bootstrap for mAP). Peer encoders (:mod:`capret_utils.train.peers`) are scored by the same function."""
    from capret_utils.evaluation import metrics, stats

    res = metrics.evaluate_items(q, g, queries, gallery, ks=EVAL_KS,
                                 config=metrics.EvalConfig(progress=False, device="cpu"))
    out: dict[str, Any] = {k: float(res.metrics[k]) for k in [f"top{k}" for k in EVAL_KS] + ["mAP"]}
    out["n_queries"], out["n_gallery"] = int(res.metrics["n_evaluated"]), int(res.metrics["n_gallery"])
    if "hit@1" in res.per_query and "ap" in res.per_query:  # 95 % intervals: Wilson for hit@1, bootstrap for mAP
        out["top1_lo"], out["top1_hi"] = stats.wilson_interval(res.per_query["hit@1"])
        out["mAP_lo"], out["mAP_hi"] = stats.bootstrap_interval(res.per_query["ap"], seed=0)
    return out


def headline(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The five numbers notebook 03 reports (top1, top5, top10, top20, mAP) and, where :func:`evaluate` computed
    them, the 95 % intervals of top1 (Wilson) and mAP (bootstrap over queries): ``top1_lo`` … ``mAP_hi``."""
    out = {k: float(metrics[k]) for k in HEADLINE}
    out.update({k: float(metrics[k]) for k in ("top1_lo", "top1_hi", "mAP_lo", "mAP_hi") if k in metrics})
    return out


# ------------------------------------------------------------------------------------------ optimisation


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or name.endswith("temp")


def build_arcfaces(config: TrainConfig, num_identities: int, embed_dim: int) -> tuple[L.ArcFace, L.ArcFace | None]:
    """The identity ArcFace (``margin``) and, when ``w_category`` is on, the category ArcFace (``category_margin``),
    both with ``arcface_scale``."""
    arcface = L.ArcFace(num_identities, embed_dim, config.margin, config.arcface_scale)
    category = (L.ArcFace(len(CATEGORY_NAMES), embed_dim, config.category_margin, config.arcface_scale)
                if config.weights().category else None)
    return arcface, category


def build_optimizer(model: torch.nn.Module, arcface: L.ArcFace, config: TrainConfig,
                    category: L.ArcFace | None = None) -> torch.optim.AdamW:
    """AdamW (betas 0.9 / 0.98, eps 1e-8 as the official optim.py) with groups: backbone decay / no decay,
    heads (``head_lr_mult``) decay / no decay, ArcFace class weights of the identities and, when given, of the
    categories (``lr_arcface``, no decay)."""
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = any(f"{h}." in name or name.startswith(h) for h in HEAD_NAMES)
        key = ("head" if head else "body") + ("_nd" if _no_decay(name, param) else "")
        g = groups.setdefault(key, {"params": [], "lr": config.lr * (config.head_lr_mult if head else 1.0),
                                    "weight_decay": 0.0 if key.endswith("_nd") else config.weight_decay,
                                    "name": key})
        g["params"].append(param)
    heads = [arcface] if config.w_arcface or config.w_arcface_fused else []
    if category is not None:
        heads.append(category)
    if heads:
        groups["arcface"] = {"params": [p for h in heads for p in h.parameters()], "lr": config.lr_arcface,
                             "weight_decay": 0.0, "name": "arcface"}
    ordered = [groups[k] for k in ("body", "body_nd", "head", "head_nd", "arcface") if k in groups]
    return torch.optim.AdamW(ordered, betas=(0.9, 0.98), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, config: TrainConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` × steps, then cosine or linear decay to 0 at ``total_steps``."""
    warm = int(round(config.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total_steps - warm)
        progress = min(max(progress, 0.0), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batches_per_epoch(config: TrainConfig, n_items: int) -> int:
    """Micro-batches of one epoch: ``ceil(n_items / batch_size)`` (``epochs`` counts passes over the items)."""
    return max(1, math.ceil(n_items / config.batch_size))


def total_steps_for(config: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of a run: ``max_steps``, or ``epochs`` x ``batches_per_epoch`` micro-batches // grad_accum."""
    if config.max_steps > 0:
        return int(config.max_steps)
    return max(1, (config.epochs * batches_per_epoch) // config.grad_accum)


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns."""

    bundle: E.ModelBundle  # the fine-tuned (merged, eval-mode) model
    history: pd.DataFrame  # per-step losses and the evaluations
    metrics: dict[str, Any]  # final validation metrics (None when no val_items)
    checkpoint: Path  # <run_dir>/checkpoint
    steps: int
    train_seconds: float  # wall time spent in training steps (this process and resumed ones)
    resumed_from: int | None  # optimizer step the run resumed from
    info: dict[str, Any]


def _log_row(step: int, epoch: float, terms: Mapping[str, float], loss: float, lr: float, temp: float,
             elapsed: float) -> dict[str, Any]:
    return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, **{f"loss_{k}": v for k, v in terms.items()},
            "lr": lr, "temp": temp, "elapsed_s": round(elapsed, 3)}


def finetune(setup: TrainSetup, run_dir: str | os.PathLike, val_items: pd.DataFrame | None = None,
             callback: Callable[[dict[str, Any]], None] | None = None, stop_after: int | None = None,
             ) -> FinetuneResult:
    """Train ``setup.bundle.model`` with the configured losses; evaluate on ``val_items`` every ``eval_every``
    steps and at the end; checkpoint every ``ckpt_every`` steps and at the end; resume when asked.

    ``callback(row)`` receives every history row (train rows every step, eval rows after each evaluation), e.g. to
    update a live plot. ``stop_after`` ends the loop after that many optimizer steps *in this call* without
    saving the final model (tests use it to simulate an interruption).
    """
    on_cpu = setup.bundle.device.type == "cpu"
    with deterministic_algorithms(setup.config.deterministic and on_cpu):
        return _finetune(setup, run_dir, val_items, callback, stop_after)


class EpochBatches:
    """The training batches, epoch after epoch, from one DataLoader built once
    (:func:`capret_utils.data.loader.build_loader`: ``num_workers``, pinned memory on CUDA, persistent workers).

    Each epoch calls ``sampler.set_epoch`` and starts a new pass over the same loader (workers persist between
    epochs); the loader's private generator is re-seeded per pass, so the worker seeds drawn from it never shift the
    global RNG (augmentation is seeded per sample: batches are identical for every worker count). ``next()``
    returns the next batch and advances the sampler's resumable position. Items left out of a batch for an
    unreadable image (``bad_images="skip"``) are collected in :attr:`skipped`.
    """

    def __init__(self, setup: TrainSetup, collate: D.Collator, sampler: D.PKBatchSampler, config: TrainConfig,
                 pin_memory: bool = False) -> None:
        self.loader = D.build_loader(setup.dataset, collate, config.num_workers, batch_sampler=sampler,
                                     pin_memory=pin_memory, seed=config.seed)
        self.sampler, self.seed = sampler, config.seed
        self.epoch = sampler.epoch
        self.skipped: list[dict[str, str]] = []
        self._batches: Iterator[Any] | None = None

    def __next__(self) -> Any:
        batch = None
        while batch is None:
            if self._batches is None:
                self.sampler.set_epoch(self.epoch)
                self.loader.generator.manual_seed(self.seed)
                self._batches = iter(self.loader)
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches, self.epoch = None, self.epoch + 1
                continue
            self.sampler.advance()
            self.skipped.extend(batch.pop("skipped", []))
            if batch.get("empty"):  # every item of the batch was unreadable (skip mode)
                batch = None
        return batch

    def close(self) -> None:
        """Stop the loader's worker processes now (they also stop when the loader is garbage-collected)."""
        self._batches = None
        workers = getattr(self.loader, "_iterator", None)  # persistent workers: the loader keeps its one iterator
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()


def train_step(net: torch.nn.Module, criterion: Criterion, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, batches: Iterator[Any], config: TrainConfig,
               step: int, scaler: Any = None, check: bool = True, ddp: torch.nn.Module | None = None,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """One optimizer step (``config.grad_accum`` micro-batches) at 0-based ``step``: forward, weighted loss,
    backward, gradient clipping, optimizer and schedule step, temperature clamp.

    Returns ``(loss, unweighted terms, gradient norm)`` as detached tensors on the model's device — nothing is
    copied to the host, so a GPU step does not wait for the CPU. ``check`` = raise
    :class:`~capret_utils.train.losses.NonFiniteLossError` here (a host sync); the training loop passes False and
    checks the returned values at its log interval. ``scaler`` (fp16, :func:`~capret_utils.train.precision
    .grad_scaler`) scales the loss, unscales before clipping and skips a step whose gradients overflowed. ``ddp``
    (several processes, :func:`~capret_utils.train.distributed.wrap_ddp`): the terms come from its forward, whose
    backward all-reduces the gradients (only after the last micro-batch of an accumulation)."""
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    loss_sum: torch.Tensor | None = None
    for i in range(config.grad_accum):
        batch = next(batches)
        last = i == config.grad_accum - 1
        with contextlib.nullcontext() if ddp is None or last else ddp.no_sync():
            terms = criterion(net, batch) if ddp is None else ddp(batch)
            loss = criterion.total(terms, step + 1, check) / config.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        for k, v in terms.items():
            part = v.detach().float() / config.grad_accum
            sums[k] = part if k not in sums else sums[k] + part
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = None
    if config.clip_grad:
        norm = torch.nn.utils.clip_grad_norm_(params, config.clip_grad).detach()
        if check and scaler is None and not torch.isfinite(norm):
            raise L.NonFiniteLossError(step + 1, {"grad_norm": float(norm)})
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the unscaled gradients hold inf / NaN
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    net.clamp_temp_()
    return loss_sum, sums, (norm if scaler is None else None)


class StepLog:
    """The loss rows of the steps since the last log, kept on the device and copied to the host in one transfer
    (:meth:`flush`) at the log interval — the loop's only host syncs. :meth:`flush` also runs the NaN guard: the
    first step with a non-finite term (or gradient norm) raises :class:`~capret_utils.train.losses
    .NonFiniteLossError` naming it. ``reduce`` (several processes: :func:`~capret_utils.train.distributed
    .mean_over_ranks`) averages the rows over the ranks in the same transfer."""

    def __init__(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self._pending: list[tuple[int, float, float, float, torch.Tensor, list[str]]] = []
        self._reduce = reduce

    def add(self, step: int, epoch: float, lr: float, elapsed: float, loss: torch.Tensor,
            terms: Mapping[str, torch.Tensor], norm: torch.Tensor | None, temp: torch.Tensor) -> None:
        names = list(terms)
        values = [loss.float(), *(terms[k].float() for k in names), temp.detach().float().reshape(()),
                  norm.float() if norm is not None else torch.zeros((), device=loss.device)]
        self._pending.append((step, epoch, lr, elapsed, torch.stack(values), names))

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self) -> list[dict[str, Any]]:
        if not self._pending:
            return []
        stacked = torch.stack([p[4] for p in self._pending])
        if self._reduce is not None:
            stacked = self._reduce(stacked)
        host = stacked.cpu().tolist()  # one device -> host copy
        rows = []
        for (step, epoch, lr, elapsed, _, names), values in zip(self._pending, host):
            loss, terms, temp, norm = values[0], values[1:1 + len(names)], values[-2], values[-1]
            named = dict(zip(names, terms))
            L.check_finite({**named, "grad_norm": norm}, step)
            rows.append(_log_row(step, epoch, named, loss, lr, temp, elapsed))
        self._pending.clear()
        return rows


def _eval_during_training(net: X2VLMModel, setup: TrainSetup, val_items: pd.DataFrame, store: Any,
                          step: int, ranks: DI.DistContext = DI.SINGLE) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate the model being trained (LoRA layers active) and return (metrics, the history row)."""
    config, bundle = setup.config, setup.bundle
    net.eval()
    model = bundle if config.mode == "full" else E.ModelBundle(net, bundle.tokenizer, bundle.processor, bundle.info)
    res = evaluate(model, val_items, config, store=store, image_level=config.eval_image_level, ranks=ranks)
    net.train()
    row = {"kind": "eval", "step": step, **{k: v for k, v in res.items() if not isinstance(v, dict)}}
    if "image_level" in res:
        row.update({f"image_{k}": v for k, v in res["image_level"].items()})
    return res, row


def _trainable(setup: TrainSetup) -> tuple[torch.nn.Module, X2VLMModel, Any]:
    """(module the optimizer trains, the plain X2-VLM inside it, the peft model or None) for ``config.mode``."""
    base = setup.bundle.model
    if setup.config.mode == "lora":
        config = setup.config  # LoraSettings' heads are HEAD_NAMES, the ones the model lacks skipped
        peft_model = apply_lora(base, LoraSettings(r=config.lora_r, alpha=config.lora_alpha,
                                                   dropout=config.lora_dropout))
        return peft_model, peft_model.get_base_model(), peft_model
    for p in base.parameters():
        p.requires_grad_(True)
    return base, base, None


def _finetune(setup: TrainSetup, run_dir: str | os.PathLike, val_items: pd.DataFrame | None,
              callback: Callable[[dict[str, Any]], None] | None, stop_after: int | None) -> FinetuneResult:
    config, bundle = setup.config, setup.bundle
    ranks = DI.current()  # several processes under torchrun (train.distributed); rank 0 writes everything
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = bundle.device
    mode = config.mode
    train_module, net, peft_model = _trainable(setup)
    net.train()
    if config.gradient_checkpointing:
        net.set_layer_checkpointing(True)
    precision = P.resolve_precision(device, config.bf16)
    scaler = P.grad_scaler(precision, device)
    if config.progress and ranks.is_main:
        print(P.describe(precision, device))
    counts = trainable_parameters(train_module)
    arcface, category = build_arcfaces(config, len(setup.classes), int(net.config.embed_dim))
    arcface = arcface.to(device)
    category = category.to(device) if category is not None else None
    sampler = D.PKBatchSampler(setup.labels, setup.data_config.identities_per_batch, config.per_identity,
                               seed=config.seed)
    per_epoch = batches_per_epoch(config, int((setup.labels >= 0).sum()))
    total = total_steps_for(config, per_epoch)
    optimizer = build_optimizer(train_module, arcface, config, category)
    scheduler = build_scheduler(optimizer, total, config)
    generator = torch.Generator().manual_seed(config.seed + 1)
    criterion = Criterion(config, arcface, category, generator, device)
    if ranks.enabled:  # per-rank shares of the global batch: box rows, recoloured crops, the P×K slice
        setup.dataset.config = replace(setup.dataset.config, box_per_batch=leading_rows(
            config.batch_size // ranks.world_size, config.box_fraction))
        criterion.category_recolour = DI.shard_for_rank(config.category_recolour, ranks)
        DI.decorrelate(generator, config.seed, ranks)
    history: list[dict[str, Any]] = []
    step, train_seconds, resumed_from = 0, 0.0, None
    digest = config.trajectory_digest(net.config)
    val_store = bundle.store(cache=True)
    if config.resume and (latest := latest_train_state(run_dir)) is not None:
        saved_digest = json.loads((latest / "state.json").read_text()).get("digest")
        if saved_digest != digest:
            raise ValueError(f"{latest} was written with another training configuration or model architecture "
                             f"(digest {saved_digest} vs {digest}); use a new run_dir or resume=False")
        state = load_train_state(latest, train_module, arcface, optimizer, scheduler, sampler, generator, category,
                                 ranks.rank, ranks.world_size)
        step, train_seconds, history = int(state["step"]), float(state["train_seconds"]), list(state["history"])
        if not state["rng_restored"]:  # resumed on another number of ranks
            DI.decorrelate(generator, config.seed, ranks, step)
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        resumed_from = step
    elif not config.resume and (run_dir / STATE_DIR).exists() and ranks.is_main:
        shutil.rmtree(run_dir / STATE_DIR)
    DI.barrier(ranks)
    ddp = DI.wrap_ddp(train_module, net, criterion, device) if ranks.enabled else None
    batches = EpochBatches(setup, D.Collator(bundle.tokenizer, box_source=setup.dataset),
                           DI.ShardedBatchSampler(sampler, ranks) if ranks.enabled else sampler, config,
                           pin_memory=device.type == "cuda")

    def save(at_step: int) -> None:
        rngs = DI.gather_rng_states(rng_state(generator), ranks)
        blob = {"digest": digest, "train_seconds": train_seconds, "history": history, "total_steps": total,
                "config": asdict(config), "precision": precision,
                "grad_scaler": scaler.state_dict() if scaler is not None else None}
        if ranks.is_main:
            save_train_state(run_dir, at_step, train_module, arcface, optimizer, scheduler, sampler, generator,
                             blob, config.keep_checkpoints, category, rngs)
        DI.barrier(ranks)

    watch = eval_subset(val_items, config.eval_items, config.seed) if val_items is not None else None

    def run_eval(at_step: int, final: bool = False) -> dict[str, Any] | None:
        if val_items is None:
            return None
        items = val_items if final else watch  # during training: a fixed, seeded subset (eval_items)
        res, row = _eval_during_training(net, setup, items, val_store, at_step, ranks)
        history.append(row)
        if callback and ranks.is_main:
            callback(row)
        return res

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc=f"fine-tune ({mode})", disable=not config.progress or not ranks.is_main,
               unit="step")
    done_here = 0
    last_eval: dict[str, Any] | None = None
    log = StepLog(DI.mean_over_ranks(ranks))

    def flush() -> None:  # the loop's host sync: loss rows of the last steps, NaN guard, progress bar
        rows = log.flush()
        history.extend(rows)
        if callback and ranks.is_main:
            for r in rows:
                callback(r)
        if rows:
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", epoch=f"{rows[-1]['epoch']:.2f}")

    try:
        while step < total and (stop_after is None or done_here < stop_after):
            t0 = time.perf_counter()
            loss_sum, sums, norm = train_step(net, criterion, optimizer, scheduler, batches, config, step, scaler,
                                              check=False, ddp=ddp)
            step += 1
            done_here += 1
            train_seconds += time.perf_counter() - t0
            epoch = round(step * config.grad_accum / per_epoch, 4)  # epochs over the items done (as ``epochs``)
            log.add(step, epoch, optimizer.param_groups[0]["lr"], train_seconds, loss_sum, sums, norm, net.temp)
            bar.update(1)
            evaluate_now = bool(config.eval_every and step % config.eval_every == 0 and step < total)
            save_now = step % config.ckpt_every == 0 or step == total
            if step % config.log_every == 0 or evaluate_now or save_now:
                flush()
            if evaluate_now:
                last_eval = run_eval(step)
            if save_now:
                save(step)
                if ranks.is_main:
                    write_history(run_dir, history)
        flush()
    finally:
        batches.close()
    bar.close()
    if stop_after is not None and step < total:
        if ranks.is_main:
            write_history(run_dir, history)
        return FinetuneResult(bundle, pd.json_normalize(history), {}, run_dir / CHECKPOINT_DIR, step, train_seconds,
                              resumed_from, {})
    # final evaluation (skipped when a finished run is re-entered and its last row already is the final eval)
    final_eval = next((r for r in reversed(history) if r.get("kind") == "eval" and r["step"] == total), None)
    if final_eval is None:
        last_eval = run_eval(total, final=True)
        save(total)
    else:
        last_eval = {k: v for k, v in final_eval.items() if k not in ("kind", "step")}
    if ranks.is_main:
        write_history(run_dir, history)
    if config.gradient_checkpointing:
        net.set_layer_checkpointing(False)
    final_model = merge_lora(peft_model) if peft_model is not None else net
    final_model.eval()
    for p in final_model.parameters():
        p.requires_grad_(False)
    final_bundle = E.ModelBundle(final_model, bundle.tokenizer, bundle.processor, dict(bundle.info))
    info = {"config": asdict(config), "finetune_mode": mode, "source": setup.source, "identity_classes": setup.classes,
            "steps": step, "total_steps": total, "train_seconds": round(train_seconds, 2),
            "trainable_parameters": counts, "metrics": last_eval, "arcface_margin_rad": config.margin,
            "arcface_margin_deg": math.degrees(config.margin), "category_margin_rad": config.category_margin,
            "resumed_from": resumed_from, "precision": precision,
            **({"world_size": ranks.world_size} if ranks.enabled else {}),
            "skipped_images": {"count": len(batches.skipped), "items": batches.skipped[:100]}}
    if batches.skipped:
        warnings.warn(f"fine-tuning left {len(batches.skipped)} sample(s) out for unreadable images "
                      f"(bad_images='skip'); first: {batches.skipped[0]['path']} (item {batches.skipped[0]['key']})",
                      stacklevel=2)
    final_bundle.info.update({k: v for k, v in info.items() if k in ("config", "finetune_mode", "identity_classes")})
    ckpt = run_dir / CHECKPOINT_DIR
    if ranks.is_main:
        save_finetuned(final_bundle, ckpt, arcface, info, category)
    DI.barrier(ranks)
    return FinetuneResult(final_bundle, pd.json_normalize(history), last_eval or {}, ckpt, step, train_seconds,
                          resumed_from, info)


def suppress_known_warnings() -> None:
    """Silence third-party warnings that say nothing about this run (peft on custom models, PML stats)."""
    warnings.filterwarnings("ignore", message=".*Unable to fetch remote file.*")
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
