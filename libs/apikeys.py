"""API keys: format, keyed hashing, verification with a short cache, and the operations behind
``dsched keys`` and ``/admin/keys``.

A key looks like ``dsk_<key id>_<secret>``: ``dsk_`` makes it recognizable (secret scanners, logs), the key id
(12 lowercase hex characters) is public and names the key in listings, audit lines and ``revoke``; the secret is 32
random bytes (urlsafe base64). Only ``HMAC-SHA256(pepper, key)`` is stored, so a copy of the store does not yield
usable keys, and the hash is compared with :func:`hmac.compare_digest`.

The pepper comes from ``DSCHED_AUTH_PEPPER``; when that is empty, from ``<data_dir>/auth.pepper`` (created once,
mode 0600). Every process that creates or checks keys must see the same pepper: set ``DSCHED_AUTH_PEPPER`` when
they do not share a data directory.

Verified keys are cached for ``DSCHED_AUTH_CACHE_S`` (default 2 s): every ingestion instance re-reads the key
from the store after that, so a revocation applies everywhere within that time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from dsched.libs import clock

if TYPE_CHECKING:
    from dsched.libs.settings import Settings
    from dsched.libs.store.base import JobStore

KEY_PREFIX = "dsk_"
_KEY_RE = re.compile(r"^dsk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_DURATION_RE = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
LAST_USED_EVERY_MS = 60_000  # "last used" is written at most this often per key


class Role(StrEnum):
    """Ordered roles: each includes the ones before it."""

    VIEWER = "viewer"
    MEMBER = "member"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, required: Role) -> bool:
        return self.rank >= required.rank


_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2}


class ApiKey(BaseModel):
    """A stored key: everything but the secret (``key_hash`` is the keyed hash of the whole key)."""

    key_id: str
    tenant: str
    role: Role
    name: str = ""
    key_hash: str
    created_ms: int
    expires_ms: int | None = None
    revoked_ms: int | None = None
    last_used_ms: int | None = None

    def public(self) -> dict[str, object]:
        """The listing view: never the hash."""
        return {
            "key_id": self.key_id,
            "prefix": f"{KEY_PREFIX}{self.key_id}",
            "tenant": self.tenant,
            "role": self.role.value,
            "name": self.name,
            "created_ms": self.created_ms,
            "expires_ms": self.expires_ms,
            "revoked_ms": self.revoked_ms,
            "last_used_ms": self.last_used_ms,
        }


class InvalidKey(Exception):
    """A key that does not authenticate; ``reason`` is the metric label (malformed, unknown, revoked, expired)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_duration(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` → seconds."""
    match = _DURATION_RE.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise ValueError(f"invalid duration {text!r} (e.g. 30d, 12h, 90m)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def load_pepper(settings: Settings) -> bytes:
    """The hashing key: ``DSCHED_AUTH_PEPPER``, else ``<data_dir>/auth.pepper`` (created atomically once)."""
    if settings.auth_pepper:
        return settings.auth_pepper.encode()
    path = Path(settings.data_dir) / "auth.pepper"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".auth.pepper.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # first writer wins; a concurrent creator reads the winner's file
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_bytes().strip()


def hash_key(pepper: bytes, key: str) -> str:
    return hmac.new(pepper, key.encode(), hashlib.sha256).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key_id, key)``."""
    key_id = secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}"


def key_id_of(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    match = _KEY_RE.match(key)
    return match.group(1) if match else None


async def create_key(
    store: JobStore,
    pepper: bytes,
    *,
    tenant: str,
    role: Role,
    name: str = "",
    expires_in_s: int | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; returns its record and the key itself (shown once, never stored)."""
    key_id, key = new_key()
    now = clock.now_ms()
    record = ApiKey(
        key_id=key_id,
        tenant=tenant,
        role=role,
        name=name,
        key_hash=hash_key(pepper, key),
        created_ms=now,
        expires_ms=None if expires_in_s is None else now + expires_in_s * 1000,
    )
    await store.put_api_key(record)
    return record, key


def normalize_key_id(text: str) -> str:
    """Accept ``dsk_<id>``, ``<id>`` or a whole key for revoke."""
    text = text.strip()
    if text.startswith(KEY_PREFIX):
        text = text[len(KEY_PREFIX) :]
    return text.split("_", 1)[0]


@dataclass
class _Cached:
    record: ApiKey | None
    until: float


class KeyVerifier:
    """Checks presented keys against the store with a per-key cache of ``ttl_s`` seconds (positive and
    negative), so a revocation or a newly created key is seen within ``ttl_s`` by every instance."""

    def __init__(self, store: JobStore, pepper: bytes, ttl_s: float = 2.0, max_entries: int = 10_000) -> None:
        self.store = store
        self.pepper = pepper
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[str, _Cached] = {}

    async def verify(self, key: str) -> ApiKey:
        """The key's record, or :class:`InvalidKey` with the reason it does not authenticate."""
        key_id = key_id_of(key)
        if key_id is None:
            raise InvalidKey("malformed")
        record = await self._lookup(key_id)
        presented = hash_key(self.pepper, key)
        if record is None or not hmac.compare_digest(presented, record.key_hash):
            raise InvalidKey("unknown")
        now = clock.now_ms()
        if record.revoked_ms is not None and record.revoked_ms <= now:
            raise InvalidKey("revoked")
        if record.expires_ms is not None and record.expires_ms <= now:
            raise InvalidKey("expired")
        if record.last_used_ms is None or now - record.last_used_ms >= LAST_USED_EVERY_MS:
            record.last_used_ms = now  # the cached copy too, so this write happens once a minute at most
            await self.store.touch_api_key(record.key_id, now)
        return record

    async def _lookup(self, key_id: str) -> ApiKey | None:
        now = time.monotonic()
        cached = self._cache.get(key_id)
        if cached is not None and cached.until > now:
            return cached.record
        record = await self.store.get_api_key(key_id)
        if len(self._cache) >= self.max_entries:
            self._cache = {k: v for k, v in self._cache.items() if v.until > now}
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        self._cache[key_id] = _Cached(record, now + self.ttl_s)
        return record

    def forget(self, key_id: str) -> None:
        """Drop a cached key (this instance applies its own revocations at once)."""
        self._cache.pop(key_id, None)
