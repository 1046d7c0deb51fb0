"""Coordination on etcd v3, through ``aetcd`` (asyncio gRPC).

Why aetcd and not the ``etcd3`` package: ``etcd3`` is blocking (every call would stall the event loop or need
a thread), unmaintained since 2020, and breaks with current ``protobuf`` and ``tenacity`` releases. ``aetcd``
is its asyncio fork with the same shape (leases, transactions, watches).

URL: ``etcd://[user:password@]host1:2379,host2:2379[/prefix][?timeout=5]``

- Several hosts are tried in order at startup; later, a connection failure (or a timeout) moves to the next
  host. Calls are retried once per host, except that ``create``/``put_if`` are not retried after a timeout
  (they raise :class:`EtcdUnavailable`: the write may or may not have happened). A ``create`` retried after
  a dropped connection recognises its own earlier write (our value under our lease) and reports True.
- ``/prefix`` namespaces every key (stored as ``prefix/key``) so several clusters, or tests, share one etcd.
- ``timeout`` is the per-call deadline in seconds (default 5).

Mapping onto etcd:

- Leases are etcd leases. etcd's TTL is whole seconds: ``ttl_s`` is rounded up, minimum 1 s (etcd itself may
  raise it further: to 1.5 election timeouts, i.e. 2 s with default server flags).
- ``create`` is a txn ``create_revision(key) == 0 → put``; ``put_if`` is a txn ``value(guard) == guard_value →
  put`` (a missing guard key fails the compare).
- ``watch_prefix`` is a native watch started at the revision after the latest one this instance has seen when
  it is called, so it never misses a change made after the call (it may report a few made just before it, by
  other clients). If the stream breaks (etcd restart, failover) it resumes at the revision after the last
  event it yielded, so nothing is skipped or repeated; it ends when the instance shuts down.
- Writes naming a lease that has expired or been revoked raise :class:`LeaseNotFound`; an unreachable etcd
  raises :class:`EtcdUnavailable` (a ``ConnectionError``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import aetcd

from dsched.libs import logs
from dsched.libs.coordination.base import Coordination, LeaseNotFound, WatchCompacted, WatchEvent
from dsched.libs.errors import BackendConfigError
from dsched.libs.settings import Settings

__all__ = ["EtcdCoordination", "EtcdEndpoint", "EtcdUnavailable", "LeaseNotFound", "WatchCompacted"]

T = TypeVar("T")

logger = logs.get("coordination.etcd")

DEFAULT_PORT = 2379
DEFAULT_TIMEOUT_S = 5.0
_WATCH_RETRY_MIN_S = 0.05
_WATCH_RETRY_MAX_S = 2.0

# gRPC channel options: reconnect quickly once etcd is back (gRPC's default backoff grows to 120 s), detect
# a silent peer through HTTP/2 pings (etcd refuses pings more often than every 5 s), allow large ranges.
_CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 2000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,  # etcd answers idle pings with GOAWAY too_many_pings
    "grpc.http2.max_pings_without_data": 0,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
}


class EtcdUnavailable(ConnectionError):
    """No etcd host answered (connection refused, timed out, or lost)."""


@dataclass(frozen=True, slots=True)
class EtcdEndpoint:
    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "; last error:" in text:  # gRPC: "failed to connect …; last error: …: Connection refused"
        text = text.rsplit(": ", 1)[-1]
    return text if len(text) <= 300 else text[:297] + "..."


def _prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    """etcd's ``[key, range_end)`` for every key starting with ``prefix`` (``b"\\0"``: unbounded)."""
    if not prefix:
        return b"\0", b"\0"  # every key
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return prefix, bytes(end)
        end.pop()
    return prefix, b"\0"


class EtcdCoordination(Coordination):
    def __init__(
        self,
        endpoints: list[EtcdEndpoint],
        *,
        prefix: str = "",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise BackendConfigError("etcd: no hosts given")
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._username = username
        self._password = password
        self._prefix_bytes = prefix.encode()
        self._current = 0
        self._client: aetcd.Client | None = None
        self._switch_lock = asyncio.Lock()
        self._revision = 0  # latest store revision seen in any response: where new watches start
        self._closed = True

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> EtcdCoordination:
        """Parse ``etcd://[user:pw@]h1:2379,h2:2379[/prefix][?timeout=S]`` (see the module docstring)."""
        parts = urlsplit(url)
        if parts.scheme != "etcd":
            raise BackendConfigError(f"etcd URL {url!r}: scheme must be etcd://")
        netloc = parts.netloc
        username = password = None
        if "@" in netloc:
            userinfo, _, netloc = netloc.rpartition("@")
            user, sep, pw = userinfo.partition(":")
            if not user or not sep:
                raise BackendConfigError(f"etcd URL {url!r}: credentials must be user:password@")
            username, password = unquote(user), unquote(pw)
        if not netloc:
            raise BackendConfigError(f"etcd URL {url!r}: no host (e.g. etcd://127.0.0.1:2379)")
        endpoints = [_parse_host(url, item) for item in netloc.split(",")]
        prefix = parts.path.strip("/")
        timeout_s = DEFAULT_TIMEOUT_S
        for name, value in parse_qsl(parts.query, keep_blank_values=True):
            if name != "timeout":
                raise BackendConfigError(f"etcd URL {url!r}: unknown parameter {name!r} (known: timeout)")
            try:
                timeout_s = float(value)
            except ValueError:
                timeout_s = -1.0
            if not 0 < timeout_s < 3600:
                raise BackendConfigError(f"etcd URL {url!r}: timeout must be seconds > 0, got {value!r}")
        return cls(
            endpoints,
            prefix=f"{prefix}/" if prefix else "",
            timeout_s=timeout_s,
            username=username,
            password=password,
        )

    # -- lifecycle

    async def startup(self) -> None:
        """Connect to the first host that answers, in URL order; :class:`EtcdUnavailable` if none does."""
        self._closed = False
        last: BaseException | None = None
        for index, endpoint in enumerate(self.endpoints):
            client = self._new_client(endpoint)
            try:
                await self._probe(client)
            except Exception as exc:
                last = exc
                await self._close_client(client)
                continue
            self._current, self._client = index, client
            return
        self._closed = True
        hosts = ", ".join(str(e) for e in self.endpoints)
        raise EtcdUnavailable(f"etcd unreachable at {hosts}: {_one_line(last) if last else 'no hosts'}")

    async def shutdown(self) -> None:
        """Close the connection; open ``watch_prefix`` iterators end."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client)

    # -- leases

    async def grant_lease(self, ttl_s: float) -> int:
        ttl = max(1, math.ceil(ttl_s))
        lease = await self._rpc(lambda c: c.lease(ttl), idempotent=True)  # a duplicate just expires unused
        return int(lease.id)

    async def keepalive(self, lease_id: int) -> bool:
        reply = await self._rpc(lambda c: c.refresh_lease(lease_id), idempotent=True)
        if reply is None:  # the keepalive stream closed without an answer
            raise EtcdUnavailable(f"etcd keepalive of lease {lease_id}: no reply")
        self._saw(reply.header.revision)
        return int(reply.TTL) > 0  # etcd answers TTL 0 for a lease it no longer has

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._rpc(lambda c: c.revoke_lease(lease_id), idempotent=True)
        except LeaseNotFound:
            pass

    # -- keys

    async def create(self, key: str, value: bytes, lease_id: int | None = None) -> bool:
        full = self._key(key)
        attempts = 0

        async def txn(c: aetcd.Client) -> tuple[bool, list[Any]]:
            nonlocal attempts
            attempts += 1
            result: tuple[bool, list[Any]] = await c.transaction(
                compare=[c.transactions.create(full) == 0],
                success=[c.transactions.put(full, value, lease=lease_id or 0)],
                failure=[c.transactions.get(full)],
            )
            return result

        succeeded, responses = await self._rpc(txn, idempotent=False)
        self._saw_txn(responses)
        if succeeded:
            return True
        # A retry after a lost connection finds the key our first attempt may have written: it is ours if it
        # holds our value under our lease (a lease id is never reused), else a leader would be stuck unknown.
        return attempts > 1 and lease_id is not None and _holds(responses, value, lease_id)

    async def put(self, key: str, value: bytes, lease_id: int | None = None) -> None:
        reply = await self._rpc(lambda c: c.put(self._key(key), value, lease=lease_id or 0), idempotent=True)
        self._saw(reply.header.revision)

    async def put_if(self, guard_key: str, guard_value: bytes, key: str, value: bytes) -> bool:
        guard, full = self._key(guard_key), self._key(key)
        attempts = 0

        async def txn(c: aetcd.Client) -> tuple[bool, list[Any]]:
            nonlocal attempts
            attempts += 1
            result: tuple[bool, list[Any]] = await c.transaction(
                compare=[c.transactions.value(guard) == guard_value],
                success=[c.transactions.put(full, value)],
                failure=[c.transactions.get(full)],
            )
            return result

        succeeded, responses = await self._rpc(txn, idempotent=False)
        self._saw_txn(responses)
        if succeeded:
            return True
        # Only reachable when ``key`` is the guard itself: a retry sees the first attempt's write.
        return attempts > 1 and full == guard and _holds(responses, value, None)

    async def get(self, key: str) -> bytes | None:
        full = self._key(key)
        reply = await self._rpc(lambda c: c.get_range(full, full + b"\0"), idempotent=True)
        self._saw(reply.header.revision)
        for kv in reply:
            return bytes(kv.value)
        return None

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        start, end = _prefix_range(self._key(prefix))
        reply = await self._rpc(lambda c: c.get_range(start, end), idempotent=True)
        self._saw(reply.header.revision)
        cut = len(self._prefix_bytes)
        return {bytes(kv.key)[cut:].decode(): bytes(kv.value) for kv in reply}

    async def delete(self, key: str) -> None:
        full = self._key(key)
        reply = await self._rpc(lambda c: c.delete_range(full, full + b"\0"), idempotent=True)
        self._saw(reply.header.revision)

    # -- watches

    def watch_prefix(self, prefix: str) -> AsyncIterator[WatchEvent]:
        """Changes under ``prefix`` after the latest revision this instance has seen when called.

        Never misses a change made after the call; may also report changes other clients made just before it.
        Survives etcd restarts and failover (resumes by revision). Raises :class:`WatchCompacted` if, while
        disconnected, etcd compacted history the watch had not read yet; ends quietly on shutdown.
        """
        return self._watch(prefix, self._revision + 1)

    async def _watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        start, end = _prefix_range(self._key(prefix))
        cut = len(self._prefix_bytes)
        next_revision = start_revision
        yielded = False
        delay = _WATCH_RETRY_MIN_S
        while not self._closed and self._client is not None:
            client = self._client
            try:
                watch = await client.watch(start, range_end=end, start_revision=next_revision)
            except Exception as exc:
                if self._closed:
                    return
                # Warn once per outage; the retries that follow are routine.
                (logger.warning if delay == _WATCH_RETRY_MIN_S else logger.debug)(
                    "etcd_watch_retry", prefix=prefix, error=_one_line(exc), endpoint=str(self._endpoint)
                )
                await self._after_failure(client, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _WATCH_RETRY_MAX_S)
                continue
            events = aiter(watch)
            try:
                async for event in events:
                    next_revision = int(event.kv.mod_revision) + 1
                    self._saw(next_revision - 1)
                    delay = _WATCH_RETRY_MIN_S
                    yielded = True
                    value = None if event.kind == aetcd.EventKind.DELETE else bytes(event.kv.value)
                    yield WatchEvent(key=bytes(event.kv.key)[cut:].decode(), value=value)
                # The stream ended without an error: the client was closed (shutdown, or failover to another
                # host). The loop condition tells which.
            except aetcd.RevisionCompactedError as exc:
                if yielded:  # history we had not read yet is gone: the caller must resynchronise
                    raise WatchCompacted(f"etcd compacted past revision {next_revision} of watch {prefix!r}") from exc
                # Not started yet: this instance's last-seen revision was just old. What was compacted
                # predates the call, so start from the oldest revision etcd still has.
                logger.info("etcd_watch_start_compacted", prefix=prefix, start=exc.compacted_revision)
                next_revision = int(exc.compacted_revision)
            except Exception as exc:
                if self._closed:
                    return
                logger.warning("etcd_watch_broken", prefix=prefix, error=_one_line(exc), resume_at=next_revision)
                await self._after_failure(client, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _WATCH_RETRY_MAX_S)
            finally:
                await self._cancel_watch(watch, events)

    @staticmethod
    async def _cancel_watch(watch: Any, events: Any) -> None:
        # Both are best effort: the client may already be closed, and a dead stream has nothing to cancel.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await watch.cancel()
        with contextlib.suppress(Exception):
            await events.aclose()

    # -- plumbing

    @property
    def _endpoint(self) -> EtcdEndpoint:
        return self.endpoints[self._current]

    def _key(self, key: str) -> bytes:
        return self._prefix_bytes + key.encode()

    def _saw(self, revision: int) -> None:
        if revision > self._revision:
            self._revision = int(revision)

    def _saw_txn(self, responses: list[Any]) -> None:
        for response in responses:
            if isinstance(response, list):  # a get: [(value, rtypes.Get)]
                for _, kv in response:
                    self._saw(int(kv.header.revision))
            else:
                with contextlib.suppress(AttributeError):
                    self._saw(int(response.response_put.header.revision))

    def _new_client(self, endpoint: EtcdEndpoint) -> aetcd.Client:
        return aetcd.Client(
            host=endpoint.host,
            port=endpoint.port,
            username=self._username,
            password=self._password,
            timeout=self.timeout_s,
            options=dict(_CHANNEL_OPTIONS),
        )

    async def _probe(self, client: aetcd.Client) -> None:
        async with asyncio.timeout(self.timeout_s):
            key = self._prefix_bytes or b"\0"
            reply = await client.get_range(key, key + b"\0")
        self._saw(reply.header.revision)

    @staticmethod
    async def _close_client(client: aetcd.Client) -> None:
        with contextlib.suppress(Exception):
            await client.close()

    async def _rpc(self, call: Callable[[aetcd.Client], Awaitable[T]], *, idempotent: bool) -> T:
        """Run ``call`` on the current host; on a connection failure move to the next host and maybe retry.

        With several hosts, UNAVAILABLE is retried on the next one; a timeout is retried only for idempotent
        calls (a timed-out write may have been applied). With one host gRPC reconnects by itself and the
        caller gets :class:`EtcdUnavailable` at once.
        """
        attempts = len(self.endpoints) if len(self.endpoints) > 1 else 1
        for attempt in range(attempts):
            client, endpoint = self._client, self._endpoint
            if client is None:
                raise EtcdUnavailable("etcd: not started (or shut down)")
            try:
                return await call(client)
            except aetcd.ConnectionFailedError as exc:
                failure: Exception = exc
                retry = True
            except aetcd.ConnectionTimeoutError as exc:
                failure, retry = exc, idempotent
            except aetcd.ClientError as exc:
                if "lease not found" in str(exc):
                    raise LeaseNotFound(_one_line(exc)) from exc
                if client is self._client or self._closed:
                    raise
                failure, retry = exc, True  # the client was swapped (failover) under this call
            except asyncio.CancelledError:
                # Another call or a watch failed over and closed this client: gRPC cancels the calls it still
                # had in flight. That is not this task being cancelled: retry on the new client.
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or client is self._client or self._closed:
                    raise
                failure, retry = EtcdUnavailable("the call's connection was closed by a failover"), True
            await self._after_failure(client, failure)
            if not retry or attempt == attempts - 1:
                raise EtcdUnavailable(f"etcd {endpoint}: {_one_line(failure)}") from failure
        raise AssertionError("unreachable")

    async def _after_failure(self, failed: aetcd.Client, exc: BaseException) -> None:
        """Fail over to the next host after ``failed`` lost its connection (once, whoever noticed)."""
        if len(self.endpoints) == 1 or self._closed:
            return  # gRPC reconnects to the one host by itself
        if not isinstance(exc, aetcd.ConnectionFailedError | aetcd.ConnectionTimeoutError):
            return
        async with self._switch_lock:
            if self._client is not failed or self._closed:
                return
            self._current = (self._current + 1) % len(self.endpoints)
            self._client = self._new_client(self._endpoint)
            logger.warning("etcd_failover", to=str(self._endpoint), error=_one_line(exc))
        # Closing ends the old client's watches; their iterators resume on the new client.
        await self._close_client(failed)


def _holds(responses: list[Any], value: bytes, lease_id: int | None) -> bool:
    """Whether a txn's failure-branch get found the key holding ``value`` (under ``lease_id`` if given)."""
    for response in responses:
        if isinstance(response, list):
            for stored, kv in response:
                if bytes(stored) == value and (lease_id is None or int(kv.lease) == lease_id):
                    return True
    return False


def _parse_host(url: str, item: str) -> EtcdEndpoint:
    item = item.strip()
    host, port_text = item, ""
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise BackendConfigError(f"etcd URL {url!r}: bad host {item!r}")
        port_text = rest[1:]
    elif ":" in item:
        host, _, port_text = item.rpartition(":")
    if not host:
        raise BackendConfigError(f"etcd URL {url!r}: empty host in {item!r}")
    if not port_text:
        return EtcdEndpoint(host)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BackendConfigError(f"etcd URL {url!r}: bad port {port_text!r}")
    return EtcdEndpoint(host, int(port_text))
