"""The dashboard in a real headless browser: Debian's chromium driven by Playwright, against a real
`jobproxy serve` with auth on. Sign in, see a task submitted through the API appear and complete,
open its output, cancel a running one, filter and page. Screenshots are kept as test artifacts in
$JOBPROXY_TEST_ARTIFACTS (default: jobproxy-test-artifacts in the temporary folder); the path is
printed. Without chromium or Playwright the test skips; in CI (CI=true) it fails."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import auth

from .conftest import IN_CI, Gateway

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("JOBPROXY_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "jobproxy-test-artifacts")
TOKEN = "jp_dashboard_alice"
CONFIG = f"""
[scheduler]
type = "local"
poll_interval = 0.2
[scheduler.options]
cores = 2
kill_grace = 1
[auth]
enabled = true
tokens = [{{ user = "alice", sha256 = "{auth.hash_token(TOKEN)}" }}]
"""
WAIT_MS = 60_000  # generous: a loaded 2-core machine is slow, and nothing here measures speed


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"the dashboard test needs it in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} is not installed (Debian's chromium; tests/run.sh installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield launched
        launched.close()


@pytest.fixture
def gateway(gateway_factory: Callable[..., Gateway]) -> Gateway:
    return gateway_factory(CONFIG).start()


def _submit(gateway: Gateway, task: dict[str, Any]) -> str:
    status, _, body = gateway.request("POST", "/v1/jobproxy/submit", json.dumps(task).encode(),
                                      {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    return str(json.loads(body)["id"])


def _state(gateway: Gateway, task_id: str) -> str:
    status, _, body = gateway.request("GET", f"/v1/jobproxy/state/{task_id}",
                                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    return str(json.loads(body)["code"])


def _shoot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"dashboard screenshot: {path}")
    return path


def test_dashboard_in_a_real_browser(browser: Any, gateway: Gateway) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1100, "height": 640})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(gateway.url + "/ui")

    # auth is on: the token prompt, and the token kept in this tab's session storage only
    expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
    page.fill("#token", "not-a-token")
    page.click("#login-form button")
    expect(page.locator("#login-error")).to_contain_text("not valid", timeout=WAIT_MS)
    page.fill("#token", TOKEN)
    page.click("#login-form button")
    expect(page.locator("#list")).to_be_visible(timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.getItem('jobproxy-token')") == TOKEN
    assert page.evaluate("localStorage.length") == 0
    expect(page.locator("#scheduler")).to_have_text("scheduler: local", timeout=WAIT_MS)

    # a task submitted through the API appears, then completes, without reloading the page
    done = _submit(gateway, {"user": "alice", "cmd": "echo hello from the dashboard; echo warned >&2",
                             "cores": 1, "memory": 64, "cputime": 30})
    row = page.locator(f'tr[data-id="{done}"]')
    expect(row).to_be_visible(timeout=WAIT_MS)
    expect(row.locator(".state")).to_have_text("COMPLETE", timeout=WAIT_MS)

    # its page: resources, times, description, the tail of its output
    row.locator("a").click()
    expect(page.locator("#task-state")).to_have_text("COMPLETE", timeout=WAIT_MS)
    expect(page.locator("#stdout")).to_have_text("hello from the dashboard\n", timeout=WAIT_MS)
    expect(page.locator("#stderr")).to_have_text("warned\n")
    fields = page.locator("#task-fields")
    for text in ("64 MiB", "30 s", "echo hello from the dashboard", "exit code", "finished"):
        expect(fields).to_contain_text(text)
    expect(page.locator("#task-description")).to_have_text("exit code 0")
    expect(page.locator("#cancel")).to_be_hidden()
    _shoot(page, "dashboard-task.png")

    # a running task: live state, then cancel it from its page
    running = _submit(gateway, {"user": "alice", "cmd": "echo started; sleep 300"})
    page.goto(f"{gateway.url}/ui#/task/{running}")
    expect(page.locator("#task-state")).to_have_text("RUNNING", timeout=WAIT_MS)
    expect(page.locator("#stdout")).to_have_text("started\n", timeout=WAIT_MS)
    page.click("#cancel")
    expect(page.locator("#task-state")).to_have_text("CANCELED", timeout=WAIT_MS)
    assert _state(gateway, running) == "CANCELED"

    # the list: filter by state, then page through more tasks than one page holds
    page.goto(gateway.url + "/ui#/")
    expect(page.locator(f'tr[data-id="{running}"] .state')).to_have_text("CANCELED", timeout=WAIT_MS)
    page.select_option("#state", "CANCELED")
    expect(page.locator("#tasks tr")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#tasks tr").first).to_have_attribute("data-id", running)
    page.select_option("#state", "")
    more = [_submit(gateway, {"user": "alice", "cmd": f"echo {n}"}) for n in range(20)]
    expect(page.locator("#tasks tr")).to_have_count(20, timeout=WAIT_MS)
    expect(page.locator("#next")).to_be_enabled(timeout=WAIT_MS)
    _shoot(page, "dashboard-list.png")
    page.click("#next")
    expect(page.locator("#page-number")).to_have_text("page 2", timeout=WAIT_MS)
    expect(page.locator("#tasks tr")).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator(f'tr[data-id="{more[-1]}"]')).to_be_visible()
    expect(page.locator("#next")).to_be_disabled()
    page.click("#previous")
    expect(page.locator(f'tr[data-id="{done}"]')).to_be_visible(timeout=WAIT_MS)

    # another tab's session has no token: the prompt again
    other = browser.new_context().new_page()
    other.goto(gateway.url + "/ui")
    expect(other.locator("#login")).to_be_visible(timeout=WAIT_MS)
    other.context.close()
    context.close()
    assert problems == []


def test_dashboard_screenshot_for_the_readme(browser: Any, gateway: Gateway) -> None:
    """Writes docs/dashboard.png's candidate into the artifacts: a small list of finished and
    running tasks (copy it to docs/ by hand when the page changes)."""
    from playwright.sync_api import expect

    ids = [_submit(gateway, {"user": "alice", "cmd": command, "cores": 1, "memory": 128})
           for command in ("echo done", "exit 3", "sleep 300", "echo more")]
    page = browser.new_context(viewport={"width": 1000, "height": 330}).new_page()
    page.goto(gateway.url + "/ui")
    page.fill("#token", TOKEN)
    page.click("#login-form button")
    expect(page.locator("#tasks tr")).to_have_count(4, timeout=WAIT_MS)
    expect(page.locator("#tasks .state.RUNNING")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator("#tasks .state.EXECUTOR_ERROR")).to_have_count(1, timeout=WAIT_MS)
    path = ARTIFACTS / "dashboard-readme.png"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    print(f"dashboard screenshot: {path}")
    assert path.stat().st_size > 1000
    page.context.close()
    status, _, _ = gateway.request("DELETE", f"/v1/jobproxy/delete/{ids[2]}",
                                   headers={"Authorization": f"Bearer {TOKEN}"})  # no job outlives the test
    assert status == 204


def test_api_docs_render_in_a_real_browser(browser: Any, gateway: Gateway) -> None:
    """/v1/docs: Swagger UI, from the gateway alone, renders the served OpenAPI document."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    elsewhere: list[str] = []

    def requested(request: Any) -> None:
        if not request.url.startswith(gateway.url):
            elsewhere.append(request.url)

    page.on("request", requested)
    page.goto(gateway.url + "/v1/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("JobProxy", timeout=WAIT_MS)
    expect(page.locator(".opblock-summary-path", has_text="/v1/jobproxy/submit").first).to_be_visible()
    # Swagger UI lists what it cannot render under "Errors" (warnings about the document go there too)
    expect(page.locator(".swagger-ui")).not_to_contain_text("Errors")
    expect(page.locator(".swagger-ui")).not_to_contain_text("Failed to load API definition")
    _shoot(page, "api-docs.png")
    context.close()
    assert elsewhere == []
