"""Fixtures of the browser tests: the deployment, Chromium, a signed-in session."""
import functools
import os
from pathlib import Path

import pytest

from tests.migrator.test_save_restore_e2e import Deployment
from tests.support import browser_pages
from tests.support.browser_pages import ADMIN_PASSWORD, AUDITOR_PASSWORD

CHROMIUM = os.environ.get("BERTH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def deployment(request, tmp_path_factory):
    """One per test module; a module may set ``PORTAL_ENV`` (settings of its own)."""
    system = Deployment(tmp_path_factory.mktemp("berth-browser"))
    system.portal.env.update({"BERTH_REQUIRE_2FA": "1",
                              "BERTH_DEMO_ADMIN_PASSWORD": ADMIN_PASSWORD,
                              "BERTH_DEMO_AUDITOR_PASSWORD": AUDITOR_PASSWORD,
                              **getattr(request.module, "PORTAL_ENV", {})})
    try:
        system.start()
        yield system
    finally:
        system.stop()


@pytest.fixture(scope="module")
def browser():
    playwright_api = pytest.importorskip("playwright.sync_api")
    browser_pages.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                     timeout=browser_pages.TIMEOUT_MS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def signed_in(browser, deployment):
    """``with signed_in(username, password) as watched:`` a session on the dashboard;
    see ``tests.support.browser_pages.signed_in``."""
    return functools.partial(browser_pages.signed_in, browser, deployment.portal.url)
