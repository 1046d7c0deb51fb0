"""Who is calling, and may they do this: authentication modes, roles per route, tenant limits, audit.

Modes (``DSCHED_AUTH``, comma-separated):

``dev``
    ``X-User-ID`` names the tenant, as sent, with every right (today's behaviour, seed 004 clients). Only for a
    process bound to loopback: the service refuses to start in ``dev`` on any other address.
``keys``
    ``Authorization: Bearer dsk_…`` API keys (:mod:`libs.apikeys`); the key carries tenant and role.
``jwt``
    ``Authorization: Bearer <JWT>`` verified by :mod:`ingestion.oidc`; claims carry tenant and role.

``keys,jwt`` accepts both (a key is recognised by its ``dsk_`` prefix). In ``keys``/``jwt`` modes, a deployment
behind an authenticating proxy may name a header (``DSCHED_TRUSTED_USER_HEADER``) that is believed only when the
connection comes from ``DSCHED_TRUSTED_PROXIES``; from anywhere else it is ignored.

Roles (ordered): ``viewer`` reads its tenant's jobs, runs and dead letters; ``member`` also changes them;
``admin`` also gets the cluster-wide views (``/queue/stats``, ``/admin/…``: keys, signing secrets, and any route
not listed in :data:`ROUTE_ROLES`, which fails closed). Admin is an operator role: it manages keys of every
tenant, but jobs stay tenant-scoped for everyone.

Answers: no credentials or bad ones → 401 with ``WWW-Authenticate: Bearer``; a role below the route's → 403;
another tenant's object → 404 (the handlers' scoping: existence is never revealed). Every write request (and
every authentication failure) is logged as one ``audit`` line: tenant, key id or token subject, route, status.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import Counter

from dsched.ingestion.oidc import InvalidToken, JwtVerifier, TokenUnavailable
from dsched.ingestion.requests import USER_ID
from dsched.libs import logs
from dsched.libs.apikeys import KEY_PREFIX, InvalidKey, KeyVerifier, Role, load_pepper
from dsched.libs.errors import BackendConfigError
from dsched.libs.metrics import REGISTRY
from dsched.libs.settings import Settings
from dsched.libs.store.base import JobStore

logger = logs.get("auth")
PUBLIC = "public"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MODES = frozenset({"dev", "keys", "jwt"})

AUTH_FAILURES = Counter(
    "dsched_auth_failures_total",
    "Requests refused by authentication or authorization, by reason",
    ["reason"],
    registry=REGISTRY,
)
TENANT_LIMITED = Counter(
    "dsched_tenant_limited_total", "Requests refused by a per-tenant limit", ["limit"], registry=REGISTRY
)

# (method, canonical route) → the least role that may call it, or PUBLIC. HEAD counts as GET. Routes missing
# here need ``admin`` (fail closed): a new route must be added to be usable by viewers or members.
ROUTE_ROLES: dict[tuple[str, str], Role | str] = {
    ("GET", "/health"): PUBLIC,
    ("GET", "/openapi.json"): PUBLIC,
    ("GET", "/job"): Role.VIEWER,
    ("GET", "/jobs"): Role.VIEWER,
    ("GET", "/jobs/{job_id}"): Role.VIEWER,
    ("GET", "/jobs/{job_id}/runs"): Role.VIEWER,
    ("GET", "/jobs/{job_id}/schedule"): Role.VIEWER,
    ("GET", "/runs/{run_id}"): Role.VIEWER,
    ("GET", "/runs/{run_id}/output"): Role.VIEWER,
    ("GET", "/dead-letters"): Role.VIEWER,
    ("POST", "/submit"): Role.MEMBER,
    ("POST", "/submit/batch"): Role.MEMBER,
    ("PATCH", "/jobs/{job_id}"): Role.MEMBER,
    ("DELETE", "/jobs/{job_id}"): Role.MEMBER,
    ("POST", "/jobs/{job_id}/pause"): Role.MEMBER,
    ("POST", "/jobs/{job_id}/resume"): Role.MEMBER,
    ("POST", "/jobs/{job_id}/trigger"): Role.MEMBER,
    ("POST", "/runs/{run_id}/cancel"): Role.MEMBER,
    ("POST", "/dead-letters/{dead_letter_id}/replay"): Role.MEMBER,
    ("GET", "/queue/stats"): Role.ADMIN,
    # The console API (ingestion/console.py, issue 13).
    ("GET", "/schedule/preview"): Role.VIEWER,
    ("GET", "/events"): Role.VIEWER,
    ("POST", "/jobs/bulk"): Role.MEMBER,
    ("POST", "/dead-letters/replay"): Role.MEMBER,
    ("GET", "/workers"): Role.ADMIN,
    ("GET", "/cluster"): Role.ADMIN,
    ("GET", "/stats"): Role.ADMIN,
}
# Static pages (the dashboard's HTML/JS carry no data; its API calls are authenticated like any other).
PUBLIC_PREFIXES = ("/ui",)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the tenant every object is scoped to, its role, and who exactly (key id,
    token subject or proxy user) for the audit log."""

    tenant: str
    role: Role
    subject: str
    method: str  # dev | key | jwt | proxy


class AuthFailure(Exception):
    """Credentials that do not authenticate (401) or a role that does not suffice (403)."""

    def __init__(self, status: int, reason: str, detail: str, principal: Principal | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.principal = status, reason, detail, principal


PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("dsched_principal", Principal)


def json_error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps({"error": error, "detail": detail}),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def principal_of(request: web.Request) -> Principal | None:
    """The caller the middleware authenticated (None in ``dev`` without ``X-User-ID`` and on public routes)."""
    return request.get(PRINCIPAL)


def parse_modes(text: str) -> frozenset[str]:
    modes = frozenset(m.strip().lower() for m in text.split(",") if m.strip())
    if not modes or not modes <= MODES:
        raise BackendConfigError(f"DSCHED_AUTH={text!r}: expected dev, keys, jwt or keys,jwt")
    if "dev" in modes and len(modes) > 1:
        raise BackendConfigError(f"DSCHED_AUTH={text!r}: dev cannot be combined with other modes")
    return modes


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Usage:
    active: int
    stored_bytes: int
    until: float


class TenantLimits:
    """Per-tenant submit rate (GCRA in the store: shared by every ingestion instance on that store) and
    active-job and request-size quotas. ``DSCHED_TENANT_LIMITS`` overrides the defaults per tenant, e.g.
    ``{"acme": {"submit_rate": 50, "submit_burst": 100, "max_active_jobs": 100000, "max_payload_bytes": 65536,
    "max_stored_bytes": 10485760}}``.

    The active-job count and their definition bytes are read from the store at most every ``usage_ttl_s`` per
    tenant and counted up locally in between, so a quota can be overshot by what other instances accept within
    that time."""

    def __init__(self, store: JobStore, settings: Settings, usage_ttl_s: float = 2.0) -> None:
        self.store = store
        self.settings = settings
        self.usage_ttl_s = usage_ttl_s
        self._usage: dict[str, _Usage] = {}

    def limit(self, tenant: str, name: str) -> float:
        override = self.settings.tenant_limits.get(tenant, {})
        if name in override:
            return float(override[name])
        return float(getattr(self.settings, f"tenant_{name}"))

    def payload_over(self, tenant: str, size: int) -> str | None:
        """The 413 detail when a body (or batch item) of ``size`` bytes is over the tenant's ``max_payload_bytes``
        (counted in ``dsched_tenant_limited_total{limit="payload_bytes"}``), else None."""
        max_payload = int(self.limit(tenant, "max_payload_bytes"))
        if max_payload and size > max_payload:
            TENANT_LIMITED.labels("payload_bytes").inc()
            return f"this tenant's submissions are limited to {max_payload} bytes"
        return None

    async def check_submit(self, tenant: str, body_bytes: int | None) -> web.Response | None:
        """None when the submit may go on, else the 413/429 answer. ``body_bytes`` None (a chunked body, whose
        length is checked once it is read: :meth:`payload_over`) skips the size check."""
        too_large = self.payload_over(tenant, body_bytes) if body_bytes is not None else None
        if too_large is not None:
            return json_error(413, "payload_too_large", too_large)
        rate = self.limit(tenant, "submit_rate")
        if rate > 0:
            burst = int(self.limit(tenant, "submit_burst")) or max(1, math.ceil(rate))
            interval_ms = max(1, round(1000 / rate))
            wait_ms = await self.store.take_rate_token(f"submit:{tenant}", interval_ms, burst, time.time_ns() // 10**6)
            if wait_ms > 0:
                TENANT_LIMITED.labels("submit_rate").inc()
                return json_error(
                    429,
                    "rate_limited",
                    f"submit rate limit of {rate:g}/s (burst {burst}) for this tenant",
                    {"Retry-After": str(max(1, math.ceil(wait_ms / 1000)))},
                )
        max_active = int(self.limit(tenant, "max_active_jobs"))
        max_stored = int(self.limit(tenant, "max_stored_bytes"))
        if max_active or max_stored:
            now = time.monotonic()
            usage = self._usage.get(tenant)
            if usage is None or usage.until <= now:
                active, stored_bytes = await self.store.tenant_usage(tenant)
                usage = self._usage[tenant] = _Usage(active, stored_bytes, now + self.usage_ttl_s)
            if max_active and usage.active >= max_active:
                TENANT_LIMITED.labels("active_jobs").inc()
                return json_error(
                    429, "quota_exceeded", f"this tenant has {usage.active} active jobs (quota {max_active})"
                )
            if max_stored and usage.stored_bytes + (body_bytes or 0) > max_stored:
                TENANT_LIMITED.labels("stored_bytes").inc()
                return json_error(
                    429,
                    "quota_exceeded",
                    f"this tenant's active jobs hold {usage.stored_bytes} bytes of definitions (quota {max_stored})",
                )
        return None

    def accepted(self, tenant: str, size: int | None) -> None:
        """Count a submit (of ``size`` bytes, if known) accepted since the last read of the tenant's usage."""
        usage = self._usage.get(tenant)
        if usage is not None:
            usage.active += 1
            usage.stored_bytes += size or 0


class Authenticator:
    """Authenticates requests per ``DSCHED_AUTH``, checks the route's role, applies tenant limits and writes
    the audit log. :meth:`middleware` goes inside the service's error middleware."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.modes = parse_modes(settings.auth)
        self.dev = "dev" in self.modes
        if self.dev and not _is_loopback(settings.host):
            raise BackendConfigError(
                f"DSCHED_AUTH=dev trusts X-User-ID from anyone and serves on loopback only, not on "
                f"{settings.host!r}: set DSCHED_AUTH=keys (or jwt), or DSCHED_HOST=127.0.0.1"
            )
        self._pepper: bytes | None = None
        self.keys = KeyVerifier(store, self.pepper, settings.auth_cache_s) if "keys" in self.modes else None
        self.jwt = JwtVerifier(settings) if "jwt" in self.modes else None
        if settings.jwt_default_role and settings.jwt_default_role not in Role._value2member_map_:
            raise BackendConfigError(f"DSCHED_JWT_DEFAULT_ROLE={settings.jwt_default_role!r}: viewer, member or admin")
        self.limits = TenantLimits(store, settings)
        self.proxies = [ipaddress.ip_network(p.strip(), strict=False) for p in settings.trusted_proxies if p.strip()]
        self.realm = 'Bearer realm="dsched"'

    @property
    def pepper(self) -> bytes:
        """The API-key hashing key (loaded on first use: ``dev`` never creates the pepper file)."""
        if self._pepper is None:
            self._pepper = load_pepper(self.settings)
        return self._pepper

    # Route table ------------------------------------------------------------------------------------------
    def required_role(self, method: str, canonical: str) -> Role | str:
        if method == "HEAD":
            method = "GET"
        if canonical == "/metrics" and method == "GET":
            return PUBLIC if self.settings.metrics_public else Role.ADMIN
        if any(canonical == p or canonical.startswith(p + "/") for p in PUBLIC_PREFIXES) and method == "GET":
            return PUBLIC
        return ROUTE_ROLES.get((method, canonical), Role.ADMIN)

    # Authentication ---------------------------------------------------------------------------------------
    def _from_proxy(self, request: web.Request) -> Principal | None:
        header = self.settings.trusted_user_header
        if not header or header not in request.headers:
            return None
        remote = request.remote or ""
        try:
            address = ipaddress.ip_address(remote)
        except ValueError:
            address = None
        if address is None or not any(address in net for net in self.proxies):
            AUTH_FAILURES.labels("untrusted_proxy").inc()
            logger.warning("auth_untrusted_proxy_header", header=header, remote=remote)
            return None  # ignored: the request must authenticate otherwise
        tenant = request.headers[header]
        if not USER_ID.match(tenant):
            raise AuthFailure(401, "bad_proxy_user", f"invalid {header}")
        role_name = (
            request.headers.get(self.settings.trusted_role_header, "") if self.settings.trusted_role_header else ""
        )
        try:
            role = Role(role_name) if role_name else Role.MEMBER
        except ValueError as exc:
            raise AuthFailure(403, "bad_role", f"unknown role {role_name!r}") from exc
        return Principal(tenant=tenant, role=role, subject=f"proxy:{tenant}", method="proxy")

    async def authenticate(self, request: web.Request) -> Principal:
        """The caller, or :class:`AuthFailure`. Not used in ``dev`` mode."""
        proxied = self._from_proxy(request)
        if proxied is not None:
            return proxied
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.partition(" ")
        credential = credential.strip()
        if not header:
            raise AuthFailure(401, "missing", "credentials required: Authorization: Bearer <API key or token>")
        if scheme.lower() != "bearer" or not credential:
            raise AuthFailure(401, "bad_scheme", "use Authorization: Bearer <API key or token>")
        if credential.startswith(KEY_PREFIX):
            if self.keys is None:
                raise AuthFailure(401, "keys_disabled", "API keys are not accepted here")
            try:
                key = await self.keys.verify(credential)
            except InvalidKey as exc:
                raise AuthFailure(401, f"key_{exc.reason}", f"invalid API key ({exc.reason})") from exc
            return Principal(tenant=key.tenant, role=key.role, subject=f"key:{key.key_id}", method="key")
        if self.jwt is None:
            raise AuthFailure(401, "key_malformed", "invalid API key (malformed)")
        try:
            claims = await self.jwt.verify(credential)
        except InvalidToken as exc:
            raise AuthFailure(401, f"jwt_{exc.reason}", f"invalid token ({exc.reason})") from exc
        return self._jwt_principal(claims)

    def _jwt_principal(self, claims: dict[str, Any]) -> Principal:
        tenant = claims.get(self.settings.jwt_tenant_claim)
        if not isinstance(tenant, str) or not USER_ID.match(tenant):
            raise AuthFailure(401, "jwt_no_tenant", f"token has no valid {self.settings.jwt_tenant_claim!r} claim")
        raw = claims.get(self.settings.jwt_role_claim)
        names = (
            [raw] if isinstance(raw, str) else [r for r in raw if isinstance(r, str)] if isinstance(raw, list) else []
        )
        roles = [Role(n) for n in names if n in Role._value2member_map_]
        if not roles and self.settings.jwt_default_role:
            roles = [Role(self.settings.jwt_default_role)]
        if not roles:
            raise AuthFailure(403, "jwt_no_role", f"token has no known role in {self.settings.jwt_role_claim!r}")
        subject = claims.get("sub")
        return Principal(
            tenant=tenant,
            role=max(roles, key=lambda r: r.rank),
            subject=f"sub:{subject}" if isinstance(subject, str) else "sub:-",
            method="jwt",
        )

    def _dev_principal(self, request: web.Request) -> Principal | None:
        user = request.headers.get("X-User-ID", "")
        if user and USER_ID.match(user):
            return Principal(tenant=user, role=Role.ADMIN, subject=f"user:{user}", method="dev")
        return None

    # Middleware -------------------------------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is None:  # unmatched: the router's 404/405
            return await handler(request)
        route = resource.canonical
        required = self.required_role(request.method, route)
        if required == PUBLIC:
            return await handler(request)
        principal: Principal | None
        try:
            if self.dev:
                principal = self._dev_principal(request)
                if principal is None and route.startswith("/admin/"):
                    raise AuthFailure(401, "missing", "missing X-User-ID header")
            else:
                principal = await self.authenticate(request)
                if not isinstance(required, Role) or not principal.role.allows(required):
                    raise AuthFailure(
                        403,
                        "forbidden_role",
                        f"role {principal.role.value} may not call {request.method} {route}",
                        principal,
                    )
        except AuthFailure as exc:
            return self._refuse(request, route, exc)
        except TokenUnavailable:
            AUTH_FAILURES.labels("jwks_unavailable").inc()
            logger.warning("auth_jwks_unavailable", route=route)
            return json_error(503, "unavailable", "the token keys (JWKS) cannot be fetched now; retry")
        if principal is not None:
            request[PRINCIPAL] = principal
            if request.method == "POST" and route == "/submit":
                refused = await self.limits.check_submit(principal.tenant, request.content_length)
                if refused is not None:
                    self._audit(request, route, principal, refused.status)
                    return refused
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except Exception as exc:
            status = int(getattr(exc, "status", 500))
            raise
        finally:
            if principal is not None and route == "/submit" and status == 202:
                self.limits.accepted(principal.tenant, request.content_length)
            if request.method not in ("GET", "HEAD"):
                self._audit(request, route, principal, status)

    def _refuse(self, request: web.Request, route: str, exc: AuthFailure) -> web.Response:
        AUTH_FAILURES.labels(exc.reason).inc()
        self._audit(request, route, exc.principal, exc.status, reason=exc.reason)
        if exc.status == 401:
            challenge = self.realm if exc.reason == "missing" else f'{self.realm}, error="invalid_token"'
            return json_error(401, "unauthorized", exc.detail, {"WWW-Authenticate": challenge})
        return json_error(exc.status, "forbidden", exc.detail)

    @staticmethod
    def _audit(
        request: web.Request, route: str, principal: Principal | None, status: int, reason: str | None = None
    ) -> None:
        logger.info(
            "audit",
            tenant=principal.tenant if principal else None,
            subject=principal.subject if principal else None,
            auth=principal.method if principal else None,
            method=request.method,
            route=route,
            path=request.path,
            status=status,
            outcome="ok" if status < 400 else "denied" if status in (401, 403, 429) else "error",
            reason=reason,
            remote=request.remote,
        )
