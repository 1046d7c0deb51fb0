"""``dsched run all`` over several OS processes (app/processes.py): the real command and its children.

A job runs end to end with writer and picker in one child and the worker in others; a child killed by SIGKILL is
noticed (``/health`` 503, logged, restarted) and jobs run again; one that keeps dying stops the whole command
non-zero, never a silent partial cluster; SIGTERM stops the children first and exits 0 with nothing left behind.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.processes import Http, Service, base_env, free_port, wait_until


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return sorted(found)


def running(pid: int) -> str:
    """The services a child runs: the argument of its ``dsched run``."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2].decode()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def health(http: Http) -> tuple[int, dict[str, Any]]:
    try:
        return http.call("GET", "/health")
    except OSError:
        return 0, {}


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    port = free_port()
    env = base_env(tmp_path / "data", port, DSCHED_PROCESSES="4", DSCHED_NODE_ID="multi")
    service = Service("all", env, tmp_path, "all").start()
    http = Http(port)
    try:
        http.wait_healthy(timeout=60)
        yield service, http
    finally:
        service.stop(timeout=30)
        assert service.proc is not None
        for child in children_of(service.proc.pid):
            os.kill(child, signal.SIGKILL)


def test_a_job_runs_across_the_children_and_a_killed_child_is_noticed_and_restarted(cluster: Any) -> None:
    service, http = cluster
    assert service.proc is not None
    status, report = health(http)
    assert status == 200
    assert {"writer-picker", "worker-1", "worker-2"} <= set(report["services"]), report
    # The parent runs only the API and the coordinator; the rest is in the children.
    assert not {"worker", "writer", "picker"} & set(report["services"]), report
    children = children_of(service.proc.pid)
    assert sorted(running(pid) for pid in children) == ["worker", "worker", "writer,picker"], children

    job_id = http.submit(payload="cmd:echo from a child")
    runs = http.wait_all_succeeded([job_id], timeout=30)[job_id]
    assert runs[0]["output"] == "from a child\n"
    assert runs[0]["worker_id"].startswith("multi-w"), runs[0]
    # One scrape of the API port covers the children: the run a child finished is counted there, labelled.
    with urllib.request.urlopen(f"{http.base}/metrics", timeout=10) as answer:
        families = {f.name: f for f in text_string_to_metric_families(answer.read().decode())}
    finished = [s for s in families["dsched_runs"].samples if s.name == "dsched_runs_total"]
    assert any(s.labels.get("process", "").startswith("worker-") and s.value >= 1 for s in finished), finished
    dispatched = [s for s in families["dsched_picker_dispatched"].samples if s.name.endswith("_total")]
    assert any(s.labels.get("process") == "writer-picker" and s.value >= 1 for s in dispatched), dispatched
    assert "dsched_http_requests" in families  # the parent's own series are still there

    for kind, name in (("worker", "worker-"), ("writer,picker", "writer-picker")):
        victim = next(pid for pid in children_of(service.proc.pid) if running(pid) == kind)
        before = children_of(service.proc.pid)
        os.kill(victim, signal.SIGKILL)
        status, report = wait_until(lambda: (h := health(http))[0] == 503 and h, 10, "/health 503")
        down = [name for name, s in report["services"].items() if s["state"] != "up"]
        assert len(down) == 1 and down[0].startswith(name), report

        def restarted(down: str = down[0]) -> dict[str, Any] | None:
            status, report = health(http)
            return report if status == 200 and report["services"][down]["restarts"] == 1 else None

        wait_until(restarted, 30, f"the child {kind} restarted")
        replacement = [pid for pid in children_of(service.proc.pid) if pid not in before]
        assert len(replacement) == 1 and len(children_of(service.proc.pid)) == 3
        assert running(replacement[0]) == kind
        log = service.log_path.read_text()
        assert '"event":"child_exited"' in log.replace(" ", "") and str(victim) in log

        after = http.submit(payload=f"cmd:echo still served after {kind} died")
        assert http.wait_all_succeeded([after], timeout=30)[after][0]["status"] == "succeeded"

    # SIGTERM: the children stop first, then the parent; exit 0 and no process left.
    children = children_of(service.proc.pid)
    assert service.stop(timeout=30) == 0
    assert not [pid for pid in children if alive(pid)]


def test_a_child_that_keeps_dying_stops_the_command_non_zero(cluster: Any) -> None:
    service, _http = cluster
    assert service.proc is not None
    killed: set[int] = set()
    deadline = time.monotonic() + 90
    while service.proc.poll() is None and time.monotonic() < deadline:
        for pid in children_of(service.proc.pid):
            if pid not in killed:
                killed.add(pid)
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    assert service.proc.poll() not in (None, 0), "the command did not stop"
    assert len(killed) > 5
    assert "failed 6 times within 60 s" in service.log_path.read_text()
    assert not [pid for pid in killed if alive(pid)]
