"""A training run from a parameter file, on one or several processes: what the CLI runs under ``torchrun``
(``python -m capret_utils.train``) and what notebook 03 launches with ``nproc`` > 1.

    torchrun --standalone --nproc_per_node 2 -m capret_utils.train --params params.yaml --run-dir DIR

:func:`run_params` is the one function: it joins the process group torchrun set up (none for one process), reads
the splits and captions (rank 0 first: it writes the index cache and the caption store), builds the seeded setup
(:func:`~capret_utils.train.model.prepare`, identical on every rank) and calls
:func:`~capret_utils.train.loop.finetune`, which shards the batches, wraps the model in DDP and lets rank 0 write.
:func:`launch` starts that command from Python (the notebook) and :func:`load_result` reads the finished run back
as a :class:`~capret_utils.train.loop.FinetuneResult`.

The parameter file (YAML or JSON) holds :class:`~capret_utils.train.config.TrainConfig` fields by name plus
:data:`RUN_PARAMS` (data root, select split, captions, smoke); ``overrides`` may name any field again (a field
named there counts as set by the user when the recipe is applied, as in notebook 03).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

from capret_utils.common import jsonable, read_param_file
from capret_utils.train import distributed as DI
from capret_utils.train.checkpoint import load_finetuned, read_history
from capret_utils.train.config import CHECKPOINT_DIR, INFO_FILE, TrainConfig, config_fields, resolve_params, smoke_config
from capret_utils.train.loop import FinetuneResult, finetune, headline, seed_everything
from capret_utils.train.model import caption_texts, prepare

# the parameters of a run besides the TrainConfig fields, with their defaults (notebook 03's names)
RUN_PARAMS: dict[str, Any] = {
    "data_root": "",  # DeepFashion2-format data root; empty: $CAPRET_DATA, else the synthetic benchmark
    "select_fraction": 0.05,  # real data without a test split: share of the train pairs held out to select on
    "max_train_items": 0,  # at most this many training items (whole identities); 0 = all
    "captions_path": "",  # notebook 02's captions.jsonl (use_captions="dialogue"); empty: generated offline
    "bad_annotations": "raise",  # "raise" | "skip" for annotation files that break the format
    "overrides": "",  # YAML / JSON mapping (or file) of TrainConfig fields, as notebook 03's parameter
    "smoke": False,  # tiny data, tiny preset, 3 CPU steps (train.smoke_config)
}
LAUNCH_FILE = "launch_params.yaml"


def read_params(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML / JSON parameter file; an unknown name raises naming the file and the name."""
    return read_param_file(path, set(config_fields()) | set(RUN_PARAMS),
                           f"the TrainConfig fields and {sorted(RUN_PARAMS)}")


def run_params(params: Mapping[str, Any], run_dir: str | os.PathLike,
               callback: Callable[[dict[str, Any]], None] | None = None, stop_after: int | None = None,
               ) -> FinetuneResult:
    """Fine-tune as ``params`` say into ``run_dir`` on this process's rank (one process without torchrun);
    rank 0 also writes ``params.json`` (when absent) and, for a finished run, ``metrics.json`` (select-split
    headline metrics, steps, seconds, ranks). ``callback`` / ``stop_after`` as :func:`~capret_utils.train.loop
    .finetune` (rank 0 calls the callback)."""
    from capret_utils import runs
    from capret_utils.data.splits import load_splits
    from capret_utils.runs import paths

    extras = {k: params.get(k, v) for k, v in RUN_PARAMS.items()}
    ranks = DI.init_distributed(str(params.get("device", "auto")))
    resolved = resolve_params(params, extras["overrides"])
    cfg: TrainConfig = smoke_config(resolved.config) if extras["smoke"] else resolved.config
    root = paths.data_root(extras["data_root"], bool(extras["smoke"]))
    run_dir = Path(run_dir)
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "params.json").exists():
            runs.write_params(run_dir, {**asdict(cfg), "recipe_effective": resolved.recipe,
                                        "param_sources": resolved.sources, **extras, "data_root": str(root),
                                        "run_dir": str(run_dir), "world_size": ranks.world_size},
                              notebook="capret_utils.train")
    with DI.main_first(ranks):  # rank 0 writes the index cache and the caption store, the others read them
        sp = load_splits(root, extras["select_fraction"], cfg.seed, int(extras["max_train_items"]),
                         errors=extras["bad_annotations"])
        caps = caption_texts(cfg, root, run_dir, extras["captions_path"], progress=cfg.progress and ranks.is_main)
    seed_everything(cfg.seed)  # every rank (and a rerun) draws the same initial weights, ArcFace heads included
    setup = prepare(cfg, sp.train, captions=caps)
    result = finetune(setup, run_dir, val_items=sp.select, callback=callback, stop_after=stop_after)
    if ranks.is_main and result.metrics:
        runs.write_metrics(run_dir, {"select": headline(result.metrics), "steps": result.steps,
                                     "train_seconds": round(result.train_seconds, 2), "world_size": ranks.world_size,
                                     "resumed_from": result.resumed_from, "checkpoint": str(result.checkpoint)})
    return result


def launch(params: Mapping[str, Any], run_dir: str | os.PathLike, nproc: int, quiet: bool = False,
           ) -> FinetuneResult:
    """Write ``params`` to ``<run_dir>/launch_params.yaml``, run ``torchrun --standalone --nproc_per_node N -m
    capret_utils.train`` on it (``nproc`` processes on this machine; output streamed) and return
    :func:`load_result`. A failed run raises ``RuntimeError`` with the command and the last output lines. No process
    outlives the call or a killed caller (:func:`capret_utils.runs.shutdown.torchrun`)."""
    from capret_utils.runs.shutdown import torchrun

    torchrun("capret_utils.train", params, run_dir, nproc, LAUNCH_FILE, quiet)
    return load_result(run_dir)


def launch_params(config: TrainConfig, **run: Any) -> dict[str, Any]:
    """A parameter file's content for an already resolved ``config``: every field under ``overrides`` (so the
    recipe changes nothing again) plus the :data:`RUN_PARAMS` given in ``run``."""
    unknown = sorted(set(run) - set(RUN_PARAMS))
    if unknown:
        raise ValueError(f"unknown run parameter(s) {unknown}; allowed: {sorted(RUN_PARAMS)}")
    return {**run, "overrides": jsonable(asdict(config))}


def load_result(run_dir: str | os.PathLike, device: str = "auto") -> FinetuneResult:
    """The :class:`FinetuneResult` of a finished run folder (``checkpoint/``, ``finetune_info.json``,
    ``history.json``), e.g. one trained by :func:`launch`."""
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT_DIR
    if not (ckpt / INFO_FILE).is_file():
        raise FileNotFoundError(f"{ckpt / INFO_FILE} does not exist: the run in {run_dir} did not finish")
    info = json.loads((ckpt / INFO_FILE).read_text())
    return FinetuneResult(load_finetuned(ckpt, device=device), read_history(run_dir), info.get("metrics") or {},
                          ckpt, int(info["steps"]), float(info["train_seconds"]), info.get("resumed_from"), info)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m capret_utils.train", description=(
        "Fine-tune X2-VLM from a parameter file; under torchrun on every rank (data parallel): "
        "torchrun --standalone --nproc_per_node N -m capret_utils.train --params params.yaml --run-dir DIR"))
    p.add_argument("--params", required=True, help="YAML / JSON file: TrainConfig fields + " + ", ".join(RUN_PARAMS))
    p.add_argument("--run-dir", required=True, help="output folder (resumes from its train_state when resume=True)")
    a = p.parse_args(argv)
    try:
        result = run_params(read_params(a.params), a.run_dir)
        if DI.current().is_main:
            print(json.dumps({"steps": result.steps, "select": headline(result.metrics) if result.metrics else {},
                              "checkpoint": str(result.checkpoint)}))
    finally:
        DI.teardown()
    return 0
