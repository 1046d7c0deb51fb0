"""Admin routes (role ``admin``, see :mod:`ingestion.auth`): API keys and per-tenant HMAC signing secrets.

=========================================================  =====================================================
``GET /admin/keys[?tenant=T]``                             keys (never their secrets or hashes), newest first
``POST /admin/keys``                                       ``{"tenant", "role", "name"?, "expires_in"?: "30d"}`` →
                                                           ``201 {"key": "dsk_…", …}``; the key is shown only here
``DELETE /admin/keys/{key_id}``                            revoke (applies everywhere within DSCHED_AUTH_CACHE_S)
``GET /admin/tenants/{tenant}/signing-secrets``            fingerprints of the tenant's outgoing-HTTP secrets
``POST /admin/tenants/{tenant}/signing-secrets/rotate``    new secret first, the previous one kept for receivers
                                                           still on it → ``201 {"secret": …}`` (shown only here)
``POST /admin/tenants/{tenant}/signing-secrets/retire``    drop every secret but the newest
=========================================================  =====================================================
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import orjson
from aiohttp import web

from dsched.ingestion.auth import Authenticator, json_error, principal_of
from dsched.ingestion.requests import USER_ID
from dsched.libs import logs
from dsched.libs.apikeys import Role, create_key, normalize_key_id, parse_duration

logger = logs.get("auth")
MAX_SIGNING_SECRETS = 2


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def fingerprint(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


class AdminRoutes:
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth
        self.store = auth.store

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get("/admin/keys", self.list_keys)
        router.add_post("/admin/keys", self.create_key)
        router.add_delete("/admin/keys/{key_id}", self.revoke_key)
        router.add_get("/admin/tenants/{tenant}/signing-secrets", self.list_secrets)
        router.add_post("/admin/tenants/{tenant}/signing-secrets/rotate", self.rotate_secret)
        router.add_post("/admin/tenants/{tenant}/signing-secrets/retire", self.retire_secrets)

    async def list_keys(self, request: web.Request) -> web.Response:
        tenant = request.query.get("tenant") or None
        keys = await self.store.list_api_keys(tenant)
        return _json({"keys": [k.public() for k in keys]})

    async def create_key(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError:
            return json_error(400, "invalid_json", "malformed JSON")
        if not isinstance(body, dict):
            return json_error(400, "invalid_json", "the body must be a JSON object")
        caller = principal_of(request)
        tenant = body.get("tenant") or (caller.tenant if caller else None)
        if not isinstance(tenant, str) or not USER_ID.match(tenant):
            return json_error(400, "invalid_field", "tenant: 1-128 of A-Z a-z 0-9 . _ @ : + -")
        try:
            role = Role(body.get("role", "member"))
        except ValueError:
            return json_error(400, "invalid_field", "role: one of viewer, member, admin")
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > 200:
            return json_error(400, "invalid_field", "name: a string of at most 200 characters")
        expires_in = body.get("expires_in")
        try:
            seconds = None if expires_in in (None, "") else parse_duration(str(expires_in))
        except ValueError:
            return json_error(400, "invalid_field", "expires_in: a duration like 30d, 12h, 90m")
        # Keys can be created in any mode (e.g. before switching a deployment from dev to keys).
        record, key = await create_key(
            self.store, self.auth.pepper, tenant=tenant, role=role, name=name, expires_in_s=seconds
        )
        logger.info("key_created", key_id=record.key_id, tenant=tenant, role=role.value, by=caller and caller.subject)
        return _json({**record.public(), "key": key}, 201)

    async def revoke_key(self, request: web.Request) -> web.Response:
        key_id = normalize_key_id(request.match_info["key_id"])
        if not await self.store.revoke_api_key(key_id, time.time_ns() // 1_000_000):
            return json_error(404, "not_found", f"no key {key_id!r}")
        if self.auth.keys is not None:
            self.auth.keys.forget(key_id)
        caller = principal_of(request)
        logger.info("key_revoked", key_id=key_id, by=caller and caller.subject)
        return _json({"key_id": key_id, "status": "Revoked"})

    def _tenant(self, request: web.Request) -> str | None:
        tenant = request.match_info["tenant"]
        return tenant if USER_ID.match(tenant) else None

    async def list_secrets(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        if tenant is None:
            return json_error(400, "invalid_field", "invalid tenant")
        found = await self.store.get_signing_secrets(tenant)
        return _json({"tenant": tenant, "secrets": [{"fingerprint": fingerprint(s)} for s in found]})

    async def rotate_secret(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        if tenant is None:
            return json_error(400, "invalid_field", "invalid tenant")
        secret = "whsec_" + secrets.token_urlsafe(32)
        current = await self.store.get_signing_secrets(tenant)
        kept = [secret, *current][:MAX_SIGNING_SECRETS]
        await self.store.put_signing_secrets(tenant, kept)
        logger.info("signing_secret_rotated", tenant=tenant, fingerprint=fingerprint(secret))
        return _json(
            {"tenant": tenant, "secret": secret, "secrets": [{"fingerprint": fingerprint(s)} for s in kept]}, 201
        )

    async def retire_secrets(self, request: web.Request) -> web.Response:
        tenant = self._tenant(request)
        if tenant is None:
            return json_error(400, "invalid_field", "invalid tenant")
        current = await self.store.get_signing_secrets(tenant)
        await self.store.put_signing_secrets(tenant, current[:1])
        return _json({"tenant": tenant, "secrets": [{"fingerprint": fingerprint(s)} for s in current[:1]]})
