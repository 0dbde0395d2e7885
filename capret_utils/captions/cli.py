"""Captioning on several processes: what ``python -m capret_utils.captions`` runs on every rank under ``torchrun``
and what notebook 02 launches with ``nproc`` > 1.

    torchrun --standalone --nproc_per_node 2 -m capret_utils.captions --params params.yaml --run-dir DIR

:func:`run_shard` is one rank's work: rank r of W (torchrun's ``RANK`` / ``WORLD_SIZE``) selects the same seeded
items as every rank and captions rows r, r + W, … into ``captions.rank<r>.jsonl``
(:func:`~capret_utils.captions.runner.run_captioning` with ``shard``; readers merge the shards), then writes its
:class:`~capret_utils.captions.runner.RunStats` to ``caption_stats.rank<r>.json``. Ranks never talk to each other.
:func:`launch` first builds what every rank would otherwise build at the same moment (the tiny models, the pixel
answerer's cache), runs the command and returns the ranks' summed statistics.

The parameter file (YAML or JSON) holds :class:`~capret_utils.captions.runner.CaptionSetup` fields plus
:data:`RUN_PARAMS` (notebook 02's names).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Mapping

from capret_utils.captions.dialogue import GenerationStats, load_attributes
from capret_utils.captions.pixel import PIXEL_VQA
from capret_utils.captions.runner import (
    CaptionSetup,
    RunStats,
    build_captioner,
    load_split_items,
    pixel_answerer_folder,
    resolve_splits,
    run_captioning,
    select_items,
)
from capret_utils.captions.store import CAPTIONS_FILE
from capret_utils.captions.tiny import build_tiny_models
from capret_utils.common import from_params, read_json, read_param_file, write_json

# the parameters of a caption run besides the CaptionSetup fields, with their defaults (notebook 02's names)
RUN_PARAMS: dict[str, Any] = {
    "data_root": "",  # DeepFashion2-format data root (resolved by the caller; the ranks read it as given)
    "split": "all",  # "all" or a comma list of split folders
    "max_items": 0,  # caption at most this many items (seeded pick, the same on every rank); 0 = all
    "seed": 0,  # seed of the max_items pick
    "batch_size": 16,  # items whose dialogues advance in lockstep, per rank
    "num_workers": 0,  # image-loading worker processes per rank (-1 auto)
}
LAUNCH_FILE = "caption_params.yaml"
TINY_DIR = "tiny-models"  # under the run folder, as notebook 02's model_dir


def stats_path(run_dir: str | os.PathLike, rank: int) -> Path:
    return Path(run_dir) / f"caption_stats.rank{rank}.json"


def read_params(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML / JSON parameter file; an unknown name raises naming the file and the name."""
    return read_param_file(path, {f.name for f in fields(CaptionSetup)} | set(RUN_PARAMS),
                           f"the CaptionSetup fields and {sorted(RUN_PARAMS)}")


def run_shard(params: Mapping[str, Any], run_dir: str | os.PathLike) -> RunStats:
    """Caption this rank's share (``RANK`` / ``WORLD_SIZE``; one process without them) into ``run_dir``."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    run = {k: params.get(k, v) for k, v in RUN_PARAMS.items()}
    run_dir = Path(run_dir)
    root = Path(run["data_root"])
    splits = resolve_splits(root, run["split"])
    items = select_items(load_split_items(root, splits), int(run["max_items"]), int(run["seed"]))
    setup = from_params(CaptionSetup, params)
    cap = build_captioner(setup, load_attributes([root / s for s in splits]), model_dir=run_dir / TINY_DIR)
    stats = run_captioning(items, run_dir / CAPTIONS_FILE, cap, batch_size=int(run["batch_size"]),
                           progress=rank == 0, num_workers=int(run["num_workers"]),
                           shard=(rank, world) if world > 1 else None)
    write_json(stats_path(run_dir, rank), stats.to_dict())
    return stats


def launch(params: Mapping[str, Any], run_dir: str | os.PathLike, nproc: int, quiet: bool = False) -> RunStats:
    """Caption with ``nproc`` processes on this machine (torchrun, :func:`run_shard` on each; output streamed) and
    return the ranks' :class:`RunStats` summed (``seconds``: the slowest rank). A failed run raises
    ``RuntimeError`` with the command and the last output lines; no process outlives the call or a killed caller
    (:func:`capret_utils.runs.shutdown.run_child`)."""
    from capret_utils.runs.shutdown import torchrun

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = from_params(CaptionSetup, params).effective()
    if "tiny" in (setup.llm, setup.vqa) or setup.vqa.startswith("tiny-"):
        build_tiny_models(run_dir / TINY_DIR)  # once, before the ranks load them
    if setup.vqa in PIXEL_VQA:
        pixel_answerer_folder(setup, run_dir / TINY_DIR)  # trains on a cache miss; the ranks then load it
    for old in run_dir.glob("caption_stats.rank*.json"):
        old.unlink()
    torchrun("capret_utils.captions", params, run_dir, nproc, LAUNCH_FILE, quiet)
    return merged_stats([read_json(stats_path(run_dir, r)) for r in range(int(nproc))])


def merged_stats(per_rank: list[Mapping[str, Any]]) -> RunStats:
    """The ranks' :class:`RunStats` (``to_dict`` form) as one: counts and generation counters summed, seconds the
    slowest rank's (the wall time of the parallel run)."""
    out = RunStats(method=per_rank[0]["method"], captioner=per_rank[0]["captioner"])
    for r in per_rank:
        for k in ("items", "skipped", "new", "batches"):
            setattr(out, k, getattr(out, k) + int(r[k]))
        out.seconds = max(out.seconds, float(r["seconds"]))
        for role in ("llm", "vqa"):
            getattr(out, role).add(GenerationStats(**r[role]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m capret_utils.captions", description=(
        "Caption items from a parameter file; under torchrun each rank takes every W-th item: torchrun --standalone "
        "--nproc_per_node N -m capret_utils.captions --params params.yaml --run-dir DIR"))
    p.add_argument("--params", required=True, help="YAML / JSON file: CaptionSetup fields + " + ", ".join(RUN_PARAMS))
    p.add_argument("--run-dir", required=True, help="output folder (captions.rank<r>.jsonl; resumes what is there)")
    a = p.parse_args(argv)
    stats = run_shard(read_params(a.params), a.run_dir)
    print(json.dumps({k: v for k, v in asdict(stats).items() if k not in ("llm", "vqa")}))
    return 0
