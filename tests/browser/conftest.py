"""The browser tier: the real ComfyUI frontend (the pinned comfyui_frontend_package) in Debian's Chromium, driven
by Playwright, on the same kind of server the e2e tier starts (tests/support/pack_server.py).

One server and one page for the whole tier (package scope: both stop when the tier ends); tests load workflows
into that page one after another. Without Chromium or Playwright the tier is skipped with the reason, unless
FEWSTEP_REQUIRE_BROWSER=1 (.ci/run sets it), which turns the skip into a failure.
"""
import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from support.browser import FrontendPage, chromium_missing  # noqa: E402
from support.pack_server import ServerSession, pack_server  # noqa: E402

_session = ServerSession()
_pages = []


@pytest.fixture(scope="package")
def server():
    why = chromium_missing()
    if why:
        if os.environ.get("FEWSTEP_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FEWSTEP_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    yield from _session.serve(pack_server())


@pytest.fixture(scope="package")
def frontend(server):
    page = FrontendPage.open(server)
    _pages.append(page)
    try:
        yield page
    finally:
        _pages.remove(page)
        page.close()


@pytest.fixture
def console(frontend):
    """The page's console messages logged during this test."""
    start = len(frontend.console)

    class View:
        def messages(self):
            return frontend.console[start:]

    return View()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    _session.record(item, report)
    if report.failed and _pages:
        report.sections.append(("browser console, last messages", "\n".join(_pages[-1].console[-40:])))
