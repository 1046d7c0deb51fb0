"""What a run does: echo a payload, run a shell command, or call an HTTP endpoint.

Security defaults (production): ``cmd:`` is refused unless ``allow_cmd``; HTTP targets that resolve to
private, loopback, link-local or otherwise non-public addresses are refused unless ``allow_private_http``.
A command runs in its own process group and the whole group is killed on timeout or cancel; its combined
stdout+stderr is capped at ``output_cap_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import os
import signal
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from libs.models import HttpTarget, Payload, RunStatus


@dataclass(slots=True)
class Outcome:
    status: RunStatus
    output: str = ""
    error: str | None = None
    exit_code: int | None = None
    http_status: int | None = None
    retry_after: str | None = None  # HTTP Retry-After header, honoured by the retry policy
    retryable: bool = True  # False: a failure retrying cannot fix (refused target, 4xx)


class TargetRefused(Exception):
    pass


class Cancellation:
    """A request to abort one run in progress (``POST /runs/{id}/cancel``, ``overlap: replace``).

    The run registers the task doing its work with :meth:`guard`; :meth:`request` cancels it. No waiter task per
    run: most runs are never cancelled, and a task per HTTP call is measurable at thousands of runs per second.
    """

    __slots__ = ("_guarded", "_requested")

    def __init__(self) -> None:
        self._requested = False
        self._guarded: list[asyncio.Future[Any]] = []

    @property
    def requested(self) -> bool:
        return self._requested

    def request(self) -> None:
        self._requested = True
        for future in self._guarded:
            future.cancel()

    def guard(self, future: asyncio.Future[Any]) -> None:
        self._guarded.append(future)
        if self._requested:
            future.cancel()


def _cap(data: bytes, cap: int) -> str:
    text = data[:cap].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > cap else "")


async def run_command(
    command: str, timeout_s: float, output_cap: int, cancellation: Cancellation | None = None
) -> Outcome:
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # own process group: a timeout kills the whole tree
    )
    assert proc.stdout is not None
    chunks: list[bytes] = []
    size = 0

    async def read_all() -> None:
        nonlocal size
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            if size <= output_cap:  # keep reading past the cap so the child never blocks on a full pipe
                chunks.append(chunk)
            size += len(chunk)
        await proc.wait()

    reader = asyncio.create_task(read_all())
    if cancellation is not None:
        cancellation.guard(reader)
    try:
        await asyncio.wait([reader], timeout=timeout_s)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        reader.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), timeout=5)
    output = _cap(b"".join(chunks), output_cap)
    if not reader.done() or reader.cancelled():
        if cancellation is not None and cancellation.requested:
            return Outcome(RunStatus.CANCELLED, output, "cancelled by request", exit_code=proc.returncode)
        return Outcome(RunStatus.TIMED_OUT, output, f"timed out after {timeout_s:g}s", exit_code=proc.returncode)
    code = proc.returncode
    if code == 0:
        return Outcome(RunStatus.SUCCEEDED, output, exit_code=0)
    return Outcome(RunStatus.FAILED, output, f"exit code {code}", exit_code=code)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_target(url: str, allow_private: bool) -> None:
    """Refuse non-HTTP URLs, and (unless allowed) hosts that resolve to any non-public address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused(f"not an http(s) URL: {url!r}")
    if allow_private:
        return
    host = parts.hostname
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, proto=6)
    except OSError as exc:
        raise TargetRefused(f"cannot resolve {host}: {exc}") from exc
    for info in infos:
        if not _is_public(str(info[4][0])):
            raise TargetRefused(f"{host} resolves to non-public address {info[4][0]} (DSCHED_ALLOW_PRIVATE_HTTP)")


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`` (see README "Verifying signatures")."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


async def call_http(
    session: aiohttp.ClientSession,
    target: HttpTarget,
    *,
    headers: dict[str, str],
    timeout_s: float,
    output_cap: int,
    allow_private: bool,
    signing_secrets: list[str] | None = None,
    cancellation: Cancellation | None = None,
) -> Outcome:
    try:
        await check_target(target.url, allow_private)
    except TargetRefused as exc:
        return Outcome(RunStatus.FAILED, error=f"target refused: {exc}", retryable=False)
    body = target.body.encode() if target.body is not None else b""
    all_headers = {**target.headers, **headers}
    if signing_secrets:
        timestamp = str(int(time.time()))
        all_headers["X-Dsched-Timestamp"] = timestamp
        all_headers["X-Dsched-Signature"] = ",".join(signature(s, timestamp, body) for s in signing_secrets)

    async def call() -> Outcome:
        async with session.request(
            target.method.upper(),
            target.url,
            data=body or None,
            headers=all_headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as resp:
            data = await resp.content.read(output_cap + 1)
            output = _cap(data, output_cap)
            if 200 <= resp.status < 300:
                return Outcome(RunStatus.SUCCEEDED, output, http_status=resp.status)
            return Outcome(
                RunStatus.FAILED,
                output,
                f"HTTP {resp.status}",
                http_status=resp.status,
                retry_after=resp.headers.get("Retry-After"),
            )

    task = asyncio.ensure_future(call())
    if cancellation is not None:
        cancellation.guard(task)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if cancellation is not None and cancellation.requested and (current is None or not current.cancelling()):
            return Outcome(RunStatus.CANCELLED, error="cancelled by request", retryable=False)
        raise  # the worker itself is being cancelled (shutdown)
    except TimeoutError:
        return Outcome(RunStatus.TIMED_OUT, error=f"timed out after {timeout_s:g}s")
    except aiohttp.ClientError as exc:
        return Outcome(RunStatus.FAILED, error=f"connection error: {type(exc).__name__}: {exc}")


def echo(payload: Payload) -> Outcome:
    return Outcome(RunStatus.SUCCEEDED, payload.text or "")
