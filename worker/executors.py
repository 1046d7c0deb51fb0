"""What a run does: echo a payload, run a shell command, or call an HTTP endpoint.

Security defaults (production): ``cmd:`` is refused unless ``allow_cmd``; HTTP targets that resolve to
private, loopback, link-local or otherwise non-public addresses are refused unless ``allow_private_http``.

HTTP: the address check and the connection use **one** DNS answer. :class:`GuardedResolver` is the resolver of
the worker's connector (:func:`http_connector`): it resolves a host once, refuses the whole answer if any address
is not public, and hands aiohttp exactly the addresses it checked, so a DNS server that answers "public" to the
check and "private" to the connect (DNS rebinding) has nothing to rebind. IP-literal URLs never reach a resolver;
:func:`check_target` checks them. TLS still verifies the URL's host name (SNI and ``Host`` are unchanged).

Commands: ``/bin/sh -c <command>``; a run's processes never outlive it. On Linux every process the command
starts — including ones that called ``setsid`` or double-forked — is killed on timeout, on cancel, and when
the shell exits while some are still alive:

- **cgroup v2** where the hierarchy is mounted and writable (probed once per process): each run gets its own
  cgroup ``dsched-run-<pid>-<id>`` under this process's cgroup; the shell joins it before it runs the command, every
  descendant inherits it, and ``cgroup.kill`` (or SIGKILL to each member, repeated until empty) ends them all;
- **otherwise a child subreaper**: the command runs under a small helper process (:data:`_REAPER`) that marks
  itself ``PR_SET_CHILD_SUBREAPER``, so every orphan of the tree is re-parented to it rather than to init; when the
  shell exits or the helper gets SIGTERM (timeout, cancel, or the worker dying: ``PR_SET_PDEATHSIG``) it kills
  its children until none are left, reaps them, and exits with the shell's status;
- elsewhere (not Linux) the command's own process group is killed, as before.

Output: combined stdout+stderr, at most ``output_cap`` bytes (:attr:`Outcome.output_capped` says the cap cut it).
The first ``inline_bytes`` stay in memory (:attr:`Outcome.output`); a longer output is spooled to an unlinked
temporary file (:attr:`Outcome.spool`) and streamed from there to the blob store by :func:`store_output`, so 64
runs with 10 MiB outputs hold 64 x ``inline_bytes`` in memory, not 640 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from dsched.libs.blobs.base import BlobStore
from dsched.libs.limits import command_problem
from dsched.libs.models import HttpTarget, Payload, RunStatus
from dsched.worker import http1

_CHUNK = 65536


@dataclass(slots=True)
class Outcome:
    """What one attempt did.

    ``output`` is the start of the combined output, complete if ``spool`` is None. ``spool``, when set, is an
    unlinked temporary file holding the whole kept output (at most the cap); :func:`store_output` consumes and
    closes it. ``output_capped``: the target produced more than the cap and the rest was discarded.
    """

    status: RunStatus
    output: str = ""
    error: str | None = None
    exit_code: int | None = None
    http_status: int | None = None
    retry_after: str | None = None  # HTTP Retry-After header, honoured by the retry policy
    retryable: bool = True  # False: a failure retrying cannot fix (refused target, 4xx)
    output_capped: bool = False
    spool: IO[bytes] | None = None
    output_ref: str | None = None  # set by store_output once the full output is in the blob store


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


# Output ------------------------------------------------------------------------------------------------------


class OutputSink:
    """Collects up to ``cap`` bytes of output: the first ``inline`` in memory, all of it in a temp file beyond.

    Bytes past the cap are counted (``capped``) and dropped. Writes to the spool file are plain buffered writes
    to the page cache, on the event loop: cheaper than a thread hop per 64 KiB chunk.
    """

    __slots__ = ("_head", "_spool", "cap", "capped", "inline", "kept")

    def __init__(self, cap: int, inline: int | None = None) -> None:
        self.cap = max(cap, 0)
        self.inline = self.cap if inline is None else max(0, min(inline, self.cap))
        self._head = bytearray()
        self._spool: IO[bytes] | None = None
        self.kept = 0
        self.capped = False

    def write(self, chunk: bytes) -> None:
        room = self.cap - self.kept
        if len(chunk) > room:
            self.capped = True
            chunk = chunk[:room]
        if not chunk:
            return
        if self._spool is None and self.kept + len(chunk) > self.inline:
            self._spool = tempfile.TemporaryFile(prefix="dsched-output-")
            self._spool.write(self._head)
        if self._spool is not None:
            self._spool.write(chunk)
        if len(self._head) < self.inline:
            self._head += chunk[: self.inline - len(self._head)]
        self.kept += len(chunk)

    @property
    def full(self) -> bool:
        return self.kept >= self.cap

    def outcome(self, status: RunStatus, **fields: Any) -> Outcome:
        """An :class:`Outcome` carrying this output (the spool file moves into it)."""
        spool, self._spool = self._spool, None
        if spool is not None:
            spool.flush()
            spool.seek(0)
        text = bytes(self._head).decode("utf-8", errors="replace")
        return Outcome(status, text, output_capped=self.capped, spool=spool, **fields)

    def discard(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


async def store_output(blobs: BlobStore, key: str, outcome: Outcome, inline_bytes: int) -> tuple[str, str | None]:
    """Store a finished run's output; returns ``(inline text, blob key or None)``.

    Output longer than ``inline_bytes`` (spooled, or an in-memory ``output`` longer than that) goes to the blob
    store under ``key`` — streamed from the spool file — and the inline text is its first ``inline_bytes``.
    Idempotent: once stored, the spool is closed and later calls (a retried recording) return the same pair.
    """
    if outcome.output_ref is not None:
        return outcome.output, outcome.output_ref
    spool = outcome.spool
    if spool is not None:
        spool.seek(0)
        await blobs.put_file(key, spool)
        outcome.spool = None
        spool.close()
        outcome.output_ref = key
        return outcome.output, key
    data = outcome.output.encode("utf-8", errors="replace")
    if len(data) <= inline_bytes:
        return outcome.output, None
    await blobs.put(key, data)
    outcome.output = data[:inline_bytes].decode("utf-8", errors="replace")
    outcome.output_ref = key
    return outcome.output, key


# Commands ----------------------------------------------------------------------------------------------------

# The child subreaper (see the module docstring). argv: [command, worker pid]. Exits with the shell's status
# (re-raising the signal that killed it, so the worker sees the same return code as without the helper).
_REAPER = r"""
import ctypes, os, signal, sys, time
command, parent = sys.argv[1], int(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: the worker died -> clean up like a timeout
class Stop(Exception): pass
waiting = [True]
def stop(*_):
    if waiting[0]:
        raise Stop
signal.signal(signal.SIGTERM, stop)
def children():
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                            found.append(int(name))
                except (OSError, ValueError, IndexError):
                    pass
        return found
def reap(block):
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid == shell and result[0] is None:
            result[0] = status
result = [None]
shell = -1
try:
    if os.getppid() != parent:
        raise Stop
    shell = os.fork()
    if shell == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.setsid()
            os.execv("/bin/sh", ["/bin/sh", "-c", command])
        finally:
            os._exit(127)
    while result[0] is None:
        pid, status = os.waitpid(-1, 0)
        if pid == shell:
            result[0] = status
    waiting[0] = False
except Stop:
    pass
waiting[0] = False
signal.signal(signal.SIGTERM, signal.SIG_IGN)
for _ in range(10000):
    alive = children()
    if not alive:
        break
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    reap(False)
    if children():
        time.sleep(0.001)
reap(False)
status = result[0]
if status is None or os.WIFSIGNALED(status):
    sig = signal.SIGKILL if status is None else os.WTERMSIG(status)
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
sys.exit(os.waitstatus_to_exitcode(status))
"""

# The shell moves itself into the run's cgroup (writing 0 to cgroup.procs moves the writer) before it starts
# the command, so no process of the command ever runs outside it.
_CGROUP_TRAMPOLINE = 'echo 0 > "$0" || exit 125; exec /bin/sh -c "$1"'


@functools.cache
def cgroup_parent() -> Path | None:
    """The cgroup v2 directory runs' cgroups are created in (this process's own cgroup), or None.

    None when not on Linux, when no cgroup2 hierarchy is mounted, or when a probe (create a child cgroup,
    move a shell into it, remove it) fails — e.g. a read-only /sys/fs/cgroup in a container.
    """
    if sys.platform != "linux":
        return None
    try:
        mount = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    mount = Path(fields[4])
                    break
        own = None
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    own = line[3:].strip()
        if mount is None or own is None or own.endswith("(deleted)"):
            return None
        parent = mount / own.lstrip("/")
        probe = parent / f"dsched-probe-{uuid.uuid4().hex}"
        probe.mkdir()
        try:
            if not (probe / "cgroup.procs").exists():
                return None
            done = subprocess.run(
                ["/bin/sh", "-c", 'echo 0 > "$0"', str(probe / "cgroup.procs")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=5,
                check=False,
            )
            if done.returncode != 0:
                return None
        finally:
            _remove_cgroup_sync(probe)
        _sweep_cgroups(parent)
        return parent
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def _discard_cgroup(path: Path) -> None:
    _kill_cgroup(path)
    _remove_cgroup_sync(path)


def _sweep_cgroups(parent: Path) -> None:
    """Discard the run cgroups of worker processes that no longer exist (killed before they could clean up)."""
    for entry in parent.glob("dsched-run-*-*"):
        pid = entry.name.split("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _discard_cgroup(entry)
        except OSError:
            continue


def _remove_cgroup_sync(path: Path) -> None:
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


class _Tree:
    """How one command's process tree is started and ended (cgroup, subreaper helper, or process group)."""

    def __init__(self, command: str) -> None:
        self.cgroup: Path | None = None
        parent = cgroup_parent()
        if parent is not None:
            cgroup = parent / f"dsched-run-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                cgroup.mkdir()
                self.cgroup = cgroup
            except OSError:
                self.cgroup = None
        if self.cgroup is not None:
            self.argv = ["/bin/sh", "-c", _CGROUP_TRAMPOLINE, str(self.cgroup / "cgroup.procs"), command]
            self.helper = False
        elif sys.platform == "linux" and sys.executable:
            self.argv = [sys.executable, "-I", "-S", "-c", _REAPER, command, str(os.getpid())]
            self.helper = True
        else:
            self.argv = ["/bin/sh", "-c", command]
            self.helper = False

    async def end(self, proc: asyncio.subprocess.Process) -> None:
        """Kill every process of the tree that is still alive, then wait for the top one (bounded)."""
        if self.cgroup is not None:
            await asyncio.to_thread(_kill_cgroup, self.cgroup)
        elif self.helper:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)  # the helper kills the tree, reaps it, and exits
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), timeout=5)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), timeout=5)

    async def close(self) -> None:
        """Kill what is left and remove the cgroup: one thread job, so it completes even if we are cancelled."""
        if self.cgroup is not None:
            await asyncio.to_thread(_discard_cgroup, self.cgroup)


async def _exited(proc: asyncio.subprocess.Process) -> None:
    """Returns when ``proc`` has exited, whether or not its stdout is still held open by something it started.

    Through a pidfd (Linux 5.3+); without one, ``proc.wait()`` (which also waits for stdout to close).
    """
    if proc.returncode is not None:
        return
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return  # exited and reaped already
    except (OSError, AttributeError):
        await proc.wait()
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _kill_cgroup(cgroup: Path) -> None:
    """SIGKILL every member of ``cgroup`` until it is empty (bounded: 5 s)."""
    kill_file = cgroup / "cgroup.kill"
    for _ in range(500):
        try:
            members = (cgroup / "cgroup.procs").read_text().split()
        except FileNotFoundError:
            return
        if not members:
            return
        try:
            kill_file.write_text("1")
        except OSError:
            for pid in members:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.01)


async def run_command(
    command: str,
    timeout_s: float,
    output_cap: int,
    cancellation: Cancellation | None = None,
    *,
    inline_bytes: int | None = None,
) -> Outcome:
    """Run ``/bin/sh -c command``; never raises for a command that cannot start (a failed, non-retryable run).

    Its whole process tree is killed on timeout, on cancel, and when the shell exits (see the module docstring).
    Output beyond ``inline_bytes`` (default: all of it inline) is spooled to a temp file (see :class:`Outcome`).
    """
    problem = command_problem(command)
    if problem is not None:
        return Outcome(RunStatus.FAILED, error=f"command refused: {problem}", retryable=False)
    sink = OutputSink(output_cap, inline_bytes)
    tree = _Tree(command)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *tree.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # own process group too (the fallback where nothing else applies)
            )
        except (OSError, ValueError) as exc:
            return Outcome(RunStatus.FAILED, error=f"command could not start: {exc}", retryable=False)
        return await _supervise(proc, tree, sink, timeout_s, cancellation)
    except BaseException:
        sink.discard()
        raise
    finally:
        await tree.close()


async def _supervise(
    proc: asyncio.subprocess.Process,
    tree: _Tree,
    sink: OutputSink,
    timeout_s: float,
    cancellation: Cancellation | None,
) -> Outcome:
    async def pump() -> None:
        stdout = proc.stdout
        if stdout is None:  # run_command starts every command with stdout=PIPE
            raise RuntimeError("the command's stdout is not a pipe")
        while chunk := await stdout.read(_CHUNK):
            sink.write(chunk)  # keeps reading past the cap so the child never blocks on a full pipe

    async def read_all() -> None:
        pumping = asyncio.ensure_future(pump())
        try:
            if tree.cgroup is not None:
                # The shell is done: what it left running goes too (and stops holding stdout open). Process.wait()
                # would also wait for stdout to close, so the shell's exit is watched through a pidfd.
                await _exited(proc)
                await asyncio.to_thread(_kill_cgroup, tree.cgroup)
            await pumping
            await proc.wait()
        finally:
            pumping.cancel()

    reader = asyncio.create_task(read_all())
    if cancellation is not None:
        cancellation.guard(reader)
    try:
        await asyncio.wait([reader], timeout=timeout_s)
    finally:
        finished = reader.done() and not reader.cancelled()
        if not finished:
            await tree.end(proc)
            reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        if proc.returncode is None:
            await tree.end(proc)
    if not finished:
        if cancellation is not None and cancellation.requested:
            return sink.outcome(RunStatus.CANCELLED, error="cancelled by request", exit_code=proc.returncode)
        return sink.outcome(RunStatus.TIMED_OUT, error=f"timed out after {timeout_s:g}s", exit_code=proc.returncode)
    code = proc.returncode
    if code == 0:
        return sink.outcome(RunStatus.SUCCEEDED, exit_code=0)
    return sink.outcome(RunStatus.FAILED, error=f"exit code {code}", exit_code=code)


# HTTP --------------------------------------------------------------------------------------------------------


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_target(url: str, allow_private: bool) -> None:
    """Refuse non-HTTP(S) URLs and URLs without a host; unless allowed, refuse an IP-literal host that is not
    public. Host names are checked by :class:`GuardedResolver` as the connection resolves them (one lookup)."""
    if (problem := _target_problem(url, allow_private)) is not None:
        raise TargetRefused(problem)


@functools.lru_cache(maxsize=http1.ENDPOINT_CACHE)
def _target_problem(url: str, allow_private: bool) -> str | None:
    """Why :func:`check_target` refuses ``url``, or None: a pure function of its arguments, so cached (a job's URL
    is checked once, not at every run)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"not an http(s) URL: {url!r}"
    if allow_private:
        return None
    address = http1.ip_literal(parts.hostname)
    if address is not None and not _is_public(address):
        return f"{parts.hostname} is a non-public address (DSCHED_ALLOW_PRIVATE_HTTP)"
    return None


class GuardedResolver(AbstractResolver):
    """A resolver that refuses non-public answers and returns exactly the addresses it checked.

    aiohttp connects only to what its connector's resolver returns, so with this resolver the SSRF check and the
    connection share one DNS answer. An answer with any non-public address (private, loopback, link-local,
    multicast, reserved, IPv4-mapped forms of those) is refused as a whole with :class:`TargetRefused`, unless
    ``allow_private``. ``inner`` does the lookups (default: aiohttp's default resolver).
    """

    def __init__(self, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        self.allow_private = allow_private
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answer = await self._inner.resolve(host, port, family)
        if not self.allow_private:
            for entry in answer:
                if not _is_public(entry["host"]):
                    raise TargetRefused(
                        f"{host} resolves to non-public address {entry['host']} (DSCHED_ALLOW_PRIVATE_HTTP)"
                    )
        return [dict(entry) for entry in answer]  # type: ignore[misc]

    async def close(self) -> None:
        await self._inner.close()


def http_connector(
    allow_private: bool, *, resolver: AbstractResolver | None = None, **kwargs: Any
) -> aiohttp.TCPConnector:
    """The worker's connector: :class:`GuardedResolver` over ``resolver``; ``kwargs`` go to TCPConnector."""
    kwargs.setdefault("limit", 0)
    return aiohttp.TCPConnector(resolver=GuardedResolver(allow_private, resolver), **kwargs)


def _guarded(session: aiohttp.ClientSession) -> bool:
    return isinstance(getattr(session.connector, "_resolver", None), GuardedResolver)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>`` (see README "Verifying signatures")."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={mac}"


def _refused(exc: BaseException) -> TargetRefused | None:
    """The :class:`TargetRefused` behind an aiohttp connection error, if that is what it is."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, TargetRefused):
            return current
        seen.add(id(current))
        nested = getattr(current, "os_error", None)
        current = nested if isinstance(nested, BaseException) else (current.__cause__ or current.__context__)
    return None


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
    inline_bytes: int | None = None,
    lean: http1.Http1Client | None = None,
) -> Outcome:
    """One HTTP call. The response body is kept up to ``output_cap`` bytes (spooled beyond ``inline_bytes``).

    A plain ``http://`` URL with an ASCII host goes through ``lean`` when given (:mod:`worker.http1`), anything
    else through ``session``. Unless ``allow_private``, the client used must resolve through a
    :class:`GuardedResolver` (``session``: :func:`http_connector`), else the call fails: a check done here with a
    lookup of its own could be rebound before the connection's lookup.
    """
    parts = urlsplit(target.url)
    lean_client = lean if parts.scheme == "http" and parts.netloc.isascii() else None
    try:
        check_target(target.url, allow_private)
        guarded = isinstance(lean_client.resolver, GuardedResolver) if lean_client is not None else _guarded(session)
        if not allow_private and not guarded:
            raise TargetRefused("the HTTP client has no address guard (use executors.http_connector)")
    except TargetRefused as exc:
        return Outcome(RunStatus.FAILED, error=f"target refused: {exc}", retryable=False)
    body = target.body.encode() if target.body is not None else b""
    all_headers = {**target.headers, **headers}
    if signing_secrets:
        timestamp = str(int(time.time()))
        all_headers["X-Dsched-Timestamp"] = timestamp
        all_headers["X-Dsched-Signature"] = ",".join(signature(s, timestamp, body) for s in signing_secrets)
    sink = OutputSink(output_cap, inline_bytes)

    async def call_lean(client: http1.Http1Client) -> Outcome:
        async with asyncio.timeout(timeout_s):
            answer = await client.request(http1.endpoint(target.url), target.method.upper(), all_headers, body, sink)
        return _http_outcome(sink, answer.status, answer.retry_after)

    async def call() -> Outcome:
        async with session.request(
            target.method.upper(),
            target.url,
            data=body or None,
            headers=all_headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=False,
        ) as resp:
            while not sink.full and (chunk := await resp.content.read(min(_CHUNK, sink.cap - sink.kept))):
                sink.write(chunk)
            if sink.full and not resp.content.at_eof() and await resp.content.read(1):
                sink.capped = True
            return _http_outcome(sink, resp.status, resp.headers.get("Retry-After"))

    task = asyncio.ensure_future(call_lean(lean_client) if lean_client is not None else call())
    if cancellation is not None:
        cancellation.guard(task)
    try:
        return await task
    except asyncio.CancelledError:
        sink.discard()
        current = asyncio.current_task()
        if cancellation is not None and cancellation.requested and (current is None or not current.cancelling()):
            return Outcome(RunStatus.CANCELLED, error="cancelled by request", retryable=False)
        raise  # the worker itself is being cancelled (shutdown)
    except TimeoutError:
        sink.discard()
        return Outcome(RunStatus.TIMED_OUT, error=f"timed out after {timeout_s:g}s")
    except TargetRefused as exc:
        sink.discard()
        return Outcome(RunStatus.FAILED, error=f"target refused: {exc}", retryable=False)
    except aiohttp.ClientError as exc:
        sink.discard()
        refused = _refused(exc)
        if refused is not None:
            return Outcome(RunStatus.FAILED, error=f"target refused: {refused}", retryable=False)
        return Outcome(RunStatus.FAILED, error=f"connection error: {type(exc).__name__}: {exc}")
    except (OSError, http1.ResponseError) as exc:  # the lean client's (after TimeoutError, an OSError)
        sink.discard()
        return Outcome(RunStatus.FAILED, error=f"connection error: {type(exc).__name__}: {exc}")


def _http_outcome(sink: OutputSink, status: int, retry_after: str | None) -> Outcome:
    """A 2xx is a success; any other status a failed attempt saying which (with ``Retry-After`` for the retry)."""
    if 200 <= status < 300:
        return sink.outcome(RunStatus.SUCCEEDED, http_status=status)
    return sink.outcome(RunStatus.FAILED, error=f"HTTP {status}", http_status=status, retry_after=retry_after)


def echo(payload: Payload, output_cap: int | None = None) -> Outcome:
    """The payload's text as the output (cut at ``output_cap`` bytes if given)."""
    text = payload.text or ""
    if output_cap is None or len(text) * 4 <= output_cap:
        return Outcome(RunStatus.SUCCEEDED, text)
    data = text.encode("utf-8", errors="replace")
    if len(data) <= output_cap:
        return Outcome(RunStatus.SUCCEEDED, text)
    return Outcome(RunStatus.SUCCEEDED, data[:output_cap].decode("utf-8", errors="replace"), output_capped=True)
