"""Real servers for tests: etcd and moto (SQS + S3), on free 127.0.0.1 ports.

The classes work outside pytest too (acceptance tests, the chaos runner)::

    with EtcdServer() as etcd, MotoServer() as moto:
        url = etcd.url            # etcd://127.0.0.1:PORT
        endpoint = moto.endpoint  # http://127.0.0.1:PORT
        etcd.restart()            # same port, same data: clients reconnect
        etcd.stop(); ...; etcd.start()   # an outage of any length
        etcd.pause(); ...; etcd.resume()  # SIGSTOP/SIGCONT: a server that hangs instead of refusing

:class:`EtcdCluster` runs several etcd members (``cluster.members[i]`` are servers as above) for failover.

A server keeps its ports across restarts, so URLs handed out stay valid. etcd also keeps its data directory
(a restart is a crash-recovery, nothing is lost); moto keeps everything in memory, so a restarted moto is
empty (queues and buckets are gone; adapters recreate them).

``astart``/``astop``/``arestart`` are async twins that wait without blocking the event loop, for use from
async tests while services are running against the server.

The session fixtures ``etcd_server`` and ``moto_server`` wrap them; register them in a conftest with
``from tests.servers import etcd_server, moto_server  # noqa: F401``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import pytest

ETCD_BINARY_ENV = "DSCHED_ETCD_BINARY"
DEFAULT_ETCD_BINARY = "/usr/bin/etcd"

_LIVE: weakref.WeakSet[_ServerProcess] = weakref.WeakSet()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def etcd_binary() -> str | None:
    """The etcd executable: ``$DSCHED_ETCD_BINARY``, /usr/bin/etcd, or ``etcd`` on PATH; None if absent."""
    override = os.environ.get(ETCD_BINARY_ENV)
    if override:
        return override if Path(override).is_file() else None
    if Path(DEFAULT_ETCD_BINARY).is_file():
        return DEFAULT_ETCD_BINARY
    return shutil.which("etcd")


def moto_binary() -> str | None:
    """``moto_server`` of the running interpreter's environment (next to ``sys.executable``)."""
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("moto_server")


class ServerError(RuntimeError):
    """A test server did not start or stop as asked."""


def _die_with_parent() -> list[str]:
    """A command prefix so the server gets SIGTERM when its parent dies (no orphans after a killed run).

    Linux ties the signal to the *thread* that forked, so it is only used from the main thread, whose death is
    the process's. ``setpriv`` (util-linux) rather than a ``preexec_fn``: forking with gRPC's threads running
    makes ``preexec_fn`` unsafe.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class _ServerProcess:
    """One server subprocess with stable ports, a log file, and start/stop/restart/pause/resume."""

    name = "server"
    start_timeout_s = 30.0

    def __init__(self, base_dir: Path | None = None) -> None:
        self._own_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"dsched-{self.name}-")) if base_dir is None else base_dir
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.base_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False
        _LIVE.add(self)

    # -- to be provided by subclasses

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _healthy(self) -> bool:
        raise NotImplementedError

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self) -> None:
        """Start the server and wait until it answers. No-op if it is already running."""
        self._spawn()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._probe():
            if time.monotonic() > deadline:
                self._fail_start("did not become healthy")
            time.sleep(0.05)

    async def astart(self) -> None:
        self._spawn()
        deadline = time.monotonic() + self.start_timeout_s
        while not await asyncio.to_thread(self._probe):
            if time.monotonic() > deadline:
                self._fail_start("did not become healthy")
            await asyncio.sleep(0.05)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill=True`` to simulate a crash). Data is kept."""
        proc = self._signal_stop(kill)
        if proc is None:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        self._after_stop()

    async def astop(self, *, kill: bool = False) -> None:
        proc = self._signal_stop(kill)
        if proc is None:
            return
        deadline = time.monotonic() + 10
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
            await asyncio.sleep(0.02)
        self._after_stop()

    def restart(self, *, kill: bool = False, downtime_s: float = 0.0) -> None:
        """Stop, stay down ``downtime_s``, start again on the same ports (and, for etcd, the same data)."""
        self.stop(kill=kill)
        if downtime_s > 0:
            time.sleep(downtime_s)
        self.start()

    async def arestart(self, *, kill: bool = False, downtime_s: float = 0.0) -> None:
        await self.astop(kill=kill)
        if downtime_s > 0:
            await asyncio.sleep(downtime_s)
        await self.astart()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers (like a network partition)."""
        if self._proc is not None and self.running and not self._paused:
            self._proc.send_signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            self._proc.send_signal(signal.SIGCONT)
            self._paused = False

    def close(self) -> None:
        """Stop the server and delete its directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals

    def _spawn(self) -> None:
        if self.running:
            return
        self._log = open(self.log_path, "ab")  # closed in _after_stop
        self._proc = subprocess.Popen(
            [*_die_with_parent(), *self._command()],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, which then stops us cleanly
        )
        self._paused = False

    def _probe(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            self._fail_start(f"exited with code {self._proc.returncode if self._proc else '?'}")
        return self._healthy()

    def _fail_start(self, why: str) -> None:
        self.stop(kill=True)
        raise ServerError(f"{self.name} {why}; log {self.log_path}:\n{self.log_tail()}")

    def _signal_stop(self, kill: bool) -> subprocess.Popen[bytes] | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)
                self._paused = False
            if kill:
                proc.kill()
            else:
                proc.terminate()
        return proc

    def _after_stop(self) -> None:
        self._proc = None
        self._paused = False
        if self._log is not None:
            self._log.close()
            self._log = None


def _http_ok(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bytes(resp.read()) if resp.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


class EtcdServer(_ServerProcess):
    """One etcd member: by default a one-member cluster of its own (see :class:`EtcdCluster` for more).

    Heartbeat 50 ms / election 500 ms (instead of 100 / 1000) so the smallest lease TTL etcd grants is 1 s:
    etcd raises any TTL to 1.5 election timeouts, which would otherwise be 2 s.
    """

    name = "etcd"

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        binary: str | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        member_name: str | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
    ) -> None:
        found = binary or etcd_binary()
        if found is None:
            raise ServerError("etcd binary not found (looked at $DSCHED_ETCD_BINARY, /usr/bin/etcd, PATH)")
        self.binary = found
        super().__init__(base_dir)
        self.data_dir = self.base_dir / "data"
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.member_name = member_name or f"dsched-test-{self.client_port}"
        self.initial_cluster = initial_cluster or f"{self.member_name}={self.peer_url}"
        self.cluster_token = cluster_token or self.member_name

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def url(self) -> str:
        """The coordination URL, ``etcd://127.0.0.1:PORT`` (append ``/prefix`` for a namespace)."""
        return f"etcd://127.0.0.1:{self.client_port}"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.client_port

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--name", self.member_name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip

    def _healthy(self) -> bool:
        body = _http_ok(f"{self.client_url}/health")
        return body is not None and b'"health":"true"' in body.replace(b" ", b"")


class EtcdCluster:
    """An etcd cluster of ``size`` members (default 3) on 127.0.0.1, for quorum and client-failover tests.

    ``url`` lists every member (``etcd://127.0.0.1:P1,127.0.0.1:P2,…``); ``members[i]`` is an
    :class:`EtcdServer` to stop, kill, pause or restart individually while the others keep quorum.
    """

    def __init__(self, size: int = 3, base_dir: Path | None = None, *, binary: str | None = None) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self._own_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="dsched-etcd-cluster-")) if base_dir is None else base_dir
        ports = [(free_port(), free_port()) for _ in range(size)]
        names = [f"m{i}-{client}" for i, (client, _) in enumerate(ports)]
        initial = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, (_, peer) in zip(names, ports, strict=True))
        self.members = [
            EtcdServer(
                self.base_dir / name,
                binary=binary,
                client_port=client,
                peer_port=peer,
                member_name=name,
                initial_cluster=initial,
                cluster_token=f"dsched-test-cluster-{ports[0][0]}",
            )
            for name, (client, peer) in zip(names, ports, strict=True)
        ]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def start(self) -> None:
        """Start every member at once (none is healthy before a quorum runs) and wait until all are."""
        for member in self.members:
            member._spawn()
        for member in self.members:
            member.start()

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def close(self) -> None:
        for member in self.members:
            member.close()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class MotoServer(_ServerProcess):
    """moto in server mode: SQS and S3 (and the rest of AWS) at ``endpoint``, all state in memory."""

    name = "moto"

    def __init__(self, base_dir: Path | None = None, *, binary: str | None = None) -> None:
        found = binary or moto_binary()
        if found is None:
            raise ServerError(f"moto_server not found next to {sys.executable}: install moto[server]")
        self.binary = found
        super().__init__(base_dir)
        self.port = free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def region(self) -> str:
        return "us-east-1"

    def _command(self) -> list[str]:
        return [self.binary, "-H", "127.0.0.1", "-p", str(self.port)]

    def _healthy(self) -> bool:
        return _http_ok(f"{self.endpoint}/moto-api/data.json") is not None

    def reset(self) -> None:
        """Forget every queue and bucket without restarting (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(kill=True)


# -- pytest fixtures


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """A real etcd for the whole session; tests isolate themselves with a key prefix in the URL."""
    if etcd_binary() is None:
        where = os.environ.get(ETCD_BINARY_ENV) or f"{DEFAULT_ETCD_BINARY} or PATH"
        pytest.fail(f"etcd is not installed (not at {where}): run `make test`, which installs it", pytrace=False)
    server = EtcdServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A real moto server (SQS, S3) for the whole session; tests isolate themselves by queue/bucket name."""
    if moto_binary() is None:
        pytest.fail(f"moto_server not found next to {sys.executable}: run `make test`", pytrace=False)
    server = MotoServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
