"""runs.shutdown: SIGTERM to a chain runner ends its whole process tree (kernels start their own session)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from capret_utils.runs import sweep

RUNNER = textwrap.dedent("""
    import subprocess, sys, time
    from capret_utils.runs import shutdown
    shutdown.exit_cleanly_on_sigterm()
    # like papermill's kernel: its own session (a process-group kill of the runner misses it), with a child of its own
    kernel = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "time.sleep(600)"], start_new_session=True)
    print(kernel.pid, flush=True)
    time.sleep(600)
""")


def test_sigterm_ends_every_descendant_and_exits_143(tmp_path: Path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    kernel_pid = int(proc.stdout.readline())
    deadline = time.time() + 20
    while len(psutil.Process(proc.pid).children(recursive=True)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) == 2 and kernel_pid in {p.pid for p in tree}
    assert os.getsid(kernel_pid) != os.getsid(proc.pid)  # a session of its own, as papermill's kernels
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, f"orphans left: {[p.pid for p in alive]}"


def test_an_interrupted_step_is_recorded_as_failed_and_the_interrupt_propagates(tmp_path: Path, monkeypatch):
    import papermill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    nb = Path(__file__).resolve().parents[1] / "notebooks" / "01_explore.ipynb"
    with pytest.raises(KeyboardInterrupt):
        sweep.run_notebook(nb, tmp_path / "run", {"smoke": True})
    status = sweep.read_status(tmp_path / "run")
    assert status["status"] == "failed" and status["error"] == "interrupted"
    assert not sweep.is_finished(tmp_path / "run")  # --resume runs it again
