"""JWT (OIDC access token) verification with PyJWT.

Tokens are RS256 or ES256 (``DSCHED_JWT_ALGORITHMS``) signed by a key from the JWKS at ``DSCHED_JWT_JWKS_URL``
or by ``DSCHED_JWT_PUBLIC_KEY`` (PEM text or a path to a PEM file). ``exp`` is required; ``exp``, ``nbf``, ``iss``
(``DSCHED_JWT_ISSUER``) and ``aud`` (``DSCHED_JWT_AUDIENCE``) are checked with ``DSCHED_JWT_LEEWAY_S`` of leeway.

The JWKS is fetched with aiohttp (never blocking the event loop), kept for ``DSCHED_JWT_JWKS_TTL_S`` and fetched
again when a token names an unknown ``kid`` (at most once per :data:`MIN_REFRESH_S`, so random kids cannot turn
every request into a fetch). One fetch at a time; concurrent requests wait for it.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from jwt.algorithms import get_default_algorithms

from dsched.libs import logs
from dsched.libs.errors import BackendConfigError
from dsched.libs.settings import Settings

logger = logs.get("auth")
MIN_REFRESH_S = 10.0
FETCH_TIMEOUT_S = 5.0


class InvalidToken(Exception):
    """A token that does not authenticate; ``reason`` is short and safe to show (and the metric label)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenUnavailable(Exception):
    """The JWKS could not be fetched (a 503, not the caller's fault)."""


def _load_static_key(text: str) -> Any:
    pem = Path(text).read_text() if not text.lstrip().startswith("-----") and Path(text).is_file() else text
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise BackendConfigError("DSCHED_JWT_PUBLIC_KEY: not a PEM public key") from exc


class JwtVerifier:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.algorithms = list(settings.jwt_algorithms)
        unknown = set(self.algorithms) - set(get_default_algorithms())
        if unknown or not self.algorithms or any(a.lower() == "none" or a.startswith("HS") for a in self.algorithms):
            raise BackendConfigError(f"DSCHED_JWT_ALGORITHMS: asymmetric algorithms only, got {self.algorithms}")
        if not settings.jwt_jwks_url and not settings.jwt_public_key:
            raise BackendConfigError("DSCHED_AUTH=jwt needs DSCHED_JWT_JWKS_URL or DSCHED_JWT_PUBLIC_KEY")
        self.static_key = _load_static_key(settings.jwt_public_key) if settings.jwt_public_key else None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = -1e18
        self._down_until = 0.0  # after a failed first fetch: answer 503 without fetching until then
        self._lock = asyncio.Lock()

    async def verify(self, token: str) -> dict[str, Any]:
        """The verified claims, or :class:`InvalidToken`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise InvalidToken("malformed") from exc
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise InvalidToken("bad_algorithm")
        key = self.static_key if self.static_key is not None else (await self._jwk(header.get("kid"))).key
        options: dict[str, Any] = {"require": ["exp"], "verify_aud": bool(self.settings.jwt_audience)}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.settings.jwt_audience or None,
                issuer=self.settings.jwt_issuer or None,
                leeway=self.settings.jwt_leeway_s,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise InvalidToken("not_yet_valid") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("bad_audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken("bad_issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken("missing_claim") from exc
        except jwt.InvalidSignatureError as exc:
            raise InvalidToken("bad_signature") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("invalid") from exc
        return claims

    async def _jwk(self, kid: object) -> jwt.PyJWK:
        if not isinstance(kid, str):
            raise InvalidToken("no_kid")
        now = time.monotonic()
        if not self._keys and now < self._down_until:
            raise TokenUnavailable(self.settings.jwt_jwks_url)
        if kid not in self._keys or now - self._fetched_at > self.settings.jwt_jwks_ttl_s:
            async with self._lock:
                stale = time.monotonic() - self._fetched_at
                if stale > self.settings.jwt_jwks_ttl_s or (kid not in self._keys and stale > MIN_REFRESH_S):
                    await self._refresh()
        found = self._keys.get(kid)
        if found is None:
            raise InvalidToken("unknown_kid")
        return found

    async def _refresh(self) -> None:
        url = self.settings.jwt_jwks_url
        try:
            timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
                response.raise_for_status()
                data = await response.json(content_type=None)
            keys: dict[str, jwt.PyJWK] = {}
            for entry in data.get("keys", []) if isinstance(data, dict) else []:
                if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or "kid" not in entry:
                    continue
                try:
                    keys[str(entry["kid"])] = jwt.PyJWK(entry)
                except jwt.PyJWTError:
                    logger.warning("jwks_key_skipped", kid=entry.get("kid"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if self._keys:  # keep serving with the keys we have; try again after MIN_REFRESH_S
                self._fetched_at = time.monotonic() - self.settings.jwt_jwks_ttl_s + MIN_REFRESH_S
                logger.warning("jwks_refresh_failed", url=url, error=type(exc).__name__)
                return
            self._down_until = time.monotonic() + 1.0
            logger.warning("jwks_unavailable", url=url, error=type(exc).__name__)
            raise TokenUnavailable(url) from exc
        self._keys = keys
        self._fetched_at = time.monotonic()
        logger.info("jwks_refreshed", url=url, keys=len(keys))
