"""Take the README's dashboard screenshots from a running dsched (``make run``) with some demo data.

    .venv/bin/python docs/screenshots/take.py http://127.0.0.1:8080 demo

Uses Debian's chromium (``/usr/bin/chromium``) through Playwright; writes docs/screenshots/*.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
OUT = Path(__file__).parent


def main(url: str, user: str) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1360, "height": 820})
        page.set_default_timeout(20_000)
        page.goto(f"{url}/ui?user={user}#/jobs")
        page.wait_for_selector("#jobs-table tbody tr[data-job]")
        page.wait_for_timeout(800)
        page.screenshot(path=OUT / "jobs.png")
        page.fill("#filter-search", "slow-sync")
        page.click("text=slow-sync (overlap: skip)")
        page.wait_for_selector('#run-timeline .tick[data-status="skipped"]')
        page.wait_for_timeout(800)
        page.click('#runs-table tr[data-run]:has(span[data-status="succeeded"]) >> nth=0')
        page.wait_for_timeout(800)
        page.screenshot(path=OUT / "job.png", full_page=True)
        page.goto(f"{url}/ui#/dead-letters")
        page.wait_for_selector("#dead-letters-table tr[data-letter]")
        page.wait_for_timeout(500)
        page.screenshot(path=OUT / "dead-letters.png")
        page.goto(f"{url}/ui#/cluster")
        page.wait_for_selector("#workers-table")
        page.wait_for_timeout(1000)
        page.screenshot(path=OUT / "cluster.png", full_page=True)
        page.goto(f"{url}/ui#/submit")
        page.select_option("#submit-when", "cron")
        page.fill("#submit-payload", "./backup.sh --incremental")
        page.fill("#submit-name", "nightly backup")
        page.fill("#submit-cron", "30 2 * * *")
        page.fill("#submit-tz", "America/New_York")
        page.wait_for_timeout(1000)
        page.screenshot(path=OUT / "submit.png", full_page=True)
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080", sys.argv[2] if len(sys.argv) > 2 else "demo")
