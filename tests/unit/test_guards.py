"""The API's loopback/JSON guards while ``cmd:`` is enabled (DNS rebinding, cross-site requests)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from dsched.ingestion.guards import loopback_host, middlewares
from dsched.libs.settings import Settings


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def base() -> AsyncIterator[str]:
    """An app with the guards of a ``cmd:``-enabled dsched in front of a handler that answers 200."""
    app = web.Application(middlewares=middlewares(Settings(allow_cmd=True)))
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def send(base: str, method: str, headers: dict[str, str], data: bytes | None = None) -> tuple[int, object]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, base + "/jobs", headers=headers, data=data) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    "host",
    ["localhost", "LOCALHOST:8080", "localhost.:80", "127.0.0.1", "127.0.0.1:8080", "[::1]", "[::1]:8080"],
)
async def test_loopback_hosts_are_answered(base: str, host: str) -> None:
    assert await send(base, "GET", {"Host": host}) == (200, {"ok": True})


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8080",
        "localhost.evil.example",
        "127.0.0.1.nip.io:8080",
        "127.0.0.2:8080",
        "[::1]x",
        "localhost:80:80",
        "localhost:http",
        "",
    ],
)
async def test_other_hosts_are_refused_with_json(base: str, host: str) -> None:
    status, body = await send(base, "GET", {"Host": host})
    assert status == 421
    assert isinstance(body, dict) and body["error"] == "misdirected_request" and "loopback" in body["detail"]


@pytest.mark.parametrize(
    ("method", "content_type", "data"),
    [
        ("POST", "text/plain", b'{"project_id": "p", "payload": "cmd:id"}'),
        ("POST", "application/x-www-form-urlencoded", b"a=b"),
        ("PATCH", "multipart/form-data; boundary=x", b"--x--"),
        ("PUT", "application/octet-stream", b"{}"),
        ("POST", "application/x-www-form-urlencoded", b""),  # an empty form: still a cross-site POST
    ],
)
async def test_bodies_that_are_not_json_are_refused(base: str, method: str, content_type: str, data: bytes) -> None:
    status, body = await send(base, method, {"Host": "localhost:8080", "Content-Type": content_type}, data)
    assert status == 415
    assert isinstance(body, dict) and body["error"] == "unsupported_media_type" and set(body) == {"error", "detail"}


async def test_json_bodies_and_bodiless_posts_pass(base: str) -> None:
    json_headers = {"Host": "localhost", "Content-Type": "application/json; charset=utf-8"}
    assert (await send(base, "POST", json_headers, b"{}"))[0] == 200
    assert (await send(base, "POST", {"Host": "localhost"}))[0] == 200  # e.g. POST /jobs/{id}/pause


def test_no_guards_without_cmd() -> None:
    assert middlewares(Settings(allow_cmd=False)) == []
    assert len(middlewares(Settings(allow_cmd=True))) == 1


def test_loopback_host_parsing() -> None:
    assert loopback_host("[::1]:65535") and loopback_host("Localhost")
    assert not loopback_host(None) and not loopback_host("[::1") and not loopback_host("localhost:123456")
