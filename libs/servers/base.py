"""What every server launcher shares: free ports, the subprocess lifecycle, readiness polling, jars.

A launcher is a :class:`ServerProcess` subclass giving the command line (``_command``) and a *real*
readiness check (``_healthy``: a query answers, not merely a port accepting connections). The base class
starts it on 127.0.0.1, waits for readiness within ``start_timeout_s``, and offers ``stop`` (SIGTERM, or
SIGKILL to simulate a crash), ``restart`` (same ports, same data directory: a crash-recovery, nothing is
lost for servers that persist), ``pause``/``resume`` (SIGSTOP/SIGCONT: a server that hangs instead of
refusing), plus async twins (``astart`` …) that never block the event loop.

Every process started here is stopped at interpreter exit, and — when started from the main thread —
receives SIGTERM if its parent dies (no orphaned JVMs after a killed test run).
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
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import TracebackType
from typing import IO, Self

# Where `make system-deps` puts each server's jars (one folder per server, see deploy/jars/<name>/pom.xml).
JARS_DIR_ENV = "DSCHED_JARS_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JARS_DIR = REPO_ROOT / ".cache" / "jars"
POMS_DIR = REPO_ROOT / "deploy" / "jars"
JAVA_ENV = "DSCHED_JAVA"

_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


class ServerError(RuntimeError):
    """A server did not start or stop as asked, or is not installed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def http_ok(url: str, timeout_s: float = 1.0) -> bytes | None:
    """The body of a ``200`` answer to GET ``url``; None on any error or other status."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return bytes(resp.read()) if resp.status == 200 else None
    except (urllib.error.URLError, OSError):
        return None


def jars_dir(server: str) -> Path:
    """The folder holding ``server``'s jars (``$DSCHED_JARS_DIR/<server>``, default ``.cache/jars/<server>``)."""
    root = Path(os.environ.get(JARS_DIR_ENV) or DEFAULT_JARS_DIR)
    return root / server


def classpath(server: str) -> str:
    """Every jar of ``server`` joined for ``-cp``; :class:`ServerError` naming the fix when they are missing."""
    folder = jars_dir(server)
    jars = sorted(folder.glob("*.jar")) if folder.is_dir() else []
    if not jars:
        raise ServerError(f"{server} jars not found in {folder}: run `make system-deps`")
    return ":".join(str(j) for j in jars)


def have_jars(server: str) -> bool:
    folder = jars_dir(server)
    return folder.is_dir() and any(folder.glob("*.jar"))


def java_binary() -> str:
    """The Java 17 runtime: ``$DSCHED_JAVA``, else ``java`` on PATH (Cassandra 5 refuses Java 24+)."""
    found = os.environ.get(JAVA_ENV) or shutil.which("java")
    if not found:
        raise ServerError("java not found: install a Java 17 runtime (Debian: openjdk-17-jre-headless)")
    return found


def die_with_parent() -> list[str]:
    """A command prefix so the server gets SIGTERM when its parent dies (no orphans after a killed run).

    Linux ties the signal to the *thread* that forked, so it is only used from the main thread, whose death is
    the process's. ``setpriv`` (util-linux) rather than a ``preexec_fn``: forking with gRPC's threads running
    makes ``preexec_fn`` unsafe.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", "TERM", "--"]


class ServerProcess:
    """One server subprocess with stable ports, a log file, and start/stop/restart/pause/resume.

    ``base_dir`` holds the log and the server's data; when not given a temporary directory is created and
    deleted by :meth:`close`. Ports are chosen once, in the constructor, so URLs handed out stay valid across
    restarts.
    """

    name = "server"
    start_timeout_s = 30.0
    stop_timeout_s = 10.0
    probe_interval_s = 0.05

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
        """True once the server really serves (a query answered); called repeatedly while starting."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Before each spawn: write configuration, format storage on first start, … (default: nothing)."""

    def _env(self) -> dict[str, str] | None:
        return None

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def paused(self) -> bool:
        return self._paused

    def start(self) -> None:
        """Start the server and wait until it answers. No-op if it is already running."""
        self._spawn()
        deadline = time.monotonic() + self.start_timeout_s
        while not self._probe():
            if time.monotonic() > deadline:
                self._fail_start(f"did not become ready within {self.start_timeout_s:.0f} s")
            time.sleep(self.probe_interval_s)

    async def astart(self) -> None:
        await asyncio.to_thread(self._prepare)  # may take seconds (Kafka formats its storage)
        # Forked from the loop's thread, not a worker thread's: on the main thread, die_with_parent applies.
        self._spawn(prepared=True)
        deadline = time.monotonic() + self.start_timeout_s
        while not await asyncio.to_thread(self._probe):
            if time.monotonic() > deadline:
                self._fail_start(f"did not become ready within {self.start_timeout_s:.0f} s")
            await asyncio.sleep(self.probe_interval_s)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with ``kill=True`` to simulate a crash). Data is kept."""
        proc = self._signal_stop(kill)
        if proc is None:
            return
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        self._after_stop()

    async def astop(self, *, kill: bool = False) -> None:
        proc = self._signal_stop(kill)
        if proc is None:
            return
        deadline = time.monotonic() + self.stop_timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                deadline = time.monotonic() + 10
            await asyncio.sleep(0.02)
        self._after_stop()

    def restart(self, *, kill: bool = False, downtime_s: float = 0.0) -> None:
        """Stop, stay down ``downtime_s``, start again on the same ports with the same data."""
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

    def _spawn(self, *, prepared: bool = False) -> None:
        if self.running:
            return
        if not prepared:
            self._prepare()
        self._log = open(self.log_path, "ab")  # closed in _after_stop
        env = self._env()
        self._proc = subprocess.Popen(
            [*die_with_parent(), *self._command()],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.base_dir,
            env=None if env is None else {**os.environ, **env},
            start_new_session=True,  # a Ctrl-C in the terminal reaches our process, which then stops us cleanly
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


class JavaServer(ServerProcess):
    """A server run as ``java <jvm options> -cp <jars of jar_set> <main class> <args>``."""

    jar_set = ""
    main_class = ""
    heap_mb = 512
    # Tests start these often on a shared 2-core machine: the serial collector and the C1 compiler only start
    # fastest. A long-running server (make stack, benchmarks) sets this False for the JVM's usual peak speed.
    quick_start = True

    def _jvm_options(self) -> list[str]:
        return []

    def _main_args(self) -> list[str]:
        return []

    def _command(self) -> list[str]:
        return [
            java_binary(),
            f"-Xms{self.heap_mb}m",
            f"-Xmx{self.heap_mb}m",
            *(["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"] if self.quick_start else ["-XX:+UseG1GC"]),
            "-Xss512k",
            "-Djava.awt.headless=true",
            *self._jvm_options(),
            "-cp",
            classpath(self.jar_set),
            self.main_class,
            *self._main_args(),
        ]


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(kill=True)
