"""``sleep <marker>`` processes a test's command started, found by their unique command line in ``/proc``: to see
that a run's whole process tree is killed (and to clean up when it is not)."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path


def marker_seconds() -> str:
    """A sleep duration no other process on the machine uses, to find the sleeper by its command line."""
    return f"{900 + random.randrange(99)}.{random.randrange(10**9):09d}"


def sleepers(seconds: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if argv[:2] == [b"sleep", seconds.encode()] and state != "Z":
            found.append(int(entry.name))
    return found


async def wait_for_sleeper(seconds: str) -> None:
    for _ in range(200):
        if sleepers(seconds):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the command's sleeper never started")


async def gone(seconds: str) -> bool:
    for _ in range(100):  # SIGKILL is asynchronous: give the kernel a moment (bounded: 2 s)
        if not sleepers(seconds):
            return True
        await asyncio.sleep(0.02)
    return False


def kill_leftovers(seconds: str) -> None:
    for pid in sleepers(seconds):  # only processes this test started (their unique marker)
        os.kill(pid, 9)
