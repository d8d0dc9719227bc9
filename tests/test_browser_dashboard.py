"""End to end in a real headless Chromium (Debian's, driven by Playwright): the dashboard loads, every view renders
a plot, a selector updates its figure, and a run started from the page completes and appears. Writes a screenshot
(``PACKCACHE_SCREENSHOT=path`` also copies it there, e.g. ``data/screenshots/dashboard.png`` for the README).

Inputs: the embedded demo profile, budget and runs in ``data/`` when they are all there (what
``packcache-dashboard`` shows without arguments), else small example inputs from a random demo model.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("PACKCACHE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
GRAPHS = ["fig-group", "fig-steps", "fig-decay", "fig-rho", "fig-spatial", "fig-ratios", "fig-keep", "fig-runtime",
          "fig-run-table", "fig-frames"]
TIMEOUT_MS = 120_000


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the browser is Debian's chromium)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free local port, served from a thread (werkzeug), over the embedded or example inputs."""
    sync_playwright = _playwright()
    from werkzeug.serving import make_server

    from dashboard.app import create_app
    from dashboard.runner import RunManager
    from dashboard.sources import default_paths, load_sources

    defaults = default_paths()
    if defaults["stats"] and defaults["budget"] and defaults["runs"]:
        sources = load_sources()
    else:
        from dashboard.examples import write_example_inputs

        paths = write_example_inputs(tmp_path_factory.mktemp("browser"), frames=6, steps=2, layers=4, heads=4)
        sources = load_sources(paths["stats"], paths["budget"], [paths["runs"]], strict=True)
        sources.model_dir = None
    assert sources.stats is not None and sources.budget is not None and sources.runs, sources.errors
    app = create_app(sources, RunManager(sources))
    httpd = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/", sources, sync_playwright
    finally:
        httpd.shutdown()
        thread.join(10)


def _trace_count(page, graph: str) -> int:
    return page.evaluate(f"() => (document.querySelector('#{graph} .js-plotly-plot') || {{}}).data?.length ?? -1")


def _title(page, graph: str) -> str:
    return page.evaluate(
        f"() => document.querySelector('#{graph} .js-plotly-plot')?.layout?.title?.text ?? ''")


def test_dashboard_end_to_end(server, tmp_path):
    url, sources, sync_playwright = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url, timeout=TIMEOUT_MS)

            # the app loads and every view renders a plot with data
            page.wait_for_selector("#run-panel", timeout=TIMEOUT_MS)
            for graph in GRAPHS + (["fig-quality"] if sources.quality else []):
                page.wait_for_function(
                    f"() => (document.querySelector('#{graph} .js-plotly-plot')?.data?.length ?? 0) > 0",
                    timeout=TIMEOUT_MS)
                assert page.locator(f"#{graph} .main-svg").count() > 0, graph
            assert page.locator(".source-error").count() == 0

            # changing a selector updates its figure
            assert "history" in _title(page, "fig-group")
            page.locator("#group label", has_text="cond").click()
            page.wait_for_function(
                "() => document.querySelector('#fig-group .js-plotly-plot')?.layout?.title?.text?.includes('cond')",
                timeout=TIMEOUT_MS)
            page.locator("#decay-layer").click()  # a dropdown
            page.get_by_role("option", name="L1", exact=True).click()
            page.wait_for_function(
                "() => document.querySelector('#fig-decay .js-plotly-plot')?.layout?.title?.text?.includes('layer 1')",
                timeout=TIMEOUT_MS)
            page.locator("#runtime-metric label", has_text="cache tokens").click()
            page.wait_for_function(
                "() => document.querySelector('#fig-runtime .js-plotly-plot')?.layout?.title?.text"
                "?.includes('tokens')", timeout=TIMEOUT_MS)

            # a short run completes and appears in the runtime and frames views; then two more policies, so the
            # screenshot compares all four (FullCache is recorded)
            for job, policy in enumerate(("SlidingWindow", "StreamingLLM", "PackCache"), start=1):
                before = _trace_count(page, "fig-runtime")
                page.locator("#run-policy label", has_text=policy).click()
                page.locator("#run-button").click()
                page.wait_for_function(
                    f"() => {{ const t = document.querySelector('#run-status')?.textContent ?? '';"
                    f" return t.startsWith('run {job} (') && t.includes('done'); }}", timeout=TIMEOUT_MS)
                page.wait_for_function(
                    f"() => (document.querySelector('#fig-runtime .js-plotly-plot')?.data?.length ?? 0) > {before}",
                    timeout=TIMEOUT_MS)
                names = page.evaluate(
                    "() => document.querySelector('#fig-runtime .js-plotly-plot').data.map(t => t.name)")
                assert any(f"live{job}" in n and policy in n for n in names), names
                page.wait_for_function(
                    "() => document.querySelector('#fig-frames .js-plotly-plot')?.layout?.title?.text"
                    f"?.startsWith('Frames: {policy}')", timeout=TIMEOUT_MS)
                assert page.locator("#run-progress").get_attribute("value") == page.locator(
                    "#run-progress").get_attribute("max")
            assert not errors, errors

            page.locator("#group label", has_text="history").click()
            page.wait_for_timeout(1500)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            target = os.environ.get("PACKCACHE_SCREENSHOT")
            if target:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, target)
        finally:
            browser.close()
