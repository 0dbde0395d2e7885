"""The FiftyOne App as a session: open it inline in a notebook or as a server (``launch``), and make sure it is
closed when the process ends (``install_shutdown``: exit and SIGTERM hooks, so no App server outlives its kernel or
a ``kill``). :mod:`capret_utils.viz.fo_app` runs this from the command line."""

from __future__ import annotations

import atexit
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from capret_utils.viz.fo import resolve_view

if TYPE_CHECKING:  # fiftyone is imported lazily: importing it costs ~2 s
    import fiftyone as fo


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where FiftyOne renders the App inline and refuses remote sessions)."""
    import fiftyone.core.context as focx

    return focx.is_notebook_context()


def _app_server_processes(port: int) -> list[Any]:
    """This process's descendants that serve the App on ``port`` (FiftyOne's ``main.py --port N``)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "--51-service" not in cmd and "--port" in cmd and str(port) in cmd and \
                any(part.endswith("main.py") for part in cmd):
            found.append(proc)
    return found


def _close_session(session: Any) -> None:
    """Close the session and its App server, the server process first and by pid.

    The web server holds no state of its own (everything is in MongoDB), so it is killed outright: its graceful
    exit takes ~2 s and then hangs ~30 s if the database has gone meanwhile (a kernel killed by Jupyter a few
    seconds into shutdown takes FiftyOne's database service with it). FiftyOne's service wrapper sees its child
    exit and ends, so ``session.close()`` then returns at once.
    """
    import psutil

    try:
        servers = _app_server_processes(int(session.server_port))
        for proc in servers:
            proc.kill()
        psutil.wait_procs(servers, timeout=5)
    except Exception:  # noqa: BLE001 - best effort at exit
        pass
    try:
        session.close()
    except Exception:  # noqa: BLE001
        pass


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def install_shutdown(session: Any, sigterm: bool = True) -> None:
    """Make the App shut down cleanly when the process (script or kernel) exits, and on SIGTERM in a script.

    The exit hook closes the session (stopping the server) while the database is still up. Without it, when this
    process owns FiftyOne's database, exiting lets the database service stop ``mongod`` first, and the orphaned
    server then hangs ~30 s in its own exit hook (a MongoDB server-selection timeout) before it goes. With
    ``sigterm``, SIGTERM becomes ``SystemExit`` so that exit hooks run at all (only from the main thread, and only
    when no other handler is installed).
    """
    atexit.register(_close_session, session)
    if sigterm and threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _show_when_connected(session: Any, timeout_s: float = 60.0) -> None:
    """``session.show()``, retried while the session client is still connecting to a just-started server."""
    deadline = time.time() + timeout_s
    while True:
        try:
            session.show()
            return
        except RuntimeError as exc:
            if "not connected" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(0.5)


def launch(dataset: "fo.Dataset", view: Any = None, port: int = 5151, remote: bool = False,
           address: str | None = None, wait: bool = False) -> Any:
    """Open the FiftyOne App on ``dataset`` (optionally a view or the name of a saved view); returns the Session.

    In a notebook the App renders inline in the cell output; ``remote=True`` raises there (FiftyOne cannot run a
    remote session from a notebook: use ``python -m capret_utils.viz.fo_app serve --dataset NAME --port P`` in a
    terminal and forward the port). In a script the App opens in the browser (``remote=False``) or just serves
    on ``address:port`` (``remote=True``, e.g. ``address="0.0.0.0"`` on a GPU box); ``wait=True`` blocks until
    SIGTERM / Ctrl-C, and the server is shut down cleanly either way (``install_shutdown``).
    """
    import fiftyone as fo

    notebook = in_notebook()
    if remote and notebook:
        raise ValueError("remote=True cannot be used from a notebook (FiftyOne refuses remote sessions there); "
                         "use remote=False to show the App inline, or run `python -m capret_utils.viz.fo_app serve "
                         f"--dataset {dataset.name} --port {port}` in a terminal and forward the port")
    target_view = resolve_view(dataset, view)
    kwargs: dict[str, Any] = {"port": int(port), "remote": bool(remote)}
    if address:
        kwargs["address"] = address
    if target_view is not dataset:
        kwargs["view"] = target_view
    if notebook:
        # FiftyOne 1.22.1 opens the session client before it starts the server; the client's first ping fails and
        # it retries only 10 s later, so auto-showing right away raises "Client is not connected" on a fresh server.
        session = fo.launch_app(dataset, auto=False, **kwargs)
        install_shutdown(session, sigterm=False)  # a kernel keeps its own signal handling
        try:
            _show_when_connected(session)
        except BaseException:
            _close_session(session)
            raise
        session.auto = True
        return session
    session = fo.launch_app(dataset, **kwargs)
    install_shutdown(session)
    if wait:
        try:
            session.wait(-1)
        except KeyboardInterrupt:
            pass
        finally:
            _close_session(session)
    return session
