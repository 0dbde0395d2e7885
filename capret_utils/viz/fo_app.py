"""Serving the FiftyOne App from a subprocess, and looking at it with headless Chromium.

Command line (what a user on a GPU box without a browser runs, then forwards the port)::

    python -m capret_utils.viz.fo_app serve --dataset capret-synthetic-validation [--view user-queries] \
        [--port 5151] [--address 127.0.0.1]
    python -m capret_utils.viz.fo_app screenshot --dataset NAME [--view VIEW] --out DIR   # serve, render, stop

From Python (tests, notebooks that want a picture of the App)::

    with AppServer(ServeConfig(dataset="capret-...", view="query-items")) as server:
        page = render_page(server.url, out_dir, expect=["samples"])
    assert server.report.clean                 # no server / service process left, port closed

``AppServer`` starts ``serve`` in a subprocess on a free port, waits until the App answers, and on exit sends
SIGTERM and checks that every process the server started is gone and nothing listens on the port
(``ShutdownReport``). ``serve`` closes the App before the process exits (``capret_utils.viz.fo_session.install_shutdown``):
with only a SIGTERM handler, FiftyOne's database service stops ``mongod`` first and the orphaned server then
sits ~30 s in a MongoDB timeout holding the port (measured on fiftyone 1.22.1).
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

READY_MARK = "CAPRET_APP_READY"
CHROMIUM_ENV = "CAPRET_CHROMIUM"  # explicit Chromium binary, else chromium / chromium-browser / google-chrome
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio", "--disable-dev-shm-usage")


# --------------------------------------------------------------------------------------------- processes & ports


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``address``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def port_listening(port: int, address: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``address:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((address, int(port))) == 0


def listener_pids(port: int) -> list[int]:
    """PIDs listening on ``port`` (any address); empty when none or when the OS does not tell us."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError):
        return []
    return sorted({c.pid for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   and c.pid is not None})


def fiftyone_server_pids(port: int) -> list[int]:
    """FiftyOne App server processes for ``port`` (``main.py --port N`` and its ``--51-service server`` wrapper)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "--port" in cmd and str(port) in cmd and any(part.endswith("main.py") for part in cmd):
            found.append(proc.info["pid"])
    return sorted(found)


def _describe(proc: Any) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    except Exception:  # noqa: BLE001 - the process may be gone
        return str(proc.pid)


@dataclass
class ShutdownReport:
    """What was left after the App server was stopped."""

    returncode: int | None
    seconds: float
    leftover: list[str] = field(default_factory=list)  # "pid cmdline" of processes that outlived the server
    port_open: bool = False  # something still listens on the port
    killed: list[int] = field(default_factory=list)  # leftovers killed afterwards (by pid) to keep the machine clean

    @property
    def clean(self) -> bool:
        return not self.leftover and not self.port_open


# --------------------------------------------------------------------------------------------- serving


@dataclass(frozen=True)
class ServeConfig:
    """Which dataset / view to serve where."""

    dataset: str  # FiftyOne dataset name (persistent, in the same database)
    view: str = ""  # saved view name ("" = the whole dataset)
    port: int = 0  # 0 = pick a free port
    address: str = "127.0.0.1"  # bind address ("0.0.0.0" to reach it from other machines)
    startup_timeout_s: float = 240.0  # App start: 5-30 s on 2 busy cores
    shutdown_timeout_s: float = 90.0  # for the serve process to exit after SIGTERM (clean: ~5-10 s)
    grace_s: float = 15.0  # after it exited, for its children to go (an orphaned server lingers ~30 s)


def app_url(dataset: str, view: str = "", port: int = 5151, address: str = "127.0.0.1") -> str:
    """The App's URL for a dataset (and a saved view, by its slug)."""
    host = "127.0.0.1" if address in ("", "0.0.0.0") else address
    url = f"http://{host}:{port}/datasets/{urllib.parse.quote(dataset, safe='')}"
    if view:
        from fiftyone.core.utils import to_slug

        url += f"?view={urllib.parse.quote(to_slug(view))}"
    return url


def serve(config: ServeConfig) -> int:
    """Serve ``config.dataset`` until SIGTERM / Ctrl-C (the ``serve`` command); prints a ready line with the URL."""
    from capret_utils.viz import fo as cfo
    from capret_utils.viz import fo_session

    port = config.port or free_port(config.address if config.address != "0.0.0.0" else "127.0.0.1")
    dataset = cfo.load_dataset(config.dataset)
    session = fo_session.launch(dataset, view=config.view or None, port=port, remote=True, address=config.address)
    url = app_url(config.dataset, config.view, port, config.address)
    print(f"{READY_MARK} {json.dumps({'url': url, 'port': port, 'pid': os.getpid()})}", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:  # runs on SIGTERM too (install_shutdown turns it into SystemExit)
        fo_session._close_session(session)
    return 0


def subprocess_env() -> dict[str, str]:
    """Environment for a FiftyOne subprocess: this process's, with the database and analytics set explicitly."""
    env = dict(os.environ)
    env["FIFTYONE_DO_NOT_TRACK"] = "true"
    env["FIFTYONE_DATABASE_VALIDATION"] = "false"
    if "fiftyone" in sys.modules or not env.get("FIFTYONE_DATABASE_DIR"):
        import fiftyone as fo

        env["FIFTYONE_DATABASE_DIR"] = str(fo.config.database_dir)
    return env


class AppServer:
    """``serve`` in a subprocess, as a context manager; ``url`` once started, ``report`` once stopped."""

    def __init__(self, config: ServeConfig, log_path: str | Path | None = None):
        self.config = config
        self.port = config.port or free_port()
        self.url = app_url(config.dataset, config.view, self.port, config.address)
        self.log_path = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / \
            f"capret-app-{self.port}-{os.getpid()}.log"
        self.process: subprocess.Popen | None = None
        self.report: ShutdownReport | None = None
        self._tree: dict[int, Any] = {}

    def __enter__(self) -> "AppServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def _remember_tree(self) -> None:
        import psutil

        try:
            for proc in psutil.Process(self.process.pid).children(recursive=True):
                self._tree.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            pass

    def command(self) -> list[str]:
        """The serve command line (``python -m capret_utils.viz.fo_app serve ...``)."""
        cmd = [sys.executable, "-m", "capret_utils.viz.fo_app", "serve", "--dataset", self.config.dataset,
               "--port", str(self.port), "--address", self.config.address]
        if self.config.view:
            cmd += ["--view", self.config.view]
        return cmd

    def start(self) -> "AppServer":
        """Start the subprocess and wait until the App answers on the port; raises with the log on failure."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=subprocess_env())
        deadline = time.time() + self.config.startup_timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"App server exited with code {self.process.returncode} before it was ready; "
                                   f"log {self.log_path}:\n{self.log()[-4000:]}")
            if READY_MARK in self.log() and self._answers():
                self._remember_tree()
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"App server not ready after {self.config.startup_timeout_s:.0f} s; "
                           f"log {self.log_path}:\n{self.log()[-4000:]}")

    def _answers(self) -> bool:
        host = "127.0.0.1" if self.config.address in ("", "0.0.0.0") else self.config.address
        try:
            with urllib.request.urlopen(f"http://{host}:{self.port}/fiftyone", timeout=5) as resp:
                return resp.status == 200 and "version" in json.loads(resp.read().decode())
        except (OSError, ValueError):
            return False

    def stop(self, kill_leftovers: bool = True) -> ShutdownReport:
        """SIGTERM the server, wait for it, then report (and by default kill, by pid) anything it left behind."""
        import psutil

        if self.report is not None:
            return self.report
        if self.process is None:
            raise RuntimeError("AppServer.stop() before start()")
        started = time.time()
        self._remember_tree()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.config.shutdown_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        deadline = time.time() + self.config.grace_s
        alive = list(self._tree.values())
        while time.time() < deadline:
            alive = [p for p in alive if _running(p)]
            if not alive and not port_listening(self.port):
                break
            time.sleep(0.25)
        leftover = [p for p in alive if _running(p)]
        known = {p.pid for p in leftover}
        for pid in sorted(set(fiftyone_server_pids(self.port) + listener_pids(self.port)) - known):
            try:
                leftover.append(psutil.Process(pid))  # e.g. an orphan re-parented away from the tree
            except psutil.NoSuchProcess:
                pass
        report = ShutdownReport(returncode=self.process.returncode, seconds=round(time.time() - started, 2),
                                leftover=[_describe(p) for p in leftover], port_open=port_listening(self.port))
        if kill_leftovers:
            for proc in leftover:
                try:
                    proc.kill()
                    report.killed.append(proc.pid)
                except psutil.Error:
                    pass
        self.report = report
        return report


def _running(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# --------------------------------------------------------------------------------------------- Chromium


def find_chromium() -> str | None:
    """Path of a Chromium binary: ``$CAPRET_CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome``."""
    explicit = os.environ.get(CHROMIUM_ENV, "").strip()
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _TextExtractor(html.parser.HTMLParser):
    """Visible text of an HTML document (script / style / template contents skipped)."""

    SKIP = {"script", "style", "noscript", "template", "svg"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.SKIP:
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def dom_text(dom: str) -> str:
    """The visible text of a dumped DOM, whitespace-collapsed."""
    parser = _TextExtractor()
    parser.feed(dom)
    return " ".join(" ".join(parser.parts).split())


@dataclass(frozen=True)
class RenderConfig:
    """How Chromium renders the page."""

    budget_ms: int = 15000  # --virtual-time-budget: virtual time the React app gets to render
    window: tuple[int, int] = (1600, 1000)  # screenshot size, pixels
    attempts: int = 3  # re-render (budget doubled) while expected strings are missing
    timeout_s: float = 120.0  # wall-clock limit for one Chromium run


@dataclass
class PageRender:
    """A rendered page: the DOM, its visible text and a screenshot."""

    url: str
    dom: str
    text: str
    screenshot: Path
    missing: list[str]  # expected strings not found in the text (after all attempts)
    attempts: int


def _chromium(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the browser and its helpers
        out, err = proc.communicate()
        raise TimeoutError(f"chromium did not finish in {timeout_s:.0f} s: {' '.join(args[:3])} …")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def render_page(url: str, out_dir: str | Path, expect: Sequence[str] = (), config: RenderConfig = RenderConfig(),
                name: str = "app", chromium: str | None = None) -> PageRender:
    """Load ``url`` in headless Chromium: dump the rendered DOM (``<name>.html``) and take a screenshot
    (``<name>.png``) under ``out_dir``. Re-renders with a doubled virtual-time budget while any ``expect`` string
    is missing from the visible text; ``PageRender.missing`` lists what never appeared."""
    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError(f"no Chromium found (set ${CHROMIUM_ENV} or `apt-get install chromium`)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    screenshot = out_dir / f"{name}.png"
    budget = config.budget_ms
    dom, text, missing = "", "", list(expect)
    attempt = 0
    for attempt in range(1, max(config.attempts, 1) + 1):
        profile = out_dir / f"chromium-profile-{attempt}"
        base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget}",
                f"--window-size={config.window[0]},{config.window[1]}"]
        result = _chromium(base + ["--dump-dom", url], config.timeout_s)
        dom = result.stdout.decode(errors="replace")
        if result.returncode != 0 or not dom.strip():
            raise RuntimeError(f"chromium --dump-dom failed (code {result.returncode}) for {url}:\n"
                               f"{result.stderr.decode(errors='replace')[-2000:]}")
        text = dom_text(dom)
        missing = [s for s in expect if s not in text]
        if not missing or attempt == config.attempts:
            break
        budget *= 2
    (out_dir / f"{name}.html").write_text(dom)
    shot = _chromium(base + [f"--screenshot={screenshot}", url], config.timeout_s)
    if not screenshot.is_file():
        raise RuntimeError(f"chromium --screenshot wrote nothing (code {shot.returncode}) for {url}:\n"
                           f"{shot.stderr.decode(errors='replace')[-2000:]}")
    shutil.rmtree(out_dir / f"chromium-profile-{attempt}", ignore_errors=True)
    for old in out_dir.glob("chromium-profile-*"):
        shutil.rmtree(old, ignore_errors=True)
    return PageRender(url=url, dom=dom, text=text, screenshot=screenshot, missing=missing, attempts=attempt)


def serve_and_render(config: ServeConfig, out_dir: str | Path, expect: Sequence[str] = (),
                     render: RenderConfig = RenderConfig(), name: str = "app") -> tuple[PageRender, ShutdownReport]:
    """Serve a dataset (+ saved view) on a free port in a subprocess, render it, stop the server; returns both.

    The shutdown report is taken after the server is stopped, so ``report.clean`` means nothing was left.
    """
    out_dir = Path(out_dir)
    server = AppServer(config, log_path=out_dir / f"{name}-server.log")
    with server:
        page = render_page(server.url, out_dir, expect=expect, config=render, name=name)
    return page, server.report


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    # SIGTERM during start-up must also run the exit hooks (see capret_utils.viz.fo_session.install_shutdown)
    from capret_utils.viz.fo_session import _raise_system_exit

    signal.signal(signal.SIGTERM, _raise_system_exit)
    parser = argparse.ArgumentParser(prog="python -m capret_utils.viz.fo_app", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("serve", "screenshot"):
        p = sub.add_parser(cmd)
        p.add_argument("--dataset", required=True, help="FiftyOne dataset name")
        p.add_argument("--view", default="", help="saved view name (default: the whole dataset)")
        p.add_argument("--address", default="127.0.0.1", help="bind address")
        if cmd == "serve":
            p.add_argument("--port", type=int, default=5151, help="App port (0 = a free one)")
        else:
            p.add_argument("--out", required=True, help="folder for app.png / app.html")
            p.add_argument("--expect", action="append", default=[], help="text the page must show (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(ServeConfig(dataset=args.dataset, view=args.view, port=args.port, address=args.address))
    page, report = serve_and_render(ServeConfig(dataset=args.dataset, view=args.view, address=args.address),
                                    args.out, expect=args.expect)
    print(json.dumps({"url": page.url, "screenshot": str(page.screenshot), "missing": page.missing,
                      "shutdown_clean": report.clean, "leftover": report.leftover}, indent=2))
    return 0 if (report.clean and not page.missing) else 1


if __name__ == "__main__":
    sys.exit(main())
