"""Run one or all services in this process until SIGTERM/SIGINT, sharing one backend instance per role."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dsched.app import processes
from dsched.app.backends import Backends
from dsched.libs import logs, tracing
from dsched.libs.metrics import exposition
from dsched.libs.settings import SERVICES, Settings
from dsched.libs.supervisor import Supervisor

ROLES = {
    "ingestion": {"log", "store", "blobs", "queue", "coordination"},
    "writer": {"log", "store"},
    "coordinator": {"coordination"},
    "picker": {"store", "queue", "coordination"},
    "worker": {"queue", "store", "blobs", "coordination"},
}
logger = logs.get("runner")
# Python's collector runs a young collection every 700 net allocations and a full one every ~100 of those, each
# full one walking every object the process holds (~80,000 after start: modules, schemas, pydantic validators).
# Per job the services allocate hundreds of short-lived objects, so collections cost 7-10 % of the API
# process's CPU (measured with gc.callbacks). A larger young threshold runs fewer of them, and the objects alive
# after start are frozen out of every later collection (gc.freeze); reference cycles are still collected.
GC_YOUNG_THRESHOLD = 20_000


async def _metrics_server(settings: Settings, supervisor: Supervisor) -> web.AppRunner | None:
    """``/metrics`` and ``/health`` for processes without the HTTP API (``DSCHED_METRICS_PORT``)."""
    if not settings.metrics_port:
        return None

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=await exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(_: web.Request) -> web.Response:
        return web.json_response(supervisor.report(), status=200 if supervisor.healthy else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.metrics_port, reuse_address=True).start()
    return runner


@contextlib.asynccontextmanager
async def started(
    settings: Settings, services: list[str], stop: asyncio.Event, supervisor: Supervisor | None = None
) -> AsyncIterator[dict[str, object]]:
    """Open backends and services, start their loops under one supervisor; on exit stop the loops, then close
    services and backends. The HTTP API opens first, so it answers while the others join their groups."""
    roles = set().union(*(ROLES[s] for s in services))
    supervisor = supervisor or Supervisor()
    async with Backends.open(settings, roles) as b, contextlib.AsyncExitStack() as stack:
        instances: dict[str, object] = {}
        loops: list[asyncio.Task[None]] = []
        for name in services:
            supervisor.register(name)
        # Each service's module is imported only where it runs: a child of `run all` running the worker alone does
        # not carry the API's modules (~10-20 MiB of RSS per process).
        if "ingestion" in services:
            from dsched.ingestion.service import Ingestion

            ingestion = await stack.enter_async_context(
                Ingestion(
                    log=b.log,
                    store=b.store,
                    blobs=b.blobs,
                    queue=b.queue,
                    coordination=b.coordination,
                    settings=settings,
                    supervisor=supervisor,
                ).open()
            )
            instances["ingestion"] = ingestion
        elif (metrics := await _metrics_server(settings, supervisor)) is not None:
            stack.push_async_callback(metrics.cleanup)
        if "writer" in services:
            from dsched.writer.service import Writer

            writer = await stack.enter_async_context(Writer(log=b.log, store=b.store, settings=settings).open())
            loops.append(supervisor.start("writer", "consume", lambda: writer.run(stop)))
            instances["writer"] = writer
        if "coordinator" in services:
            from dsched.coordinator.service import Coordinator

            coordinator = await stack.enter_async_context(
                Coordinator(coordination=b.coordination, settings=settings, supervisor=supervisor).open()
            )
            loops.append(supervisor.start("coordinator", "lead", lambda: coordinator.run(stop)))
            instances["coordinator"] = coordinator
        if "worker" in services:
            from dsched.worker.service import Worker

            worker = await stack.enter_async_context(
                Worker(
                    queue=b.queue,
                    store=b.store,
                    blobs=b.blobs,
                    coordination=b.coordination,
                    settings=settings,
                    supervisor=supervisor,
                ).open()
            )
            loops.append(supervisor.start("worker", "receive", lambda: worker.run(stop)))
            instances["worker"] = worker
        if "picker" in services:
            from dsched.picker.service import Picker

            picker = await stack.enter_async_context(
                Picker(
                    store=b.store, queue=b.queue, coordination=b.coordination, settings=settings, supervisor=supervisor
                ).open()
            )
            loops.append(supervisor.start("picker", "dispatch", lambda: picker.run(stop)))
            instances["picker"] = picker
            if "writer" in services:  # in one process: what the writer stores reaches the picker without a tick
                writer.on_stored = picker.entries_stored
        instances["supervisor"] = supervisor
        try:
            yield instances
        finally:
            stop.set()
            # Loops finish their current step; the worker hands back what it cannot finish (in its close).
            await supervisor.wait(loops, grace_s=settings.shutdown_grace_s)
    await supervisor.close()


async def serve(settings: Settings, services: list[str], children: Sequence[processes.ChildSpec] = ()) -> None:
    """Run until SIGTERM/SIGINT. ``children`` (``run all`` with ``DSCHED_PROCESSES`` > 1, app/processes.py): child
    processes that run some of ``services`` instead of this one."""
    for name in services:
        if name not in SERVICES:
            raise ValueError(f"unknown service {name!r}")
    # SQLite calls run on helper threads; a short switch interval stops a busy helper thread from holding the
    # event loop off the GIL for the default 5 ms (measured: it dominated fire lag under load).
    sys.setswitchinterval(0.0005)
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    stop = asyncio.Event()  # SIGTERM/SIGINT, a loop given up, or (in a child) the parent gone
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = processes.parent_channel(stop)  # set when this process is a child of `run all`
    # No-op unless DSCHED_OTLP_ENDPOINT is set. A worker child of `run all` is part of the one `dsched` service.
    tracing.configure(settings, list(SERVICES) if parent is not None else services)
    supervisor = Supervisor()
    give_up = asyncio.ensure_future(supervisor.failed.wait())
    give_up.add_done_callback(lambda _: stop.set())
    local = processes.services_here(services, children)
    child_processes = [processes.ChildProcess(settings, child, supervisor, stop) for child in children]
    for child in child_processes:  # reported (starting) from the first /health on, not only once they are spawned
        supervisor.set_state(child.service, "process", "starting")
    local_stop = asyncio.Event()  # this process's own loops: stopped after the children
    # Spawned at once, not after this process's services have opened: a writer's group join may take a minute
    # (Kafka, after a crash), and the workers need none of it (every backend creates its schema idempotently).
    child_tasks = [supervisor.start(c.service, "process", c.run) for c in child_processes]
    try:
        async with started(settings, local, local_stop, supervisor):
            logger.info(
                "started",
                services=services,
                node=settings.node_id,
                processes=1 + len(children),
                here=local,
                url=f"http://{settings.host}:{settings.port}" if "ingestion" in services else None,
            )
            gc.freeze()  # what start-up built lives as long as the process: never walked again
            processes.report_ready(parent)
            await stop.wait()
            logger.info("stopping", services=services)
            if child_tasks:  # the children first (the workers finish or hand back their runs), then the rest
                await supervisor.wait(child_tasks, grace_s=settings.shutdown_grace_s + 2 * processes.KILL_MARGIN_S)
    finally:
        if any(not task.done() for task in child_tasks):  # this process failed to start or stopped abnormally
            stop.set()
            await supervisor.wait(child_tasks, grace_s=settings.shutdown_grace_s + 2 * processes.KILL_MARGIN_S)
        processes.close_channel(parent)
    give_up.cancel()
    tracing.shutdown()  # flushes the spans still batched for DSCHED_OTLP_ENDPOINT
    logger.info("stopped", services=services)
    if supervisor.failure is not None:
        raise supervisor.failure
