"""Browser fixtures: the real app on a live 127.0.0.1 server, driven by Debian's Chromium.

``live_server`` serves ``create_app(settings, database=db)`` with werkzeug in a
background thread (one thread per request, so the per-thread peewee pool and the
app's per-request connect/close work as in production). ``page`` is a fresh
browser context per test; ``new_page`` opens further, independent contexts (a
second seat, or a page with JavaScript off). Every page is screenshotted into
``test-artifacts/screenshots/<test name>[-<suffix>].png`` when the test ends,
pass or fail. Requests to anything but 127.0.0.1 are aborted and fail the test.
"""

from __future__ import annotations

import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, expect, sync_playwright
from werkzeug.serving import make_server

SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# Anything that is not this machine's loopback address.
_NOT_LOCAL = re.compile(r"^(?!(?:http|ws)s?://127\.0\.0\.1(?::\d+)?(?:/|$))(?!data:|blob:|about:)")

expect.set_options(timeout=5_000)


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:<port>, no trailing slash
    app: object

    def link(self, emailed_link: str) -> str:
        """A set-password link (built from ``public_url``) pointed at this server instead."""
        parts = urlsplit(emailed_link)
        assert parts.path.startswith("/auth/set-password/"), emailed_link
        return self.url + parts.path


@pytest.fixture
def live_server(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="live-server", daemon=True)
    thread.start()
    try:
        yield LiveServer(url=f"http://127.0.0.1:{server.server_port}", app=app)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def _playwright():
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def chromium(_playwright):
    browser = _playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@dataclass
class _Contexts:
    browser: object
    base_url: str
    opened: list = field(default_factory=list)  # (suffix, context, page)
    outside: list = field(default_factory=list)  # requests that tried to leave 127.0.0.1

    def open(self, suffix: str = "", **options) -> Page:
        options.setdefault("viewport", {"width": 1400, "height": 900})
        options.setdefault("locale", "en-US")
        context = self.browser.new_context(base_url=self.base_url, **options)
        context.set_default_timeout(5_000)
        context.set_default_navigation_timeout(10_000)

        def refuse(route):
            self.outside.append(route.request.url)
            route.abort()

        context.route(_NOT_LOCAL, refuse)
        page = context.new_page()
        self.opened.append((suffix, context, page))
        return page


@pytest.fixture
def _contexts(request, chromium, live_server):
    contexts = _Contexts(chromium, live_server.url)
    yield contexts
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", request.node.name)
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for suffix, context, page in contexts.opened:
        stem = name + (f"-{suffix}" if suffix else "")
        for stale in (f"{stem}.png", f"{stem}-FAILED.png"):  # from an earlier run
            (SCREENSHOT_DIR / stale).unlink(missing_ok=True)
        try:
            if not page.is_closed():
                page.screenshot(path=str(SCREENSHOT_DIR / f"{stem}{'-FAILED' if failed else ''}.png"),
                                full_page=True)
        except Exception as exc:  # a missing screenshot must not hide the test's own result
            warnings.warn(f"no screenshot for {stem}: {exc}")
        finally:
            context.close()
    assert not contexts.outside, f"the browser tried to reach beyond 127.0.0.1: {contexts.outside}"


@pytest.fixture
def page(_contexts) -> Page:
    """A fresh browser context and page on the live server (relative URLs work)."""
    return _contexts.open()


@pytest.fixture
def new_page(_contexts):
    """new_page("b") -> another independent context's page, screenshotted as <test>-b.png."""
    def _open(suffix: str, **options) -> Page:
        return _contexts.open(suffix, **options)
    return _open

