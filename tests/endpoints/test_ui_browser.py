"""The dashboard in a real headless Chromium (Debian's chromium, driven by Playwright) against a
real `carwash-jobs serve` process: log in, filter the list, open a failed job, retry it and watch
it complete; a page without a session goes to the login, and a forged action is refused.

Screenshots of each step are kept under test-artifacts/ui/ (git-ignored), for a person to look
at. Skipped, saying why, when /usr/bin/chromium or the playwright package is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.endpoints.sample_tasks import MODULES
from tests.task_types.support import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

    from playwright.sync_api import Browser, Dialog, Page

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "ui"
TOKEN = "browser-test-token-0123456789"
#: what the brief of the CI machine allows Chromium to do: no sandbox (root in a container), no
#: GPU, and nothing that would reach the network by itself
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 10_000

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: apt-get install -y chromium"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="the playwright package is missing: pip install playwright (no browser download needed)",
    ),
]


class Server:
    """`carwash-jobs serve` (role all) on 127.0.0.1 in a directory of its own."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        config = directory / "carwash.toml"
        config.write_text(
            f'database_url = "sqlite+aiosqlite:///{directory / "carwash.db"}"\n'
            f'task_types = {json.dumps([*MODULES, "tests.endpoints.ui_tasks"])}\n'
            f'files_dir = "{directory / "files"}"\n'
            'schedules_file = ""\nsqlite_synchronous = "NORMAL"\nreload_interval_seconds = 0.5\n',
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CARWASH_")}
        env |= {"CARWASH_CONFIG": str(config), "CARWASH_API_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = (directory / "serve.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "carwash_jobs.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=directory, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.api = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited: {(directory / 'serve.log').read_text()}")
            try:
                if self.api.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError("serve did not answer /health in time")

    def enqueue(self, slug: str, body: dict[str, Any]) -> str:
        response = self.api.post(f"/api/tasks/{slug}", json=body)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def wait_for(self, job_id: str, *statuses: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.api.get(f"/api/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not reach {statuses}")

    def stop(self) -> None:
        self.api.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("ui-browser"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser profile per test: no cookie carries over."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    yield opened
    context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def log_in(page: Page, server: Server, path: str = "/ui") -> None:
    page.goto(server.url + path)
    page.wait_for_url("**/ui/login?next=*")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{path}")


def test_log_in_filter_open_a_failed_job_retry_it_and_watch_it_complete(server: Server, page: Page) -> None:
    from playwright.sync_api import expect

    gate = server.directory / "gate-open"
    server.enqueue("echo", {"message": "a wash was booked"})
    other_failure = server.enqueue("fail", {"reason": "not the one we look for"})
    gated = server.enqueue("gated", {"gate": str(gate), "tags": ["browser"], "max_attempts": 1})
    server.wait_for(gated, "failed")
    server.wait_for(other_failure, "failed")

    page.goto(server.url + "/ui")
    page.wait_for_url("**/ui/login?next=*")
    shot(page, "1-login")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url("**/ui")
    assert page.locator("[data-status=failed]").inner_text() == "2"
    shot(page, "2-overview")

    page.click("nav >> text=Jobs")
    page.select_option("select[name=status]", "failed")
    page.select_option("select[name=task_type]", "gated")
    page.click("#filters button[type=submit]")
    page.wait_for_url("**/ui/jobs?*status=failed*task_type=gated*")
    rows = page.locator("#job-rows tr[data-job-id]")
    assert rows.count() == 1
    assert rows.first.get_attribute("data-job-id") == gated
    shot(page, "3-filtered-list")

    page.click(f"a[href='/ui/jobs/{gated}']")
    page.wait_for_url(f"**/ui/jobs/{gated}")
    assert "gate" in page.locator("#job-error").inner_text()
    assert page.locator("#job-status").inner_text() == "failed"
    assert "GateClosed" in page.locator("pre.traceback").inner_text()
    shot(page, "4-failed-job")

    gate.touch()  # what an operator fixes before retrying
    questions: list[str] = []

    def accept(dialog: Dialog) -> None:
        questions.append(dialog.message)
        dialog.accept()

    page.once("dialog", accept)
    page.click("form[action$='/retry'] button")
    page.wait_for_url(f"**/ui/jobs/{gated}?notice=retried")
    # the live refresh brings the new state in; a polled predicate cannot be used here, since
    # the page's Content-Security-Policy forbids the eval it would need (as it should)
    expect(page.locator("#job-status")).to_have_text("completed", timeout=WAIT_MS)
    assert questions
    assert questions[0].startswith(f"Retry job {gated}?")
    assert "retried" in page.locator("#timeline").inner_text()
    assert "passed" in page.locator("#job-result").inner_text()
    shot(page, "5-retried-and-completed")
    assert server.api.get(f"/api/jobs/{gated}").json()["status"] == "completed"


def test_declining_the_confirmation_changes_nothing(server: Server, page: Page) -> None:
    failed = server.enqueue("fail", {"reason": "leave me"})
    server.wait_for(failed, "failed")
    log_in(page, server, f"/ui/jobs/{failed}")

    page.once("dialog", lambda dialog: dialog.dismiss())
    page.click("form[action$='/retry'] button")
    page.wait_for_timeout(300)  # long enough for a submit to have left the page

    assert page.url.endswith(f"/ui/jobs/{failed}")
    assert server.api.get(f"/api/jobs/{failed}").json()["status"] == "failed"


def test_without_a_session_every_page_goes_to_the_login(server: Server, page: Page) -> None:
    for path in ("/ui", "/ui/jobs?status=failed", "/ui/jobs/anything"):
        page.goto(server.url + path)
        page.wait_for_url("**/ui/login?next=*")
        assert page.locator("#token").is_visible()
    shot(page, "no-session-login")


def test_a_forged_action_is_refused(server: Server, page: Page) -> None:
    failed = server.enqueue("fail", {"reason": "forge me"})
    server.wait_for(failed, "failed")
    log_in(page, server)

    # a script in the page posting without the form's CSRF token, then with a made-up one
    statuses = page.evaluate(
        """async (id) => {
            const post = (body) => fetch(`/ui/jobs/${id}/retry`,
                                         {method: "POST", body: new URLSearchParams(body)});
            return [(await post({})).status, (await post({csrf_token: "0".repeat(64)})).status];
        }""",
        failed,
    )
    # the same request from a browser that has no session
    with httpx.Client(base_url=server.url) as stranger:
        anonymous = stranger.post(f"/ui/jobs/{failed}/retry", data={"csrf_token": "x"})

    assert statuses == [403, 403]
    assert anonymous.status_code == 303
    assert anonymous.headers["location"].startswith("/ui/login")
    assert server.api.get(f"/api/jobs/{failed}").json()["status"] == "failed"


@pytest.fixture(autouse=True, scope="module")
def _clean_artifacts() -> None:
    """Screenshots of this run only."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
