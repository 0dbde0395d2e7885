"""DeepFashion2-size data path: index, memory, start-up, loader throughput and reduced decode; prints JSON.

Builds a DeepFashion2-train-sized layout without new pixels: a few hundred synthetic photos rendered at real sizes
(700-1,000 px long side) are hard-linked again and again under new image ids, and every copy gets new ``pair_id``s
(so identities stay distinct); no ``attributes.jsonl``, like the real data. Then measures, each probe in a fresh
process:

* index build time, cold (parse every JSON) and warm (the cached parquet index), at the largest size;
* seconds from process start to the first optimizer step (warm index, tiny model at ``--image-res``), peak RSS of
  the training process after preparation and after ``--steps`` steps, and the PSS of the whole process tree
  (DataLoader workers included, shared pages counted once), at every ``--sizes`` value;
* training-loader items/s (crops + augmentation + box views, no model) at 0, 1 and 2 workers;
* ms per item to decode a 384-px crop at full size vs reduced (JPEG DCT scaling), and how often the default
  training view side (2 x image_res) allows a reduction.

    python benchmarks/bench_scale.py                                  # 19.2 k and 192 k train images (~10 min)
    python benchmarks/bench_scale.py --sizes 20000 --steps 10         # quick
    python benchmarks/bench_scale.py --out /data/scale --keep         # keep the layout (e.g. for notebook 03)

Targets (issue 24): first step <= 90 s warm (<= 5 min cold) and peak RSS <= 3 GB at 192 k images, growing < 20 %
from 19 k to 192 k; loader 2 workers >= 1.7 x in-process; reduced decode >= 2 x faster than full.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
START = time.perf_counter()

PAIR_STRIDE = 1_000_000  # pair_id offset per copy of the base photos (new identities)
TARGETS = {"first_step_warm_s": 90.0, "first_step_cold_s": 300.0, "peak_rss_gb": 3.0, "rss_growth": 0.20,
           "loader_2w_speedup": 1.7, "decode_speedup": 2.0}


# ------------------------------------------------------------------------------------------ layout


def base_photos(out: Path, pairs: int) -> Path:
    """A synthetic benchmark whose photos have DeepFashion2 sizes (700-1,000 px long side)."""
    from capret_utils.data import synth

    cfg = synth.SynthConfig(seed=0, train_pairs=pairs, val_pairs=2, test_pairs=2, image_size=(700, 1000))
    return synth.ensure_benchmark(out / "base", cfg, workers=1, progress=True)


def build_layout(base: Path, dest: Path, splits: dict[str, int]) -> Path:
    """``dest/<split>/{image,annos}`` with ``splits[split]`` images hard-linked from ``base/train``; copy c of a
    base photo has ``pair_id + c * PAIR_STRIDE`` (and a split-specific offset)."""
    from tqdm.auto import tqdm

    src = base / "train"
    stems = sorted(p.stem for p in (src / "annos").iterdir())
    annos = {s: json.loads((src / "annos" / f"{s}.json").read_text()) for s in stems}
    for k, (split, count) in enumerate(splits.items()):
        folder = dest / split
        if (folder / ".complete").is_file() and int((folder / ".complete").read_text()) == count:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "image").mkdir(parents=True)
        (folder / "annos").mkdir()
        for i in tqdm(range(count), desc=f"layout {split}", unit="img", mininterval=2):
            stem, copy = stems[i % len(stems)], i // len(stems)
            new = f"{i + 1:06d}"
            os.link(src / "image" / f"{stem}.jpg", folder / "image" / f"{new}.jpg")
            data = dict(annos[stem])
            data["pair_id"] = int(data["pair_id"]) + (copy + 1) * PAIR_STRIDE + k * 100 * PAIR_STRIDE
            (folder / "annos" / f"{new}.json").write_text(json.dumps(data))
        (folder / ".complete").write_text(str(count))
    return dest


# ------------------------------------------------------------------------------------------ probes (subprocesses)


class PeakMemory:
    """Polls the PSS of this process and its children (shared pages counted once) every ``every`` seconds."""

    def __init__(self, every: float = 0.25) -> None:
        import psutil

        self.proc, self.every, self.peak, self._stop = psutil.Process(), every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except Exception:  # a worker that just exited
                pass
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self.thread.join()
        return self.peak


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB


def probe_train(a: argparse.Namespace) -> dict:
    """Process start -> warm index -> prepare (tiny model, real input size) -> ``steps`` optimizer steps."""
    import torch

    from capret_utils import train
    from capret_utils.data.index import load_index

    mem = PeakMemory()
    items = load_index(Path(a.root) / "train")
    t_index = time.perf_counter() - START
    cfg = train.TrainConfig(model="tiny", image_res=a.image_res, use_captions="template", max_steps=a.steps,
                            batch_size=a.batch_size, num_workers=a.workers, eval_every=0, ckpt_every=10**6, log_every=1, progress=False,
                            device="cpu", threads=1, cache_mb=a.cache_mb)
    torch.set_num_threads(1)
    setup = train.prepare(cfg, items)
    t_prepared = time.perf_counter() - START
    after_prepare = {"rss_gb": rss_gb(), "tree_pss_gb": mem.sample() / 2**30}
    first: dict = {}

    def on_row(row):
        if row["kind"] == "train" and not first:
            first["s"] = time.perf_counter() - START

    run = Path(a.run_dir)
    result = train.finetune(setup, run, callback=on_row)
    peak = mem.stop()
    return {"images": int(items["image_id"].nunique()), "items": len(items), "identities": len(setup.classes),
            "index_s": round(t_index, 2), "prepared_s": round(t_prepared, 2),
            "first_step_s": round(first.get("s", float("nan")), 2), "steps": result.steps,
            "after_prepare": {k: round(v, 3) for k, v in after_prepare.items()},
            "after_steps": {"rss_gb": round(rss_gb(), 3), "tree_pss_peak_gb": round(peak / 2**30, 3)},
            "s_per_step": round(result.train_seconds / max(1, result.steps), 3)}


def probe_loader(a: argparse.Namespace) -> dict:
    """Training batches per second of the loader alone (no model) at ``workers``."""
    from capret_utils import train
    from capret_utils.data import loader as D
    from capret_utils.data.index import load_index

    items = load_index(Path(a.root) / "train")
    cfg = train.TrainConfig(model="tiny", image_res=a.image_res, use_captions="none", num_workers=a.workers,
                            batch_size=a.batch_size, progress=False, device="cpu", cache_mb=0)
    setup = train.prepare(cfg, items)
    sampler = D.PKBatchSampler(setup.labels, setup.data_config.identities_per_batch, cfg.per_identity, seed=0)
    loader = D.build_loader(setup.dataset, D.Collator(setup.bundle.tokenizer, box_source=setup.dataset),
                            a.workers, batch_sampler=sampler)
    it = iter(loader)
    for _ in range(max(1, a.workers)):  # warm-up: workers started, first batches in flight
        next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(a.batches):
        n += len(next(it)["keys"])
    dt = time.perf_counter() - t0
    return {"workers": a.workers, "items": n, "items_per_s": round(n / dt, 1)}


def run_probe(kind: str, root: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--probe", kind, "--root", str(root), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"probe {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ in-process measures


def decode_timing(base: Path, side: int, n: int, repeats: int = 3) -> dict:
    """ms per item for the views of the base photos at ``side``: full decode vs reduced (DCT-scaled) decode, for
    GT-box crops (all of them, and the ones whose region allows a reduction) and for whole photos (the box task's
    view). Each item's time is the minimum over ``repeats`` runs (the machine is shared)."""
    from capret_utils.data import decode as DEC
    from capret_utils.data.index import load_index

    items = load_index(base / "train").head(n)
    cols = DEC.ItemColumns(items)
    rows = [cols.row(i) for i in range(len(cols))]

    def per_item(view: str, draft: bool) -> np.ndarray:
        store = DEC.ImageStore(side, draft=draft)
        out = np.full(len(rows), np.inf)
        for _ in range(repeats):
            for i, r in enumerate(rows):
                t0 = time.perf_counter()
                store.view(r, view, 0.05)
                out[i] = min(out[i], time.perf_counter() - t0)
        return out * 1000

    reducible = np.array([DEC._request(r["width"], r["height"], max(b[2] - b[0], b[3] - b[1]), side) is not None
                          for r in rows for b in [DEC.crop_box(r, 0.05, r["width"], r["height"])]])
    result: dict = {"side": side, "items": len(rows), "crop_reducible_share": round(float(reducible.mean()), 3)}
    for view in ("crop", "image"):
        full, reduced = per_item(view, False), per_item(view, True)
        entry = {"full_ms": round(float(full.mean()), 2), "reduced_ms": round(float(reduced.mean()), 2),
                 "speedup": round(float(full.mean() / reduced.mean()), 2)}
        if view == "crop" and reducible.any():
            entry["reducible_items"] = {"full_ms": round(float(full[reducible].mean()), 2),
                                        "reduced_ms": round(float(reduced[reducible].mean()), 2),
                                        "speedup": round(float(full[reducible].mean() / reduced[reducible].mean()),
                                                         2)}
        result[view] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/capret-scale", help="folder for the base photos and the layouts")
    p.add_argument("--sizes", default="19200,192000", help="train image counts to probe (comma list)")
    p.add_argument("--val-images", type=int, default=0, help="also build a validation split of this many images")
    p.add_argument("--base-pairs", type=int, default=50, help="pairs of the rendered base benchmark (~7 photos each)")
    p.add_argument("--image-res", type=int, default=384)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16,
                   help="items per step (small: on CPU the activations are host memory; on a GPU they are not)")
    p.add_argument("--workers", type=int, default=2, help="loader workers of the training probe")
    p.add_argument("--cache-mb", type=float, default=512.0)
    p.add_argument("--batches", type=int, default=12, help="batches timed per loader probe")
    p.add_argument("--keep", action="store_true", help="keep the layouts (default: delete the big ones at the end)")
    p.add_argument("--only", choices=("decode", "loader"), help="only this measurement (on an existing layout)")
    p.add_argument("--probe", choices=("train", "loader"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe:
        if a.probe == "train":
            a.run_dir = a.run_dir or str(Path(a.root) / "run")
            shutil.rmtree(a.run_dir, ignore_errors=True)
            print(json.dumps(probe_train(a)))
        else:
            print(json.dumps(probe_loader(a)))
        return 0

    from capret_utils.data.index import load_index

    out = Path(a.out)
    base = base_photos(out, a.base_pairs)
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    if a.only == "decode":
        print(json.dumps({"decode": [decode_timing(base, side, 200) for side in (a.image_res, 2 * a.image_res)]},
                         indent=2))
        return 0
    if a.only == "loader":
        root = build_layout(base, out / f"df2-{max(sizes)}", {"train": max(sizes)})
        os.environ["CAPRET_CACHE"] = str(out)
        rates = [run_probe("loader", root, ["--image-res", str(a.image_res), "--workers", str(w), "--batches",
                                            str(a.batches), "--batch-size", str(a.batch_size)]) for w in (0, 1, 2)]
        by = {r["workers"]: r["items_per_s"] for r in rates}
        print(json.dumps({"loader": rates, "loader_2w_speedup": round(by[2] / by[0], 2)}, indent=2))
        return 0
    report: dict = {"machine": {"cpus": os.cpu_count(), "image_res": a.image_res},
                    "base_photos": sum(1 for _ in (base / "train" / "image").iterdir()), "sizes": {}}
    for n in sizes:
        splits = {"train": n, **({"validation": a.val_images} if a.val_images else {})}
        root = build_layout(base, out / f"df2-{n}", splits)
        cache = out / "index-cache"
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        items = load_index(root / "train", cache_dir=cache)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_index(root / "train", cache_dir=cache)
        warm = time.perf_counter() - t0
        os.environ["CAPRET_CACHE"] = str(out)  # probes read the same (now warm) index: <out>/index
        shutil.rmtree(out / "index", ignore_errors=True)
        shutil.move(str(cache), str(out / "index"))
        entry = {"items": len(items), "index_cold_s": round(cold, 2), "index_warm_s": round(warm, 2),
                 "train": run_probe("train", root, ["--image-res", str(a.image_res), "--steps", str(a.steps),
                                                    "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--cache-mb", str(a.cache_mb)])}
        entry["first_step_cold_s"] = round(entry["train"]["first_step_s"] - entry["train"]["index_s"] + cold, 2)
        if n == max(sizes):
            entry["loader"] = [run_probe("loader", root, ["--image-res", str(a.image_res), "--workers", str(w),
                                                          "--batches", str(a.batches), "--batch-size",
                                                          str(a.batch_size)]) for w in (0, 1, 2)]
        report["sizes"][n] = entry
        print(json.dumps({n: entry}), file=sys.stderr)
    report["decode"] = [decode_timing(base, side, 200) for side in (a.image_res, 2 * a.image_res)]
    big, small = report["sizes"][max(sizes)], report["sizes"][min(sizes)]
    peak = max(big["train"]["after_steps"]["rss_gb"], big["train"]["after_steps"]["tree_pss_peak_gb"])
    checks = {"first_step_warm_s": big["train"]["first_step_s"] <= TARGETS["first_step_warm_s"],
              "first_step_cold_s": big["first_step_cold_s"] <= TARGETS["first_step_cold_s"],
              "peak_rss_gb": peak <= TARGETS["peak_rss_gb"],
              "decode_speedup": report["decode"][0]["image"]["speedup"] >= TARGETS["decode_speedup"]}
    if len(sizes) > 1:
        growth = big["train"]["after_steps"]["tree_pss_peak_gb"] / small["train"]["after_steps"]["tree_pss_peak_gb"]
        report["rss_growth"] = round(growth - 1, 3)
        checks["rss_growth"] = growth - 1 < TARGETS["rss_growth"]
    if "loader" in big:
        rates = {r["workers"]: r["items_per_s"] for r in big["loader"]}
        report["loader_2w_speedup"] = round(rates[2] / rates[0], 2)
        checks["loader_2w_speedup"] = rates[2] / rates[0] >= TARGETS["loader_2w_speedup"]
    report["targets"], report["met"] = TARGETS, checks
    if not a.keep:
        for n in sizes:
            shutil.rmtree(out / f"df2-{n}", ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
