"""Notebooks 03 and 02 with ``nproc`` = 2 (torchrun: gloo training ranks, caption shards) in smoke mode through
papermill, and that :func:`capret_utils.train.cli.launch` (:func:`capret_utils.runs.shutdown.run_child`) leaves no
process behind when the launching process is interrupted or killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from capret_utils.common import repo_root
from capret_utils.runs import demo, sweep
from capret_utils.train import CHECKPOINT_DIR, INFO_FILE

pytestmark = [pytest.mark.notebook, pytest.mark.slow]


def _processes_naming(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes that mention ``text`` (a run folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(p.info["cmdline"] or []):
                found.append(" ".join(p.info["cmdline"]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _gone(text: str, timeout: float = 30.0) -> list[str]:
    deadline = time.time() + timeout
    while (left := _processes_naming(text)) and time.time() < deadline:
        time.sleep(0.2)
    return left


def test_notebook_03_trains_on_two_processes_in_smoke_mode(tmp_path):
    run_dir = tmp_path / "03_finetune_nproc2"
    step = next(s for s in demo.STEPS if s.name == "03_finetune")
    status = sweep.run_notebook(step.notebook, run_dir, {"smoke": True, "nproc": 2, "resume": False})
    assert status["status"] == "ok", (status.get("error_type"), status.get("error"), status.get("traceback"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] > 0
    for role in ("select", "test"):
        assert {"top1", "mAP"} <= set(metrics[role]["finetuned"])
    info = json.loads((run_dir / CHECKPOINT_DIR / INFO_FILE).read_text())
    assert info["world_size"] == 2 and info["steps"] == metrics["steps"]
    assert (run_dir / "launch_params.yaml").is_file()  # the torchrun path, not the in-kernel loop
    assert not _gone(str(run_dir)), "torchrun or a rank outlived the notebook"


def test_notebook_02_captions_on_two_processes_in_smoke_mode(tmp_path):
    run_dir = tmp_path / "02_captions_nproc2"
    step = next(s for s in demo.STEPS if s.name == "02_captions_oracle")  # notebook 02
    status = sweep.run_notebook(step.notebook, run_dir, {"smoke": True, "nproc": 2, "captioner": "dialogue",
                                                         "max_items": 24, "batch_size": 4, "num_workers": 0})
    assert status["status"] == "ok", (status.get("error_type"), status.get("error"), status.get("traceback"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["captions"] == 24 and metrics["run"]["new"] == 24
    per_rank = [json.loads((run_dir / f"caption_stats.rank{r}.json").read_text()) for r in range(2)]
    assert [r["new"] for r in per_rank] == [12, 12]
    keys = [[json.loads(line)["key"] for line in (run_dir / f"captions.rank{r}.jsonl").read_text().splitlines()]
            for r in range(2)]
    assert len(keys[0]) == len(keys[1]) == 12 and not set(keys[0]) & set(keys[1])  # each item once, split evenly
    assert not _gone(str(run_dir)), "torchrun or a rank outlived the notebook"


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["interrupt", "kill-9"])
def test_launch_leaves_no_process_behind_when_its_caller_stops(tmp_path, how):
    """SIGINT (an interrupted notebook cell: KeyboardInterrupt in ``launch``) or SIGKILL (a killed kernel:
    torchrun's parent-death signal) of the launching process while the 2 ranks train."""
    run_dir = tmp_path / "run"
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(f"""
        from capret_utils import train
        from capret_utils.train import cli
        cfg = train.smoke_config(train.resolve_params({{"max_steps": 400, "eval_every": 0, "progress": False}}, "").config)
        cli.launch(cli.launch_params(cfg, smoke=True), {str(run_dir)!r}, nproc=2, quiet=True)
    """))
    caller = subprocess.Popen([sys.executable, str(script)], cwd=repo_root(),
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 180
        while len(_processes_naming(str(run_dir))) < 3:  # torchrun and both ranks are up
            assert caller.poll() is None and time.time() < deadline, "the ranks did not start"
            time.sleep(0.2)
        time.sleep(2.0)
        caller.send_signal(how)
        caller.wait(timeout=60)
    finally:
        if caller.poll() is None:
            caller.kill()
    left = _gone(str(run_dir), timeout=20.0)  # silent ranks (no progress bar): a closed pipe would not end them
    for p in psutil.process_iter(["cmdline"]):  # a failing test does not leave them running either
        if str(run_dir) in " ".join(p.info["cmdline"] or []):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    assert not left, f"left behind after {how.name}: {left}"
