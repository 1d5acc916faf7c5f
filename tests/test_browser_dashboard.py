"""The dashboard in a real browser: headless Chromium (Debian's `chromium` package, driven by Playwright for
Python pointed at that executable: no browser download) against a real daemon.

The page must load with no console errors, list a deployed API, follow a load live (its request counter
and its chart move without a reload), show a failing replica's error, and tell the user to log in again
when the session ends. Screenshots go to `$CIRRUS_TEST_ARTIFACTS` (default: tests/artifacts/, ignored by
git). Marked `browser`; skipped, with the reason, where no Chromium is installed (`apt-get install chromium`).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import backends
import httpx
import pytest
from conftest import Cirrus, module_daemon, write_project

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("CIRRUS_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
WAIT_MS = 15_000

ECHO = """
    import time


    class Predictor:
        def predict(self, payload):
            time.sleep(0.002)
            return {"echo": payload}
"""

BROKEN = """
    class Predictor:
        def __init__(self, config):
            raise RuntimeError("weights file is corrupt")

        def predict(self, payload):
            return payload
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        # A system package, not a pip one: .ci/run installs it where it can; elsewhere these tests skip
        # (even under CIRRUS_TESTS_REQUIRE_BACKENDS, which is about what pip installs).
        pytest.skip("no Chromium: apt-get install chromium")
    sync_api = backends.module("playwright.sync_api", "playwright")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def gw(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cirrus]:
    """A daemon serving `echo` (live) and `broken` (its predictor cannot load)."""
    root = tmp_path_factory.mktemp("dashboard")
    with module_daemon(root / "home") as cirrus:
        client = cirrus.client()
        client.deploy(write_project(root / "echo", ECHO, name="echo"), timeout=60)
        client.deploy(write_project(root / "broken", BROKEN, name="broken"), wait=False)
        yield cirrus


class Page:
    """A browser tab logged in to the dashboard, recording every console error and uncaught exception."""

    def __init__(self, browser: Any, cirrus: Cirrus) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.tab = self.context.new_page()
        self.errors: list[str] = []
        self.requested: list[str] = []
        self.tab.on("request", lambda r: self.requested.append(r.url))
        self.tab.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.tab.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.tab.goto(login_url(cirrus))
        assert self.tab.url.endswith("/dashboard/"), self.tab.url

    def number(self, selector: str) -> float:
        text = self.tab.inner_text(selector).replace(",", "").split()[0]
        return float(text) if text not in ("\N{EN DASH}", "") else 0.0  # the page shows a dash for none

    def wait_js(self, expression: str, arg: Any = None) -> None:
        self.tab.wait_for_function(expression, arg=arg, timeout=WAIT_MS)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / name
        self.tab.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def page(browser: Any, gw: Cirrus) -> Iterator[Page]:
    tab = Page(browser, gw)
    try:
        yield tab
    finally:
        tab.context.close()


def login_url(cirrus: Cirrus) -> str:
    """A one-time login link, printed by `cirrus dashboard --no-browser`."""
    code, out, err = cirrus.cli("dashboard", "--no-browser")
    assert code == 0, out + err
    url = out.strip().splitlines()[-1]
    assert "/dashboard/login?code=" in url, out
    return url


class Load:
    """Requests to an API from a background thread until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                answer = client.post(self.url, json={"n": self.sent})
                self.sent += 1
                if answer.status_code != 200:
                    self.failed.append(answer.text)
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def test_the_overview_and_an_api_page_follow_a_load(page: Page, gw: Cirrus) -> None:
    tab = page.tab
    tab.wait_for_selector("tr[data-api=echo]", timeout=WAIT_MS)
    assert tab.inner_text("tr[data-api=echo] .badge") == "live"

    with Load(gw.url("echo")) as load:
        # The overview's request rate, refreshed without a reload.
        page.wait_js("() => Number(document.querySelector('tr[data-api=echo] [data-field=rps]')?.dataset.value) > 0")

        tab.click("tr[data-api=echo] a")
        tab.wait_for_selector("#chart-requests", timeout=WAIT_MS)
        assert tab.url.endswith("#/api/echo")
        page.wait_js("() => Number(document.querySelector('#chart-requests').dataset.points) >= 1")
        points = int(tab.get_attribute("#chart-requests", "data-points") or 0)
        counter = "Number(document.querySelector('[data-stat=requests_last_minute]').textContent.replace(/,/g, ''))"
        page.wait_js(f"() => {counter} > 0")
        counted = page.number("[data-stat=requests_last_minute]")
        # Both move while the load runs: the counter grows, the chart gains points, 2xx above zero.
        page.wait_js(
            f"([points, counted]) => Number(document.querySelector('#chart-requests').dataset.points) > points"
            f" && {counter} > counted",
            [points, counted],
        )
        page.wait_js("() => Number(document.querySelector('#chart-requests').dataset.latest.split(',')[0]) > 0")
        assert load.sent > 0 and not load.failed, load.failed[:3]

    assert tab.locator("#replicas [data-state=ready]").count() == 1
    tab.select_option("#window", "300")  # 5 min: the same history, drawn wider
    page.wait_js("() => document.querySelector('#chart-requests').dataset.window === '300'")
    assert "No revisions." not in tab.inner_text("#revisions")
    shot = page.screenshot("dashboard-api-echo.png")
    assert shot.stat().st_size > 10_000
    assert not page.errors, page.errors
    # Everything came from the daemon's admin port: nothing from a CDN, so the page works offline.
    admin = gw.info.admin_url.rstrip("/") + "/"
    assert [url for url in page.requested if not url.startswith(admin)] == []


def test_a_failing_replica_shows_its_error(page: Page, gw: Cirrus) -> None:
    tab = page.tab
    tab.wait_for_selector("tr[data-api=broken]", timeout=WAIT_MS)
    page.wait_js("() => document.querySelector('tr[data-api=broken] .badge').textContent === 'error'")
    page.screenshot("dashboard-overview.png")

    tab.click("tr[data-api=broken] a")
    tab.wait_for_selector("#replicas-card .error-cell", timeout=WAIT_MS)
    page.wait_js("() => document.querySelector('#replicas-card').innerText.includes('weights file is corrupt')")
    assert "weights file is corrupt" in tab.inner_text("#summary")  # the API's message
    page.screenshot("dashboard-api-broken.png")
    assert not page.errors, page.errors


def test_an_ended_session_says_how_to_log_in_again(page: Page) -> None:
    tab = page.tab
    tab.wait_for_selector("tr[data-api=echo]", timeout=WAIT_MS)
    page.context.clear_cookies()
    tab.wait_for_selector("#banner:not([hidden])", timeout=WAIT_MS)
    assert "cirrus dashboard" in tab.inner_text("#banner")
    assert tab.locator("tr[data-api=echo]").count() == 1  # what was shown stays
    # The only errors: the browser's own note of the refused request.
    assert all("401" in error for error in page.errors), page.errors


def test_the_page_ships_with_its_assets() -> None:
    """No browser needed: every file index.html loads is in the package, and the vendored uPlot is the
    version scripts/vendor-uplot recorded."""
    static = Path(__file__).parent.parent / "cirrus" / "dashboard" / "static"
    index = (static / "index.html").read_text()
    loaded = re.findall(r'(?:src|href)="static/([^"]+)"', index)
    assert {"app.js", "style.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"} <= set(loaded)
    assert all((static / name).is_file() for name in loaded)
    assert "//" not in re.sub(r"<!--.*?-->", "", index).replace("<!doctype html>", "")  # no URL to elsewhere
    version = (static / "vendor" / "uPlot.VERSION").read_text().strip()
    assert f"(v{version})" in (static / "vendor" / "uPlot.iife.min.js").read_text()[:200]
    assert "MIT" in (static / "vendor" / "uPlot.LICENSE").read_text()
