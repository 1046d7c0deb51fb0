"""``make stack`` as a user runs it: ``python -m dsched.libs.servers.stack`` (what the Makefile target runs).

It prints where each server and service listens and "ready"; it runs with API keys and made an admin key of tenant
``demo`` (a file of mode 0600, named on its output, the key itself never printed); every command of the README's
"Try it" block works against it with that key in place of ``X-User-ID`` (run with bash and curl as printed there,
``curl -f`` so an HTTP error fails) while ``X-User-ID`` alone is a 401; SIGTERM stops every
service and server and exits 0; a second start on the same data directory resumes: same ports, the jobs of the
first run with their runs, and the recurring job fires again.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from dsched.libs.servers.base import port_open
from dsched.libs.servers.stack import REPLICAS
from tests.helpers.processes import Http, free_port, wait_until
from tests.helpers.targets import CountingTarget

# Two starts of three JVMs and nine Python processes on a shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
READY_S = 480.0
SERVERS = ("etcd", "kafka", "cassandra", "elasticmq", "moto (S3)")


def try_it_commands() -> list[str]:
    """The shell commands of the README's "Try it" block, one string each (continuation lines, pipes and quoted
    line breaks joined), comments dropped."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Try it", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    commands: list[str] = []
    pending = ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line + "\n"
        if pending.count("'") % 2 == 0 and not line.rstrip().endswith(("\\", "|")):
            commands.append(pending)
            pending = ""
    assert not pending, f"unterminated command in the README: {pending}"
    return commands


@pytest.fixture
def hook() -> Iterator[CountingTarget]:
    server = CountingTarget()
    yield server
    server.close()


class StackRun:
    """One ``python -m dsched.libs.servers.stack`` process and the lines it printed."""

    def __init__(self, data_dir: Path, port: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSCHED_")}
        env["DSCHED_LOG_LEVEL"] = "WARNING"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dsched.libs.servers.stack", "--data-dir", str(data_dir), "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"make stack exited with {self.proc.returncode}:\n{self.output()}"
            return any("dsched stack: ready" in line for line in self.lines)

        wait_until(ready, READY_S, "make stack to print ready", interval_s=1.0)

    def where(self) -> dict[str, str]:
        """Name -> where it listens, from the lines printed before "ready"."""
        found = {}
        for line in self.lines:
            match = re.match(r"^  (\S+(?: \(S3\))?)\s+(.+)$", line)
            if match:
                found[match.group(1)] = match.group(2)
        return found

    def pids(self) -> list[int]:
        return [int(m.group(1)) for v in self.where().values() if (m := re.match(r"pid (\d+)", v))]

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"make stack did not stop within 180 s of SIGTERM:\n{self.output()}") from None
        self.reader.join(timeout=10)  # every line it printed is read
        return code

    def kill(self) -> None:
        """Stop it whatever happened (a failed assertion too): SIGTERM, as Ctrl-C, so that it stops its services and
        servers; SIGKILL only if it has not stopped within 180 s (its servers then die with it: die_with_parent)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run_readme(commands: list[str], port: int, hook: CountingTarget, http: Http, key_file: Path) -> dict[str, str]:
    """Run the README's commands against the stack, with its admin key as the README says (in place of
    ``X-User-ID: demo``); returns {"echo": job id, "recurring": job id}."""
    ids: dict[str, str] = {}
    for command in commands:
        line = command.replace("localhost:8080", f"127.0.0.1:{port}").replace("curl -s ", "curl -sf ")
        line = line.replace("-H 'X-User-ID: demo'", f'-H "Authorization: Bearer $(cat {key_file})"')
        line = line.replace("http://127.0.0.1:9000/hook", hook.url).replace("python3 ", f"{sys.executable} ")
        if "6f1c…" in line or "<run_id>" in line:
            runs = wait_until(
                lambda: [r for r in http.runs(ids["echo"]) if r["status"] == "succeeded"],
                120.0,
                "the README's first job to succeed",
            )
            line = line.replace("6f1c…", ids["echo"]).replace("<run_id>", runs[0]["run_id"])
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"README command failed ({done.returncode}): {line}\n{done.stdout}{done.stderr}"
        answer = orjson.loads(done.stdout) if done.stdout.startswith("{") else {}
        if '"cmd:echo hi"' in line:
            ids["echo"] = answer["job_id"]
        if '"@every 5s"' in line:
            ids["recurring"] = answer["job_id"]
        if "/output" in line:
            assert done.stdout == "hi\n", done.stdout
    return ids


def test_make_stack_serves_the_readme_stops_on_sigterm_and_resumes(tmp_path: Path, hook: CountingTarget) -> None:
    data_dir, port = tmp_path / "stack", free_port()
    first = StackRun(data_dir, port)
    key_file = data_dir / "admin.key"
    try:
        first.wait_ready()
        assert any(str(key_file) in line for line in first.lines), first.output()
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert key.startswith("dsk_") and not any(key in line for line in first.lines)
        http = Http(port, user="demo", token=key)
        assert Http(port, user="demo").call("GET", "/jobs")[0] == 401  # X-User-ID alone: not in keys mode
        where = first.where()
        assert all(name in where for name in SERVERS), first.output()
        services = {f"{service}-{i}" for service, count in REPLICAS.items() for i in range(count)}
        assert services <= set(where), first.output()
        assert where["ingestion-0"].endswith(f"API http://127.0.0.1:{port}")
        ids = _run_readme(try_it_commands(), port, hook, http, key_file)
        wait_until(lambda: hook.total >= 1, 120.0, "the README's HTTP job to call its target")
        wait_until(lambda: len(http.runs(ids["recurring"])) >= 2, 120.0, "two runs of the recurring job")
        assert first.terminate() == 0, first.output()
    finally:
        first.kill()
    assert first.lines[-1] == "dsched stack: stopped", first.output()
    assert not [pid for pid in first.pids() if _alive(pid)], "service processes left running"
    ports = [int(m.group(1)) for v in where.values() if (m := re.search(r"127\.0\.0\.1:(\d+)", v))]
    assert not [p for p in ports if port_open(p)], "servers left listening"

    second = StackRun(data_dir, port)
    try:
        second.wait_ready()
        assert {k: v for k, v in second.where().items() if k in SERVERS} == {k: where[k] for k in SERVERS}
        status, job = http.call("GET", f"/jobs/{ids['echo']}")
        assert status == 200 and job["job_id"] == ids["echo"], job
        assert [r["output"] for r in http.runs(ids["echo"]) if r["status"] == "succeeded"] == ["hi\n"]
        before = len(http.runs(ids["recurring"]))
        wait_until(lambda: len(http.runs(ids["recurring"])) > before, 120.0, "the recurring job to fire again")
        assert second.terminate() == 0, second.output()
    finally:
        with contextlib.suppress(Exception):
            second.kill()
