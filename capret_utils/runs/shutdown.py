"""A clean exit on SIGTERM for the chain runners (``runs.demo``, ``runs.seeds``, ``runs.sweep``).

papermill starts each notebook's kernel in its own session, so a plain SIGTERM to the runner leaves the kernel — and
the DataLoader workers it forked — running as orphans. :func:`exit_cleanly_on_sigterm` installs a handler that ends
every descendant process (SIGTERM, then SIGKILL after a grace period) and exits with ``128 + signal``; the step that
was running is recorded as failed (``sweep.run_notebook``), finished steps keep their results, and ``--resume``
re-runs only what did not finish.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import psutil

GRACE_S = 10.0  # seconds a descendant gets to exit after SIGTERM before SIGKILL


def terminate_descendants(grace_s: float = GRACE_S) -> int:
    """SIGTERM every descendant of this process (kernels, their workers, servers), SIGKILL those still alive after
    ``grace_s``; returns how many there were."""
    return _terminate(psutil.Process().children(recursive=True), grace_s)


def terminate_tree(pid: int, grace_s: float = GRACE_S) -> int:
    """SIGTERM process ``pid`` and every descendant of it (e.g. ``torchrun`` and its ranks, with their loader
    workers), SIGKILL those still alive after ``grace_s``; returns how many were alive."""
    try:
        root = psutil.Process(pid)
        return _terminate(root.children(recursive=True) + [root], grace_s)
    except psutil.NoSuchProcess:
        return 0


def run_child(cmd: list[str], cwd: str | os.PathLike, env: Mapping[str, str], quiet: bool = False,
              ) -> tuple[int, str]:
    """Run ``cmd`` (e.g. torchrun) with its output streamed (``quiet``: kept only); returns the exit code and the
    last 40 output lines. No process outlives the call: an exception or ``KeyboardInterrupt`` here (an
    interrupted notebook cell) ends the child and its descendants (:func:`terminate_tree`), and on Linux the child
    gets SIGTERM when this process dies, even by SIGKILL (``PR_SET_PDEATHSIG``, kept across the exec; torchrun then
    stops its ranks)."""
    wrapped = [sys.executable, "-c", _EXEC_WITH_PARENT_DEATH_SIGNAL, str(os.getpid()), *cmd] \
        if sys.platform == "linux" else list(cmd)
    proc = subprocess.Popen(wrapped, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            if not quiet:
                print(line, end="")
        proc.wait()
    finally:
        if proc.poll() is None:
            terminate_tree(proc.pid)
        proc.stdout.close()
    return proc.returncode, "".join(tail)


def torchrun(module: str, params: Mapping[str, Any], run_dir: str | os.PathLike, nproc: int, params_file: str,
             quiet: bool = False) -> None:
    """Write ``params`` to ``<run_dir>/<params_file>`` and run ``python -m torch.distributed.run --standalone
    --nproc_per_node N -m <module> --params FILE --run-dir DIR`` from the repository (on its ``PYTHONPATH``) through
    :func:`run_child`; a failed run raises ``RuntimeError`` with the command and the last output lines. What
    ``train.cli.launch`` and ``captions.cli.launch`` share."""
    import yaml

    from capret_utils.common import jsonable, repo_root

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / params_file
    path.write_text(yaml.safe_dump(jsonable(dict(params)), sort_keys=False))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}",
           "-m", module, "--params", str(path), "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root()), os.environ.get("PYTHONPATH")]))}
    code, tail = run_child(cmd, repo_root(), env, quiet)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {code}):\n{tail}")


_EXEC_WITH_PARENT_DEATH_SIGNAL = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "  # 1 = PR_SET_PDEATHSIG
    "os.getppid() != int(sys.argv[1]) and sys.exit(143); os.execv(sys.argv[2], sys.argv[2:])")


def _terminate(children: list[psutil.Process], grace_s: float) -> int:
    # listed before any exits, so grandchildren stay known
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(children)


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second SIGTERM during the clean-up does not interrupt it
    n = terminate_descendants()
    print(f"[capret] signal {signum}: stopped {n} child process(es); finished steps are kept, --resume continues",
          flush=True)
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """Install the SIGTERM handler (call once, from a CLI's ``main``)."""
    signal.signal(signal.SIGTERM, _on_sigterm)
