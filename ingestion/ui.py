"""The web dashboard at ``/ui``: static assets shipped in the package (``ingestion/ui/``), nothing to build.

The page is plain JavaScript that calls the public API with the user's own credentials (``X-User-ID`` in ``dev``
mode, ``Authorization: Bearer`` otherwise); there is no private back door. Every response here carries a strict
Content-Security-Policy (scripts, styles and connections only from this origin, no inline code, no framing).

- ``GET /ui`` (and ``/ui/``, ``/ui/<anything>`` for deep links): ``index.html``
- ``GET /ui/static/<file>``: ``app.js``, ``app.css``
- ``GET /ui/config.json``: ``{"auth": "dev" | "keys" | "jwt" | ...}`` so the page knows which credential to ask for
"""

from __future__ import annotations

from pathlib import Path

import orjson
from aiohttp import web

from dsched.libs.settings import Settings

ASSETS = Path(__file__).with_name("ui")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}


def auth_mode(settings: Settings) -> str:
    """The API's authentication mode as the page needs it (``dev`` unless ``DSCHED_AUTH`` says otherwise)."""
    return str(getattr(settings, "auth", None) or "dev")


def register(app: web.Application, settings: Settings) -> None:
    async def index(_: web.Request) -> web.Response:
        return web.Response(
            body=(ASSETS / "index.html").read_bytes(),
            content_type="text/html",
            charset="utf-8",
            headers=SECURITY_HEADERS,
        )

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        path = ASSETS / name
        if "/" in name or name.startswith(".") or path.suffix not in TYPES or not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(
            body=path.read_bytes(), content_type=TYPES[path.suffix], charset="utf-8", headers=SECURITY_HEADERS
        )

    async def config(_: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({"auth": auth_mode(settings)}),
            content_type="application/json",
            headers=SECURITY_HEADERS,
        )

    app.router.add_get("/ui", index)
    app.router.add_get("/ui/config.json", config)
    app.router.add_get("/ui/static/{name}", asset)
    app.router.add_get("/ui/{path:(?s:.*)}", index)  # any deep link, even one with an encoded newline
