"""The FiftyOne App really serves: a subprocess serves a small dataset on 127.0.0.1, headless Chromium renders it,
and stopping the server leaves no process and no open port.

Reusable pieces (for the retrieval-failures extension): the ``app_server`` fixture (one server per module, on a
free port) and ``render(view, expect)`` below, both thin wrappers over ``capret_utils.viz.fo_app``.
"""

from __future__ import annotations

import json
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from capret_utils.viz import fo as cfo
from capret_utils.viz import fo_app
from _items_fixture import make_items

pytestmark = [pytest.mark.browser, pytest.mark.fiftyone, pytest.mark.slow]


@pytest.fixture(scope="module")
def app_dataset(tmp_path_factory):
    """A small persistent dataset (the server subprocess loads it by name); unique name, deleted afterwards."""
    items = make_items(tmp_path_factory.mktemp("browser-items"), n_pairs=3)
    name = f"capret-test-app-{uuid.uuid4().hex[:8]}"
    dataset = cfo.build_dataset(items, name, cfo.BuildConfig(persistent=True))
    yield dataset
    cfo.delete_dataset(name)


@pytest.fixture(scope="module")
def app_server(app_dataset, small_run, tmp_path_factory):
    """``python -m capret_utils.viz.fo_app serve`` for ``app_dataset`` on a free port; stopped at the end. Started after
    ``small_run`` wrote its results and saved views (a running App server does not see views saved later by
    another process)."""
    log = tmp_path_factory.mktemp("app-server") / "server.log"
    server = fo_app.AppServer(fo_app.ServeConfig(dataset=app_dataset.name), log_path=log).start()
    yield server
    server.stop()


@pytest.fixture
def render(app_server, app_dataset, tmp_path):
    """``render(view="", expect=(...))`` -> PageRender of the App (DOM text + screenshot under tmp_path)."""
    chromium = fo_app.find_chromium()
    if chromium is None:
        pytest.skip("headless Chromium is not installed (`make test` installs Debian's: apt-get install -y chromium)")

    def _render(view: str = "", expect: tuple[str, ...] = ()) -> fo_app.PageRender:
        url = fo_app.app_url(app_dataset.name, view, app_server.port)
        return fo_app.render_page(url, tmp_path, expect=expect, name=view or "dataset", chromium=chromium)

    return _render


def test_app_server_answers(app_server):
    base = f"http://127.0.0.1:{app_server.port}"
    with urllib.request.urlopen(f"{base}/fiftyone", timeout=10) as resp:
        import fiftyone

        assert json.loads(resp.read())["version"] == fiftyone.__version__
    with urllib.request.urlopen(base + "/", timeout=10) as resp:
        assert resp.status == 200 and b"<html" in resp.read().lower()


def test_app_shows_the_dataset(render, app_dataset):
    n = len(app_dataset)
    page = render(expect=(app_dataset.name, f"{n} samples", "items", "pair_id", "image_key"))
    assert not page.missing, f"App page lacks {page.missing}; visible text: {page.text[:1500]}"
    assert page.screenshot.is_file()
    pixels = np.asarray(Image.open(page.screenshot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1000, 1600)
    assert pixels.std() > 10, "screenshot is blank"


def test_app_shows_a_saved_patches_view(render, app_dataset):
    n_queries = len(app_dataset.load_saved_view("query-items"))
    page = render("query-items", expect=("query-items", f"{n_queries} patches", "short sleeve top"))
    assert not page.missing, f"App page lacks {page.missing}; visible text: {page.text[:1500]}"


@pytest.fixture(scope="module")
def small_run(app_dataset, tmp_path_factory):
    """Per-query results of a small retrieval run (seeded random embeddings scored by the real evaluator) written
    into the served dataset with its failure views, as notebook 04 writes them. Returns (failures view, count)."""
    from capret_utils.evaluation import analysis, metrics
    from capret_utils.viz import variant_views

    items = make_items(tmp_path_factory.mktemp("browser-run"), n_pairs=3)  # same keys as app_dataset
    queries, gallery = metrics.item_sets(items)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(len(queries), 16)).astype(np.float32)
    g = rng.normal(size=(len(gallery), 16)).astype(np.float32)
    res = analysis.score_items(q, g, queries, gallery, device="cpu")
    result = analysis.VariantResult("fine-tuned/crop", "fine-tuned", analysis.VARIANTS["crop"], dict(res.metrics),
                                    res.per_query)
    table, per_query = analysis.variant_table([result]), analysis.per_query_table([result])
    k = 1  # the fixture's gallery has 9 items, so every query is found in the top 10: show the top-1 failures
    views = variant_views.write_fiftyone(app_dataset, per_query, table, k=k)
    name = cfo.failure_view_name("fine-tuned/crop", k)
    expected = int((~per_query["hit@1"].astype(bool)).sum())
    assert views[name] == expected > 0
    return name, expected


def test_app_shows_the_failures_view_of_a_small_run(render, small_run):
    view, n_failures = small_run
    page = render(view, expect=(view, f"{n_failures} patches", "short sleeve top"))
    assert not page.missing, f"App page lacks {page.missing}; visible text: {page.text[:1500]}"


def test_stopping_leaves_no_process_and_no_port(app_server):
    port = app_server.port
    report = app_server.stop(kill_leftovers=True)
    assert report.returncode == 0, app_server.log()[-3000:]
    assert report.clean, f"left behind after {report.seconds} s: {report.leftover}, port open: {report.port_open}"
    assert not fo_app.port_listening(port)
    assert fo_app.fiftyone_server_pids(port) == []
    assert fo_app.listener_pids(port) == []
