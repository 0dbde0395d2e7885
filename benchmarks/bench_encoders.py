"""Peer-encoder embedding throughput: items/s per encoder (same crops, same batch, same machine), preprocessing
included (each model's own processor on PIL crops) and separately the model forward alone.

Default: the tiny random encoders of every family (``tiny-clip``, ``tiny-siglip``, ``tiny-siglip2``,
``tiny-dinov2``) and the tiny X2-VLM through its adapter; ``--encoders`` takes hub ids or folders too (a GPU user
measuring the real models: ``--encoders patrickjohncyh/fashion-clip,google/siglip-base-patch16-224,...
--device cuda``). Prints one JSON object. Example::

    python benchmarks/bench_encoders.py --batch-size 32 --items 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from capret_utils import encoders  # noqa: E402

DEFAULT = "tiny-clip,tiny-siglip,tiny-siglip2,tiny-dinov2,x2vlm-tiny"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", default=DEFAULT, help="comma list: tiny-*, hub ids, folders, x2vlm-tiny")
    p.add_argument("--items", type=int, default=128, help="crops embedded per measurement")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--model-dir", default="", help="where tiny encoders are built (default: a temporary folder)")
    return p.parse_args(argv)


def crops(n: int, seed: int = 0) -> list[Image.Image]:
    """Item-crop-like PIL images of varied size and aspect (what ImageStore hands an encoder)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(48, 160)), int(rng.integers(48, 160))
        out.append(Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")))
    return out


def load(spec: str, device: str, model_dir: str) -> encoders.Encoder:
    if spec == "x2vlm-tiny":
        from capret_utils.evaluation import analysis

        return encoders.X2VLMEncoder(analysis.fresh_bundle("tiny", 0, [], device=device), name=spec,
                                     weights="random-init")
    return encoders.load_encoder(spec, device=device, model_dir=model_dir)


def median_seconds(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = crops(args.items)
    model_dir = args.model_dir or tempfile.mkdtemp(prefix="capret-bench-encoders-")
    rows = {}
    for spec in encoders.parse_encoders(args.encoders):
        enc = load(spec, args.device, model_dir)
        total = median_seconds(lambda: enc.encode_images(images, batch_size=args.batch_size), args.repeats,
                               args.device)
        batches = [enc.preprocess(images[i:i + args.batch_size]) for i in range(0, len(images), args.batch_size)]

        @torch.no_grad()
        def forward():
            for b in batches:
                with enc.autocast():
                    enc.image_features(b)

        model_only = median_seconds(forward, args.repeats, args.device)
        rows[spec] = {**enc.describe(), "items_per_s": round(len(images) / total, 1),
                      "model_items_per_s": round(len(images) / model_only, 1),
                      "preprocess_share": round(max(0.0, 1 - model_only / total), 3)}
    result = {"benchmark": "encoders", "items": args.items, "batch_size": args.batch_size, "device": args.device,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "encoders": rows}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
