"""HTTP jobs connect to exactly the addresses that passed the SSRF check (one DNS answer, no rebinding)."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dsched.libs.models import HttpTarget, RunStatus
from dsched.worker.executors import GuardedResolver, TargetRefused, call_http, http_connector
from tests.helpers.targets import ScriptedDns

PUBLIC = "93.184.216.34"  # never connected to: the tests intercept every connection to a non-loopback address


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, list[web.Request]]]:
    """A local HTTP server on 127.0.0.1 that records every request it gets."""
    hits: list[web.Request] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request)
        return web.Response(text="reached")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield port, hits
    finally:
        await runner.cleanup()


def session_for(
    dns: ScriptedDns, allow_private: bool, connected: list[str]
) -> tuple[aiohttp.ClientSession, aiohttp.TCPConnector]:
    """A worker-like session over ``dns``; connections to non-loopback addresses are recorded and refused."""
    connector = http_connector(allow_private, resolver=dns, use_dns_cache=False)
    real = connector._wrap_create_connection

    async def wrap(*args: Any, addr_infos: list[Any], req: Any, **kwargs: Any) -> Any:
        addresses = [info[4][0] for info in addr_infos]
        connected.extend(addresses)
        if any(a != "127.0.0.1" for a in addresses):
            raise aiohttp.ClientConnectorError(req.connection_key, OSError(111, "test: no outside network"))
        return await real(*args, addr_infos=addr_infos, req=req, **kwargs)

    connector._wrap_create_connection = wrap  # type: ignore[method-assign]
    return aiohttp.ClientSession(connector=connector), connector


async def call(session: aiohttp.ClientSession, url: str, allow_private: bool) -> Any:
    return await call_http(
        session, HttpTarget(url=url), headers={}, timeout_s=5, output_cap=1000, allow_private=allow_private
    )


async def test_a_rebinding_answer_is_never_connected_to(server: tuple[int, list[web.Request]]) -> None:
    port, hits = server
    dns = ScriptedDns([PUBLIC], ["127.0.0.1"])  # public for the first lookup, then rebound to loopback
    connected: list[str] = []
    session, _ = session_for(dns, allow_private=False, connected=connected)
    async with session:
        first = await call(session, f"http://rebind.example:{port}/hook", allow_private=False)
        # One lookup served both the check and the connection, so the connection went to the checked address.
        assert dns.lookups == 1
        assert connected == [PUBLIC]
        assert first.status == RunStatus.FAILED and "connection error" in (first.error or "")
        # The next attempt's lookup answers loopback: refused before any connection.
        second = await call(session, f"http://rebind.example:{port}/hook", allow_private=False)
        assert second.status == RunStatus.FAILED and second.retryable is False
        assert "non-public address 127.0.0.1" in (second.error or "")
    assert connected == [PUBLIC]
    assert hits == []


@pytest.mark.parametrize(
    "answer",
    [["127.0.0.1"], ["10.1.2.3"], ["169.254.169.254"], ["::1"], ["::ffff:127.0.0.1"], [PUBLIC, "127.0.0.1"]],
    ids=["loopback", "private", "link-local", "v6-loopback", "v4-mapped", "mixed"],
)
async def test_a_private_target_is_refused_by_default(server: tuple[int, list[web.Request]], answer: list[str]) -> None:
    port, hits = server
    connected: list[str] = []
    session, _ = session_for(ScriptedDns(answer), allow_private=False, connected=connected)
    async with session:
        outcome = await call(session, f"http://internal.example:{port}/", allow_private=False)
    assert outcome.status == RunStatus.FAILED and outcome.retryable is False
    assert (outcome.error or "").startswith("target refused:")
    assert connected == [] and hits == []


async def test_an_ip_literal_private_target_is_refused_without_a_lookup(server: tuple[int, list[web.Request]]) -> None:
    port, hits = server
    dns = ScriptedDns([PUBLIC])
    connected: list[str] = []
    session, _ = session_for(dns, allow_private=False, connected=connected)
    async with session:
        outcome = await call(session, f"http://127.0.0.1:{port}/", allow_private=False)
    assert outcome.status == RunStatus.FAILED and "non-public" in (outcome.error or "")
    assert dns.lookups == 0 and connected == [] and hits == []


async def test_a_private_target_is_allowed_when_enabled(server: tuple[int, list[web.Request]]) -> None:
    port, hits = server
    dns = ScriptedDns(["127.0.0.1"])
    connected: list[str] = []
    session, _ = session_for(dns, allow_private=True, connected=connected)
    async with session:
        outcome = await call(session, f"http://internal.example:{port}/x", allow_private=True)
    assert outcome.status == RunStatus.SUCCEEDED and outcome.output == "reached"
    assert connected == ["127.0.0.1"]
    [hit] = hits
    assert hit.headers["Host"] == f"internal.example:{port}"  # the URL's host, not the address connected to


async def test_an_unguarded_session_is_refused_when_private_targets_are_not_allowed(
    server: tuple[int, list[web.Request]],
) -> None:
    port, hits = server
    async with aiohttp.ClientSession() as session:
        outcome = await call(session, f"http://localhost:{port}/", allow_private=False)
    assert outcome.status == RunStatus.FAILED and "no address guard" in (outcome.error or "")
    assert hits == []


async def test_the_resolver_returns_only_what_it_checked() -> None:
    dns = ScriptedDns([PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"], ["127.0.0.1"])
    guard = GuardedResolver(allow_private=False, inner=dns)
    answer = await guard.resolve("example.test", 443)
    assert [a["host"] for a in answer] == [PUBLIC, "2606:2800:220:1:248:1893:25c8:1946"]
    with pytest.raises(TargetRefused):
        await guard.resolve("example.test", 443)
    allowing = GuardedResolver(allow_private=True, inner=ScriptedDns(["127.0.0.1"]))
    assert [a["host"] for a in await allowing.resolve("example.test", 80)] == ["127.0.0.1"]


def tls_pair(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for ``name`` from a throwaway CA, and a client context trusting it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dsched test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


async def test_tls_verifies_the_url_host_name_not_the_checked_address(tmp_path: Path) -> None:
    server_ctx, client_ctx = tls_pair(tmp_path, "internal.example")
    names: list[str | None] = []
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)

    async def handle(request: web.Request) -> web.Response:
        names.append(request.host)
        return web.Response(text="tls ok")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    port = runner.addresses[0][1]
    try:
        dns = ScriptedDns(["127.0.0.1"])
        connector = http_connector(True, resolver=dns, use_dns_cache=False, ssl=client_ctx)
        async with aiohttp.ClientSession(connector=connector) as session:
            good = await call(session, f"https://internal.example:{port}/", allow_private=True)
            assert good.status == RunStatus.SUCCEEDED and good.output == "tls ok", good
            assert names == [f"internal.example:{port}"] and sni == ["internal.example"]
            # The certificate is checked against the URL's name: a name it does not cover fails, same address.
            wrong = await call(session, f"https://other.example:{port}/", allow_private=True)
            assert wrong.status == RunStatus.FAILED and "connection error" in (wrong.error or "")
            assert names == [f"internal.example:{port}"]
    finally:
        await runner.cleanup()


async def test_refusal_holds_with_the_workers_dns_cache(server: tuple[int, list[web.Request]]) -> None:
    port, hits = server
    dns = ScriptedDns(["127.0.0.1"])
    connector = http_connector(False, resolver=dns, ttl_dns_cache=60)  # as the worker builds it
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(2):  # a refused answer is not cached as usable either
            outcome = await call(session, f"http://cached.example:{port}/", allow_private=False)
            assert outcome.status == RunStatus.FAILED and outcome.retryable is False
            assert "non-public address 127.0.0.1" in (outcome.error or "")
    assert hits == []
