"""Data-parallel scaling on CPU: embedding and dialogue-captioning throughput with 1 and 2 processes. Prints JSON.

Each measurement launches ``torchrun --standalone --nproc_per_node N`` on this script (``--worker``), the same
launcher and process group (gloo) as data-parallel training; every process runs one torch thread. Timed between two
barriers: rank r's share of the work (contiguous rows for embedding, :func:`capret_utils.train.distributed.sharded`,
gathered on every rank; rows r, r + W, … for captioning, ``run_captioning(shard=(r, W))`` into its own store
file). Model loading is not timed. ``speedup`` = items/s with 2 processes / items/s with 1; the issue's target is
≥ 1.6. For reference, ``threads2`` is one process with 2 intra-op threads (what 2 cores give without data
parallelism). The load average before and after is reported: on a shared machine other work takes cores.

    python benchmarks/bench_distributed.py                       # demo X2-VLM embeddings + tiny Phi-3 / BLIP dialogue
    python benchmarks/bench_distributed.py --embed-items 2048 --caption-items 64 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _items(n: int):
    """``n`` items of the synthetic benchmark (repeated with distinct keys when it has fewer)."""
    import pandas as pd

    from capret_utils import captions as C
    from capret_utils.runs import paths

    root = paths.data_root("", smoke=not (paths.data_root("", smoke=False) / "train").is_dir())
    items = C.load_split_items(root, "all")
    reps = -(-n // len(items))
    frames = []
    for r in range(reps):
        f = items.copy()
        f["key"] = f["key"] + (f"#{r}" if r else "")
        frames.append(f)
    return pd.concat(frames, ignore_index=True).iloc[:n].reset_index(drop=True), root


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    from capret_utils.train import distributed as DI

    ctx = DI.init_distributed("cpu")
    if a.task == "embed":
        from capret_utils.evaluation import embed as E
        from capret_utils.x2vlm import X2VLMConfig, X2VLMImageProcessor, X2VLMModel
        from capret_utils.x2vlm.processing import ImageSettings

        items, _ = _items(a.items)
        torch.manual_seed(0)
        model = X2VLMModel(X2VLMConfig.preset("demo")).eval()
        bundle = E.ModelBundle(model, None, X2VLMImageProcessor(ImageSettings(image_res=model.config.image_res)), {})
        cfg = E.EmbedConfig(view="crop", batch_size=32, num_workers=0, progress=False)
        store = bundle.store(cache=False)
        run = lambda: DI.sharded(E.embed_items, ctx)(items, bundle, cfg, store=store)  # noqa: E731
    else:
        from capret_utils import captions as C

        items, root = _items(a.items)
        cap = C.build_captioner(C.CaptionSetup(captioner="dialogue", llm="tiny", vqa="tiny", rounds=a.rounds,
                                               device="cpu"), model_dir=a.model_dir)
        torch.set_num_threads(a.threads)  # build_captioner sets 1 thread for the tiny models
        store = Path(a.out).with_suffix("") / "captions.jsonl"
        run = lambda: C.run_captioning(items, store, cap, batch_size=8, progress=False,  # noqa: E731
                                       shard=(ctx.rank, ctx.world_size) if ctx.enabled else None)
    DI.barrier(ctx)
    t0 = time.perf_counter()
    out = run()
    DI.barrier(ctx)
    seconds = time.perf_counter() - t0
    if a.task == "embed":
        assert len(out[0]) == len(items) and out[1].shape[0] == len(items)
    if ctx.is_main:
        Path(a.out).write_text(json.dumps({"seconds": seconds, "items": len(items)}))
    DI.teardown()


def measure(task: str, items: int, nproc: int, threads: int, extra: list[str], tmp: Path) -> dict:
    out = tmp / f"{task}-{nproc}x{threads}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           __file__, "--worker", "--task", task, "--items", str(items), "--threads", str(threads), "--out", str(out),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    r = json.loads(out.read_text())
    return {"processes": nproc, "threads_per_process": threads, "seconds": round(r["seconds"], 3),
            "items_per_s": round(r["items"] / r["seconds"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embed-items", type=int, default=1024)
    p.add_argument("--caption-items", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="dialogue rounds per item (tiny Phi-3 + tiny BLIP)")
    p.add_argument("--tasks", default="embed,caption")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", default="embed", help=argparse.SUPPRESS)
    p.add_argument("--items", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    from capret_utils.captions import tiny

    result: dict = {"cpu_cores": os.cpu_count(), "load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "tiny-models"
        tiny.build_tiny_models(model_dir)  # once, before the ranks load them
        for task in a.tasks.split(","):
            n = a.embed_items if task == "embed" else a.caption_items
            extra = ["--model-dir", str(model_dir), "--rounds", str(a.rounds)]
            one = measure(task, n, 1, 1, extra, tmp)
            two = measure(task, n, 2, 1, extra, tmp)
            threads2 = measure(task, n, 1, 2, extra, tmp)
            result[task] = {"items": n, "one": one, "two": two, "threads2": threads2,
                            "speedup": round(two["items_per_s"] / one["items_per_s"], 3),
                            "speedup_vs_threads2": round(two["items_per_s"] / threads2["items_per_s"], 3)}
            if task == "caption":
                result[task]["rounds"] = a.rounds
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["target_speedup"] = 1.6
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
