"""How much faster is the batched lockstep dialogue than captioning items one at a time? Prints JSON.

Runs the real ``DialogueCaptioner`` (``ChatLLMQuestioner`` + ``VQAAnswerer``, loaded with ``from_pretrained``
from folders written by ``save_pretrained``) over the same items twice — all items of a batch in lockstep
(``--batch-size``), then one item at a time (batch 1, what ChatCaptioner does) — checks that both give the same
dialogues, and reports items/s, LLM tokens/s and the speed-up. Default workload: ChatCaptioner's settings,
10 rounds, 30 tokens per question, 100 per summary; ``--min-new-tokens`` defaults to the maximum so every call
generates the full length (random weights would otherwise stop at random; real models stop earlier, and a
batch then waits for its longest member). Both runs use the same ``LLMConfig``: cross-round KV-cache reuse of the
shared prompt prefix (``prefix_cache``, on by default; ``--no-prefix-cache`` re-prefills every prompt in full);
``llm_cached_prompt_tokens`` counts the prompt tokens read from the reused cache.

    python benchmarks/bench_captions.py                                   # tiny Phi-3 + tiny BLIP, CPU, batch 32
    python benchmarks/bench_captions.py --vqa blip2 --items 16 --batch-size 16
    # on a GPU: the real Phi-3-mini architecture (3.8 B params) with random weights, bf16 or 4-bit NF4
    python benchmarks/bench_captions.py --llm-config phi3-mini --device cuda [--load-in-4bit] \\
        --model-dir /scratch/capret-bench-models --sequential-items 8

``--llm-config phi3-mini`` writes a random-weight Phi-3-mini checkpoint (7.6 GB in bf16) to ``--model-dir`` once
and loads it back through ``from_pretrained`` (with ``BitsAndBytesConfig`` NF4 when ``--load-in-4bit``). On
GPU, bf16 batching can change low-order bits, so equality of outputs is reported, not asserted
(``--assert-equal`` forces the check); on CPU fp32 it is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from capret_utils import captions as C  # noqa: E402
from capret_utils.runs import paths  # noqa: E402
from capret_utils.captions import tiny as testing  # noqa: E402


def _phi3_mini_checkpoint(model_dir: Path, device: str) -> Path:
    """Random weights in the real Phi-3-mini-4k architecture, saved once (bf16) for from_pretrained."""
    from transformers import Phi3ForCausalLM

    out = model_dir / "phi3-mini-random"
    if (out / "config.json").is_file():
        return out
    tok = testing.tiny_phi3_tokenizer()  # vocab ids fit in Phi-3's 32,064-row embedding
    config = testing.phi3_config("phi3-mini", tok)
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = config.eos_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".phi3-mini-", dir=model_dir))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    os.replace(tmp, out)
    return out


def _run(captioner: C.DialogueCaptioner, rows: list[dict], batch_size: int) -> tuple[list[dict], dict]:
    llm0 = captioner.questioner.stats.copy()
    vqa0 = captioner.answerer.stats.copy()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    records: list[dict] = []
    for start in range(0, len(rows), batch_size):
        records += captioner.caption_batch(rows[start:start + batch_size])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    llm = captioner.questioner.stats.minus(llm0)
    vqa = captioner.answerer.stats.minus(vqa0)
    result = {
        "items": len(rows), "batch_size": batch_size, "seconds": round(seconds, 3),
        "items_per_s": round(len(rows) / seconds, 3),
        "llm_calls": llm.calls, "llm_generated_tokens": llm.generated_tokens, "llm_prompt_tokens": llm.prompt_tokens,
        "llm_cached_prompt_tokens": llm.cached_prompt_tokens,
        "llm_seconds": round(llm.seconds, 3), "llm_tokens_per_s": round(llm.generated_tokens / llm.seconds, 1),
        "vqa_calls": vqa.calls, "vqa_seconds": round(vqa.seconds, 3),
    }
    if torch.cuda.is_available():
        result["cuda_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return records, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=32, help="items captioned batched (default 32)")
    ap.add_argument("--sequential-items", type=int, default=0,
                    help="items captioned one at a time (default: --items); the first ones of the batched set")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--question-tokens", type=int, default=30)
    ap.add_argument("--summary-tokens", type=int, default=100)
    ap.add_argument("--answer-tokens", type=int, default=10)
    ap.add_argument("--min-new-tokens", type=int, default=-1, help="-1: equal to the maximum (fixed lengths)")
    ap.add_argument("--llm-config", choices=("tiny", "phi3-mini"), default="tiny")
    ap.add_argument("--vqa", choices=("blip", "blip2"), default="blip", help="tiny VQA model")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--load-in-4bit", action="store_true", help="LLM in NF4 (double quant, bf16 compute)")
    ap.add_argument("--no-prefix-cache", action="store_true", help="re-prefill every prompt (LLMConfig.prefix_cache)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: best for tiny models)")
    ap.add_argument("--data-root", default="", help="DeepFashion2-format root (default: synthetic smoke benchmark)")
    ap.add_argument("--model-dir", default="", help="where models are built (default: a temp folder)")
    ap.add_argument("--assert-equal", action="store_true", help="fail when batched != sequential (default on CPU)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    root = paths.data_root(args.data_root, smoke=True)
    items = C.load_split_items(root, "all")
    if len(items) < args.items:
        raise SystemExit(f"{root} has {len(items)} items, fewer than --items {args.items}")
    rows = items.to_dict("records")[:args.items]
    n_seq = args.sequential_items or args.items

    with tempfile.TemporaryDirectory(prefix="bench-captions-") as tmp:
        model_dir = Path(args.model_dir or tmp)
        model_dir.mkdir(parents=True, exist_ok=True)
        tiny = testing.build_tiny_models(model_dir / "tiny")
        llm_path = tiny["phi3"] if args.llm_config == "tiny" else _phi3_mini_checkpoint(model_dir, args.device)
        min_new = args.min_new_tokens
        t0 = time.perf_counter()
        questioner = C.ChatLLMQuestioner(str(llm_path), C.LLMConfig(
            device=args.device, load_in_4bit=args.load_in_4bit, max_new_tokens=args.question_tokens,
            summary_max_new_tokens=args.summary_tokens, prefix_cache=not args.no_prefix_cache,
            min_new_tokens=max(args.question_tokens, args.summary_tokens) if min_new < 0 else min_new))
        load_s = time.perf_counter() - t0
        answerer = C.VQAAnswerer(str(tiny[args.vqa]), C.VQAConfig(
            device=args.device, max_new_tokens=args.answer_tokens,
            min_new_tokens=args.answer_tokens if min_new < 0 else min(min_new, args.answer_tokens)))
        captioner = C.DialogueCaptioner(questioner, answerer, C.DialogueConfig(rounds=args.rounds))

        captioner.caption_batch(rows[:2])  # warm-up (allocator, kernels), not timed
        batched, b = _run(captioner, rows, args.batch_size)
        sequential, s = _run(captioner, rows[:n_seq], 1)
        equal = batched[:n_seq] == sequential
        llm_params = sum(p.numel() for p in questioner.model.parameters())

    result = {
        "benchmark": "captions: batched lockstep dialogue vs one item at a time",
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(0),
        "llm": args.llm_config, "llm_params": llm_params, "load_in_4bit": args.load_in_4bit,
        "prefix_cache": not args.no_prefix_cache,
        "llm_load_seconds": round(load_s, 2), "vqa": f"tiny {args.vqa}",
        "rounds": args.rounds, "question_tokens": args.question_tokens, "summary_tokens": args.summary_tokens,
        "answer_tokens": args.answer_tokens, "min_new_tokens": "max" if min_new < 0 else min_new,
        "threads": args.threads, "batched": b, "sequential": s,
        "speedup_items_per_s": round(b["items_per_s"] / s["items_per_s"], 2),
        "target_speedup": 8.0, "outputs_equal": equal,
        "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(), "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    result["meets_target"] = result["speedup_items_per_s"] >= result["target_speedup"]
    print(json.dumps(result, indent=2))
    if (args.assert_equal or not args.device.startswith("cuda")) and not equal:
        print("ERROR: batched and sequential dialogues differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
