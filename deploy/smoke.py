"""End-to-end smoke test of a running stack: submit a job through the API, wait until its run succeeded.

    python deploy/smoke.py [API_URL] [--jobs N] [--timeout SECONDS]

Exits 0 when every job ran successfully, 1 (with one line saying what is missing) otherwise. Standard
library only, so it runs from any Python 3.11 without the project installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

API_KEY = os.environ.get("DSCHED_API_KEY", "")  # set by --key: the stack runs with DSCHED_AUTH=keys


def call(base: str, method: str, path: str, user: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method)
    if API_KEY:
        request.add_header("Authorization", f"Bearer {API_KEY}")
    else:
        request.add_header("X-User-ID", user)  # DSCHED_AUTH=dev
    if data is not None:
        request.add_header("Content-Type", "application/json")
        request.add_header("Idempotency-Key", str(uuid.uuid4()))
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def wait_healthy(base: str, deadline: float) -> None:
    while True:
        try:
            call(base, "GET", "/health", "smoke")
            return
        except (urllib.error.URLError, OSError) as exc:
            if time.monotonic() > deadline:
                sys.exit(f"smoke: {base}/health never answered: {exc}")
            time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("api", nargs="?", default="http://127.0.0.1:8080")
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--key", default=None, help="API key (default: $DSCHED_API_KEY; none: X-User-ID, dev mode)")
    args = parser.parse_args()
    if args.key:
        global API_KEY
        API_KEY = args.key
    base = args.api.rstrip("/")
    deadline = time.monotonic() + args.timeout
    wait_healthy(base, deadline)

    user = f"smoke-{uuid.uuid4().hex[:8]}"
    pending: dict[str, str] = {}
    for i in range(args.jobs):
        job = call(base, "POST", "/submit", user, {"project_id": "smoke", "name": f"smoke-{i}", "payload": f"hi {i}"})
        pending[job["job_id"]] = "submitted"
    print(f"smoke: submitted {len(pending)} job(s) as {user}")

    while pending:
        for job_id in list(pending):
            runs = call(base, "GET", f"/jobs/{job_id}/runs", user)["runs"]
            statuses = [run["status"] for run in runs]
            if "succeeded" in statuses:
                del pending[job_id]
            else:
                pending[job_id] = ",".join(statuses) or "no run yet"
        if pending and time.monotonic() > deadline:
            sys.exit(f"smoke: {len(pending)} job(s) did not succeed in {args.timeout:.0f}s: {pending}")
        time.sleep(0.5)
    print("smoke: every job ran; queue stats:", json.dumps(call(base, "GET", "/queue/stats", user)))


if __name__ == "__main__":
    main()
