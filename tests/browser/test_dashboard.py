"""The dashboard in a real browser: Debian's chromium driven by Playwright, against ``dsched run all``.

``make test`` installs chromium (``make system-deps``). Set ``DSCHED_SCREENSHOTS=<dir>`` to save the pages shown
in the README (``docs/screenshots/``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.processes import Http, Service, base_env, free_port, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium: `make system-deps` installs it"
)
SHOTS = os.environ.get("DSCHED_SCREENSHOTS")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Http]:
    tmp = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    service = Service("all", base_env(tmp / "data", port, DSCHED_NODE_ID="ui-node"), tmp, "all").start()
    try:
        http = Http(port)
        http.wait_healthy()
        yield http
    finally:
        service.stop(timeout=10)


@pytest.fixture(scope="module")
def expect() -> Any:
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=TIMEOUT_MS)
    return playwright_expect


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (empty storage) per test; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1360, "height": 860})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.on("console", lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None)
    yield tab
    context.close()
    assert errors == [], errors


def as_user(http: Http, user: str) -> Http:
    other = Http(int(http.base.rsplit(":", 1)[1]), user=user)
    return other


def shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def test_page_sends_a_strict_csp_and_escapes_what_it_renders(server: Http, page: Any) -> None:
    api = as_user(server, "ui-escape")
    hostile = '<img src=x onerror="window.pwned=1">'
    job_id = api.submit(payload="<script>window.pwned=2</script>", name=hostile, next_fire_at="2099-01-01T00:00:00Z")
    response = page.goto(server.base + "/ui?user=ui-escape#/jobs")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    row = page.locator(f'tr[data-job="{job_id}"]')
    row.wait_for()
    assert hostile in row.inner_text() and "<script>window.pwned=2</script>" in row.inner_text()
    assert page.locator("#jobs-table img").count() == 0
    assert page.evaluate("window.pwned") is None


def test_jobs_page_filters_searches_and_pages_on_the_server(server: Http, page: Any, expect: Any) -> None:
    api = as_user(server, "ui-list")
    ids = [api.submit(payload=f"p{i}", name=f"etl-{i}", project_id="etl", next_fire_at="2099-01-01T00:00:00Z")
           for i in range(30)]  # fmt: skip
    other = api.submit(payload="x", name="unique-report", project_id="misc", next_fire_at="2099-01-01T00:00:00Z")
    page.goto(server.base + "/ui?user=ui-list")
    rows = page.locator("#jobs-table tbody tr[data-job]")
    rows.first.wait_for()
    assert rows.count() == 25  # first page
    assert rows.first.get_attribute("data-job") == other  # newest first
    page.click("#page-next")
    expect(rows).to_have_count(6)
    assert rows.last.get_attribute("data-job") == ids[0]
    page.fill("#filter-search", "unique-rep")
    expect(rows).to_have_count(1)
    assert rows.first.get_attribute("data-job") == other
    page.fill("#filter-search", "")
    page.fill("#filter-project", "etl")
    expect(page.locator("#jobs-table tbody tr[data-job] td:nth-child(3)")).to_have_text(["etl"] * 25)
    shot(page, "jobs")


def test_submit_from_the_form_and_watch_the_run_appear_live(server: Http, page: Any, expect: Any) -> None:
    page.goto(server.base + "/ui?user=ui-submit#/submit")
    page.select_option("#submit-when", "cron")
    page.fill("#submit-cron", "0 30 9 * * MON-FRI")
    page.fill("#submit-tz", "Europe/Berlin")
    preview = page.locator("#submit-preview li")
    expect(preview).to_have_count(5)
    expect(preview.first).to_contain_text("Europe/Berlin")
    assert all(re.search(r"09:30:00 Europe/Berlin", t) for t in preview.all_inner_texts()), preview.all_inner_texts()
    page.fill("#submit-cron", "61 * * * *")
    page.wait_for_selector("#submit-preview li.error-text")
    page.select_option("#submit-when", "now")
    page.fill("#submit-payload", "echo hello-from-the-browser")
    page.fill("#submit-name", "browser job")
    shot(page, "submit")
    page.click("#submit-button")
    page.wait_for_url(re.compile(r"#/jobs/[0-9a-f-]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    # the run shows up and finishes without a reload (server-sent events)
    page.wait_for_selector('#run-timeline .tick[data-status="succeeded"]')
    page.click("#runs-table tr[data-run] >> nth=0")
    expect(page.locator("#output-text")).to_contain_text("hello-from-the-browser")
    assert as_user(server, "ui-submit").runs(job_id)[0]["status"] == "succeeded"


def test_pause_resume_trigger_and_skipped_runs_on_the_job_page(server: Http, page: Any, expect: Any) -> None:
    api = as_user(server, "ui-control")
    job_id = api.submit(payload="cmd:echo tick", name="every-hour", cron_schedule="@hourly", timezone="Asia/Tokyo")
    page.goto(server.base + f"/ui?user=ui-control#/jobs/{job_id}")
    expect(page.locator("#next-fires li")).to_have_count(5)
    assert "Asia/Tokyo" in page.locator("#next-fires").inner_text()
    page.click("#job-pause")
    page.wait_for_selector("#job-resume")
    assert wait_until(lambda: api.call("GET", f"/jobs/{job_id}")[1]["status"] == "paused")
    page.click("#job-resume")
    page.wait_for_selector("#job-pause")
    assert wait_until(lambda: api.call("GET", f"/jobs/{job_id}")[1]["status"] == "scheduled")
    page.click("#job-trigger")
    page.wait_for_selector('#run-timeline .tick[data-status="succeeded"]')
    page.fill("#edit-cron", "*/30 * * * *")
    page.click("#edit-schedule button[type=submit]")
    assert wait_until(lambda: api.call("GET", f"/jobs/{job_id}")[1]["cron_schedule"] == "*/30 * * * *")
    shot(page, "job")


def test_skipped_runs_are_shown_with_their_reason(server: Http, page: Any) -> None:
    api = as_user(server, "ui-skip")
    job_id = api.submit(payload="cmd:sleep 3", name="slow", cron_schedule="@every 1s", overlap="skip")
    page.goto(server.base + f"/ui?user=ui-skip#/jobs/{job_id}")
    page.wait_for_selector('#run-timeline .tick[data-status="skipped"]', timeout=30_000)
    skipped = page.locator('#runs-table tr[data-run]:has(span[data-status="skipped"])').first
    assert "overlap" in skipped.inner_text()
    api.call("DELETE", f"/jobs/{job_id}")


def test_replay_dead_letters_one_and_many(server: Http, page: Any, expect: Any) -> None:
    api = as_user(server, "ui-dlq")
    job_ids = [
        api.submit(payload=f"cmd:echo broken; exit {4 + i}", name=f"broken-{i}", max_retries=0) for i in range(3)
    ]
    wait_until(lambda: len(api.call("GET", "/dead-letters")[1]["dead_letters"]) == 3)
    page.goto(server.base + "/ui?user=ui-dlq#/dead-letters")
    rows = page.locator("#dead-letters-table tr[data-letter]")
    expect(rows).to_have_count(3)
    assert "exit code 4" in page.locator("#dead-letters-table").inner_text()
    shot(page, "dead-letters")
    page.click(f"tr:has(a[href='#/jobs/{job_ids[0]}']) [data-replay]")
    page.wait_for_selector(".toast >> text=replayed")
    assert wait_until(lambda: len(api.runs(job_ids[0])) == 2)
    for job_id in job_ids[1:]:
        page.check(f"tr:has(a[href='#/jobs/{job_id}']) input[type=checkbox]")
    page.click("#replay-selected")
    page.wait_for_selector(".toast >> text=replayed 2")
    assert wait_until(lambda: all(len(api.runs(j)) == 2 for j in job_ids[1:]))


def test_bulk_pause_from_the_jobs_page(server: Http, page: Any, expect: Any) -> None:
    api = as_user(server, "ui-bulk")
    ids = [api.submit(payload="tick", name=f"cron-{i}", cron_schedule="@daily") for i in range(3)]
    page.goto(server.base + "/ui?user=ui-bulk")
    expect(page.locator("#jobs-table tbody tr[data-job]")).to_have_count(3)
    page.check("#jobs-table thead input[type=checkbox]")
    assert page.locator("[data-bulk=pause]").is_enabled()
    page.click("[data-bulk=pause]")
    # the list updates itself (events stream / refresh), no reload
    expect(page.locator("#jobs-table tbody tr[data-job] td:nth-child(4) .badge")).to_have_text(["paused"] * 3)
    assert all(api.call("GET", f"/jobs/{i}")[1]["status"] == "paused" for i in ids)


def test_cluster_page_shows_leader_pickers_workers_and_charts(server: Http, page: Any) -> None:
    api = as_user(server, "ui-cluster")
    for i in range(5):
        api.submit(payload=f"cmd:echo {i}")
    page.goto(server.base + "/ui?user=ui-cluster#/cluster")
    page.wait_for_selector("#workers-table td >> text=ui-node")
    assert "ui-node" in page.locator("#pickers-table").inner_text()
    assert page.locator("svg.chart").count() == 2
    shot(page, "cluster")


def test_dev_mode_asks_for_a_user_and_remembers_it(server: Http, page: Any) -> None:
    page.goto(server.base + "/ui")
    page.fill("#signin-input", "ui-remember")
    page.press("#signin-input", "Enter")
    page.wait_for_selector("#jobs-table")
    page.reload()
    page.wait_for_selector("#jobs-table")
    assert page.input_value("#who-input") == "ui-remember"


def test_keys_mode_asks_for_a_key_and_keeps_it_for_the_session(tmp_path: Path, browser: Any, expect: Any) -> None:
    import subprocess

    from tests.helpers.processes import DSCHED

    port = free_port()
    env = base_env(tmp_path / "data", port, DSCHED_NODE_ID="ui-keys", DSCHED_AUTH="keys")
    made = subprocess.run(
        [DSCHED, "keys", "create", "--tenant", "acme", "--role", "member"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    key = made.stdout.strip().splitlines()[-1]
    service = Service("all", env, tmp_path, "all").start()
    context = browser.new_context()
    try:
        Http(port).wait_healthy()
        tab = context.new_page()
        tab.set_default_timeout(TIMEOUT_MS)
        tab.goto(f"http://127.0.0.1:{port}/ui")
        assert tab.get_attribute("#signin-input", "type") == "password"
        tab.fill("#signin-input", key)
        tab.press("#signin-input", "Enter")
        tab.click("text=+ Submit a job")
        tab.fill("#submit-payload", "echo keyed-browser")
        tab.click("#submit-button")
        expect(tab.locator("#runs-table span[data-status=succeeded]").first).to_be_visible()
        stored = tab.evaluate("[sessionStorage.getItem('dsched.token'), localStorage.getItem('dsched.user')]")
        assert stored == [key, None]  # the key lives in the session only
    finally:
        context.close()
        service.stop(timeout=10)


def test_cancel_a_running_run_from_the_job_page(server: Http, page: Any, expect: Any) -> None:
    api = as_user(server, "ui-cancel")
    job_id = api.submit(payload="cmd:sleep 60", name="long", max_retries=0)
    page.goto(server.base + f"/ui?user=ui-cancel#/jobs/{job_id}")
    page.click("[data-cancel]")  # appears once the run is reported running (live)
    expect(page.locator('#run-timeline .tick[data-status="cancelled"]')).to_have_count(1)
    assert api.runs(job_id)[0]["status"] == "cancelled"
