"""The pixel answerer (X2-VLM VQA trained on the train split): training time, answer accuracy per topic on the
test split's user crops, answering throughput, and a GPU-cost estimate per 1,000 items. Prints JSON.

Trains :func:`capret_utils.captions.pixel.load_or_train` into a fresh temporary cache (``--cache DIR`` re-uses
one), then scores :func:`capret_utils.captions.answer_accuracy` on the user items of ``--split`` against its
``attributes.jsonl``. Targets (issue 27): category >= 0.85, colour >= 0.75; reported whether met or not.

``training_cpu_seconds`` is the process's CPU time (both threads): on a shared, loaded machine it, not the wall
time, says what training costs. The GPU estimate is derived, not measured (no GPU here): the forward matmul FLOPs of answering one item (every
scripted question; ``rank_answer`` with ``k_test`` 128), counted analytically for the official VQA architecture
(X2-VLM base, 768 px, 6 decoder layers; :func:`flops_per_item`), divided by an assumed sustained throughput (``--gpu-tflops``, default 200 bf16 TFLOP/s: about 20 % of an
H100/H200's dense peak, typical for batched ViT inference).

    python benchmarks/bench_vqa.py                         # demo benchmark, default training (400 steps, every question per crop)
    python benchmarks/bench_vqa.py --steps 100 --max-items 100 --no-flops
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from capret_utils.captions import (  # noqa: E402
    PixelAnswerer,
    PixelVQAConfig,
    PriorAnswerer,
    answer_accuracy,
    load_attributes,
    load_or_train,
    load_split_items,
    select_items,
)
from capret_utils.captions.pixel import dialogue_questions, vqa_triples  # noqa: E402
from capret_utils.captions.views import ItemView  # noqa: E402
from capret_utils.runs import paths  # noqa: E402

TARGETS = {"category": 0.85, "colour": 0.75}


def _layer(n: int, d: int, f: int, m: int = 0, kv_in: int = 0) -> float:
    """Matmul FLOPs (2 per multiply-add) of one transformer layer over n tokens: q/k/v/o projections, attention
    scores and values, FFN; with ``m`` > 0 also cross-attention to m states of width ``kv_in``."""
    flops = 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * f
    if m:
        flops += 2 * n * 2 * d * d + 2 * m * 2 * kv_in * d + 2 * 2 * n * m * d
    return flops


def flops_per_item(n_answers: int, answer_len: int = 4, question_len: int = 12, k: int = 128) -> dict:
    """Forward matmul FLOPs of answering one item (every scripted question) with the official VQA architecture
    (x2vlm.md §7: base, 768 px, 12 text + 6 fusion layers, 6 decoder layers, vocab 30,522; LM head on every
    decoder token). Analytic count; layer norms, softmax and embeddings are ignored (< 1 %)."""
    d, f, vocab, n_q = 768, 3072, 30522, len(dialogue_questions())
    n_img = (768 // 16) ** 2 + 1
    lm_head = 2 * d * d + 2 * d * vocab  # transform dense + vocabulary projection, per token
    counts = {"vision": 12 * _layer(n_img, d, f)}
    counts["question"] = n_q * (12 * _layer(question_len, d, f) + 6 * _layer(question_len, d, f, n_img, d))
    first = n_q * (6 * _layer(1, d, f, question_len, d) + lm_head)
    shortlist = n_q * min(k, n_answers) * (6 * _layer(answer_len, d, f, question_len, d) + answer_len * lm_head)
    counts["rank_answer"] = first + shortlist
    counts["total"] = sum(counts.values())
    return counts


class BlankImages:
    """Wraps an answerer: every crop replaced by a uniform grey one of the same size (the image-ablation check:
    accuracy at the class prior means the answers come from the pixels, not from the question alone)."""

    needs_images = True

    def __init__(self, answerer) -> None:
        self.inner, self.answer_list = answerer, answerer.answer_list
        self.composed_topics = getattr(answerer, "composed_topics", set())

    def answer(self, views, questions, histories=None):
        from PIL import Image

        blank = [ItemView(v.key, v.row, Image.new("RGB", v.image.size, (124, 116, 104))) for v in views]
        return self.inner.answer(blank, questions, histories)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="", help="DeepFashion2-format root with attributes.jsonl (default: synthetic)")
    ap.add_argument("--split", default="test", help="split whose user crops are scored")
    ap.add_argument("--steps", type=int, default=PixelVQAConfig.steps, help="training steps")
    ap.add_argument("--batch-size", type=int, default=PixelVQAConfig.batch_size, help="crops per training step")
    ap.add_argument("--questions-per-crop", type=int, default=PixelVQAConfig.questions_per_crop,
                    help="questions per crop and step (0: all trained questions)")
    ap.add_argument("--lr", type=float, default=PixelVQAConfig.lr, help="AdamW peak learning rate")
    ap.add_argument("--init", default="", help="notebook-03 checkpoint folder to start from (default: random init)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (training and answering); 0: torch's default")
    ap.add_argument("--max-items", type=int, default=0, help="score at most this many user items (0: all)")
    ap.add_argument("--cache", default="", help="answerer cache folder (default: a fresh temporary one)")
    ap.add_argument("--answers", type=int, default=3129, help="candidate answers for the GPU estimate (VQAv2: 3129)")
    ap.add_argument("--gpu-tflops", type=float, default=200.0, help="assumed sustained GPU TFLOP/s for the estimate")
    ap.add_argument("--no-flops", action="store_true", help="skip the FLOP count / GPU estimate")
    ap.add_argument("--blank-check", action="store_true",
                    help="also score the answerer on uniform grey crops (does it use the image?)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = paths.data_root(args.data_root or None)
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="bench-vqa-"))
    config = PixelVQAConfig(steps=args.steps, threads=args.threads, batch_size=args.batch_size,
                            questions_per_crop=args.questions_per_crop, lr=args.lr, init=args.init)
    started, cpu = time.perf_counter(), time.process_time()
    folder = load_or_train(root, cache, config, progress=False)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    answerer = PixelAnswerer(folder)
    items = load_split_items(root, args.split)
    items = select_items(items[items["source"] == "user"].reset_index(drop=True), args.max_items)
    started = time.perf_counter()
    quality = answer_accuracy(answerer, items, load_attributes(root / args.split))
    eval_s = time.perf_counter() - started
    acc = quality.accuracy()
    attributes = load_attributes(root / args.split)
    train_triples, _ = vqa_triples(load_split_items(root, "train"), load_attributes(root / "train"))
    prior = answer_accuracy(PriorAnswerer(train_triples), items, attributes).accuracy()
    blank = answer_accuracy(BlankImages(answerer), items, attributes).accuracy() if args.blank_check else None
    out = {
        "data_root": str(root), "split": args.split, "threads": torch.get_num_threads(), "answerer": str(folder),
        "training": {k: v for k, v in answerer.record.items() if k not in ("questions",)},
        "training_seconds_wall": wall, "training_cpu_seconds": cpu,
        "load_average_1min": os.getloadavg()[0],
        "answer_accuracy": acc,
        "prior_accuracy": prior,  # most frequent train answer per topic, image ignored
        **({"blank_image_accuracy": blank} if blank is not None else {}),
        "n": {t: int(n) for t, n in quality.by_topic["n"].items()},
        "truth_outside_list": {t: int(n) for t, n in quality.by_topic["truth_outside_list"].items()},
        "skipped": quality.skipped,
        "targets": {t: {"target": v, "accuracy": acc.get(t), "prior": prior.get(t), "met": acc.get(t, 0.0) >= v}
                    for t, v in TARGETS.items()},
        "user_items": len(items), "eval_seconds": eval_s, "items_per_s_cpu": len(items) / max(eval_s, 1e-9),
        "colour_confusion": quality.confusion("colour").to_dict(),
    }
    if not args.no_flops:
        flops = flops_per_item(args.answers)
        seconds = 1000 * flops["total"] / (args.gpu_tflops * 1e12)
        out["gpu_estimate"] = {"architecture": "X2-VLM base VQA, 768 px, 6 decoder layers, k_test 128",
                               "answers": args.answers, "questions_per_item": len(dialogue_questions()),
                               "flops_per_item": flops, "assumed_tflops": args.gpu_tflops,
                               "gpu_seconds_per_1000_items": seconds, "measured": False}
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
