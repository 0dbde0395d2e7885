"""Results over several synthetic data seeds: the whole ``make demo`` chain once per data seed, then mean ± sd.

One seed's numbers are one draw of the benchmark; the README quotes this summary instead. For each data seed ``s``
the embedded benchmark is generated with ``SynthConfig.demo(seed=s)`` (seed 0 is the default ``data/synthetic``,
others ``data/synthetic-seed<s>``), notebooks 01-04 run into ``<out>/data-seed<s>/`` (a finished step is skipped,
so a killed run resumes), and :func:`summarise` writes ``<out>/seeds_summary.csv`` (one row per model/variant: mean, sd
and n of test hit@1 and mAP over the seeds, and the text source) and ``<out>/seeds_summary.json`` (not ``summary.csv``: notebook 04 reads every ``runs/*/summary.csv`` as a sweep).

CLI: ``python -m capret_utils.runs.seeds --seeds 0 1 2 --out runs/seeds``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from capret_utils.common import atomic_path, repo_root, write_json
from capret_utils.data import synth
from capret_utils.runs import demo, shutdown

SUMMARY_FILE = "seeds_summary.csv"


def data_root_for(seed: int) -> Path:
    """The embedded benchmark of data seed ``seed`` (generated on first use)."""
    root = repo_root() / "data" / ("synthetic" if seed == 0 else f"synthetic-seed{seed}")
    return synth.ensure_benchmark(root, synth.SynthConfig.demo(seed=seed))


def run_seeds(seeds: Sequence[int], out: str | Path, train_seed: int = 0) -> dict[int, bool]:
    """The demo chain for every data seed (resumable); returns ``{seed: finished}``."""
    out = Path(out)
    done = {}
    for seed in seeds:
        root = data_root_for(seed)
        print(f"[seeds] data seed {seed}: {root}")
        results = demo.run_pipeline(out / f"data-seed{seed}", data_root=str(root), seed=train_seed, resume=True)
        done[seed] = len(results) == len(demo.STEPS) and all(r.get("status") == "ok" for r in results.values())
    return done


def collect(out: str | Path) -> pd.DataFrame:
    """One row per (data seed, variant row) from every finished ``<out>/data-seed*/04_retrieval/variants.csv``,
    plus notebook 03's test metrics as the ``03/crop`` rows."""
    rows = []
    for run in sorted(Path(out).glob("data-seed*")):
        seed = int(run.name.removeprefix("data-seed"))
        table = run / "04_retrieval" / demo.VARIANTS_FILE
        if table.is_file():
            frame = pd.read_csv(table)
            keep = [c for c in ("name", "text_source", "top1", "mAP", "delta_mAP", "p_top1", "official_top1",
                                "official_top20") if c in frame]
            rows += [{"data_seed": seed, **r} for r in frame[keep].to_dict("records")]
        finetune = run / "03_finetune" / "metrics.json"
        if finetune.is_file():
            m = json.loads(finetune.read_text())
            for phase in ("zero_shot", "finetuned"):
                test = m.get("test", {}).get(phase)
                if test:
                    rows.append({"data_seed": seed, "name": f"03 {phase} (test)", "text_source": "none",
                                 "top1": test["top1"], "mAP": test["mAP"]})
    return pd.DataFrame(rows)


def _t_interval(values: pd.Series, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean over data seeds (NaN with fewer than 2 seeds)."""
    from scipy import stats

    v = values.dropna().to_numpy(dtype=float)
    if len(v) < 2:
        return float("nan"), float("nan")
    if np.ptp(v) == 0:  # identical on every seed: no spread to scale
        return float(v[0]), float(v[0])
    lo, hi = stats.t.interval(level, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    return float(lo), float(hi)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Per row name (in first-seen order), over data seeds: mean, sample sd and 95 % Student-t interval of the mean
    of test hit@1 and mAP; mean and sd of the official-protocol top-1 / top-20 (the box-mode rows); mean and sd of
    the paired ΔmAP against the row's baseline (the same model's ``crop``,
    from each seed's variant table) and on how many seeds its exact McNemar test gave p < 0.05."""
    columns = ["name", "text_source", "n_seeds", "seeds", "top1_mean", "top1_sd", "top1_ci_lo", "top1_ci_hi",
               "mAP_mean", "mAP_sd", "mAP_ci_lo", "mAP_ci_hi", "delta_mAP_mean", "delta_mAP_sd", "seeds_p_below_0.05",
               "official_top1_mean", "official_top1_sd", "official_top20_mean", "official_top20_sd"]
    if not len(frame):
        return pd.DataFrame(columns=columns)
    for col in ("delta_mAP", "p_top1", "official_top1", "official_top20"):
        if col not in frame:
            frame = frame.assign(**{col: float("nan")})
    rows = []
    for name, g in frame.groupby("name", sort=False):
        top1_ci, map_ci = _t_interval(g["top1"]), _t_interval(g["mAP"])
        rows.append({"name": name, "text_source": g["text_source"].iloc[0], "n_seeds": g["data_seed"].nunique(),
                     "seeds": " ".join(str(v) for v in sorted(g["data_seed"])),
                     "top1_mean": g["top1"].mean(), "top1_sd": g["top1"].std(ddof=1),
                     "top1_ci_lo": top1_ci[0], "top1_ci_hi": top1_ci[1],
                     "mAP_mean": g["mAP"].mean(), "mAP_sd": g["mAP"].std(ddof=1),
                     "mAP_ci_lo": map_ci[0], "mAP_ci_hi": map_ci[1],
                     "delta_mAP_mean": g["delta_mAP"].mean(), "delta_mAP_sd": g["delta_mAP"].std(ddof=1),
                     "seeds_p_below_0.05": int((g["p_top1"] < 0.05).sum()),
                     "official_top1_mean": g["official_top1"].mean(), "official_top1_sd": g["official_top1"].std(ddof=1),
                     "official_top20_mean": g["official_top20"].mean(),
                     "official_top20_sd": g["official_top20"].std(ddof=1)})
    return pd.DataFrame(rows, columns=columns)


def write_summary(out: str | Path) -> pd.DataFrame:
    """Collect, summarise and write ``seeds_summary.csv`` / ``seeds_summary.json`` into ``out``."""
    out = Path(out)
    summary = summarise(collect(out))
    with atomic_path(out / SUMMARY_FILE) as tmp:
        summary.to_csv(tmp, index=False)
    write_json(out / "seeds_summary.json", {"rows": summary.to_dict("records")})
    return summary


def _pm(mean: float, sd: float) -> str:
    return "—" if pd.isna(mean) else f"{mean:.3f} ± {0.0 if pd.isna(sd) else sd:.3f}"


def markdown_table(summary: pd.DataFrame, model: str = "fine-tuned") -> str:
    """The README's results table: ``model``'s variant rows and its official-protocol box rows (mean ± sd over
    data seeds on test, the 95 % t-interval of the mean hit@1, paired ΔmAP against ``crop``, seeds with McNemar
    p < 0.05), then the zero-shot ``crop`` row. Peer encoders are left out (random-init on the synthetic data)."""
    rows = ["| variant | query text | seeds | hit@1 mean ± sd [95 % CI of the mean] | mAP mean ± sd | "
            "ΔmAP vs `crop` mean ± sd | seeds p < 0.05 |", "|---|---|---|---|---|---|---|"]
    pick = summary[summary["name"].str.startswith(f"{model}/") | (summary["name"] == "zero-shot/crop")]
    for r in pick.to_dict("records"):
        if "@" in r["name"]:  # official protocol (boxes): top-1 / top-20, no item-level metrics
            hit = f"official top-1 {_pm(r['official_top1_mean'], r['official_top1_sd'])}"
            rows.append(f"| `{r['name']}` | {r['text_source']} | {r['n_seeds']} | {hit} | "
                        f"official top-20 {_pm(r['official_top20_mean'], r['official_top20_sd'])} | — | — |")
            continue
        ci = "" if pd.isna(r["top1_ci_lo"]) else f" [{max(r['top1_ci_lo'], 0):.3f}, {min(r['top1_ci_hi'], 1):.3f}]"
        base = r["name"].endswith("/crop") or pd.isna(r["delta_mAP_mean"])
        rows.append(f"| `{r['name']}` | {r['text_source']} | {r['n_seeds']} | {_pm(r['top1_mean'], r['top1_sd'])}{ci} | "
                    f"{_pm(r['mAP_mean'], r['mAP_sd'])} | "
                    f"{'—' if base else _pm(r['delta_mAP_mean'], r['delta_mAP_sd'])} | "
                    f"{'—' if base else r['seeds_p_below_0.05']} |")
        if r["name"] == f"{model}/crop" and not pd.isna(r["official_top1_mean"]):  # the same crops, official protocol
            rows.append(f"| `{model}/crop@gt` | none | {r['n_seeds']} | official top-1 "
                        f"{_pm(r['official_top1_mean'], r['official_top1_sd'])} | official top-20 "
                        f"{_pm(r['official_top20_mean'], r['official_top20_sd'])} | — | — |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    shutdown.exit_cleanly_on_sigterm()  # a killed run takes its notebook kernels with it
    parser = argparse.ArgumentParser(prog="python -m capret_utils.runs.seeds", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="synthetic data seeds")
    parser.add_argument("--out", default=str(repo_root() / "runs" / "seeds"), help="output folder")
    parser.add_argument("--train-seed", type=int, default=0, help="training seed of every run")
    parser.add_argument("--summary-only", action="store_true", help="only re-summarise finished runs")
    args = parser.parse_args(argv)
    started = time.time()
    done = {} if args.summary_only else run_seeds(args.seeds, args.out, args.train_seed)
    summary = write_summary(args.out)
    with pd.option_context("display.width", 200, "display.max_rows", 100):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\n" + markdown_table(summary))
    print(f"[seeds] {'done' if all(done.values()) else 'INCOMPLETE'} in {time.time() - started:.0f} s: {done}")
    return 0 if all(done.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
