"""``dsched run all`` over several OS processes: children of the process that serves the API.

``DSCHED_PROCESSES=N`` (``--processes N``) chooses the layout (:func:`plan`); each process is one interpreter, so
one GIL, and the services that cost the most CPU get their own:

- ``1``: the five services in one process;
- ``2`` (the default): ingestion, writer, coordinator and picker in the process the user started, the worker in a
  child;
- ``N >= 3``: ingestion and coordinator in the first, writer and picker in a child (``writer-picker``), the worker
  in ``N - 2`` children (``worker-<i>``). Submissions and firing then no longer share one interpreter: batch
  submits +10-15 %, at ~9 % more CPU per job in a steady state and ~50 MiB more memory (docs/benchmarks.md, issue
  15, "`run all` over three processes").

The embedded backends are safe for several processes on one directory; doorbells (libs/doorbell.py) wake a
process's waiting log consumer or queue receive as soon as another process commits.

Each child is one supervised loop (libs/supervisor.py) named after it (``writer-picker``, ``worker-<i>``):
- it is ``starting`` (``/health`` 503) until the child reports it serves (one byte on a socket pair), then ``up``;
- a child that exits while the cluster is not stopping is logged (pid, exit status) and restarted with the
  supervisor's backoff; more than ``MAX_RESTARTS`` exits within the window stop everything and the command
  exits non-zero. Never a silent partial cluster;
- on SIGTERM/SIGINT the parent signals SIGTERM to every child (they finish or hand back their runs within
  ``DSCHED_SHUTDOWN_GRACE_S``), waits for them (SIGKILL after the grace and a margin), then stops its own services.
- a child watches its end of the socket pair: if the parent dies (even by SIGKILL) the child stops as well.

Children run in their own session, so a terminal's Ctrl-C reaches the parent only, which forwards it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from dsched.libs import logs, metrics
from dsched.libs.settings import SERVICES, Settings
from dsched.libs.supervisor import Supervisor

# The child's end of the socket pair; set for children only (read and removed by the child at start).
SUPERVISOR_FD_ENV = "DSCHED_SUPERVISOR_FD"
# Extra time, beyond the shutdown grace, a child may take to exit after SIGTERM before it is killed.
KILL_MARGIN_S = 5.0
# How long a scrape of the API port waits for a child's metrics before leaving them out of that scrape.
METRICS_READ_TIMEOUT_S = 2.0

logger = logs.get("processes")


class ChildExited(RuntimeError):
    """A worker child ended while the cluster was not stopping."""


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True)
class ChildSpec:
    """One child of ``run all``: the services it runs and how it differs from the parent."""

    name: str  # its supervised loop (``/health``, ``process`` label of its metrics): writer-picker, worker-<i>
    services: tuple[str, ...]
    index: int  # 1, 2, ...: its metrics port is the parent's + index
    node_id_suffix: str = ""  # appended to the parent's node id (several workers need distinct ids)


def plan(processes: int) -> tuple[list[str], list[ChildSpec]]:
    """The services ``run all`` runs itself and its children, for ``DSCHED_PROCESSES=processes`` (see above).

    Node ids: a child keeps the parent's node id unless several children run the worker (``<node id>-w<i>``), so
    ``cluster status`` and the runs' ``worker_id`` show the same node as with one process. Either way a restarted
    child keeps its predecessor's id, which tells it that an at-most-once run claimed under that id died with the
    predecessor (worker/service.py ``_claimer_alive``)."""
    if processes <= 1:
        return list(SERVICES), []
    children: list[ChildSpec] = []
    if processes == 2:
        workers = 1
    else:
        children.append(ChildSpec("writer-picker", ("writer", "picker"), index=1))
        workers = processes - 2
    for i in range(1, workers + 1):
        suffix = "" if workers == 1 else f"-w{i}"
        children.append(ChildSpec(f"worker-{i}", ("worker",), index=len(children) + 1, node_id_suffix=suffix))
    return services_here(list(SERVICES), children), children


def services_here(services: list[str], children: Sequence[ChildSpec]) -> list[str]:
    """The services of ``services`` that none of ``children`` runs: the parent's own."""
    in_children = {service for child in children for service in child.services}
    return [s for s in services if s not in in_children]


def child_environment(settings: Settings, child: ChildSpec) -> dict[str, str]:
    """The environment of ``child``: the parent's settings as ``DSCHED_*`` variables (whether they came from the
    environment, a file or overrides), dev defaults included, plus what must differ (node id, metrics port)."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DSCHED_")}
    names = set(settings.model_fields_set) | {"allow_cmd", "allow_private_http", "data_dir"}
    for name in sorted(names):
        value = getattr(settings, name)
        if name == "data_dir":
            value = Path(value).resolve()
        env[f"DSCHED_{name.upper()}"] = _env_value(value)
    env["DSCHED_NODE_ID"] = settings.node_id + child.node_id_suffix
    # One port cannot serve several processes: child i serves /metrics and /health on the parent's port + i, or
    # on a free loopback port; the parent serves the children's metrics with its own (libs/metrics.exposition).
    if settings.metrics_port:
        env["DSCHED_METRICS_PORT"] = str(settings.metrics_port + child.index)
    else:
        env["DSCHED_METRICS_PORT"] = str(_free_loopback_port())
        env["DSCHED_HOST"] = "127.0.0.1"
    env["DSCHED_PROCESSES"] = "1"
    return env


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _metrics_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


class ChildProcess:
    """One ``dsched run <services>`` child, run by :meth:`run` as a supervised loop named after it."""

    def __init__(self, settings: Settings, child: ChildSpec, supervisor: Supervisor, stop: asyncio.Event) -> None:
        self.settings = settings
        self.child = child
        self.service = child.name
        self.supervisor = supervisor
        self.stop = stop
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def run(self) -> None:
        self.supervisor.set_state(self.service, "process", "starting")
        if self.stop.is_set():
            return
        ours, theirs = socket.socketpair()
        env = child_environment(self.settings, self.child)
        metrics_url = (
            f"http://{_metrics_host(env.get('DSCHED_HOST', self.settings.host))}:{env['DSCHED_METRICS_PORT']}/metrics"
        )
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "dsched.app.cli",
                "run",
                ",".join(self.child.services),
                env={**env, SUPERVISOR_FD_ENV: str(theirs.fileno())},
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        finally:
            theirs.close()
        proc = self.proc
        logger.info("child_started", service=self.service, pid=proc.pid)
        ours.setblocking(False)
        exited = asyncio.ensure_future(proc.wait())
        stopping = asyncio.ensure_future(self.stop.wait())
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[bytes] = asyncio.ensure_future(loop.sock_recv(ours, 1))
        try:
            while True:
                waits: set[asyncio.Future[Any]] = {exited, stopping, ready}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if stopping.done():
                    await self._terminate(proc, exited)
                    return
                if exited.done():
                    # Stopping at the same time (e.g. a signal to the whole group): not a failure.
                    if self.stop.is_set():
                        return
                    logger.error("child_exited", service=self.service, pid=proc.pid, returncode=proc.returncode)
                    raise ChildExited(f"{self.service} (pid {proc.pid}) exited with status {proc.returncode}")
                if ready.done():
                    if ready.exception() is None and ready.result():
                        self.supervisor.set_state(self.service, "process", "up")
                        metrics.add_source(self.service, functools.partial(_read_metrics, metrics_url))
                        logger.info("child_ready", service=self.service, pid=proc.pid)
                    ready = loop.create_future()  # nothing more to read
        finally:
            metrics.remove_source(self.service)
            for task in (exited, stopping, ready):
                task.cancel()
            if proc.returncode is None:  # cancelled (supervisor closing): never leave a child behind
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=5)
            ours.close()

    async def _terminate(self, proc: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout=self.settings.shutdown_grace_s + KILL_MARGIN_S)
        except TimeoutError:
            logger.error("child_killed", service=self.service, pid=proc.pid, after_s=self.settings.shutdown_grace_s)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await exited
        logger.info("child_stopped", service=self.service, pid=proc.pid, returncode=proc.returncode)


async def _read_metrics(url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=METRICS_READ_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        response.raise_for_status()
        return await response.text()


def parent_channel(stop: asyncio.Event) -> socket.socket | None:
    """In a child: the socket to the parent (``None`` elsewhere). Its EOF (the parent ended) sets ``stop``."""
    fd = os.environ.pop(SUPERVISOR_FD_ENV, None)
    if fd is None or not fd.isdigit():
        return None
    try:
        sock = socket.socket(fileno=int(fd))
    except OSError:
        return None
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sock.fileno())
            logger.error("parent_gone")
            stop.set()

    loop.add_reader(sock.fileno(), readable)
    return sock


def report_ready(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.send(b"r")


def close_channel(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()
