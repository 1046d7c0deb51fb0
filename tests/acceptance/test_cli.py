"""The real CLI: separate service processes on one data directory, crash recovery, clean shutdown."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.helpers.processes import Http, Service, base_env, free_port


def in_seconds(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_separate_processes_share_one_data_directory(tmp_path: Path, services: list[Service]) -> None:
    port = free_port()
    env = base_env(tmp_path / "data", port)
    for i, what in enumerate(["ingestion", "writer", "coordinator", "picker", "picker", "worker", "worker"]):
        services.append(Service(what, {**env, "DSCHED_NODE_ID": f"{what}-{i}"}, tmp_path, f"{what}-{i}").start())
    http = Http(port)
    http.wait_healthy()
    job_ids = [http.submit(payload=f"cmd:echo job-{i}") for i in range(20)]
    job_ids += [http.submit(payload=f"later-{i}", next_fire_at=in_seconds(2)) for i in range(10)]
    done = http.wait_all_succeeded(job_ids, timeout=30)
    for job_id, runs in done.items():
        assert len([r for r in runs if r["status"] == "succeeded"]) == 1, (job_id, runs)
    workers = {r["worker_id"] for runs in done.values() for r in runs}
    assert workers <= {"worker-5", "worker-6"}


def test_sigkill_then_restart_loses_no_accepted_job(tmp_path: Path, services: list[Service]) -> None:
    port = free_port()
    env = base_env(tmp_path / "data", port, DSCHED_NODE_ID="all-1")
    first = Service("all", env, tmp_path, "all-first").start()
    services.append(first)
    http = Http(port)
    http.wait_healthy()
    job_ids = [http.submit(payload=f"cmd:echo {i}", next_fire_at=in_seconds(1.5 + i * 0.05)) for i in range(40)]
    job_ids += [http.submit(payload="cmd:sleep 0.5") for _ in range(10)]
    first.kill(signal.SIGKILL)
    assert first.proc is not None
    first.proc.wait(5)
    second = Service("all", {**env, "DSCHED_NODE_ID": "all-2"}, tmp_path, "all-second").start()
    services.append(second)
    http.wait_healthy()
    http.wait_all_succeeded(job_ids, timeout=60)


def test_sigterm_stops_cleanly_within_seconds_and_hands_back_the_run_in_flight(
    tmp_path: Path, services: list[Service]
) -> None:
    port = free_port()
    # A visibility timeout far beyond the test's waits: only a hand-back can make the message visible in time.
    env = base_env(tmp_path / "data", port, DSCHED_VISIBILITY_TIMEOUT_S="600")
    service = Service("all", env, tmp_path, "all").start()
    services.append(service)
    http = Http(port)
    http.wait_healthy()
    marker = tmp_path / "executions"
    long_job = http.submit(payload=f"cmd:echo started >> {marker}; sleep 4", max_retries=0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(0.1)
    assert marker.exists(), "the run never started"
    t0 = time.monotonic()
    code = service.stop(timeout=15)
    assert code == 0
    assert time.monotonic() - t0 < 8  # the 2 s grace, then the run is stopped and handed back
    assert '"stopped"' in service.log_path.read_text()
    # Handed back, not lost: the message is visible again at once and a restarted worker runs it to its end.
    restarted = Service("all", {**env, "DSCHED_NODE_ID": "all-2"}, tmp_path, "all-2").start()
    services.append(restarted)
    http.wait_healthy()
    runs = http.wait_all_succeeded([long_job], timeout=30)[long_job]
    assert marker.read_text().splitlines() == ["started", "started"]
    assert [r["status"] for r in runs if r["status"] == "succeeded"] == ["succeeded"]


def test_bad_backend_url_fails_with_one_line(tmp_path: Path) -> None:
    import subprocess

    from tests.helpers.processes import DSCHED

    env = base_env(tmp_path / "data", free_port(), DSCHED_QUEUE_URL="nosuch://x")
    proc = subprocess.run([DSCHED, "run", "worker"], env=env, capture_output=True, timeout=30)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.decode().splitlines() if line.startswith("dsched:")]
    assert lines == ["dsched: DSCHED_QUEUE_URL: unsupported scheme 'nosuch' (use sqlite:// or sqs://)"]
    assert "Traceback" not in proc.stderr.decode()


def test_db_check_reports_each_embedded_file_and_fails_on_a_damaged_one(tmp_path: Path) -> None:
    import asyncio
    import subprocess

    from dsched.libs.store.sqlite import SqliteStore
    from tests.helpers.processes import DSCHED
    from tests.helpers.store_contract import make_job

    data = tmp_path / "data"

    async def fill() -> None:
        store = SqliteStore(data / "store.db")
        await store.startup()
        await store.put_jobs([make_job("u", 1_000 + i) for i in range(400)])
        await store.shutdown()  # the last connection closes: the WAL is copied into the file

    asyncio.run(fill())
    env = base_env(data, free_port())
    intact = subprocess.run([DSCHED, "db", "check"], env=env, capture_output=True, timeout=60)
    assert intact.returncode == 0, intact.stderr.decode()
    assert intact.stdout.decode().splitlines() == ["store.db: ok"]

    with (data / "store.db").open("r+b") as file:  # garbage over pages 3-6 (4 KiB pages): the jobs' b-tree
        file.seek(2 * 4096)
        file.write(b"\xa5" * 4 * 4096)
    damaged = subprocess.run([DSCHED, "db", "check"], env=env, capture_output=True, timeout=60)
    assert damaged.returncode == 1
    assert damaged.stdout.decode().startswith("store.db: DAMAGED\n  ")
    assert "Traceback" not in damaged.stderr.decode()
