"""The CLI's client sends a request again when the API refused it with ``Retry-After`` (503 overloaded, 429 rate
limited), a bounded number of times; other errors are reported at once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dsched.app.client import RETRY_ATTEMPTS, Client, CliError


class _Api(BaseHTTPRequestHandler):
    answers: list[tuple[int, dict[str, str]]] = []  # (status, headers) per request; then 202
    seen = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).seen += 1
        status, headers = self.answers.pop(0) if self.answers else (202, {})
        body = json.dumps({"job_id": "j1"} if status == 202 else {"error": "overloaded", "detail": "later"}).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[tuple[Client, type[_Api]]]:
    handler = type("Api", (_Api,), {"answers": [], "seen": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Client(f"http://127.0.0.1:{server.server_address[1]}", user="alice", timeout=5), handler
    finally:
        server.shutdown()
        server.server_close()


def test_a_refusal_with_retry_after_is_sent_again(api: tuple[Client, type[_Api]]) -> None:
    client, handler = api
    handler.answers = [(503, {"Retry-After": "0"}), (429, {"Retry-After": "0"})]
    assert client.call("POST", "/submit", {"project_id": "p"}) == {"job_id": "j1"}
    assert handler.seen == 3


def test_retries_are_bounded_and_the_last_refusal_is_reported(api: tuple[Client, type[_Api]]) -> None:
    client, handler = api
    handler.answers = [(503, {"Retry-After": "0"})] * (RETRY_ATTEMPTS + 1)
    with pytest.raises(CliError, match=r"503 .*later"):
        client.call("POST", "/submit", {"project_id": "p"})
    assert handler.seen == RETRY_ATTEMPTS


@pytest.mark.parametrize("headers", [{}, {"Retry-After": "3600"}, {"Retry-After": "soon"}])
def test_a_503_without_a_usable_retry_after_is_reported_at_once(
    api: tuple[Client, type[_Api]], headers: dict[str, str]
) -> None:
    client, handler = api
    handler.answers = [(503, headers)]
    with pytest.raises(CliError, match="503"):
        client.call("POST", "/submit", {"project_id": "p"})
    assert handler.seen == 1
