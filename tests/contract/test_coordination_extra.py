"""etcd-specific coordination checks: namespaces, restarts, failover inside a cluster, hung servers.

The common contract is tests/contract/test_coordination.py; these cover what only a networked etcd can do
wrong. Restarts and kills use their own servers, never the session one other tests share.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aetcd
import pytest

from dsched.libs.coordination.base import WatchEvent
from dsched.libs.coordination.etcd import EtcdCoordination, EtcdUnavailable, LeaseNotFound
from dsched.libs.servers import EtcdCluster, EtcdServer, free_port
from tests.helpers import backends


def _coordination(url: str, tmp_path: Path) -> EtcdCoordination:
    return EtcdCoordination.from_url(url, backends.test_settings(tmp_path, coordination_url=url))


@contextlib.asynccontextmanager
async def _started(url: str, tmp_path: Path) -> AsyncIterator[EtcdCoordination]:
    coordination = _coordination(url, tmp_path)
    await coordination.startup()
    try:
        yield coordination
    finally:
        await coordination.shutdown()


class _Collector:
    """Consumes a watch in the background; ``wait_for(n)`` returns once ``n`` events arrived."""

    def __init__(self, events: AsyncIterator[WatchEvent]) -> None:
        self.events = events
        self.got: list[WatchEvent] = []
        self.arrived = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.events:
            self.got.append(event)
            self.arrived.set()

    async def wait_for(self, n: int, timeout_s: float = 15.0) -> list[WatchEvent]:
        async with asyncio.timeout(timeout_s):
            while len(self.got) < n:
                self.arrived.clear()
                await self.arrived.wait()
        return self.got

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        aclose = getattr(self.events, "aclose", None)
        if aclose is not None:
            await aclose()


async def _retry(fn: Callable[[], Awaitable[object]], timeout_s: float = 15.0) -> None:
    """Call ``fn`` until it stops raising EtcdUnavailable (a server coming back)."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            await fn()
            return
        except EtcdUnavailable:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


async def test_etcd_namespaces_do_not_see_each_other(etcd_server: EtcdServer, tmp_path: Path) -> None:
    ns = uuid.uuid4().hex[:8]
    async with (
        _started(f"{etcd_server.url}/{ns}-a", tmp_path) as a,
        _started(f"{etcd_server.url}/{ns}-a2", tmp_path) as a2,
    ):
        watch = _Collector(a2.watch_prefix(""))
        try:
            await a.put("k", b"in a")
            assert await a2.get("k") is None
            assert await a2.create("k", b"in a2") is True  # same key, other namespace
            assert await a.get_prefix("") == {"k": b"in a"}
            assert await a2.get_prefix("") == {"k": b"in a2"}
            # A namespace is a path segment: "ns-a/" is not a prefix of "ns-a2/".
            assert (await watch.wait_for(1)) == [WatchEvent("k", b"in a2")]
        finally:
            await watch.close()


async def test_etcd_create_retried_after_a_lost_reply_still_reports_the_win(
    etcd_server: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two "hosts" that are the same server, so a failover retries against the same data.
    url = f"etcd://127.0.0.1:{etcd_server.port},127.0.0.1:{etcd_server.port}/{uuid.uuid4().hex[:8]}"
    async with _started(url, tmp_path) as coordination:
        lease = await coordination.grant_lease(30)
        real = aetcd.Client.transaction
        lost: list[bool] = []

        async def applied_but_reply_lost(self: aetcd.Client, *args: object, **kwargs: object) -> object:
            result = await real(self, *args, **kwargs)
            if not lost:
                lost.append(True)
                raise aetcd.ConnectionFailedError("Stream removed (simulated after the write)")
            return result

        monkeypatch.setattr(aetcd.Client, "transaction", applied_but_reply_lost)
        assert await coordination.create("leader", b"me", lease_id=lease) is True
        assert lost == [True]
        assert await coordination.create("leader", b"me", lease_id=lease) is False  # no retry: plain False
        await coordination.revoke(lease)


async def test_etcd_lease_ttl_is_rounded_up_to_whole_seconds(etcd_server: EtcdServer, tmp_path: Path) -> None:
    async with _started(f"{etcd_server.url}/{uuid.uuid4().hex[:8]}", tmp_path) as coordination:
        lease = await coordination.grant_lease(0.1)
        await coordination.put("k", b"v", lease_id=lease)
        await asyncio.sleep(0.4)  # a 0.1 s lease would be gone; etcd's is at least 1 s
        assert await coordination.keepalive(lease) is True
        await coordination.revoke(lease)
        with pytest.raises(LeaseNotFound):
            await coordination.put("k2", b"v", lease_id=lease)


async def test_etcd_startup_skips_unreachable_hosts(etcd_server: EtcdServer, tmp_path: Path) -> None:
    url = f"etcd://127.0.0.1:{free_port()},127.0.0.1:{etcd_server.port}/{uuid.uuid4().hex[:8]}"
    async with _started(url, tmp_path) as coordination:
        await coordination.put("k", b"v")
        assert await coordination.get("k") == b"v"


async def test_etcd_watch_and_leases_survive_a_restart(own_etcd: EtcdServer, tmp_path: Path) -> None:
    async with _started(f"{own_etcd.url}/ns", tmp_path) as coordination:
        lease = await coordination.grant_lease(30)
        await coordination.put("member", b"me", lease_id=lease)
        watch = _Collector(coordination.watch_prefix("w/"))
        try:
            await coordination.put("w/1", b"before")
            await watch.wait_for(1)
            await own_etcd.arestart(kill=True)  # a crash: etcd recovers from its WAL
            await _retry(lambda: coordination.put("w/2", b"after"))
            await coordination.delete("w/1")
            got = await watch.wait_for(3)
            assert got == [WatchEvent("w/1", b"before"), WatchEvent("w/2", b"after"), WatchEvent("w/1", None)]
            assert await coordination.keepalive(lease) is True
            assert await coordination.get("member") == b"me"
        finally:
            await watch.close()


async def test_etcd_changes_made_while_the_watch_was_disconnected_are_delivered(
    own_etcd: EtcdServer, tmp_path: Path
) -> None:
    async with (
        _started(f"{own_etcd.url}/ns", tmp_path) as watcher,
        _started(f"{own_etcd.url}/ns", tmp_path) as writer,
    ):
        watch = _Collector(watcher.watch_prefix("w/"))
        try:
            await writer.put("w/0", b"0")
            await watch.wait_for(1)
            await own_etcd.astop()
            await own_etcd.astart()
            # The writer gets through before the watcher's stream is back: these must not be skipped.
            await _retry(lambda: writer.put("w/1", b"1"))
            await writer.put("w/2", b"2")
            got = await watch.wait_for(3)
            assert [e.key for e in got] == ["w/0", "w/1", "w/2"]
        finally:
            await watch.close()


async def test_etcd_watch_started_behind_a_compaction_starts_at_the_oldest_revision(
    own_etcd: EtcdServer, tmp_path: Path
) -> None:
    async with (
        _started(f"{own_etcd.url}/ns", tmp_path) as idle,  # its last-seen revision is about to go stale
        _started(f"{own_etcd.url}/ns", tmp_path) as writer,
    ):
        for i in range(5):
            await writer.put(f"w/{i}", b"old")
        raw = aetcd.Client("127.0.0.1", own_etcd.port)
        try:
            reply = await raw.put(b"unrelated", b"x")
            await raw.compact(reply.header.revision, physical=True)
        finally:
            await raw.close()
        watch = _Collector(idle.watch_prefix("w/"))
        try:
            await writer.put("w/new", b"new")
            got = await watch.wait_for(1)
            assert got[-1] == WatchEvent("w/new", b"new")
            assert all(event.value == b"new" for event in got)  # nothing from before the compaction
        finally:
            await watch.close()


async def test_etcd_hung_server_times_out_instead_of_blocking(own_etcd: EtcdServer, tmp_path: Path) -> None:
    async with _started(f"{own_etcd.url}/ns?timeout=1", tmp_path) as coordination:
        await coordination.put("k", b"v")
        own_etcd.pause()
        try:
            started = time.monotonic()
            with pytest.raises(EtcdUnavailable):
                await coordination.get("k")
            assert time.monotonic() - started < 5
        finally:
            own_etcd.resume()
        await _retry(lambda: coordination.get("k"))


async def test_etcd_watch_ends_when_coordination_shuts_down(etcd_server: EtcdServer, tmp_path: Path) -> None:
    coordination = _coordination(f"{etcd_server.url}/{uuid.uuid4().hex[:8]}", tmp_path)
    await coordination.startup()
    watch = _Collector(coordination.watch_prefix(""))
    await coordination.put("k", b"v")
    await watch.wait_for(1)
    await coordination.shutdown()
    await asyncio.wait_for(watch.task, 5)  # ended by itself, no error


@pytest.fixture(scope="module")
def etcd_cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(3) as cluster:
        yield cluster


async def test_etcd_fails_over_when_its_member_dies(etcd_cluster: EtcdCluster, tmp_path: Path) -> None:
    async with _started(f"{etcd_cluster.url}/{uuid.uuid4().hex[:8]}", tmp_path) as coordination:
        lease = await coordination.grant_lease(30)
        assert await coordination.create("leader", b"me", lease_id=lease) is True
        watch = _Collector(coordination.watch_prefix("w/"))
        first = etcd_cluster.members[0]  # startup connects to the first host listed
        try:
            await coordination.put("w/1", b"1")
            await watch.wait_for(1)
            await first.astop(kill=True)
            await _retry(lambda: coordination.put("w/2", b"2"))
            assert await coordination.keepalive(lease) is True
            assert await coordination.get("leader") == b"me"
            got = await watch.wait_for(2)
            assert got == [WatchEvent("w/1", b"1"), WatchEvent("w/2", b"2")]
        finally:
            await watch.close()
            await first.astart()
