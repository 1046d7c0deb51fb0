"""The client CLI (``dsched jobs|runs|dlq|cluster``) as a user runs it: subprocesses against a running pipeline."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.processes import DSCHED, Http, Service, base_env, free_port, wait_until

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``dsched run all`` on a free port for the whole module; yields its base URL."""
    tmp = tmp_path_factory.mktemp("client-cli")
    port = free_port()
    service = Service("all", base_env(tmp / "data", port, DSCHED_NODE_ID="cli-1"), tmp, "all").start()
    try:
        Http(port).wait_healthy()
        yield f"http://127.0.0.1:{port}"
    finally:
        service.stop(timeout=10)


def dsched(
    url: str, *args: str, user: str | None = "cli", timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the CLI; the environment names the server and user the way a user's shell would."""
    full_env = {"PATH": "/usr/bin:/bin", "DSCHED_URL": url, **env}
    if user is not None:
        full_env["DSCHED_USER"] = user
    return subprocess.run([DSCHED, *args], env=full_env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(proc))


def test_version() -> None:
    proc = subprocess.run([DSCHED, "--version"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert re.fullmatch(r"dsched \d+\.\d+\.\d+\S*\n", proc.stdout), proc.stdout


def test_submit_wait_runs_output(server: str) -> None:
    job_id = ok(dsched(server, "jobs", "submit", "cmd:echo hello-from-cli", "--project", "cli", "--name", "greet"))
    job_id = job_id.strip()
    assert UUID.match(job_id), job_id
    waited = dsched(server, "jobs", "wait", job_id, "--timeout", "30")
    assert waited.returncode == 0, waited.stderr
    assert "succeeded" in waited.stdout and "hello-from-cli" in waited.stdout
    runs = as_json(dsched(server, "jobs", "runs", job_id, "--json"))["runs"]
    assert [r["status"] for r in runs] == ["succeeded"]
    table = ok(dsched(server, "jobs", "runs", job_id))
    assert table.splitlines()[0].split()[:3] == ["RUN", "ID", "ATTEMPT"]
    assert runs[0]["run_id"] in table
    assert ok(dsched(server, "runs", "output", runs[0]["run_id"])) == "hello-from-cli\n"
    job = as_json(dsched(server, "jobs", "get", job_id, "--json"))
    assert (job["job_id"], job["name"], job["status"]) == (job_id, "greet", "succeeded")
    shown = ok(dsched(server, "jobs", "get", job_id))
    assert "status:    succeeded" in shown and "cmd:echo hello-from-cli" in shown


def test_submit_json_and_wait_flag(server: str) -> None:
    answer = as_json(dsched(server, "jobs", "submit", "plain text payload", "--json", "--project", "cli"))
    assert answer["status"] == "Submitted" and UUID.match(answer["job_id"])
    proc = dsched(server, "jobs", "submit", "cmd:echo waited", "--wait", "--timeout", "30")
    lines = ok(proc).splitlines()
    assert UUID.match(lines[0]) and "succeeded" in lines[1] and lines[-1] == "waited"


def test_failed_run_exits_1_and_is_replayed_from_the_dead_letters(server: str) -> None:
    job_id = ok(dsched(server, "jobs", "submit", "cmd:echo boom; exit 3", "--max-retries", "0", user="cli-dlq"))
    job_id = job_id.strip()
    waited = dsched(server, "jobs", "wait", job_id, "--timeout", "30", user="cli-dlq")
    assert waited.returncode == 1, (waited.stdout, waited.stderr)
    assert "failed" in waited.stdout and "exit code 3" in waited.stdout
    letters = wait_until(lambda: as_json(dsched(server, "dlq", "list", "--json", user="cli-dlq"))["dead_letters"])
    assert [d["job_id"] for d in letters] == [job_id]
    assert letters[0]["id"] in ok(dsched(server, "dlq", "list", user="cli-dlq"))
    replayed = ok(dsched(server, "dlq", "replay", letters[0]["id"], user="cli-dlq"))
    assert "Replayed" in replayed
    wait_until(lambda: len(as_json(dsched(server, "jobs", "runs", job_id, "--json", user="cli-dlq"))["runs"]) == 2)
    # other tenants see none of it
    assert as_json(dsched(server, "dlq", "list", "--json", user="someone-else"))["dead_letters"] == []


def test_list_filter_search_and_table(server: str) -> None:
    user = "cli-list"
    ids = [ok(dsched(server, "jobs", "submit", f"item {i}", "--name", f"nightly-{i}", "--project", "reports",
                     "--at", "+1h", user=user)).strip() for i in range(3)]  # fmt: skip
    other = ok(dsched(server, "jobs", "submit", "x", "--name", "adhoc", "--project", "misc", "--at", "+1h", user=user))
    listed = as_json(dsched(server, "jobs", "list", "--json", "--project", "reports", user=user))["jobs"]
    assert [j["job_id"] for j in listed] == ids[::-1]  # newest first
    table = ok(dsched(server, "jobs", "list", user=user)).splitlines()
    assert table[0].split()[:4] == ["JOB", "ID", "NAME", "PROJECT"]
    assert len(table) == 5 and other.strip() in table[1]
    found = as_json(dsched(server, "jobs", "list", "--search", "NIGHTLY-1", "--json", user=user))["jobs"]
    assert [j["job_id"] for j in found] == [ids[1]]
    by_id = as_json(dsched(server, "jobs", "list", "-q", ids[2], "--json", user=user))["jobs"]
    assert [j["job_id"] for j in by_id] == [ids[2]]
    assert ok(dsched(server, "jobs", "list", "--status", "failed", user=user)).strip() == "no jobs"
    paged = as_json(dsched(server, "jobs", "list", "--limit", "2", "--json", user=user))
    assert len(paged["jobs"]) == 2 and paged["next_cursor"]
    rest = as_json(
        dsched(server, "jobs", "list", "--limit", "2", "--cursor", paged["next_cursor"], "--json", user=user)
    )
    assert len(rest["jobs"]) == 2 and not {j["job_id"] for j in rest["jobs"]} & {j["job_id"] for j in paged["jobs"]}


def test_pause_resume_trigger_delete_one_and_many(server: str) -> None:
    user = "cli-control"
    a = ok(dsched(server, "jobs", "submit", "tick", "--cron", "0 9 * * MON-FRI", "--tz", "Europe/Berlin", user=user))
    b = ok(dsched(server, "jobs", "submit", "tock", "--cron", "@every 1h", user=user))
    a, b = a.strip(), b.strip()
    schedule = as_json(dsched(server, "jobs", "schedule", a, "--next", "3", "--json", user=user))
    assert schedule["timezone"] == "Europe/Berlin" and len(schedule["next"]) == 3
    assert all(t.endswith(("T07:00:00.000Z", "T08:00:00.000Z")) for t in schedule["next"]), schedule

    def status(job_id: str) -> str:
        return str(as_json(dsched(server, "jobs", "get", job_id, "--json", user=user))["status"])

    assert ok(dsched(server, "jobs", "pause", a, user=user)).strip() == f"{a}: Paused"
    wait_until(lambda: status(a) == "paused")
    partly = dsched(server, "jobs", "resume", a, b, "no-such-job", "--json", user=user)
    assert partly.returncode == 1  # one of the three failed
    bulk = json.loads(partly.stdout)
    assert (bulk["ok"], bulk["failed"]) == (2, 1)
    wait_until(lambda: status(a) == "scheduled")
    assert ok(dsched(server, "jobs", "trigger", b, user=user)).strip() == f"{b}: Triggered"
    wait_until(lambda: any(r["status"] == "succeeded" for r in as_json(
        dsched(server, "jobs", "runs", b, "--json", user=user))["runs"]))  # fmt: skip
    ok(dsched(server, "jobs", "delete", a, b, user=user))
    wait_until(lambda: status(a) == "deleted" and status(b) == "deleted")


def test_large_output_is_streamed_whole(server: str) -> None:
    job_id = ok(dsched(server, "jobs", "submit", "cmd:head -c 50000 /dev/zero | tr '\\0' x; echo", "--wait")).split()[0]
    run_id = as_json(dsched(server, "jobs", "runs", job_id, "--json"))["runs"][0]["run_id"]
    out = ok(dsched(server, "runs", "output", run_id))
    assert out == "x" * 50000 + "\n"
    assert as_json(dsched(server, "runs", "get", run_id, "--json"))["output_truncated"] is True


def test_cancel_a_running_run(server: str) -> None:
    job_id = ok(dsched(server, "jobs", "submit", "cmd:sleep 30", "--max-retries", "0")).strip()
    run = wait_until(lambda: next(iter(r for r in as_json(dsched(server, "jobs", "runs", job_id, "--json"))["runs"]
                                     if r["status"] == "running"), None))  # fmt: skip
    assert ok(dsched(server, "runs", "cancel", run["run_id"])).strip() == f"{run['run_id']}: Cancelling"
    waited = dsched(server, "jobs", "wait", job_id, "--timeout", "20")
    assert waited.returncode == 1 and "cancelled" in waited.stdout, waited.stdout


def _settled_status(server: str) -> Any:
    """``cluster status --json`` once every shard is assigned: with the tests' 2 s lease, a loaded machine may let a
    lease lapse, and the status shows the picker without shards until the coordinator has assigned them again."""
    status = as_json(dsched(server, "cluster", "status", "--json"))
    return status if sorted(s for p in status["cluster"]["pickers"] for s in p["shards"]) == list(range(8)) else None


def _status_text_with(server: str, part: str) -> str | None:
    text = ok(dsched(server, "cluster", "status"))
    return text if part in text else None


def test_cluster_status_and_workers(server: str) -> None:
    status = wait_until(lambda: _settled_status(server), what="every shard assigned")
    assert status["cluster"]["leader"] == "cli-1"
    assert [p["node_id"] for p in status["cluster"]["pickers"]] == ["cli-1"]
    assert [w["node_id"] for w in status["cluster"]["workers"]] == ["cli-1"]
    writer = status["cluster"]["writer"]
    assert isinstance(writer["backlog"], int) and writer["backlog"] >= 0 and writer["max_backlog"] == 20_000
    assert writer["refuse_all_above"] == 40_000
    text = wait_until(lambda: _status_text_with(server, "0-7"), what="every shard assigned, in the table")
    assert "leader:   cli-1" in text
    pattern = (
        r"^writer:   \d+ submissions left to store; "
        r"new work refused above 20000 from tenants over their share, above 40000 from all$"
    )
    assert re.search(pattern, text, re.M), text
    workers = as_json(dsched(server, "cluster", "workers", "--json"))["workers"]
    assert workers[0]["slots"] > 0


def test_one_line_errors(server: str) -> None:
    unreachable = dsched(f"http://127.0.0.1:{free_port()}", "jobs", "list")
    assert unreachable.returncode == 3
    assert (
        unreachable.stderr.startswith("dsched: cannot reach http://127.0.0.1:") and unreachable.stderr.count("\n") == 1
    )
    missing = dsched(server, "jobs", "get", "no-such-job")
    assert missing.returncode == 1 and missing.stderr.startswith("dsched: 404 ") and "Traceback" not in missing.stderr
    anonymous = dsched(server, "jobs", "list", user=None)
    assert anonymous.returncode == 1 and anonymous.stderr.startswith("dsched: 401 ")
    assert "--user/DSCHED_USER" in anonymous.stderr
    bad = dsched(server, "jobs", "submit", "x", "--cron", "not a cron")
    assert bad.returncode == 1 and "cron_schedule" in bad.stderr and bad.stderr.count("\n") == 1


def test_url_flag_wins_over_the_environment(server: str) -> None:
    proc = dsched(f"http://127.0.0.1:{free_port()}", "jobs", "list", "--url", server, "--json")
    assert "jobs" in as_json(proc)


def test_common_options_may_come_before_the_command(server: str) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    job_id = ok(dsched(nowhere, "--url", server, "--user", "cli-front", "jobs", "submit", "x", "--at", "+1h"))
    listed = as_json(dsched(nowhere, "--json", f"--url={server}", "jobs", "list", user="cli-front"))["jobs"]
    assert [j["job_id"] for j in listed] == [job_id.strip()]
    after_wins = dsched(server, "--url", server, "jobs", "list", "--url", nowhere, user="cli-front")
    assert after_wins.returncode == 3 and nowhere in after_wins.stderr
    accepted = ok(dsched(server, "jobs", "list", "--status", "submitted", user="cli-front"))  # a status to filter on
    assert accepted.strip() == "no jobs" or job_id.strip() in accepted  # the writer may not have stored it yet


def test_bash_completion(tmp_path: Path) -> None:
    script = subprocess.run([DSCHED, "completion", "bash"], capture_output=True, text=True, timeout=30)
    assert script.returncode == 0
    path = tmp_path / "dsched.bash"
    path.write_text(script.stdout)
    probe = (
        f"source {path}; COMP_WORDS=(dsched jobs pa); COMP_CWORD=2; _dsched_complete; echo ${{COMPREPLY[@]}};"
        "COMP_WORDS=(dsched jobs list --st); COMP_CWORD=3; _dsched_complete; echo ${COMPREPLY[@]}"
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert out.stdout.splitlines() == ["pause", "--status"], (out.stdout, out.stderr)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """``dsched run all`` with ``DSCHED_AUTH=keys``; yields its URL and API keys made by ``dsched keys create``."""
    tmp = tmp_path_factory.mktemp("client-cli-keys")
    port = free_port()
    env = base_env(tmp / "data", port, DSCHED_NODE_ID="keys-1", DSCHED_AUTH="keys")
    keys = {}
    for role in ("viewer", "member", "admin"):
        made = subprocess.run(
            [DSCHED, "keys", "create", "--tenant", "acme", "--role", role],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        keys[role] = made.stdout.strip().splitlines()[-1]
    service = Service("all", env, tmp, "all").start()
    try:
        Http(port).wait_healthy()
        yield f"http://127.0.0.1:{port}", keys
    finally:
        service.stop(timeout=10)


def test_api_keys_and_roles(keyed: tuple[str, dict[str, str]]) -> None:
    url, keys = keyed
    submitted = dsched(url, "jobs", "submit", "cmd:echo keyed", "--wait", "--api-key", keys["member"], user=None)
    assert "succeeded" in ok(submitted)
    job_id = submitted.stdout.split()[0]
    listed = as_json(dsched(url, "jobs", "list", "--json", user=None, DSCHED_API_KEY=keys["viewer"]))["jobs"]
    assert [j["job_id"] for j in listed] == [job_id]  # the same tenant, through the environment variable
    refused = dsched(url, "jobs", "pause", job_id, "--api-key", keys["viewer"], user=None)
    assert refused.returncode == 1 and refused.stderr.startswith("dsched: 403 ") and "role" in refused.stderr
    member_cluster = dsched(url, "cluster", "status", "--api-key", keys["member"], user=None)
    assert member_cluster.returncode == 1 and member_cluster.stderr.startswith("dsched: 403 ")
    assert "leader:   keys-1" in ok(dsched(url, "cluster", "status", "--api-key", keys["admin"], user=None))
    bad = dsched(url, "jobs", "list", "--api-key", "dsk_nope_nope", user=None)
    assert bad.returncode == 1 and bad.stderr.startswith("dsched: 401 ") and "--api-key" in bad.stderr
    # dev-mode identity is not accepted in keys mode
    assert dsched(url, "jobs", "list", user="acme").returncode == 1


def test_wait_shows_a_live_progress_line_on_a_terminal_and_times_out_with_3(server: str) -> None:
    import os
    import pty
    import select

    job_id = ok(dsched(server, "jobs", "submit", "later", "--at", "+1h")).strip()
    master, slave = pty.openpty()
    env = {"PATH": "/usr/bin:/bin", "DSCHED_URL": server, "DSCHED_USER": "cli"}
    proc = subprocess.Popen(
        [DSCHED, "jobs", "wait", job_id, "--timeout", "2"], env=env, stdin=slave, stderr=slave,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                seen += os.read(master, 4096)
            except OSError:
                break
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(10) == 3
    text = seen.decode(errors="replace")
    assert f"job {job_id[:8]}: waiting for the next run" in text and "\r\x1b[K" in text
    assert "timed out after 2s" in text
