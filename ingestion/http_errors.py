"""JSON answers for errors aiohttp raises itself, before any route or middleware runs.

A request line aiohttp cannot parse, an unknown method, headers that are too long: aiohttp answers these from
its protocol handler with a text/plain or HTML page. dsched answers every error as ``{"error", "detail"}``; this
runner swaps in a protocol handler that does, with a fixed detail per kind of error (never parser internals).
"""

from __future__ import annotations

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server


def _detail(status: int, exc: BaseException | None) -> tuple[str, str]:
    if isinstance(exc, LineTooLong):
        return "request_too_large", "the request line or a header is too long"
    if isinstance(exc, BadHttpMethod):
        return "bad_request", "unknown HTTP method"
    if isinstance(exc, BadStatusLine):
        return "bad_request", "malformed request line"
    if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
        return "bad_request", "malformed HTTP request"
    return "internal_error", "the server could not process the request"


class _JsonErrorHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)  # logs, checks nothing was sent yet
        error, detail = _detail(status, exc)
        json_response = web.Response(
            status=response.status,
            body=orjson.dumps({"error": error, "detail": detail}),
            content_type="application/json",
        )
        json_response.force_close()
        return json_response


class _JsonErrorServer(Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorAppRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose protocol-level errors are JSON ``{"error", "detail"}``."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # same state, one overridden factory method
        return server
