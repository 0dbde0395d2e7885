"""A clean exit on SIGTERM for the chain runners (``runs.demo``, ``runs.seeds``, ``runs.sweep``).

papermill starts each notebook's kernel in its own session, so a plain SIGTERM to the runner leaves the kernel — and
the DataLoader workers it forked — running as orphans. :func:`exit_cleanly_on_sigterm` installs a handler that ends
every descendant process (SIGTERM, then SIGKILL after a grace period) and exits with ``128 + signal``; the step that
was running is recorded as failed (``sweep.run_notebook``), finished steps keep their results, and ``--resume``
re-runs only what did not finish.
"""

from __future__ import annotations

import signal
from typing import Any

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
