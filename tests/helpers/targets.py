"""Stand-ins for what HTTP jobs talk to: a local endpoint that counts calls, and a scripted DNS resolver."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiohttp.abc import AbstractResolver, ResolveResult


class CountingTarget:
    """A local HTTP endpoint on 127.0.0.1 (``url``, path ``/hook``) answering 200 to any POST and counting the calls
    per job (``X-Dsched-Job-Id``; ``""`` without it). Runs in a thread, so blocking tests can use it too."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        lock = threading.Lock()
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    job_id = self.headers.get("X-Dsched-Job-Id", "")
                    calls[job_id] = calls.get(job_id, 0) + 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ScriptedDns(AbstractResolver):
    """Answers each lookup with the next scripted list of addresses (the last one repeats); counts lookups."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answer = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in answer
        ]

    async def close(self) -> None:
        return None
