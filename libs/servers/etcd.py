"""etcd from Debian (``apt-get install etcd-server``; ``make system-deps`` does it), one member or a cluster.

``EtcdServer`` keeps its data directory across restarts (a restart is a crash-recovery: nothing is lost).
Ready means ``/health`` reports ``"health":"true"`` (the member has a leader).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from dsched.libs.servers.base import ServerError, ServerProcess, free_port, http_ok

ETCD_BINARY_ENV = "DSCHED_ETCD_BINARY"
DEFAULT_ETCD_BINARY = "/usr/bin/etcd"


def etcd_binary() -> str | None:
    """The etcd executable: ``$DSCHED_ETCD_BINARY``, /usr/bin/etcd, or ``etcd`` on PATH; None if absent."""
    override = os.environ.get(ETCD_BINARY_ENV)
    if override:
        return override if Path(override).is_file() else None
    if Path(DEFAULT_ETCD_BINARY).is_file():
        return DEFAULT_ETCD_BINARY
    return shutil.which("etcd")


class EtcdServer(ServerProcess):
    """One etcd member: by default a one-member cluster of its own (see :class:`EtcdCluster` for more).

    Heartbeat 50 ms / election 500 ms (instead of 100 / 1000) so the smallest lease TTL etcd grants is 1 s:
    etcd raises any TTL to 1.5 election timeouts, which would otherwise be 2 s.
    """

    name = "etcd"

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        binary: str | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        member_name: str | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
    ) -> None:
        found = binary or etcd_binary()
        if found is None:
            raise ServerError("etcd binary not found (looked at $DSCHED_ETCD_BINARY, /usr/bin/etcd, PATH)")
        self.binary = found
        super().__init__(base_dir)
        self.data_dir = self.base_dir / "data"
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.member_name = member_name or f"dsched-test-{self.client_port}"
        self.initial_cluster = initial_cluster or f"{self.member_name}={self.peer_url}"
        self.cluster_token = cluster_token or self.member_name

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def url(self) -> str:
        """The coordination URL, ``etcd://127.0.0.1:PORT`` (append ``/prefix`` for a namespace)."""
        return f"etcd://127.0.0.1:{self.client_port}"

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def port(self) -> int:
        return self.client_port

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--name", self.member_name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.cluster_token,
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip

    def _healthy(self) -> bool:
        body = http_ok(f"{self.client_url}/health")
        return body is not None and b'"health":"true"' in body.replace(b" ", b"")


class EtcdCluster:
    """An etcd cluster of ``size`` members (default 3) on 127.0.0.1, for quorum and client-failover tests.

    ``url`` lists every member (``etcd://127.0.0.1:P1,127.0.0.1:P2,…``); ``members[i]`` is an
    :class:`EtcdServer` to stop, kill, pause or restart individually while the others keep quorum.
    """

    def __init__(self, size: int = 3, base_dir: Path | None = None, *, binary: str | None = None) -> None:
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self._own_dir = base_dir is None
        self.base_dir = Path(tempfile.mkdtemp(prefix="dsched-etcd-cluster-")) if base_dir is None else base_dir
        ports = [(free_port(), free_port()) for _ in range(size)]
        names = [f"m{i}-{client}" for i, (client, _) in enumerate(ports)]
        initial = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, (_, peer) in zip(names, ports, strict=True))
        self.members = [
            EtcdServer(
                self.base_dir / name,
                binary=binary,
                client_port=client,
                peer_port=peer,
                member_name=name,
                initial_cluster=initial,
                cluster_token=f"dsched-test-cluster-{ports[0][0]}",
            )
            for name, (client, peer) in zip(names, ports, strict=True)
        ]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def start(self) -> None:
        """Start every member at once (none is healthy before a quorum runs) and wait until all are."""
        for member in self.members:
            member._spawn()
        for member in self.members:
            member.start()

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def close(self) -> None:
        for member in self.members:
            member.close()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
