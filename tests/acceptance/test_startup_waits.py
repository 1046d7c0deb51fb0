"""Issue 9, item 10: a service started while a backend is briefly down waits for it (bounded, logged) instead of
exiting — here etcd, which is not running yet when a worker, a picker and a coordinator start."""

from __future__ import annotations

import time
from pathlib import Path

from dsched.libs.servers.etcd import EtcdServer
from tests.helpers.processes import Service, base_env, free_port


def _log(service: Service) -> str:
    return service.log_path.read_text(errors="replace") if service.log_path.exists() else ""


def _wait(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise AssertionError(what)


def test_services_started_while_etcd_is_down_wait_for_it(tmp_path: Path) -> None:
    etcd_port = free_port()
    env = base_env(
        tmp_path / "data",
        free_port(),
        DSCHED_COORDINATION_URL=f"etcd://127.0.0.1:{etcd_port}/startup",
        DSCHED_STARTUP_RETRY_S="60",
    )
    services = [Service(what, env, tmp_path, name=what).start() for what in ("worker", "picker", "coordinator")]
    etcd = EtcdServer(tmp_path / "etcd", client_port=etcd_port)
    try:
        _wait(
            lambda: all('"startup_retry"' in _log(s) for s in services), 30, "no startup_retry line while etcd is down"
        )
        time.sleep(1.0)
        for service in services:
            assert service.proc is not None and service.proc.poll() is None, f"{service.what} exited:\n{_log(service)}"
        etcd.start()
        _wait(lambda: all('"started"' in _log(s) for s in services), 60, "services did not start once etcd was up")
        _wait(lambda: '"assignment"' in _log(services[1]), 30, "the picker got no shards from the coordinator")
        for service in services:
            assert service.proc is not None and service.proc.poll() is None, f"{service.what} exited:\n{_log(service)}"
    finally:
        codes = {s.what: s.stop() for s in services}
        etcd.stop()
    assert codes == {"worker": 0, "picker": 0, "coordinator": 0}, codes


def test_a_backend_that_stays_down_ends_start_up_with_one_line_after_the_budget(tmp_path: Path) -> None:
    env = base_env(
        tmp_path / "data",
        free_port(),
        DSCHED_COORDINATION_URL=f"etcd://127.0.0.1:{free_port()}/startup",
        DSCHED_STARTUP_RETRY_S="1.5",
    )
    started = time.monotonic()
    service = Service("picker", env, tmp_path).start()
    assert service.proc is not None
    code = service.proc.wait(60)
    assert code != 0
    assert 1.5 <= time.monotonic() - started < 60
    text = _log(service)
    assert '"startup_retry"' in text and '"startup_gave_up"' in text
    assert [line for line in text.splitlines() if line.startswith("dsched:")], text[-2000:]
