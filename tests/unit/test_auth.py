"""API keys, the shared rate limit on the embedded store, role table, OpenAPI security, audit lines."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from dsched.ingestion.auth import PUBLIC, ROUTE_ROLES, Authenticator, parse_modes
from dsched.ingestion.openapi import spec
from dsched.libs.apikeys import (
    InvalidKey,
    KeyVerifier,
    Role,
    create_key,
    hash_key,
    key_id_of,
    load_pepper,
    new_key,
    normalize_key_id,
    parse_duration,
)
from dsched.libs.errors import BackendConfigError
from dsched.libs.models import Job, JobState, JobStatus, Payload
from dsched.libs.settings import Settings
from dsched.libs.store.sqlite import SqliteStore


def test_key_format_and_hash() -> None:
    key_id, key = new_key()
    assert key.startswith(f"dsk_{key_id}_") and len(key) == 4 + 12 + 1 + 43
    assert key_id_of(key) == key_id
    assert key_id_of(key[:-1]) is None and key_id_of("dsk_XYZ_" + "a" * 43) is None
    assert new_key()[1] != key
    assert hash_key(b"p1", key) != hash_key(b"p2", key)  # keyed: the pepper matters
    assert normalize_key_id(f"dsk_{key_id}") == normalize_key_id(key) == normalize_key_id(key_id) == key_id


def test_durations() -> None:
    assert parse_duration("30d") == 30 * 86400 and parse_duration("90m") == 5400 and parse_duration("2w") == 1209600
    for bad in ("", "0d", "5y", "-1h", "1.5h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_pepper_file_is_created_once(tmp_path: Path) -> None:
    settings = Settings.from_env(data_dir=tmp_path)
    first = load_pepper(settings)
    assert first == load_pepper(settings) and len(first) == 64
    assert (tmp_path / "auth.pepper").stat().st_mode & 0o077 == 0
    assert load_pepper(Settings.from_env(data_dir=tmp_path, auth_pepper="env")) == b"env"


async def test_verifier_reasons_and_cache(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    await store.startup()
    try:
        verifier = KeyVerifier(store, b"pepper", ttl_s=0.3)
        record, key = await create_key(store, b"pepper", tenant="t", role=Role.MEMBER)
        assert (await verifier.verify(key)).tenant == "t"
        assert (await store.get_api_key(record.key_id)).last_used_ms is not None  # type: ignore[union-attr]
        reasons = {}
        for name, presented in {
            "malformed": "dsk_nope",
            "unknown": key[:-4] + "AAAA",
            "wrong pepper": (await create_key(store, b"other", tenant="t", role=Role.ADMIN))[1],
        }.items():
            with pytest.raises(InvalidKey) as exc:
                await verifier.verify(presented)
            reasons[name] = exc.value.reason
        assert reasons == {"malformed": "malformed", "unknown": "unknown", "wrong pepper": "unknown"}
        await store.revoke_api_key(record.key_id, int(time.time() * 1000))
        assert (await verifier.verify(key)).key_id == record.key_id  # still cached
        await asyncio.sleep(0.35)
        with pytest.raises(InvalidKey, match="revoked"):
            await verifier.verify(key)
        expired, expired_key = await create_key(store, b"pepper", tenant="t", role=Role.VIEWER, expires_in_s=1)
        expired.expires_ms = int(time.time() * 1000) - 1
        await store.put_api_key(expired)
        with pytest.raises(InvalidKey, match="expired"):
            await verifier.verify(expired_key)
        assert {k.key_id for k in await store.list_api_keys("t")} >= {record.key_id, expired.key_id}
        assert not await store.revoke_api_key("000000000000", 1)
    finally:
        await store.shutdown()


async def test_rate_limit_is_shared_between_store_instances(tmp_path: Path) -> None:
    """Two processes' stores on one file draw from one bucket (GCRA in one write transaction)."""
    a, b = SqliteStore(tmp_path / "store.db"), SqliteStore(tmp_path / "store.db")
    await a.startup()
    await b.startup()
    try:
        now = 1_000_000
        # 10/s (100 ms per token), burst 4: four immediate tokens in total, whichever instance takes them.
        results = [await (a if i % 2 else b).take_rate_token("submit:t", 100, 4, now) for i in range(6)]
        assert results[:4] == [0, 0, 0, 0] and results[4] == results[5] == 100
        assert await a.take_rate_token("submit:t", 100, 4, now + 100) == 0  # one more token after 100 ms
        assert await b.take_rate_token("submit:t", 100, 4, now + 100) == 100
        assert await a.take_rate_token("submit:other", 100, 4, now) == 0  # per name
        concurrent = await asyncio.gather(*(s.take_rate_token("x", 100, 3, now) for s in (a, b) * 5))
        assert concurrent.count(0) == 3
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_tenant_usage_counts_active_jobs(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.db")
    await store.startup()
    try:
        assert await store.tenant_usage("nobody") == (0, 0)
        jobs = [
            Job(
                job_id=f"j{i}",
                user_id="t",
                project_id="p",
                payload=Payload(kind="echo", text="x"),
                next_fire_ms=1,
                created_ms=1,
            )
            for i in range(3)
        ]
        jobs[1] = jobs[1].model_copy(update={"deleted": True})
        jobs[2] = jobs[2].model_copy(update={"paused": True})
        await store.put_jobs(jobs)
        await store.update_job_states([JobState(job_id="j0", state=JobStatus.SUCCEEDED)])
        active, size = await store.tenant_usage("t")
        assert active == 1 and size > 0  # j0 finished, j1 deleted: only the paused j2 is active
        offloaded = jobs[0].model_copy(
            update={"job_id": "big", "payload": Payload(kind="echo", blob_key="payloads/big/k", size=50_000)}
        )
        await store.put_jobs([offloaded])
        active, with_blob = await store.tenant_usage("t")
        assert active == 2 and with_blob > size + 50_000  # the blob's bytes count, not only its reference
        await store.put_signing_secrets("t", ["new", "old"])
        assert await store.get_signing_secrets("t") == ["new", "old"]
        assert await store.get_signing_secrets("u") == []
    finally:
        await store.shutdown()


def test_route_table_and_fail_closed(tmp_path: Path) -> None:
    auth = Authenticator(None, Settings.from_env(data_dir=tmp_path, auth="keys"))  # type: ignore[arg-type]
    assert auth.required_role("GET", "/jobs/{job_id}") == Role.VIEWER
    assert auth.required_role("HEAD", "/jobs/{job_id}") == Role.VIEWER
    assert auth.required_role("POST", "/submit") == Role.MEMBER
    assert auth.required_role("GET", "/some/new/route") == Role.ADMIN  # unlisted: admin only
    assert auth.required_role("GET", "/metrics") == PUBLIC
    private = Authenticator(None, Settings.from_env(data_dir=tmp_path, auth="keys", metrics_public=False))  # type: ignore[arg-type]
    assert private.required_role("GET", "/metrics") == Role.ADMIN
    assert all(method in {"GET", "POST", "PATCH", "DELETE"} for method, _ in ROUTE_ROLES)


def test_openapi_declares_security() -> None:
    document = spec()
    assert set(document["components"]["securitySchemes"]) == {"apiKey", "jwt", "devUser"}
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            if op.get("security") == []:
                assert "401" not in op["responses"], (method, path)
                continue
            assert {"401", "403"} <= set(op["responses"]), (method, path)
            expected = ROUTE_ROLES.get((method.upper(), path), Role.ADMIN)
            assert op["x-dsched-least-role"] == expected, (method, path)
    assert "429" in document["paths"]["/submit"]["post"]["responses"]
    assert "Retry-After" in document["paths"]["/submit"]["post"]["responses"]["429"]["headers"]


def test_audit_line_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    class _Req:
        method, path, remote = "POST", "/submit", "127.0.0.1"

    from dsched.ingestion import auth as auth_module
    from dsched.ingestion.auth import Principal

    logs: list[dict[str, Any]] = []

    class _Logger:  # in place of the module's logger: structlog.testing.capture_logs misses a logger cached under
        # an earlier configuration (another test module's CLI run reconfigures logging)
        def info(self, event: str, **fields: Any) -> None:
            logs.append({"event": event, **fields})

    monkeypatch.setattr(auth_module, "logger", _Logger())
    Authenticator._audit(_Req(), "/submit", Principal("t", Role.MEMBER, "key:abc", "key"), 202)  # type: ignore[arg-type]
    Authenticator._audit(_Req(), "/submit", None, 401, reason="key_revoked")  # type: ignore[arg-type]
    ok, refused = logs
    assert ok["event"] == "audit" and ok["tenant"] == "t" and ok["subject"] == "key:abc" and ok["outcome"] == "ok"
    assert ok["route"] == "/submit" and ok["status"] == 202
    assert refused["outcome"] == "denied" and refused["reason"] == "key_revoked" and refused["tenant"] is None


async def test_jwt_with_a_configured_public_key(tmp_path: Path) -> None:
    """DSCHED_JWT_PUBLIC_KEY (a PEM file) instead of a JWKS: no fetch, the same claim checks."""
    import jwt as pyjwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from dsched.ingestion.oidc import InvalidToken, JwtVerifier

    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    verifier = JwtVerifier(Settings.from_env(jwt_public_key=str(pem), jwt_audience="dsched"))
    claims = {"tenant": "t", "role": "viewer", "aud": "dsched", "exp": int(time.time()) + 60}
    assert (await verifier.verify(pyjwt.encode(claims, key, "ES256")))["tenant"] == "t"
    with pytest.raises(InvalidToken, match="bad_signature"):
        await verifier.verify(pyjwt.encode(claims, other, "ES256"))
    with pytest.raises(InvalidToken, match="bad_audience"):
        await verifier.verify(pyjwt.encode({**claims, "aud": "x"}, key, "ES256"))
    with pytest.raises(InvalidToken, match="missing_claim"):
        await verifier.verify(pyjwt.encode({"tenant": "t", "aud": "dsched"}, key, "ES256"))
    with pytest.raises(InvalidToken, match="malformed"):
        await verifier.verify("not.a.jwt")


def test_the_compose_stack_faces_the_network_with_api_keys(tmp_path: Path) -> None:
    """deploy/docker-compose.yml publishes the API beyond loopback, so it must not run in dev: it runs with keys,
    and the settings it gives every service start (dev with that host would not)."""
    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "docker-compose.yml").read_text())
    env = compose["x-dsched-env"]
    assert env["DSCHED_HOST"] == "0.0.0.0" and parse_modes(env["DSCHED_AUTH"]) == {"keys"}
    Authenticator(None, Settings.from_env(host=env["DSCHED_HOST"], auth=env["DSCHED_AUTH"], data_dir=tmp_path))  # type: ignore[arg-type]
    with pytest.raises(BackendConfigError, match="loopback"):
        Authenticator(None, Settings.from_env(host=env["DSCHED_HOST"], auth="dev", data_dir=tmp_path))  # type: ignore[arg-type]
