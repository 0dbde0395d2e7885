"""OpenMP wait policy on a shared CPU: torch's default (threads spin while they wait) against ``PASSIVE`` (they
sleep), with the machine otherwise idle and beside one busy core that this benchmark starts itself; prints JSON.

Each case runs in a fresh process (the policy is read when torch loads libgomp) with torch's default thread count:
a linear-layer loop (64 × 256 → 256, 3,000 calls) and ``--steps`` optimizer steps of the demo fine-tune (notebook
03's defaults on the synthetic benchmark, template captions, its DataLoader worker included; after 3 warm-up steps). ``capret_utils`` sets ``OMP_WAIT_POLICY=PASSIVE``
unless it is already set (and the Makefile exports it); this is the measurement behind that default.

    python benchmarks/bench_threads.py              # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time, tempfile
import torch
steps = int(sys.argv[1])
x = torch.randn(64, 256); lin = torch.nn.Linear(256, 256)
with torch.no_grad():
    for _ in range(200): lin(x)
    t = time.perf_counter()
    for _ in range(3000): lin(x)
linear_s = time.perf_counter() - t
step_s = None
if steps:
    from capret_utils.train import cli
    elapsed = []
    def callback(row):
        if row.get("kind") == "train":
            elapsed.append(row["elapsed_s"])
    # torch is loaded above, so importing capret_utils no longer changes this process's wait policy
    params = {"eval_every": 0, "progress": False, "log_every": 1, "use_captions": "template"}  # loader workers: auto
    with tempfile.TemporaryDirectory() as run_dir:
        cli.run_params(params, run_dir, callback=callback, stop_after=steps + 3)
    step_s = (elapsed[-1] - elapsed[2]) / (len(elapsed) - 3) if len(elapsed) > 3 else None
print(json.dumps({"threads": torch.get_num_threads(), "linear_s": round(linear_s, 3),
                  "train_step_s": None if step_s is None else round(step_s, 3)}))
"""


def run_case(policy: str, steps: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed demo fine-tune steps per case (0 = linear loop only)")
    a = p.parse_args(argv)
    report: dict = {"cores": os.cpu_count(), "load_before": os.getloadavg()[0], "cases": []}
    # load that was there before: the idle case is only idle when this is ~0
    for busy in (False, True):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            time.sleep(1.0 if busy else 0.0)
            for policy in ("default", "PASSIVE"):
                report["cases"].append({"other_busy_cores": int(busy), "policy": policy, **run_case(policy, a.steps)})
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    by = {(c["other_busy_cores"], c["policy"]): c for c in report["cases"]}
    for busy in (0, 1):
        d, q = by[(busy, "default")], by[(busy, "PASSIVE")]
        report[f"passive_speedup_linear_busy{busy}"] = round(d["linear_s"] / q["linear_s"], 2)
        if d["train_step_s"] and q["train_step_s"]:
            report[f"passive_speedup_train_busy{busy}"] = round(d["train_step_s"] / q["train_step_s"], 2)
    report["load_after"] = os.getloadavg()[0]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
