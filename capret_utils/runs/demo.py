"""The whole pipeline in one command: notebooks 01 → 04 through papermill, each into its own run folder.

``make demo`` calls ``python -m capret_utils.runs.demo --out runs/demo-quick --budget quick`` (``make demo-full``:
``--out runs/demo``, the documented budget): it runs every notebook in ``notebooks/`` in
order on the embedded default (the synthetic benchmark, generated on first use), chaining outputs, then prints where the outputs and metrics are
and the variant table of the retrieval run. ``--smoke`` runs the same chain in smoke mode (tiny data, tiny
models, a few steps) — this is what the notebook test in CI runs. ``--resume`` skips steps that already
finished (``status.json`` ok and ``metrics.json`` present).

Notebook 02 runs twice. ``02_captions_oracle`` (first) is the ground-truth answerer's dialogue on every split (the
**oracle**, an upper bound); 03 fine-tunes on it (the pixel answerer's train-split answers would be on crops it was
trained on, not test-time quality; and the oracle file is instant). ``02_captions`` (after 03) is the query-side
default: the **pixel** dialogue (``vqa="x2vlm-demo"``: an X2-VLM VQA model started from 03's checkpoint — trained
on the train split only — and fine-tuned on the train split's questions and answers, cached in
``.cache/pixel-vqa`` across runs) on the test split, with its answer accuracy. 04 evaluates the
fine-tuned model on the test split with the pixel captions (``captions_path``) and the oracle ones
(``oracle_captions_path``): image-only, gallery-only, pixel and oracle rows with intervals and paired tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from capret_utils.captions.runner import (
    GROUND_TRUTH_VQA,  # the oracle dialogue's answerer, explicit
)
from capret_utils.common import repo_root
from capret_utils.runs import shutdown, sweep

VARIANTS_FILE = "variants.csv"
PIXEL_VQA = "x2vlm-demo"  # the demo's query-side answerer (captions.pixel), trained on the train split
PIXEL_VQA_STEPS = 400  # its training steps from 03's checkpoint (docs/experiments.md, "The pixel answerer")
BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "full": {},
    "quick": {"03_finetune": {"epochs": 10}, "02_captions": {"vqa_steps": 100}},
}
"""Training budgets of the chain, as parameters added to a step: ``full`` = the documented configuration (notebook
defaults: 30 epochs = 960 steps, a 400-step pixel answerer; ``make demo-full``, ``runs.seeds`` and the README's
results table); ``quick`` = ``make demo``, about 8 minutes on 2 CPU cores: a third of the fine-tuning steps and a
quarter of the answerer's, so lower numbers, same conclusions (docs/experiments.md, "make demo wall time")."""


@dataclass(frozen=True)
class Step:
    """One notebook of the chain and how its parameters derive from the output folder."""

    name: str  # run folder under the demo's output folder (and the notebook, unless `notebook_name` is set)
    params: Callable[[Path], dict[str, Any]]
    notebook_name: str = ""  # notebook file stem when it differs from `name` (a notebook run twice)

    @property
    def notebook(self) -> Path:
        return repo_root() / "notebooks" / f"{self.notebook_name or self.name}.ipynb"


STEPS: tuple[Step, ...] = (
    Step("01_explore", lambda out: {"split": "validation"}),
    Step("02_captions_oracle", lambda out: {"captioner": "dialogue", "vqa": GROUND_TRUTH_VQA},
         notebook_name="02_captions"),
    Step("03_finetune", lambda out: {"captions_path": str(out / "02_captions_oracle" / "captions.jsonl")}),
    Step("02_captions", lambda out: {"captioner": "dialogue", "vqa": PIXEL_VQA, "split": "test",
                                     "vqa_steps": PIXEL_VQA_STEPS, "vqa_init": str(out / "03_finetune" / "checkpoint"),
                                     "vqa_cache": str(repo_root() / ".cache" / "pixel-vqa")}),
    Step("04_retrieval", lambda out: {"checkpoint": str(out / "03_finetune" / "checkpoint"),
                                      "captions_path": str(out / "02_captions" / "captions.jsonl"),
                                      "oracle_captions_path": str(out / "02_captions_oracle" / "captions.jsonl")}),
)
"""The demo chain (see the module docstring for the two runs of notebook 02)."""


def run_pipeline(out: str | Path, smoke: bool = False, data_root: str = "", seed: int = 0,
                 resume: bool = False, steps: tuple[Step, ...] = STEPS, log: Callable[[str], None] = print,
                 budget: str = "full") -> dict[str, dict[str, Any]]:
    """Run the chain into ``out/<notebook name>/``; stop at the first failed step. Returns each step's status.
    ``budget``: a key of :data:`BUDGETS` (smoke mode ignores it: its own few steps)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for step in steps:
        run_dir = out / step.name
        if resume and sweep.is_finished(run_dir):
            log(f"[demo] {step.name}: finished earlier, skipped ({run_dir})")
            results[step.name] = sweep.read_status(run_dir) or {}
            continue
        params = {"data_root": data_root, "seed": seed, "smoke": smoke, **step.params(out),
                  **({} if smoke else BUDGETS[budget].get(step.name, {}))}
        if step.name == "03_finetune":  # a plain run trains from scratch; --resume continues a killed training
            params["resume"] = resume
        log(f"[demo] {step.name}: running into {run_dir} …")
        started = time.time()
        status = sweep.run_notebook(step.notebook, run_dir, params, log_output=False)
        results[step.name] = status
        if status["status"] != "ok":
            log(f"[demo] {step.name} FAILED after {time.time() - started:.0f} s: {status.get('error_type')}: "
                f"{status.get('error')}\n        executed notebook with the error: {run_dir / sweep.NOTEBOOK_FILE}")
            break
        log(f"[demo] {step.name}: ok in {status['duration_s']:.0f} s")
    return results


def report(out: str | Path) -> str:
    """Where the outputs are, the headline metrics, and the retrieval variant table."""
    out = Path(out).resolve()
    lines = [f"Outputs under {out}:"]
    for step in STEPS:
        run_dir = out / step.name
        metrics = run_dir / "metrics.json"
        lines.append(f"  {step.name:<13} {run_dir}  (metrics: {'metrics.json' if metrics.is_file() else 'none'})")
    finetune = out / "03_finetune" / "metrics.json"
    if finetune.is_file():
        m = json.loads(finetune.read_text())
        for role in ("select", "test"):
            for phase in ("zero_shot", "finetuned"):
                if isinstance(m.get(role, {}).get(phase), dict):
                    vals = ", ".join(f"{k} {v:.3f}" for k, v in m[role][phase].items() if isinstance(v, (int, float)))
                    lines.append(f"  03 {role} {phase}: {vals}")
    variants = out / "04_retrieval" / VARIANTS_FILE
    if variants.is_file():
        import pandas as pd

        table = pd.read_csv(variants)
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 100):
            lines.append("\nRetrieval variants (04_retrieval/variants.csv):")
            lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    shutdown.exit_cleanly_on_sigterm()  # a killed run takes its notebook kernels with it
    parser = argparse.ArgumentParser(prog="python -m capret_utils.runs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(repo_root() / "runs" / "demo"), help="output folder")
    parser.add_argument("--smoke", action="store_true", help="tiny data and models (what CI runs)")
    parser.add_argument("--data-root", default="", help="DeepFashion2-format data root (default: synthetic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="skip steps that already finished")
    parser.add_argument("--budget", default="full", choices=sorted(BUDGETS),
                        help="training budget: full (the documented configuration, make demo-full) | quick (make demo, ~8 min)")
    args = parser.parse_args(argv)
    started = time.time()
    if args.budget != "full" and not args.smoke:
        print(f"[demo] budget {args.budget!r}: {BUDGETS[args.budget]} (the README's results use budget 'full')")
    results = run_pipeline(args.out, smoke=args.smoke, data_root=args.data_root, seed=args.seed,
                           resume=args.resume, budget=args.budget)
    print(report(args.out))
    ok = all(r.get("status") == "ok" for r in results.values()) and len(results) == len(STEPS)
    print(f"\n[demo] {'done' if ok else 'FAILED'} in {time.time() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
