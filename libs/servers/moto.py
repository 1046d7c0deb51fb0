"""moto in server mode: S3 (and SQS) on 127.0.0.1, from PyPI (``moto[server]``, a test dependency).

moto keeps everything in memory, so a restarted moto is empty (queues and buckets are gone; the adapters
recreate them). Ready means its ``/moto-api/data.json`` answers.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from pathlib import Path

from dsched.libs.servers.base import ServerError, ServerProcess, free_port, http_ok


def moto_binary() -> str | None:
    """``moto_server`` of the running interpreter's environment (next to ``sys.executable``)."""
    candidate = Path(sys.executable).parent / "moto_server"
    if candidate.is_file():
        return str(candidate)
    return shutil.which("moto_server")


class MotoServer(ServerProcess):
    """moto in server mode: SQS and S3 (and the rest of AWS) at ``endpoint``, all state in memory."""

    name = "moto"

    def __init__(self, base_dir: Path | None = None, *, binary: str | None = None) -> None:
        found = binary or moto_binary()
        if found is None:
            raise ServerError(f"moto_server not found next to {sys.executable}: install moto[server]")
        self.binary = found
        super().__init__(base_dir)
        self.port = free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def region(self) -> str:
        return "us-east-1"

    def _command(self) -> list[str]:
        return [self.binary, "-H", "127.0.0.1", "-p", str(self.port)]

    def _healthy(self) -> bool:
        return http_ok(f"{self.endpoint}/moto-api/data.json") is not None

    def reset(self) -> None:
        """Forget every queue and bucket without restarting (moto's reset API)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10):
            pass
