"""Subprocess for tests/test_train.py: fine-tune the tiny preset on the smoke benchmark into RUN_DIR.

    python tests/train_kill_worker.py RUN_DIR [--mode full|lora] [--steps N] [--sleep S]

``--sleep`` pauses after every training step (in the history callback, which does not touch the training
state) so the test can SIGKILL the process mid-run. When training finishes it writes ``RUN_DIR/result.json``
with the final metrics, the step the run resumed from and a SHA-256 of the trained weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--mode", default="full")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from capret_utils.runs import paths
    from capret_utils import train
    from capret_utils.data.splits import load_splits

    root = paths.data_root("", smoke=True)
    cfg = train.TrainConfig(model="tiny", finetune_mode=a.mode, use_captions="template", max_steps=a.steps,
                            batch_size=8, per_identity=2, eval_every=4, ckpt_every=1, device="cpu", threads=1,
                            lr=1e-3, progress=False, seed=3)
    train_items, val_items = load_splits(root)[:2]  # train, select
    setup = train.prepare(cfg, train_items)

    def slow(row):
        if row["kind"] == "train" and a.sleep:
            time.sleep(a.sleep)

    result = train.finetune(setup, a.run_dir, val_items=val_items, callback=slow)
    out = {"metrics": result.metrics, "steps": result.steps, "resumed_from": result.resumed_from,
           "weights": weights_digest(result.bundle.model),
           "eval_steps": [int(s) for s in result.history.loc[result.history["kind"] == "eval", "step"]]}
    with open(os.path.join(a.run_dir, "result.json"), "w") as fh:
        json.dump(out, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
