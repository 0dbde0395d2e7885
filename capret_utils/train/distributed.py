"""Data parallelism with standard PyTorch tooling: ``torchrun`` starts one process per GPU (or per CPU slot),
``torch.distributed`` connects them (NCCL on CUDA, gloo on CPU) and DDP averages the gradients.

What this module owns (the loop in :mod:`capret_utils.train.loop` calls it; with one process every helper is a
no-op, so a single-process run is byte-identical to one without this module):

* :func:`init_distributed` / :func:`teardown` / :func:`current`: the process group from torchrun's environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) as a :class:`DistContext`.
* :class:`ShardedBatchSampler`: each *global* P×K batch of :class:`~capret_utils.data.loader.PKBatchSampler`
  (``TrainConfig.batch_size`` items) is cut into ``world_size`` contiguous slices of whole identity groups, so the
  union of the per-rank batches is the 1-rank batch (rank r gets identities ``r·P/W … (r+1)·P/W - 1`` of it, K
  items each). The sampler state stays global (epoch, position in global batches): a run resumes on any number
  of ranks that divides P.
* :class:`TrainedModule` + :func:`wrap_ddp`: the trained module (X2-VLM or its peft wrapper) and the
  :class:`~capret_utils.train.criterion.Criterion` (which owns the identity and category ArcFace class weights) as
  one module under one DDP wrapper, so the ArcFace weights are all-reduced with the rest.
* :func:`shard_for_rank`: the per-rank share of the batch-level counts (box rows, recoloured crops).
* :func:`sharded`: an embedding function (``embed_items`` / ``embed_images``) run on a contiguous shard of the
  rows on each rank and gathered in row order on every rank (evaluation during training).
* :func:`mean_over_ranks`: the logged loss rows averaged over ranks at the log interval (one all-reduce).
* :func:`gather_rng_states` / :func:`decorrelate`: each rank's RNG states for the checkpoint (written by rank 0);
  ranks other than 0 draw ITM negatives, recoloured views and dropout from their own seeds.

What a global batch means: ``batch_size`` is the global micro-batch (all ranks together), each rank holds
``batch_size / world_size``; an optimizer step sees ``batch_size x grad_accum`` items. Per-sample terms (ArcFace,
category, box) give the same update as one process with the whole batch; ITC and ITM draw their in-batch
negatives from the rank's own share (``batch_size / world_size - 1`` negatives per sample instead of
``batch_size - 1``), as gradient accumulation does: their losses are lower (fewer, easier negatives) and their
gradients differ from one process. Features are not all-gathered.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` in [0, world_size), ``local_rank`` on its node (the GPU index),
    ``backend`` ("nccl" | "gloo"; "" for a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes checkpoints, history and the final model."""
        return self.rank == 0


SINGLE = DistContext()


def env_context() -> DistContext:
    """The ranks torchrun announced in the environment (nothing initialised); a single process without them."""
    try:
        rank, world, local = (int(os.environ.get(k, d)) for k, d in zip(ENV_VARS, ("0", "1", "0")))
    except ValueError as err:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err}); set by torchrun") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    return DistContext(rank, world, local)


def current() -> DistContext:
    """The initialised process group as a :class:`DistContext` (:data:`SINGLE` when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                           str(dist.get_backend()))
    return SINGLE


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1): NCCL when CUDA is used (``device`` "auto"
    with a GPU, or "cuda"; the process takes GPU ``LOCAL_RANK``), gloo otherwise. Without torchrun's variables
    (or with one process) nothing is initialised and :data:`SINGLE` is returned."""
    env = env_context()
    if not env.enabled:
        return SINGLE
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if cuda:
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return current()


def teardown() -> None:
    """Leave the process group (waits for every rank first); a no-op without one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache or a caption store), the other ranks after it."""
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    yield
    if ctx.enabled and ctx.is_main:
        dist.barrier()


# ------------------------------------------------------------------------------------------ sampling


def shard_slice(n: int, rank: int, world_size: int) -> slice:
    """Rows ``[rank·n/W, (rank+1)·n/W)`` (integer bounds; contiguous, in order, covering 0..n)."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


class ShardedBatchSampler(torch.utils.data.Sampler):
    """This rank's share of every global P×K batch of ``sampler``: ``K·P/W`` items, whole identities, contiguous.

    ``set_epoch``, ``advance``, ``epoch``, ``position``, ``state_dict`` / ``load_state_dict`` act on the wrapped
    global sampler, so its checkpoint state does not depend on the number of ranks.
    """

    def __init__(self, sampler: Any, ctx: DistContext) -> None:
        if sampler.P % ctx.world_size:
            raise ValueError(f"the P×K batch holds P={sampler.P} identities, which {ctx.world_size} ranks cannot "
                             f"share evenly; choose batch_size / per_identity divisible by the number of processes")
        self.sampler, self.rank, self.world_size = sampler, ctx.rank, ctx.world_size

    def shard(self, batch: Sequence[Any]) -> list[Any]:
        per = len(batch) // self.world_size  # P·K with P divisible by W: whole identity groups
        return list(batch[self.rank * per:(self.rank + 1) * per])

    def __iter__(self) -> Iterator[list[Any]]:
        for batch in self.sampler:
            yield self.shard(batch)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def position(self) -> int:
        return self.sampler.position

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def advance(self) -> None:
        self.sampler.advance()

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.load_state_dict(state)


def shard_for_rank(count: int, ctx: DistContext) -> int:
    """A per-global-batch count (box rows, recoloured crops) as this rank's share: ``ceil(count / W)``."""
    return int(math.ceil(count / ctx.world_size)) if ctx.enabled else int(count)


# ------------------------------------------------------------------------------------------ the DDP module


class TrainedModule(torch.nn.Module):
    """The trained module and the criterion as one module: ``forward(batch)`` = the criterion's loss terms on the
    plain X2-VLM ``net`` (the model inside ``trained``, where peft injected its adapters). Registering the criterion
    puts the ArcFace class weights under the same DDP wrapper as the model."""

    def __init__(self, trained: torch.nn.Module, net: torch.nn.Module, criterion: torch.nn.Module) -> None:
        super().__init__()
        self.trained, self.criterion = trained, criterion
        object.__setattr__(self, "_net", net)  # the same parameters as ``trained``: not registered twice

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return self.criterion(self._net, batch)


def wrap_ddp(trained: torch.nn.Module, net: torch.nn.Module, criterion: torch.nn.Module,
             device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP over :class:`TrainedModule` (rank 0's weights are broadcast when it is built). Unused parameters are
    looked for, since switched-off loss terms leave heads (ITM, box, category ArcFace) without gradients."""
    module = TrainedModule(trained, net, criterion)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)


# ------------------------------------------------------------------------------------------ collectives


def mean_over_ranks(ctx: DistContext) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A function averaging a tensor over the ranks (one all-reduce; gloo has no AVG, so SUM / W), or None for
    a single process."""
    if not ctx.enabled:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / ctx.world_size

    return reduce


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank (pickled; for small host objects)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def sharded(embed: Callable[..., tuple[list[str], np.ndarray]], ctx: DistContext
            ) -> Callable[..., tuple[list[str], np.ndarray]]:
    """``embed(table, bundle, config, texts=None, store=None)`` run by each rank on its contiguous shard of the
    rows and gathered in row order on every rank: the same ``(keys, array)`` as one process (evaluation mode is
    deterministic per row). ``embed`` is :func:`~capret_utils.evaluation.embed.embed_items` or ``embed_images``."""
    if not ctx.enabled:
        return embed

    def run(table: Any, bundle: Any, config: Any = None, texts: Sequence[str] | None = None, **kw: Any
            ) -> tuple[list[str], np.ndarray]:
        sl = shard_slice(len(table), ctx.rank, ctx.world_size)
        part = table.iloc[sl]
        if texts is not None:
            kw["texts"] = list(texts)[sl]
        keys, array = embed(part, bundle, config, **kw)
        parts = gather_objects((list(keys), np.asarray(array, dtype=np.float32)), ctx)
        all_keys = [k for ks, _ in parts for k in ks]
        return all_keys, np.concatenate([a for _, a in parts], axis=0)

    return run


# ------------------------------------------------------------------------------------------ randomness


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank`` > 0 (rank 0 keeps ``seed``, so one process is unchanged)."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank), 0xDD9]).generate_state(1, dtype=np.uint32)[0])


def decorrelate(generator: torch.Generator, seed: int, ctx: DistContext, step: int = 0) -> None:
    """Reseed the global RNGs (python, numpy, torch: dropout) and ``generator`` (ITM negatives, recoloured views)
    of ranks other than 0 from ``(seed, rank, step)``, so the ranks do not draw the same numbers. Rank 0 and a
    single process are left alone."""
    if not ctx.enabled or ctx.is_main:
        return
    s = rank_seed(seed * 1_000_003 + step, ctx.rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    generator.manual_seed(rank_seed(seed + 1, ctx.rank) + step)


def gather_rng_states(state: Mapping[str, Any], ctx: DistContext) -> list[Any] | None:
    """Every rank's RNG state (``checkpoint._rng_state``) gathered for rank 0's checkpoint; None for one process."""
    if not ctx.enabled:
        return None
    return gather_objects(dict(state), ctx)
