"""Browser-facing guards of the HTTP API while ``cmd:`` jobs are enabled (``DSCHED_ALLOW_CMD``, ``make run``).

A dsched that runs shell commands and listens on 127.0.0.1 must not be drivable by a web page the developer
happens to visit. Two attacks, two checks (both answer a JSON ``{"error", "detail"}``):

- **DNS rebinding**: a page on ``evil.example:8080`` re-points its own name at 127.0.0.1 and then talks to the
  API *same-origin*, so CORS does not stop it — but its requests carry ``Host: evil.example:8080``. Only a
  loopback ``Host`` is answered: ``localhost``, ``127.0.0.1`` or ``[::1]``, with any port, any case, and an
  optional trailing dot on ``localhost``. Anything else (or no ``Host``) is **421 misdirected_request**.
- **Cross-site requests** to ``localhost`` itself: a page may send a "simple" cross-origin POST (a form, or
  ``fetch`` with ``text/plain``) without a CORS preflight. A request with a body (``POST``, ``PUT``, ``PATCH``,
  ``DELETE`` with ``Content-Length > 0`` or a chunked body) must say ``Content-Type: application/json``; a page
  can only send that cross-origin after a preflight, which this API never approves. An empty body declared as
  one of the preflight-free types (an empty form: ``text/plain``, ``application/x-www-form-urlencoded``,
  ``multipart/form-data``) is refused too; an empty body without those (``curl -XPOST …/pause``) passes.
  Otherwise **415 unsupported_media_type**.

With ``cmd:`` disabled the guards are not installed (a production API sits behind its own host names).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from dsched.libs.settings import Settings

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LOOPBACK_HOSTS = frozenset({"localhost", "localhost.", "127.0.0.1", "[::1]"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# What a browser sends cross-origin without a CORS preflight.
SIMPLE_CONTENT_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})


def loopback_host(host: str | None) -> bool:
    """Whether a ``Host`` header value names this machine's loopback interface (port optional)."""
    if not host:
        return False
    name = host.strip().lower()
    if name.startswith("["):  # [v6]:port
        end = name.find("]")
        if end < 0:
            return False
        name, rest = name[: end + 1], name[end + 1 :]
    else:
        name, sep, rest = name.partition(":")
        rest = sep + rest
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and len(rest) <= 6):
        return False
    return name in LOOPBACK_HOSTS


def has_body(request: web.Request) -> bool:
    """Whether the request carries a body (a positive Content-Length, or a chunked transfer)."""
    if request.content_length is not None:
        return request.content_length > 0
    return "chunked" in request.headers.get(hdrs.TRANSFER_ENCODING, "").lower()


def _refuse(status: int, error: str, detail: str) -> web.Response:
    body = json.dumps({"error": error, "detail": detail})
    return web.Response(text=body, status=status, content_type="application/json")


@web.middleware
async def loopback_json_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a non-loopback ``Host`` (421) and a request body that is not ``application/json`` (415)."""
    host = request.headers.get(hdrs.HOST)
    if not loopback_host(host):
        return _refuse(
            421,
            "misdirected_request",
            f"Host {host!r} is not a loopback name: while cmd: jobs are enabled (DSCHED_ALLOW_CMD) this API answers "
            "only requests for localhost, 127.0.0.1 or [::1]",
        )
    declared = request.headers.get(hdrs.CONTENT_TYPE)
    if request.method in BODY_METHODS:
        body = has_body(request)
        if (body and request.content_type != "application/json") or (
            not body and declared is not None and request.content_type in SIMPLE_CONTENT_TYPES
        ):
            return _refuse(
                415,
                "unsupported_media_type",
                f"a request body must be Content-Type: application/json, not {declared or 'none'!r}",
            )
    return await handler(request)


def middlewares(settings: Settings) -> list[Middleware]:
    """The guards to install for ``settings``: :func:`loopback_json_only` while ``cmd:`` is on, else none."""
    return [loopback_json_only] if settings.allow_cmd else []
