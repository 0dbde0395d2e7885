"""torchrun worker for tests/test_distributed.py: one rank of a data-parallel run, slowed down so the test can
SIGKILL a rank mid-run.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_dist_worker.py PARAMS RUN_DIR SLEEP_S

Each rank writes its process id to ``RUN_DIR/pid.rank<r>``; rank 0 sleeps ``SLEEP_S`` after every logged training
step (in the history callback, which does not touch the training state), and the other ranks wait for it at the
next all-reduce.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str]) -> int:
    params, run_dir, sleep = argv[0], Path(argv[1]), float(argv[2])
    import torch

    torch.set_num_threads(1)
    from capret_utils.train import distributed as DI
    from capret_utils.train import cli as launch

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"pid.rank{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))

    def slow(row):
        if row["kind"] == "train" and sleep:
            time.sleep(sleep)

    try:
        launch.run_params(launch.read_params(params), run_dir, callback=slow)
    finally:
        DI.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
