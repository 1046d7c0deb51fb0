"""The authentication half of the OpenAPI document: security schemes, each operation's security and least role
(from :data:`ingestion.auth.ROUTE_ROLES`, so the document cannot drift from what is enforced), the 401/403/429
answers, and the ``/admin`` routes (:mod:`ingestion.admin`)."""

from __future__ import annotations

import re
from typing import Any

from dsched.ingestion.auth import PUBLIC, PUBLIC_PREFIXES, ROUTE_ROLES
from dsched.libs.apikeys import Role

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "dsk_<key id>_<secret>",
        "description": "An API key (DSCHED_AUTH=keys): `dsched keys create` or POST /admin/keys.",
    },
    "jwt": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An RS256/ES256 token from the configured issuer (DSCHED_AUTH=jwt); claims carry tenant "
        "and role.",
    },
    "devUser": {
        "type": "apiKey",
        "in": "header",
        "name": "X-User-ID",
        "description": "DSCHED_AUTH=dev only (loopback): names the tenant, unauthenticated.",
    },
}
SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}, {"jwt": []}, {"devUser": []}]


def least_role(method: str, path: str) -> Role | str:
    """The least role for an OpenAPI ``path`` (default settings: ``/metrics`` public)."""
    if path == "/metrics" or any(path == p or path.startswith(p + "/") for p in PUBLIC_PREFIXES):
        return PUBLIC
    return ROUTE_ROLES.get((method.upper(), path), Role.ADMIN)


def _admin_op(summary: str, *, ok: str = "200", body: dict[str, Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {ok: {"description": "OK"}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


def admin_paths() -> dict[str, Any]:
    tenant = [{"name": "tenant", "in": "path", "required": True, "schema": {"type": "string"}}]
    key_body = {
        "type": "object",
        "properties": {
            "tenant": {"type": "string", "description": "default: the caller's tenant"},
            "role": {"enum": [r.value for r in Role], "default": "member"},
            "name": {"type": "string", "maxLength": 200},
            "expires_in": {"type": "string", "examples": ["30d", "12h"], "description": "default: never"},
        },
    }
    secrets_get = _admin_op("Fingerprints of the tenant's outgoing-HTTP signing secrets (never the secrets)")
    return {
        "/admin/keys": {
            "get": {
                **_admin_op("API keys, newest first (prefix, tenant, role, name, created, last used, expiry)"),
                "parameters": [{"name": "tenant", "in": "query", "schema": {"type": "string"}}],
            },
            "post": _admin_op("Create an API key; the response's `key` is shown only once", ok="201", body=key_body),
        },
        "/admin/keys/{key_id}": {
            "delete": {
                **_admin_op("Revoke a key (every instance refuses it within DSCHED_AUTH_CACHE_S)"),
                "parameters": [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            }
        },
        "/admin/tenants/{tenant}/signing-secrets": {"get": {**secrets_get, "parameters": tenant}},
        "/admin/tenants/{tenant}/signing-secrets/rotate": {
            "post": {
                **_admin_op("New signing secret (returned once); the previous one stays active", ok="201"),
                "parameters": tenant,
            }
        },
        "/admin/tenants/{tenant}/signing-secrets/retire": {
            "post": {**_admin_op("Drop every signing secret but the newest"), "parameters": tenant}
        },
    }


def secure(document: dict[str, Any]) -> dict[str, Any]:
    """Add the admin paths, the security schemes and, per operation, its security, least role and the
    401/403/429 answers; returns ``document``."""
    document["paths"].update(admin_paths())
    document.setdefault("components", {})["securitySchemes"] = SCHEMES
    document["security"] = SECURITY
    for path, ops in document["paths"].items():
        route = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)
        for method, op in ops.items():
            role = least_role(method, route)
            responses = op.setdefault("responses", {})
            op["parameters"] = [
                {**p, "required": False, "description": "DSCHED_AUTH=dev only: the tenant (unauthenticated)."}
                if p.get("name") == "X-User-ID" and p.get("in") == "header"
                else p
                for p in op.get("parameters", [])
            ]
            if role == PUBLIC:
                op["security"] = []
                responses.pop("401", None)
                continue
            if not isinstance(role, Role):
                raise TypeError(f"least role of {method.upper()} {route} is {role!r}: neither a Role nor {PUBLIC!r}")
            op["x-dsched-least-role"] = role.value
            responses["401"] = {
                "description": "no credentials, or an unknown, revoked or expired key / invalid token "
                "(`WWW-Authenticate: Bearer`)",
                "content": _ERROR,
            }
            responses["403"] = {"description": f"the caller's role is below {role.value}", "content": _ERROR}
            if method == "post" and route in ("/submit", "/submit/batch"):
                responses["429"] = {
                    "description": "the tenant's submit rate limit (`Retry-After` seconds) or active-job quota",
                    "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                    "content": _ERROR,
                }
                responses["413"] = {"description": "body over the (tenant's) size limit", "content": _ERROR}
    return document
