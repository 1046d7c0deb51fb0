"""Authentication and roles over HTTP: every route x every kind of caller, in ``keys`` and ``jwt`` modes.

Callers: no credentials, a bad credential, a revoked key (jwt: a token whose signing key left the JWKS), an expired
one, viewer / member / admin of tenant ``alice`` (who owns the objects the routes name), and a member of tenant
``bob``. Expected: 401 (with ``WWW-Authenticate``) for the first four, 403 for a role below the route's, 404 for
another tenant's object, and the route's own answer otherwise. A completeness check fails when the app serves a
route this table does not cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from dsched.app.runner import started
from dsched.ingestion import auth as auth_module
from dsched.ingestion import oidc
from dsched.ingestion.auth import AUTH_FAILURES, Authenticator
from dsched.ingestion.service import Ingestion
from dsched.libs.apikeys import Role, create_key
from dsched.libs.errors import BackendConfigError
from dsched.libs.metrics import REGISTRY
from dsched.libs.settings import SERVICES, Settings
from dsched.libs.store.sqlite import SqliteStore
from tests.helpers.cluster import cluster_settings

ALICE, BOB = "alice", "bob"
ISSUER, AUDIENCE = "https://idp.test", "dsched"
CALLERS = ("none", "bad", "revoked", "expired", "viewer", "member", "admin", "other")


@dataclass
class Client:
    base: str
    session: aiohttp.ClientSession
    ingestion: Any
    creds: dict[str, str] = field(default_factory=dict)  # caller → Authorization header value

    async def call(
        self, method: str, path: str, auth: str | None, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        hdrs = dict(headers or {})
        if auth is not None:
            hdrs["Authorization"] = auth
        data = None
        if body is not None:
            data = orjson.dumps(body)
            hdrs["Content-Type"] = "application/json"
        async with self.session.request(method, self.base + path, data=data, headers=hdrs) as resp:
            if resp.content_type == "text/event-stream":  # a stream: the status is the answer
                return resp.status, None, dict(resp.headers)
            raw = await resp.read()
            parsed = orjson.loads(raw) if resp.content_type == "application/json" else raw
            return resp.status, parsed, dict(resp.headers)

    async def as_(self, caller: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, data, _ = await self.call(method, path, self.creds.get(caller), body)
        return status, data

    async def wait_for(self, check: Callable[[], Any], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = await check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            await asyncio.sleep(0.05)


# JWT issuer ---------------------------------------------------------------------------------------------------
class Issuer:
    """Signing keys and a local JWKS server (``http://127.0.0.1:<port>/jwks``)."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.retired = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # kid rsa-2, once published
        self.publish_rotated = False
        self.fetches = 0
        self.url = ""

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True)
        ec_jwk = ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        keys = [
            {**rsa_jwk, "kid": "rsa-1", "use": "sig", "alg": "RS256"},
            {**ec_jwk, "kid": "ec-1", "use": "sig", "alg": "ES256"},
        ]
        if self.publish_rotated:
            keys.append({**RSAAlgorithm.to_jwk(self.rotated.public_key(), as_dict=True), "kid": "rsa-2", "use": "sig"})
        return {"keys": keys}

    def token(
        self, tenant: str, role: str | list[str] | None, *, alg: str = "RS256", exp_in: float = 300, **extra: Any
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": f"user-{tenant}", "tenant": tenant, "iss": ISSUER, "aud": AUDIENCE}
        claims.update(iat=now, nbf=now, exp=int(now + exp_in))
        if role is not None:
            claims["role"] = role
        claims.update(extra)
        key, kid = (self.ec, "ec-1") if alg == "ES256" else (self.rsa, "rsa-1")
        if alg == "RS256" and self.publish_rotated:
            key, kid = self.rotated, "rsa-2"  # the issuer signs with its new key once it has published it
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[Issuer]:
        async def jwks(_: web.Request) -> web.Response:
            self.fetches += 1
            return web.json_response(self.jwks())

        app = web.Application()
        app.router.add_get("/jwks", jwks)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/jwks"
        try:
            yield self
        finally:
            await runner.cleanup()


# Cluster ------------------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, **overrides: Any) -> AsyncIterator[Client]:
    settings = cluster_settings(tmp_path, **overrides)
    stop = asyncio.Event()
    async with started(settings, list(SERVICES), stop) as services, aiohttp.ClientSession() as session:
        ingestion = services["ingestion"]
        yield Client(f"http://127.0.0.1:{ingestion.port}", session, ingestion)  # type: ignore[attr-defined]


async def add_key(client: Client, tenant: str, role: Role) -> tuple[str, str]:
    record, key = await create_key(client.ingestion.store, client.ingestion.auth.pepper, tenant=tenant, role=role)
    return record.key_id, key


async def key_credentials(client: Client) -> None:
    store = client.ingestion.store
    for caller, tenant, role in (
        ("viewer", ALICE, Role.VIEWER),
        ("member", ALICE, Role.MEMBER),
        ("admin", ALICE, Role.ADMIN),
        ("other", BOB, Role.MEMBER),
    ):
        client.creds[caller] = f"Bearer {(await add_key(client, tenant, role))[1]}"
    revoked_id, revoked = await add_key(client, ALICE, Role.ADMIN)
    await store.revoke_api_key(revoked_id, int(time.time() * 1000))
    client.creds["revoked"] = f"Bearer {revoked}"
    expired_record, expired = await create_key(
        store, client.ingestion.auth.pepper, tenant=ALICE, role=Role.ADMIN, expires_in_s=1
    )
    expired_record.expires_ms = int(time.time() * 1000) - 1000
    await store.put_api_key(expired_record)
    client.creds["expired"] = f"Bearer {expired}"
    client.creds["bad"] = "Bearer dsk_0123456789ab_" + "A" * 43


def jwt_credentials(client: Client, issuer: Issuer) -> None:
    client.creds.update(
        viewer=f"Bearer {issuer.token(ALICE, 'viewer')}",
        member=f"Bearer {issuer.token(ALICE, 'member', alg='ES256')}",
        admin=f"Bearer {issuer.token(ALICE, 'admin')}",
        other=f"Bearer {issuer.token(BOB, 'member')}",
        expired=f"Bearer {issuer.token(ALICE, 'admin', exp_in=-600)}",
    )
    now = int(time.time())
    claims = {"sub": "x", "tenant": ALICE, "role": "admin", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300}
    # Signed by a key that is no longer (or never was) in the JWKS: its kid is unknown.
    client.creds["revoked"] = "Bearer " + jwt.encode(claims, issuer.retired, "RS256", headers={"kid": "rsa-0"})
    # A known kid with someone else's signature.
    client.creds["bad"] = "Bearer " + jwt.encode(claims, issuer.stranger, "RS256", headers={"kid": "rsa-1"})


# Objects the routes name (tenant alice) -------------------------------------------------------------------------
async def alice_objects(client: Client) -> dict[str, str]:
    async def submit(body: dict[str, Any]) -> str:
        status, data = await client.as_("admin", "POST", "/submit", {"project_id": "p1", **body})
        assert status == 202, data
        return str(data["job_id"])

    job = await submit({"payload": "cmd:echo hi", "max_retries": 0})
    failing = await submit({"payload": "cmd:exit 3", "max_retries": 0})
    ctx = {"J": job, "F": failing}
    for caller in CALLERS:  # a job per caller for DELETE, so each delete meets a live job
        ctx[f"del_{caller}"] = await submit({"payload": "later", "next_fire_at": "2099-01-01T00:00:00Z"})

    async def finished() -> bool:
        status, data = await client.as_("admin", "GET", f"/jobs/{job}/runs")
        runs = data.get("runs", []) if status == 200 else []
        ok = [r for r in runs if r["status"] == "succeeded"]
        if ok:
            ctx["R"] = ok[0]["run_id"]
        return bool(ok)

    async def dead() -> bool:
        status, data = await client.as_("admin", "GET", "/dead-letters")
        letters = [d for d in data.get("dead_letters", []) if d["job_id"] == failing] if status == 200 else []
        if letters:
            ctx["D"] = letters[0]["id"]
        return bool(letters)

    await client.wait_for(finished)
    await client.wait_for(dead)
    for caller in CALLERS:
        if (await client.as_("admin", "GET", f"/jobs/{ctx[f'del_{caller}']}"))[0] != 200:
            await client.wait_for(
                lambda c=caller: _is_200(client.as_("admin", "GET", f"/jobs/{ctx[f'del_{c}']}"))  # type: ignore[misc]
            )
    for caller in ("admin", "other", "member", "viewer"):  # throwaway keys to revoke
        ctx[f"key_{caller}"] = (await add_key(client, ALICE, Role.VIEWER))[0]
    return ctx


async def _is_200(call: Any) -> bool:
    return bool((await call)[0] == 200)


# The table ----------------------------------------------------------------------------------------------------
# (method, path, body, least role or "public", "own" = names alice's object / "any" = the caller's own scope,
#  status when allowed)
FUTURE_JOB = {"project_id": "p1", "payload": "x", "next_fire_at": "2099-01-01T00:00:00Z"}
ROUTES: list[tuple[str, str, Any, str, str, int]] = [
    ("GET", "/health", None, "public", "any", 200),
    ("GET", "/openapi.json", None, "public", "any", 200),
    ("GET", "/metrics", None, "public", "any", 200),
    ("GET", "/ui", None, "public", "any", 200),
    ("GET", "/ui/config.json", None, "public", "any", 200),
    ("GET", "/ui/static/none.css", None, "public", "any", 404),  # public: a missing asset is 404, never 401
    ("GET", "/ui/{path}", None, "public", "any", 200),
    ("GET", "/job?id={J}", None, "viewer", "own", 200),
    ("GET", "/jobs", None, "viewer", "any", 200),
    ("GET", "/jobs/{J}", None, "viewer", "own", 200),
    ("GET", "/jobs/{J}/runs", None, "viewer", "own", 200),
    ("GET", "/jobs/{J}/schedule", None, "viewer", "own", 200),
    ("GET", "/runs/{R}", None, "viewer", "own", 200),
    ("GET", "/runs/{R}/output", None, "viewer", "own", 200),
    ("GET", "/dead-letters", None, "viewer", "any", 200),
    ("GET", "/schedule/preview?cron=@hourly", None, "viewer", "any", 200),
    ("GET", "/events?max_s=0", None, "viewer", "any", 200),
    ("POST", "/submit", FUTURE_JOB, "member", "any", 202),
    ("POST", "/submit/batch", {"jobs": [FUTURE_JOB, FUTURE_JOB]}, "member", "any", 202),
    ("PATCH", "/jobs/{J}", {"name": "renamed by {caller}"}, "member", "own", 202),  # a no-op PATCH is a 400
    ("POST", "/jobs/{J}/pause", None, "member", "own", 202),
    ("POST", "/jobs/{J}/resume", None, "member", "own", 202),
    ("POST", "/jobs/{J}/trigger", None, "member", "own", 202),
    ("DELETE", "/jobs/{del}", None, "member", "own", 202),
    ("POST", "/runs/{R}/cancel", None, "member", "own", 409),  # finished: a conflict, but allowed to ask
    ("POST", "/dead-letters/{D}/replay", None, "member", "own", 202),
    ("POST", "/jobs/bulk", {"action": "trigger", "job_ids": ["{J}"]}, "member", "any", 200),
    ("POST", "/dead-letters/replay", {"ids": ["{D}"]}, "member", "any", 200),
    ("GET", "/queue/stats", None, "admin", "any", 200),
    ("GET", "/workers", None, "admin", "any", 200),
    ("GET", "/cluster", None, "admin", "any", 200),
    ("GET", "/stats", None, "admin", "any", 200),
    ("GET", "/admin/keys", None, "admin", "any", 200),
    ("POST", "/admin/keys", {"tenant": ALICE, "role": "viewer", "expires_in": "1d"}, "admin", "any", 201),
    ("DELETE", "/admin/keys/{key}", None, "admin", "any", 200),
    ("GET", "/admin/tenants/alice/signing-secrets", None, "admin", "any", 200),
    ("POST", "/admin/tenants/alice/signing-secrets/rotate", None, "admin", "any", 201),
    ("POST", "/admin/tenants/alice/signing-secrets/retire", None, "admin", "any", 200),
]
CANONICAL = {  # table path → the app's canonical route
    "/job?id={J}": "/job",
    "/schedule/preview?cron=@hourly": "/schedule/preview",
    "/events?max_s=0": "/events",
    "/ui/static/none.css": "/ui/static/{name}",
    "/ui/{path}": "/ui/{path}",
    "/admin/tenants/alice/signing-secrets": "/admin/tenants/{tenant}/signing-secrets",
    "/admin/tenants/alice/signing-secrets/rotate": "/admin/tenants/{tenant}/signing-secrets/rotate",
    "/admin/tenants/alice/signing-secrets/retire": "/admin/tenants/{tenant}/signing-secrets/retire",
}
RANK = {"viewer": 0, "member": 1, "admin": 2}


def expected(caller: str, least: str, scope: str, ok: int) -> int:
    if least == "public":
        return ok
    if caller in ("none", "bad", "revoked", "expired"):
        return 401
    role = "member" if caller == "other" else caller
    if RANK[role] < RANK[least]:
        return 403
    if caller == "other" and scope == "own":
        return 404
    return ok


def fill(text: str, ctx: dict[str, str], caller: str) -> str:
    text = text.replace("{del}", ctx[f"del_{caller}"]).replace("{key}", ctx.get(f"key_{caller}", "0" * 12))
    text = text.replace("{path}", "deep/link").replace("{caller}", caller)
    for name in ("J", "R", "D"):
        text = text.replace("{" + name + "}", ctx[name])
    return text


async def run_matrix(client: Client) -> None:
    ctx = await alice_objects(client)
    table = {(m, CANONICAL.get(p, p).replace("{J}", "{job_id}").replace("{R}", "{run_id}")) for m, p, *_ in ROUTES}
    table = {
        (m, p.replace("{D}", "{dead_letter_id}").replace("{del}", "{job_id}").replace("{key}", "{key_id}"))
        for m, p in table
    }
    served = {
        (r.method, r.resource.canonical)
        for r in client.ingestion.app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    served = {(m, "/ui/{path}" if p.startswith("/ui/{path") else p) for m, p in served}
    assert served <= table, f"routes without a row in the auth matrix: {sorted(served - table)}"

    failures: list[str] = []
    for method, path, body, least, scope, ok in ROUTES:
        for caller in CALLERS:
            url = fill(path, ctx, caller)
            payload = orjson.loads(fill(orjson.dumps(body).decode(), ctx, caller)) if body is not None else None
            status, data, headers = await client.call(method, url, client.creds.get(caller), payload)
            want = expected(caller, least, scope, ok)
            if status != want:
                failures.append(f"{caller:8} {method} {path}: {status} (want {want}) {data!r:.120}")
            if status == 401:
                assert headers.get("WWW-Authenticate", "").startswith("Bearer"), (caller, path)
            if status >= 400 and isinstance(data, dict):
                assert set(data) == {"error", "detail"}, data
            if caller == "other" and least != "public" and status < 300 and isinstance(data, dict):
                # Bob's own scope: alice's objects are neither listed nor acted on (bulk: each id not_found).
                results = data.get("results") if path in ("/jobs/bulk", "/dead-letters/replay") else None
                if isinstance(results, list):
                    assert all(r.get("error") == "not_found" for r in results), (path, data)
                else:
                    assert not any(ctx[n] in orjson.dumps(data).decode() for n in ("J", "F", "R", "D")), (path, data)
    assert not failures, "\n".join(failures)


def _failures(reason: str) -> float:
    return REGISTRY.get_sample_value("dsched_auth_failures_total", {"reason": reason}) or 0.0


async def test_route_matrix_keys_mode(tmp_path: Path) -> None:
    before = _failures("key_revoked")
    async with cluster(tmp_path, auth="keys", auth_cache_s=0.2) as client:
        await key_credentials(client)
        await run_matrix(client)
    assert _failures("key_revoked") - before >= len(ROUTES) - 7  # every non-public route refused the revoked key


async def test_route_matrix_jwt_mode(tmp_path: Path) -> None:
    issuer = Issuer()
    async with issuer.serve():
        async with cluster(
            tmp_path, auth="jwt", jwt_jwks_url=issuer.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
        ) as client:
            jwt_credentials(client, issuer)
            await run_matrix(client)
    # Cached: the JWKS was fetched once, plus at most one refetch per MIN_REFRESH_S for the unknown kid.
    assert 1 <= issuer.fetches <= 3


async def test_keys_and_jwt_together(tmp_path: Path) -> None:
    issuer = Issuer()
    async with issuer.serve():
        async with cluster(
            tmp_path, auth="keys,jwt", jwt_jwks_url=issuer.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
        ) as client:
            _, key = await add_key(client, ALICE, Role.VIEWER)
            assert (await client.call("GET", "/jobs", f"Bearer {key}"))[0] == 200
            assert (await client.call("GET", "/jobs", f"Bearer {issuer.token(ALICE, 'viewer')}"))[0] == 200
            assert (await client.call("GET", "/jobs", "Bearer not-a-token"))[0] == 401
            # X-User-ID is not a credential outside dev.
            status, _, headers = await client.call("GET", "/jobs", None, headers={"X-User-ID": ALICE})
            assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="dsched"'


async def test_jwt_claims_checked(tmp_path: Path) -> None:
    issuer = Issuer()
    async with issuer.serve():
        async with cluster(
            tmp_path, auth="jwt", jwt_jwks_url=issuer.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
        ) as client:
            cases = {
                "wrong audience": (issuer.token(ALICE, "admin", aud="someone-else"), 401),
                "wrong issuer": (issuer.token(ALICE, "admin", iss="https://evil.test"), 401),
                "not yet valid": (issuer.token(ALICE, "admin", nbf=int(time.time()) + 600), 401),
                "within leeway": (issuer.token(ALICE, "admin", exp_in=-5), 200),
                "no tenant": (issuer.token("", "admin"), 401),
                "no role": (issuer.token(ALICE, None), 403),
                "role list": (issuer.token(ALICE, ["viewer", "admin"]), 200),
            }
            for name, (token, want) in cases.items():
                status, data, _ = await client.call("GET", "/queue/stats", f"Bearer {token}")
                assert status == want, (name, status, data)
            hs = jwt.encode({"tenant": ALICE, "role": "admin", "exp": int(time.time()) + 60}, "k" * 32, "HS256")
            assert (await client.call("GET", "/jobs", f"Bearer {hs}"))[0] == 401  # no symmetric algorithms


async def test_jwks_is_fetched_again_for_a_new_signing_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The JWKS is cached; a token signed with a key the issuer published since (an unknown kid) makes the verifier
    fetch it again and is accepted. (The refetch is throttled to once per MIN_REFRESH_S, here 0.)"""
    monkeypatch.setattr(oidc, "MIN_REFRESH_S", 0.0)
    issuer = Issuer()
    async with issuer.serve():
        async with cluster(
            tmp_path, auth="jwt", jwt_jwks_url=issuer.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE
        ) as client:
            for _ in range(3):
                assert (await client.call("GET", "/jobs", f"Bearer {issuer.token(ALICE, 'viewer')}"))[0] == 200
            assert issuer.fetches == 1  # cached
            issuer.publish_rotated = True
            status, _, _ = await client.call("GET", "/jobs", f"Bearer {issuer.token(ALICE, 'viewer')}")
            assert status == 200 and issuer.fetches == 2


class _AuditLog:
    """Stands in for the auth module's logger: records each call's event and fields."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append({"event": event, **fields})

    warning = info


async def test_writes_and_refusals_are_audited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each write and each refusal is one ``audit`` line (tenant, key id, route, status, outcome, reason); reads
    that succeed are not; refusals count in dsched_auth_failures_total by reason."""
    async with cluster(tmp_path, auth="keys") as client:
        member_id, member = await add_key(client, ALICE, Role.MEMBER)
        viewer_id, viewer = await add_key(client, ALICE, Role.VIEWER)
        before = {r: _failures(r) for r in ("forbidden_role", "key_unknown", "missing")}
        log = _AuditLog()
        with monkeypatch.context() as patch:  # the logger object, not structlog's configuration (tests reconfigure it)
            patch.setattr(auth_module, "logger", log)
            assert (await client.call("POST", "/submit", f"Bearer {member}", FUTURE_JOB))[0] == 202
            assert (await client.call("GET", "/jobs", f"Bearer {member}"))[0] == 200
            assert (await client.call("POST", "/submit", f"Bearer {viewer}", FUTURE_JOB))[0] == 403
            assert (await client.call("POST", "/submit", "Bearer dsk_0123456789ab_" + "A" * 43, FUTURE_JOB))[0] == 401
            assert (await client.call("GET", "/jobs", None))[0] == 401
        audits = [
            (a["tenant"], a["subject"], a["method"], a["route"], a["status"], a["outcome"], a["reason"])
            for a in log.lines
            if a["event"] == "audit"
        ]
        assert audits == [
            (ALICE, f"key:{member_id}", "POST", "/submit", 202, "ok", None),
            (ALICE, f"key:{viewer_id}", "POST", "/submit", 403, "denied", "forbidden_role"),
            (None, None, "POST", "/submit", 401, "denied", "key_unknown"),
            (None, None, "GET", "/jobs", 401, "denied", "missing"),
        ]
        assert {r: _failures(r) - n for r, n in before.items()} == {"forbidden_role": 1, "key_unknown": 1, "missing": 1}


async def test_revocation_applies_within_cache_ttl(tmp_path: Path) -> None:
    async with cluster(tmp_path, auth="keys", auth_cache_s=0.5) as client:
        key_id, key = await add_key(client, ALICE, Role.MEMBER)
        assert (await client.call("GET", "/jobs", f"Bearer {key}"))[0] == 200
        # Revoked straight in the store, as `dsched keys revoke` or another instance would.
        await client.ingestion.store.revoke_api_key(key_id, int(time.time() * 1000))
        revoked_at = time.monotonic()
        # The instance cached the key before the revocation, so once the cache time has passed since then the
        # very next request reads the store again and is refused: an upper bound that needs no clock assertion.
        await asyncio.sleep(max(0.0, revoked_at + 0.5 - time.monotonic()))
        assert (await client.call("GET", "/jobs", f"Bearer {key}"))[0] == 401
        listed = {k.key_id: k for k in await client.ingestion.store.list_api_keys(ALICE)}
        assert listed[key_id].last_used_ms is not None and listed[key_id].revoked_ms is not None


async def test_admin_keys_over_http(tmp_path: Path) -> None:
    async with cluster(tmp_path, auth="keys") as client:
        _, admin = await add_key(client, "ops", Role.ADMIN)
        auth = f"Bearer {admin}"
        status, created, _ = await client.call("POST", "/admin/keys", auth, {"tenant": BOB, "role": "member"})
        assert status == 201 and created["key"].startswith("dsk_") and "key_hash" not in created
        bob = f"Bearer {created['key']}"
        assert (await client.call("POST", "/submit", bob, {"project_id": "p", "payload": "x"}))[0] == 202
        status, listing, _ = await client.call("GET", f"/admin/keys?tenant={BOB}", auth)
        assert [k["key_id"] for k in listing["keys"]] == [created["key_id"]]
        assert all("key_hash" not in k for k in listing["keys"])
        assert (await client.call("DELETE", f"/admin/keys/dsk_{created['key_id']}", auth))[0] == 200
        assert (await client.call("GET", "/jobs", bob))[0] == 401  # this instance applies its own revocation at once
        assert (await client.call("DELETE", "/admin/keys/ffffffffffff", auth))[0] == 404
        for bad in ({"tenant": BOB, "role": "root"}, {"tenant": "no spaces", "role": "viewer"}, {"expires_in": "x"}):
            assert (await client.call("POST", "/admin/keys", auth, bad))[0] == 400


async def test_signing_secret_rotation(tmp_path: Path) -> None:
    async with cluster(tmp_path, auth="keys") as client:
        _, admin = await add_key(client, "ops", Role.ADMIN)
        auth = f"Bearer {admin}"
        url = "/admin/tenants/alice/signing-secrets"
        first = (await client.call("POST", url + "/rotate", auth))[1]["secret"]
        second = (await client.call("POST", url + "/rotate", auth))[1]["secret"]
        third = (await client.call("POST", url + "/rotate", auth))[1]["secret"]
        assert await client.ingestion.store.get_signing_secrets(ALICE) == [third, second]  # two active at most
        assert first not in str((await client.call("GET", url, auth))[1])  # secrets are never listed
        # Workers sign alice's outgoing HTTP with both active secrets.
        _, member = await add_key(client, ALICE, Role.MEMBER)
        received: list[tuple[dict[str, str], bytes]] = []

        async def hook(request: web.Request) -> web.Response:
            received.append((dict(request.headers), await request.read()))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            target = {"http": {"url": f"http://127.0.0.1:{port}/hook", "method": "POST", "body": {"a": 1}}}
            status, _, _ = await client.call(
                "POST", "/submit", f"Bearer {member}", {"project_id": "p", "payload": target}
            )
            assert status == 202

            async def delivered() -> bool:
                return bool(received)

            await client.wait_for(delivered)
        finally:
            await runner.cleanup()
        headers, body = received[0]
        signed = headers["X-Dsched-Timestamp"].encode() + b"." + body
        expected = {"v1=" + hmac.new(s.encode(), signed, hashlib.sha256).hexdigest() for s in (third, second)}
        assert set(headers["X-Dsched-Signature"].split(",")) == expected
        await client.call("POST", url + "/retire", auth)
        assert await client.ingestion.store.get_signing_secrets(ALICE) == [third]


async def test_trusted_proxy_header(tmp_path: Path) -> None:
    async with cluster(
        tmp_path, auth="keys", trusted_user_header="X-Forwarded-User", trusted_proxies=["127.0.0.0/8"]
    ) as client:
        hdrs = {"X-Forwarded-User": ALICE}
        assert (await client.call("POST", "/submit", None, {"project_id": "p", "payload": "x"}, hdrs))[0] == 202
        assert (await client.call("GET", "/queue/stats", None, headers=hdrs))[0] == 403  # member by default
    async with cluster(
        tmp_path / "b", auth="keys", trusted_user_header="X-Forwarded-User", trusted_proxies=["10.0.0.0/8"]
    ) as client:
        before = _failures("untrusted_proxy")
        assert (await client.call("GET", "/jobs", None, headers={"X-Forwarded-User": ALICE}))[0] == 401
        assert _failures("untrusted_proxy") == before + 1


async def test_submit_rate_limit_and_quota(tmp_path: Path) -> None:
    async with cluster(
        tmp_path,
        auth="keys",
        tenant_submit_rate=0.5,
        tenant_submit_burst=3,
        tenant_limits={
            BOB: {"submit_rate": 0, "max_active_jobs": 2, "max_payload_bytes": 500},
            "carol": {"submit_rate": 0, "max_payload_bytes": 500},
        },
    ) as client:
        _, alice = await add_key(client, ALICE, Role.MEMBER)
        _, bob = await add_key(client, BOB, Role.MEMBER)
        body = {"project_id": "p", "payload": "x", "next_fire_at": "2099-01-01T00:00:00Z"}
        statuses = [(await client.call("POST", "/submit", f"Bearer {alice}", body))[:3:2] for _ in range(4)]
        assert [s for s, _ in statuses] == [202, 202, 202, 429]
        assert 1 <= int(statuses[3][1]["Retry-After"]) <= 2
        assert (await client.call("GET", "/jobs", f"Bearer {alice}"))[0] == 200  # reads are not limited
        # bob: no rate limit, but at most 2 active jobs and 500-byte submissions
        bob_statuses = [(await client.call("POST", "/submit", f"Bearer {bob}", body))[0] for _ in range(3)]
        assert bob_statuses == [202, 202, 429]
        big = {**body, "payload": "y" * 600}
        assert (await client.call("POST", "/submit", f"Bearer {bob}", big))[0] == 413

        # carol: only the size cap, on every way a job definition comes in
        _, carol = await add_key(client, "carol", Role.MEMBER)
        auth = f"Bearer {carol}"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap applies to the body as read
            yield orjson.dumps(big)

        headers = {"Authorization": auth, "Content-Type": "application/json"}
        async with client.session.post(client.base + "/submit", data=chunks(), headers=headers) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "payload_too_large"
        status, created, _ = await client.call("POST", "/submit", auth, body)
        assert status == 202
        status, _, _ = await client.call("PATCH", f"/jobs/{created['job_id']}", auth, {"payload": "y" * 600})
        assert status == 413
        status, batch, _ = await client.call("POST", "/submit/batch", auth, {"jobs": [body, big, body]})
        assert status == 202 and batch["accepted"] == 2
        assert [r.get("status") for r in batch["results"]] == ["Submitted", 413, "Submitted"]
        status, stored, _ = await client.call("GET", f"/jobs/{created['job_id']}", auth)
        assert status == 200 and stored["payload"]["text"] == "x"  # the refused PATCH changed nothing


async def test_stored_bytes_quota_counts_every_active_definition(tmp_path: Path) -> None:
    """``max_stored_bytes``: a tenant's active jobs together (offloaded payloads included) stay within the quota;
    past it submits and batch items are 429 quota_exceeded, and deleting jobs frees room."""
    async with cluster(tmp_path, auth="keys", tenant_limits={"dave": {"max_stored_bytes": 12_000}}) as client:
        _, dave = await add_key(client, "dave", Role.MEMBER)
        auth = f"Bearer {dave}"
        big = {"project_id": "p", "payload": "z" * 5_000, "next_fire_at": "2099-01-01T00:00:00Z"}  # offloaded
        statuses, ids = [], []
        for _ in range(4):
            status, answer, _ = await client.call("POST", "/submit", auth, big)
            statuses.append(status)
            if status == 202:
                ids.append(answer["job_id"])
            else:
                assert answer["error"] == "quota_exceeded"
        assert statuses == [202, 202, 429, 429]
        status, batch, _ = await client.call("POST", "/submit/batch", auth, {"jobs": [big]})
        assert status == 429 and batch["results"][0]["error"] == "quota_exceeded"
        assert (await client.call("DELETE", f"/jobs/{ids[0]}", auth))[0] in (200, 202, 204)
        for _ in range(60):  # room again once the deletion is stored and the usage read again (every 2 s)
            if (status := (await client.call("POST", "/submit", auth, big))[0]) == 202:
                break
            await asyncio.sleep(0.25)
        assert status == 202


async def test_rate_limit_is_shared_by_two_ingestion_instances(tmp_path: Path) -> None:
    """Two ingestion instances, each with its own connection to the store file, draw from one bucket."""
    async with cluster(tmp_path, auth="keys", tenant_submit_rate=0.2, tenant_submit_burst=4) as client:
        first = client.ingestion
        other_store = SqliteStore(first.settings.data_dir / "store.db")
        await other_store.startup()
        try:
            second = Ingestion(log=first.log, store=other_store, blobs=first.blobs, settings=first.settings)
            async with second.open(port=0):
                _, key = await add_key(client, ALICE, Role.MEMBER)
                bases = [client.base, f"http://127.0.0.1:{second.port}"]
                statuses = []
                for i in range(8):
                    other = Client(bases[i % 2], client.session, first)
                    statuses.append((await other.call("POST", "/submit", f"Bearer {key}", FUTURE_JOB))[0])
                assert sorted(statuses) == [202] * 4 + [429] * 4, statuses
        finally:
            await other_store.shutdown()


async def test_dev_mode_is_loopback_only(tmp_path: Path) -> None:
    async with cluster(tmp_path) as client:  # dev (the default): X-User-ID as before, no Authorization needed
        status, _, _ = await client.call("GET", "/jobs", None, headers={"X-User-ID": ALICE})
        assert status == 200
        assert (await client.call("GET", "/admin/keys", None))[0] == 401
        assert (await client.call("GET", "/admin/keys", None, headers={"X-User-ID": "ops"}))[0] == 200
        store = client.ingestion.store
        with pytest.raises(BackendConfigError, match="loopback"):
            Authenticator(store, Settings.from_env(host="0.0.0.0", data_dir=tmp_path))
        Authenticator(store, Settings.from_env(host="0.0.0.0", auth="keys", data_dir=tmp_path))
        with pytest.raises(BackendConfigError):
            Authenticator(store, Settings.from_env(auth="dev,keys", data_dir=tmp_path))


def test_auth_failure_metric_is_registered() -> None:
    AUTH_FAILURES.labels("missing")
    assert REGISTRY.get_sample_value("dsched_auth_failures_total", {"reason": "missing"}) is not None
