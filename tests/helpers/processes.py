"""The real ``dsched`` command as subprocesses (procrastinate's acceptance style), and a small HTTP client."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson

T = TypeVar("T")


def wait_until(
    check: Callable[[], T | None], timeout_s: float = 20.0, what: str = "condition", interval_s: float = 0.2
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``timeout_s`` saying ``what`` was awaited."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last: {last!r})")


DSCHED = str(Path(sys.executable).with_name("dsched"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """One ``dsched run <what>`` process; stderr (JSON logs) goes to a file for post-mortems."""

    def __init__(self, what: str, env: dict[str, str], log_dir: Path, name: str | None = None) -> None:
        self.what, self.env, self.name = what, env, name or what
        self.log_path = log_dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [DSCHED, "run", self.what], env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


class Http:
    """A blocking client of one ingestion: as ``user`` (``X-User-ID``, dev mode) or, once ``token`` is set, with
    ``Authorization: Bearer <token>``."""

    def __init__(self, port: int, user: str = "acceptance", token: str | None = None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.user = user
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = orjson.dumps(body) if body is not None else None
        req = urllib.request.Request(
            self.base + path,
            data=data,
            method=method,
            headers={
                **({"Authorization": f"Bearer {self.token}"} if self.token else {"X-User-ID": self.user}),
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, orjson.loads(err.read() or b"{}")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.call("GET", "/health")[0] == 200:
                    return
            time.sleep(0.1)
        raise AssertionError("ingestion did not become healthy")

    def submit(self, **body: Any) -> str:
        body.setdefault("project_id", "acceptance")
        status, data = self.call("POST", "/submit", body)
        assert status == 202, data
        return str(data["job_id"])

    def runs(self, job_id: str) -> list[dict[str, Any]]:
        status, data = self.call("GET", f"/jobs/{job_id}/runs?limit=1000")
        return list(data["runs"]) if status == 200 else []

    def wait_all_succeeded(self, job_ids: list[str], timeout: float) -> dict[str, list[dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        pending = set(job_ids)
        done: dict[str, list[dict[str, Any]]] = {}
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                runs = self.runs(job_id)
                if any(r["status"] == "succeeded" for r in runs):
                    done[job_id] = runs
                    pending.discard(job_id)
            if pending:
                time.sleep(0.2)
        assert not pending, f"{len(pending)} of {len(job_ids)} jobs never succeeded, e.g. {sorted(pending)[:3]}"
        return done


def base_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSCHED_")}
    env.update(
        {
            "DSCHED_DATA_DIR": str(data_dir),
            "DSCHED_PORT": str(port),
            "DSCHED_SHARD_COUNT": "8",
            "DSCHED_BUCKET_S": "10",
            "DSCHED_BUCKET_GRACE_S": "2",
            "DSCHED_LEASE_TTL_S": "2",
            "DSCHED_ALLOW_CMD": "true",
            "DSCHED_ALLOW_PRIVATE_HTTP": "true",
            "DSCHED_SHUTDOWN_GRACE_S": "2",
        }
    )
    env.update(extra)
    return env
