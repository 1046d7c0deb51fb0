"""Buffered OS randomness (libs/entropy.py): ids and receipts never repeat across threads or a fork."""

from __future__ import annotations

import os
import threading

from dsched.libs.entropy import ENTROPY_BUFFER_BYTES, random_bytes
from dsched.libs.models import new_job_id


def test_job_ids_from_many_threads_never_repeat() -> None:
    ids: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(new_job_id(1_760_000_000_000) for _ in range(3 * ENTROPY_BUFFER_BYTES // 10))

    threads = [threading.Thread(target=make, args=(out,)) for out in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    every = [job_id for out in ids for job_id in out]
    assert len(every) == 4 * (3 * ENTROPY_BUFFER_BYTES // 10)
    assert len(set(every)) == len(every)


def test_a_forked_child_does_not_repeat_its_parents_bytes() -> None:
    random_bytes(16)  # the parent holds a partly used buffer
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next bytes and leave without running the parent's cleanup
        os.write(write_end, random_bytes(32))
        os._exit(0)
    os.close(write_end)
    try:
        child = os.read(read_end, 64)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    assert len(child) == 32
    assert child != random_bytes(32)


def test_a_large_request_is_served_whole() -> None:
    first, second = random_bytes(ENTROPY_BUFFER_BYTES + 1), random_bytes(ENTROPY_BUFFER_BYTES + 1)
    assert len(first) == len(second) == ENTROPY_BUFFER_BYTES + 1
    assert first != second
