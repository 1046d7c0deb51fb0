"""The embedded backends' cross-process doorbell: another process's commit wakes a waiter without its poll.

Two backend objects on one file behave like two processes (each has its own bell socket). The poll interval is
raised far above the wait, so a waiter that returns data can only have been woken by the bell.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from dsched.libs import doorbell
from dsched.libs.doorbell import Doorbell, folder_for
from dsched.libs.log.sqlite import SqliteLog
from dsched.libs.queue.base import OutgoingMessage
from dsched.libs.queue.sqlite import SqliteQueue


async def test_a_ring_wakes_another_listener_and_not_itself(tmp_path: Path) -> None:
    rung: list[str] = []
    a = Doorbell(tmp_path / "x.db", lambda: rung.append("a"))
    b = Doorbell(tmp_path / "x.db", lambda: rung.append("b"))
    a.listen()
    b.listen()
    try:
        a.ring()
        for _ in range(100):
            if rung:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert rung == ["b"]
    finally:
        a.close()
        b.close()
    assert not list(folder_for(tmp_path / "x.db").iterdir())  # each removed its own socket


async def test_a_dead_listener_is_removed_and_ringing_never_raises(tmp_path: Path) -> None:
    folder = folder_for(tmp_path / "x.db")
    folder.mkdir()
    dead = folder / "1.dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(dead))
    sock.close()  # the file stays, nobody is bound: a process killed without cleaning up
    bell = Doorbell(tmp_path / "x.db", lambda: None)
    bell.ring()
    bell.close()
    assert not dead.exists()
    nowhere = Doorbell(tmp_path / "nowhere" / "y.db", lambda: None)
    nowhere.ring()  # no folder: nothing to ring
    nowhere.close()


def test_a_path_too_long_for_a_socket_gets_a_short_folder_the_same_for_everyone(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120) / "queue.db"
    folder = folder_for(deep)
    assert len(os.fsencode(folder)) < 80
    assert folder == folder_for(deep)
    assert folder != folder_for(tmp_path / ("e" * 120) / "queue.db")


@pytest.fixture
def slow_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dsched.libs.queue.sqlite.POLL_INTERVAL_S", 60.0)
    monkeypatch.setattr("dsched.libs.log.sqlite.POLL_INTERVAL_S", 60.0)
    monkeypatch.setattr(doorbell, "RELIST_S", 0.0)


@pytest.mark.usefixtures("slow_polls")
async def test_another_queue_instances_send_wakes_a_waiting_receive(tmp_path: Path) -> None:
    receiver = SqliteQueue(tmp_path / "queue.db", max_receives=3)
    sender = SqliteQueue(tmp_path / "queue.db", max_receives=3)
    await receiver.startup()
    await sender.startup()
    try:
        waiting = asyncio.create_task(receiver.receive(10, wait_s=10, visibility_s=30))
        await asyncio.sleep(0.2)  # it found nothing and waits (listening)
        await sender.send([OutgoingMessage(b"rung")])
        got = await asyncio.wait_for(waiting, timeout=5)  # the poll alone would take 10 s
        assert [m.body for m in got] == [b"rung"]
        # a nack (hand-back) rings too
        waiting = asyncio.create_task(receiver.receive(10, wait_s=10, visibility_s=30))
        await asyncio.sleep(0.2)
        await sender.nack([got[0].receipt])
        again = await asyncio.wait_for(waiting, timeout=5)
        assert [m.body for m in again] == [b"rung"]
    finally:
        await sender.shutdown()
        await receiver.shutdown()


@pytest.mark.usefixtures("slow_polls")
async def test_another_log_instances_append_wakes_a_waiting_consumer(tmp_path: Path) -> None:
    log = SqliteLog(tmp_path / "log.db", partitions=2)
    other = SqliteLog(tmp_path / "log.db", partitions=2)
    await log.startup()
    await other.startup()
    consumer = log.consumer("writer")
    await consumer.startup()
    try:
        waiting = asyncio.create_task(consumer.poll(10, timeout_s=10))
        await asyncio.sleep(0.2)
        await other.append([("k", b"v")])
        got = await asyncio.wait_for(waiting, timeout=5)
        assert [(r.key, r.value) for r in got] == [("k", b"v")]
    finally:
        await consumer.shutdown()
        await other.shutdown()
        await log.shutdown()


_SEND = """
import asyncio, sys
from pathlib import Path
from dsched.libs.queue.base import OutgoingMessage
from dsched.libs.queue.sqlite import SqliteQueue

async def main():
    q = SqliteQueue(Path(sys.argv[1]), max_receives=3)
    await q.startup()
    await q.send([OutgoingMessage(b"from another process")])
    await q.shutdown()

asyncio.run(main())
"""


@pytest.mark.usefixtures("slow_polls")
async def test_a_send_from_another_process_wakes_a_waiting_receive(tmp_path: Path) -> None:
    receiver = SqliteQueue(tmp_path / "queue.db", max_receives=3)
    await receiver.startup()
    try:
        waiting = asyncio.create_task(receiver.receive(10, wait_s=20, visibility_s=30))
        await asyncio.sleep(0.2)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _SEND, str(tmp_path / "queue.db"))
        assert await proc.wait() == 0
        got = await asyncio.wait_for(waiting, timeout=15)
        assert [m.body for m in got] == [b"from another process"]
    finally:
        await receiver.shutdown()
