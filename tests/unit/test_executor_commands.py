"""``cmd:`` execution: input limits, the whole process tree dies (cgroup v2 and child-subreaper modes), outputs."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsched.libs.blobs.files import FileBlobStore
from dsched.libs.limits import MAX_COMMAND_BYTES, command_problem
from dsched.libs.models import RunStatus
from dsched.worker import executors
from dsched.worker.executors import Cancellation, Outcome, run_command, store_output
from tests.helpers.sleepers import gone, kill_leftovers, marker_seconds, wait_for_sleeper

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process-tree containment is Linux-specific")


CGROUP_PARENT = executors.cgroup_parent()  # probed once, at collection
no_cgroups = pytest.mark.skipif(CGROUP_PARENT is None, reason="no writable cgroup v2 hierarchy here")


@pytest.fixture(params=[pytest.param("cgroup", marks=no_cgroups), "subreaper"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test once per containment mode; the cgroup mode only where cgroup v2 is mounted and writable (the
    subreaper variant runs everywhere)."""
    if request.param == "cgroup":
        parent = executors.cgroup_parent()
        assert parent is not None
        yield "cgroup"
        assert not list(parent.glob(f"dsched-run-{os.getpid()}-*")), "a run's cgroup was left behind"
    else:
        monkeypatch.setattr(executors, "cgroup_parent", lambda: None)
        yield "subreaper"


# Limits ------------------------------------------------------------------------------------------------------


def test_command_problem_names_nul_size_and_bad_text() -> None:
    assert command_problem("echo hi") is None
    assert command_problem("x" * (MAX_COMMAND_BYTES - 1)) is None
    assert "NUL" in (command_problem("echo a\x00b") or "")
    assert "131072" in (command_problem("x" * MAX_COMMAND_BYTES) or "")
    assert "131071" in (command_problem("é" * (MAX_COMMAND_BYTES // 2)) or "")  # bytes, not characters
    assert "surrogate" in (command_problem("echo \ud800") or "")


@pytest.mark.parametrize(
    "command", ["echo a\x00b", "echo " + "x" * MAX_COMMAND_BYTES, "echo \ud800"], ids=["nul", "too-long", "surrogate"]
)
async def test_a_command_that_cannot_run_is_a_clean_non_retryable_failure(command: str) -> None:
    outcome = await run_command(command, timeout_s=5, output_cap=1000)
    assert outcome.status == RunStatus.FAILED
    assert outcome.retryable is False
    assert outcome.error is not None and outcome.error.startswith("command refused:")


async def test_the_longest_command_the_kernel_takes_still_runs(mode: str) -> None:
    command = "true " + "x" * (MAX_COMMAND_BYTES - 6)
    assert len(command.encode()) == MAX_COMMAND_BYTES - 1
    outcome = await run_command(command, timeout_s=10, output_cap=1000)
    assert outcome.status == RunStatus.SUCCEEDED, outcome


# Process tree --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spawn", ["setsid sleep {s} &", "(setsid sleep {s} &);"], ids=["setsid", "orphaned-setsid"])
async def test_timeout_kills_children_that_called_setsid(mode: str, spawn: str) -> None:
    seconds = marker_seconds()
    try:
        outcome = await run_command(f"{spawn.format(s=seconds)} sleep 30", timeout_s=0.5, output_cap=1000)
        assert outcome.status == RunStatus.TIMED_OUT
        assert await gone(seconds), f"sleep {seconds} survived the timeout ({mode})"
    finally:
        kill_leftovers(seconds)


async def test_cancel_kills_children_that_called_setsid(mode: str) -> None:
    seconds = marker_seconds()
    cancellation = Cancellation()
    try:
        task = asyncio.ensure_future(
            run_command(f"setsid sleep {seconds} & sleep 30", timeout_s=30, output_cap=1000, cancellation=cancellation)
        )
        await wait_for_sleeper(seconds)
        cancellation.request()
        outcome = await asyncio.wait_for(task, timeout=10)
        assert outcome.status == RunStatus.CANCELLED
        assert await gone(seconds), f"sleep {seconds} survived the cancel ({mode})"
    finally:
        kill_leftovers(seconds)


async def test_what_a_finished_command_left_running_dies_with_it(mode: str) -> None:
    seconds = marker_seconds()
    try:
        outcome = await run_command(f"setsid sleep {seconds} & echo started", timeout_s=10, output_cap=1000)
        assert outcome.status == RunStatus.SUCCEEDED and outcome.output == "started\n"
        assert await gone(seconds)
    finally:
        kill_leftovers(seconds)


async def test_a_shell_that_closes_its_output_still_runs_to_its_end(mode: str) -> None:
    outcome = await run_command("echo before; exec >/dev/null 2>&1; sleep 0.5; exit 4", timeout_s=10, output_cap=100)
    assert (outcome.status, outcome.exit_code, outcome.output) == (RunStatus.FAILED, 4, "before\n")


async def test_exit_codes_and_signals_are_reported_as_before(mode: str) -> None:
    assert (await run_command("exit 3", timeout_s=5, output_cap=100)).exit_code == 3
    outcome = await run_command("kill -TERM $$", timeout_s=5, output_cap=100)
    assert outcome.status == RunStatus.FAILED and outcome.exit_code == -15
    timed_out = await run_command("sleep 30", timeout_s=0.3, output_cap=100)
    assert timed_out.status == RunStatus.TIMED_OUT and timed_out.exit_code == -9


# Output --------------------------------------------------------------------------------------------------------


async def test_output_past_the_inline_part_is_spooled_and_the_cap_is_reported(mode: str) -> None:
    outcome = await run_command(
        "head -c 300000 /dev/zero | tr '\\0' a; echo", timeout_s=10, output_cap=200_000, inline_bytes=1000
    )
    assert outcome.status == RunStatus.SUCCEEDED
    assert outcome.output == "a" * 1000
    assert outcome.output_capped is True
    assert outcome.spool is not None
    assert outcome.spool.read() == b"a" * 200_000
    outcome.spool.close()


async def test_output_under_the_cap_is_not_capped(mode: str) -> None:
    outcome = await run_command("printf abc", timeout_s=10, output_cap=3, inline_bytes=2)
    assert (outcome.output, outcome.output_capped) == ("ab", False)
    assert outcome.spool is not None and outcome.spool.read() == b"abc"
    outcome.spool.close()


async def test_store_output_streams_the_spool_to_the_blob_store_once(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path)
    await blobs.startup()
    outcome = await run_command("head -c 100000 /dev/zero", timeout_s=10, output_cap=1 << 20, inline_bytes=10)
    first = await store_output(blobs, "outputs/r1", outcome, 10)
    assert first == ("\0" * 10, "outputs/r1")
    assert outcome.spool is None  # consumed and closed
    assert await blobs.get("outputs/r1") == b"\0" * 100000
    assert await store_output(blobs, "outputs/r1", outcome, 10) == first  # a retried recording: same answer
    chunks = [c async for c in blobs.iter_chunks("outputs/r1", 4096)]
    assert b"".join(chunks) == b"\0" * 100000 and max(map(len, chunks)) == 4096


async def test_store_output_keeps_short_output_inline(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path)
    await blobs.startup()
    assert await store_output(blobs, "outputs/r2", Outcome(RunStatus.SUCCEEDED, "hi"), 10) == ("hi", None)
    long = Outcome(RunStatus.SUCCEEDED, "y" * 50)
    assert await store_output(blobs, "outputs/r3", long, 10) == ("y" * 10, "outputs/r3")
    assert await blobs.get("outputs/r3") == b"y" * 50


@no_cgroups
def test_the_cgroups_of_a_dead_worker_are_swept(tmp_path: Path) -> None:
    parent = executors.cgroup_parent()
    assert parent is not None
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = parent / f"dsched-run-{dead.pid}-{random.randrange(10**9)}"
    mine = parent / f"dsched-run-{os.getpid()}-{random.randrange(10**9)}"
    leftover.mkdir()
    mine.mkdir()
    try:
        executors._sweep_cgroups(parent)
        assert not leftover.exists()
        assert mine.exists()  # a live worker's run is never touched
    finally:
        for path in (leftover, mine):
            if path.exists():
                path.rmdir()


async def test_concurrent_large_outputs_are_not_held_in_memory() -> None:
    """16 runs printing 12 MiB each at once (10 MiB kept per run): Python allocations stay far below 16 x 10 MiB."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        outcomes = await asyncio.gather(
            *(
                run_command("head -c 12582912 /dev/zero", timeout_s=60, output_cap=10 * 1024 * 1024, inline_bytes=4096)
                for _ in range(16)
            )
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert peak < 16 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB of Python allocations"
        assert all(o.status == RunStatus.SUCCEEDED and o.output_capped and o.spool is not None for o in outcomes)
    finally:
        for outcome in outcomes:
            if outcome.spool is not None:
                outcome.spool.close()
