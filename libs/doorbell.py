"""A cross-process wake-up ("doorbell") for the embedded backends sharing one SQLite file.

A process that waits for another process's writes to a file (a queue receive, a log poll) *listens*: it binds a
Unix datagram socket ``<pid>.<token>.sock`` in the file's bell folder (``<file>.bell/``, or a folder under the
temp directory named by a hash of the file's path when that path is too long for a socket address) and wakes
its waiters when a byte arrives. A process that committed something waiters may want *rings*: one non-blocking
``sendto`` of one byte to every other socket in the folder, once per commit (not per message).

The bell only makes waiting shorter; it never carries data and correctness never depends on it: waiters keep
polling the file as before (a lost or late ring costs at most one poll interval). So everything that can go
wrong is ignored: a full receive buffer (the peer already has a wake-up pending), a socket whose process died
(removed by the first ringer that finds it dead), a folder that cannot be created (no bell, polling only).

The folder listing is cached and re-read only when the folder's modification time changed, checked at most
every :data:`RELIST_S`: a process that starts listening is rung within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from dsched.libs import logs

RELIST_S = 0.05
# sockaddr_un.sun_path is 108 bytes on Linux (104 on BSDs) including the terminating NUL.
_MAX_SOCKET_PATH = 100
_NAME_LEN = len("4194304.0123456789abcdef.sock")

logger = logs.get("doorbell")


def folder_for(path: Path) -> Path:
    """The bell folder of the file ``path`` (the same in every process that opens the file)."""
    resolved = Path(os.path.abspath(path))
    folder = resolved.with_name(resolved.name + ".bell")
    if len(os.fsencode(folder)) + 1 + _NAME_LEN <= _MAX_SOCKET_PATH:
        return folder
    digest = hashlib.sha1(os.fsencode(resolved)).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / "dsched-bells" / digest


class Doorbell:
    """One process's bell for one file: :meth:`listen` to be woken (``on_ring``), :meth:`ring` to wake others."""

    def __init__(self, path: Path, on_ring: Callable[[], None]) -> None:
        self.folder = folder_for(path)
        self._on_ring = on_ring
        self._listener: socket.socket | None = None
        self._own: str | None = None
        self._sender: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peers: list[str] = []
        self._listed_mtime: int | None = None
        self._checked_at = float("-inf")

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def listen(self) -> None:
        """Start being woken by other processes' rings (idempotent; on the running event loop)."""
        if self._listener is not None:
            return
        own = str(self.folder / f"{os.getpid()}.{os.urandom(8).hex()}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            sock.setblocking(False)
            sock.bind(own)
            loop = asyncio.get_running_loop()
            loop.add_reader(sock.fileno(), self._drain)
        except OSError as exc:
            sock.close()
            logger.warning("doorbell_unavailable", folder=str(self.folder), error=str(exc))
            return
        self._listener, self._own, self._loop = sock, own, loop
        self._checked_at = float("-inf")  # our own entry changed the folder

    def _drain(self) -> None:
        sock = self._listener
        if sock is None:
            return
        while True:
            try:
                if not sock.recv(64):
                    break
            except OSError:  # BlockingIOError: drained
                break
        self._on_ring()

    def ring(self) -> None:
        """Wake every other listening process (one non-blocking datagram each); never raises."""
        now = time.monotonic()
        if now - self._checked_at >= RELIST_S:
            self._checked_at = now
            self._relist()
        if not self._peers:
            return
        sender = self._sender
        if sender is None:
            sender = self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sender.setblocking(False)
        dead: list[str] = []
        for peer in self._peers:
            try:
                sender.sendto(b"\x01", peer)
            except BlockingIOError:
                pass  # its buffer is full: it has wake-ups pending already
            except ConnectionRefusedError:
                dead.append(peer)  # nobody bound to it: its process ended without removing it
                with contextlib.suppress(OSError):
                    os.unlink(peer)
            except FileNotFoundError:
                dead.append(peer)
            except OSError:
                pass
        if dead:
            self._peers = [p for p in self._peers if p not in dead]

    def _relist(self) -> None:
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except OSError:
            self._peers, self._listed_mtime = [], None
            return
        if mtime == self._listed_mtime:
            return
        try:
            names = os.listdir(self.folder)
        except OSError:
            self._peers, self._listed_mtime = [], None
            return
        self._listed_mtime = mtime
        self._peers = [
            path for name in names if name.endswith(".sock") and (path := str(self.folder / name)) != self._own
        ]

    def close(self) -> None:
        """Stop listening and remove this process's socket; the bell can listen again later."""
        if self._listener is not None:
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._own is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._own)
            self._own = None
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        self._loop = None
        self._peers, self._listed_mtime, self._checked_at = [], None, float("-inf")
