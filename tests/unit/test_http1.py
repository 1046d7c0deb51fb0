"""The worker's lean HTTP/1.1 client (worker/http1.py) against a scripted server on 127.0.0.1: framing (length,
chunked, to the end of the connection, none), interim answers, the output cap, keep-alive reuse and a stale
pooled connection, malformed answers, and the SSRF guard when reached through ``call_http``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from dsched.libs.models import HttpTarget, RunStatus
from dsched.worker.executors import GuardedResolver, OutputSink, call_http, http_connector
from dsched.worker.http1 import Http1Client, ResponseError, endpoint
from tests.helpers.targets import ScriptedDns

Reply = Callable[[bytes], bytes | None]  # request head -> bytes to send (None: close without answering)


@dataclass
class Server:
    """Answers each request with ``reply(request head)``; ``close_after`` closes a connection after that many
    answers. Records every request head and counts connections."""

    reply: Reply
    close_after: int = 0
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                body = await reader.readexactly(length) if length else b""
                self.requests.append(head + body)
                answer = self.reply(head)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                answered += 1
                if self.close_after and answered >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Serve = Callable[..., Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Starts scripted servers on 127.0.0.1 (closed after the test)."""
    listeners: list[asyncio.Server] = []

    async def start(reply: Reply, close_after: int = 0) -> Server:
        server = Server(reply, close_after)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        listeners.append(listener)
        server.port = listener.sockets[0].getsockname()[1]
        return server

    yield start
    for listener in listeners:
        listener.close()
        await listener.wait_closed()


def fixed(answer: bytes) -> Reply:
    return lambda head: answer


async def get(
    client: Http1Client,
    server: Server,
    path: str = "/x",
    cap: int = 1000,
    method: str = "GET",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bool, str | None]:
    sink = OutputSink(cap)
    url = endpoint(f"http://127.0.0.1:{server.port}{path}")
    answer = await client.request(url, method, headers or {}, body, sink)
    outcome = sink.outcome(RunStatus.SUCCEEDED)
    return answer.status, outcome.output or "", outcome.output_capped, answer.retry_after


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    http = Http1Client(GuardedResolver(allow_private=True))
    yield http
    await http.close()


async def test_length_framed_answers_reuse_one_connection(serve: Serve, client: Http1Client) -> None:
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"))
    for _ in range(3):
        assert await get(client, server) == (200, "hello", False, None)
    assert server.connections == 1
    status, _, _, _ = await get(client, server, method="POST", body=b'{"a": 1}', headers={"X-Dsched-Job-Id": "j"})
    assert status == 200
    request = server.requests[-1].decode()
    assert request.startswith("POST /x HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in request and "User-Agent: dsched\r\n" in request
    assert "X-Dsched-Job-Id: j\r\n" in request and request.endswith('Content-Length: 8\r\n\r\n{"a": 1}')


async def test_chunked_answers_with_extensions_and_trailers(serve: Serve, client: Http1Client) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
    )
    server = await serve(fixed(answer))
    assert await get(client, server) == (200, "hello world", False, None)
    assert await get(client, server) == (200, "hello world", False, None)
    assert server.connections == 1


async def test_an_answer_to_the_end_of_the_connection_is_read_whole_and_not_reused(
    serve: Serve, client: Http1Client
) -> None:
    server = await serve(fixed(b"HTTP/1.0 200 OK\r\n\r\nuntil the end"), close_after=1)
    assert await get(client, server) == (200, "until the end", False, None)
    assert await get(client, server) == (200, "until the end", False, None)
    assert server.connections == 2


async def test_no_body_for_head_204_and_interim_answers_skipped(serve: Serve, client: Http1Client) -> None:
    def reply(head: bytes) -> bytes:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"  # the length a GET would have: no body follows
        if b"/none" in head:
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nRetry-After: 7\r\nContent-Length: 2\r\n\r\nno"

    server = await serve(reply)
    assert await get(client, server, method="HEAD") == (200, "", False, None)
    assert await get(client, server, path="/none") == (204, "", False, None)
    assert await get(client, server) == (503, "no", False, "7")
    assert server.connections == 1


@pytest.mark.parametrize("framing", ["length", "chunked", "to-the-end"])
async def test_a_body_over_the_cap_is_cut_and_its_connection_not_reused(
    serve: Serve, client: Http1Client, framing: str
) -> None:
    body = b"x" * 5000
    answers = {
        "length": b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + body,
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"3e8\r\n"
        + body[:1000]
        + b"\r\n"
        + b"fa0\r\n"
        + body[1000:]
        + b"\r\n0\r\n\r\n",
        "to-the-end": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body,
    }
    server = await serve(fixed(answers[framing]), close_after=1 if framing == "to-the-end" else 0)
    assert await get(client, server, cap=1000) == (200, "x" * 1000, True, None)
    assert await get(client, server, cap=5000) == (200, "x" * 5000, False, None)  # exactly the cap: not cut
    assert await get(client, server, cap=5000) == (200, "x" * 5000, False, None)


async def test_a_pooled_connection_the_server_closed_is_replaced_once(serve: Serve, client: Http1Client) -> None:
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), close_after=1)
    assert await get(client, server) == (200, "ok", False, None)
    await asyncio.sleep(0.05)  # the server has closed the idle connection (no Connection: close said so)
    assert await get(client, server) == (200, "ok", False, None)
    assert server.connections == 2 and len(server.requests) == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
    ids=["version", "status", "obs-fold", "short-body", "chunk-size", "coding"],
)
async def test_malformed_answers_are_errors(serve: Serve, client: Http1Client, answer: bytes) -> None:
    server = await serve(fixed(answer), close_after=1)
    with pytest.raises(ResponseError):
        await get(client, server)


async def test_a_server_that_closes_a_new_connection_unanswered_is_an_error(serve: Serve, client: Http1Client) -> None:
    server = await serve(lambda head: None)
    with pytest.raises(ResponseError):
        await get(client, server)


# Through call_http, as the worker calls it --------------------------------------------------------------------
async def test_call_http_uses_the_lean_client_for_http_and_times_out(serve: Serve) -> None:
    server = await serve(fixed(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone"))
    lean = Http1Client(GuardedResolver(allow_private=True))
    async with aiohttp.ClientSession(connector=http_connector(True)) as session:
        target = HttpTarget(url=f"http://127.0.0.1:{server.port}/hook", method="POST", body="{}")
        outcome = await call_http(
            session, target, headers={"X-A": "1"}, timeout_s=5, output_cap=100, allow_private=True, lean=lean
        )
        assert outcome.status == RunStatus.SUCCEEDED and outcome.http_status == 201 and outcome.output == "done"
        assert b"User-Agent: dsched" in server.requests[-1]  # aiohttp would have sent its own
        silent = await serve(lambda head: b"")  # accepts the request, never answers
        target = HttpTarget(url=f"http://127.0.0.1:{silent.port}/hook")
        outcome = await call_http(
            session, target, headers={}, timeout_s=0.3, output_cap=100, allow_private=True, lean=lean
        )
        assert outcome.status == RunStatus.TIMED_OUT
    await lean.close()


async def test_the_lean_client_connects_only_to_checked_addresses_and_caches_the_answer(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    connected: list[str] = []
    real_connect = Http1Client._connect

    async def connect(self: Http1Client, address: str, port: int) -> object:
        connected.append(address)
        if address != "127.0.0.1":
            raise OSError(111, "test: no outside network")
        return await real_connect(self, address, port)

    monkeypatch.setattr(Http1Client, "_connect", connect)
    async with aiohttp.ClientSession(connector=http_connector(False)) as session:
        # A private answer is refused before any connection.
        refusing = Http1Client(GuardedResolver(False, ScriptedDns(["10.1.2.3"])))
        target = HttpTarget(url=f"http://internal.example:{server.port}/")
        outcome = await call_http(
            session, target, headers={}, timeout_s=5, output_cap=100, allow_private=False, lean=refusing
        )
        assert outcome.status == RunStatus.FAILED and not outcome.retryable
        assert (outcome.error or "").startswith("target refused:") and connected == []
        # A public answer then rebound to loopback: the checked answer is what is connected to, and reused.
        dns = ScriptedDns(["93.184.216.34"], ["127.0.0.1"])
        rebinding = Http1Client(GuardedResolver(False, dns))
        target = HttpTarget(url=f"http://rebind.example:{server.port}/")
        for _ in range(2):
            outcome = await call_http(
                session, target, headers={}, timeout_s=5, output_cap=100, allow_private=False, lean=rebinding
            )
            assert outcome.status == RunStatus.FAILED and "connection error" in (outcome.error or "")
        assert dns.lookups == 1 and connected == ["93.184.216.34", "93.184.216.34"]
        # An unguarded lean client is refused outright unless private targets are allowed.
        unguarded = Http1Client(ScriptedDns(["127.0.0.1"]))
        outcome = await call_http(
            session, target, headers={}, timeout_s=5, output_cap=100, allow_private=False, lean=unguarded
        )
        assert outcome.status == RunStatus.FAILED and "no address guard" in (outcome.error or "")
    assert server.requests == []


async def test_a_large_body_is_not_drained_past_the_cap(serve: Serve, client: Http1Client) -> None:
    big = 8 * 1024 * 1024
    server = await serve(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big + b"y" * big))
    assert await get(client, server, cap=1000) == (200, "y" * 1000, True, None)
    await get(client, server, cap=1000)
    assert server.connections == 2  # the cut answer's connection was closed, not read to its end and reused
