"""Which secrets sign a job's outgoing HTTP requests (``X-Dsched-Signature``).

Lookup order, most specific first: ``DSCHED_SIGNING_SECRETS["user/project"]``, then the tenant's secrets rotated
through ``/admin/tenants/{tenant}/signing-secrets`` (stored in the job store, so every worker sees them), then
``DSCHED_SIGNING_SECRETS["user"]``. A tenant's stored secrets are cached for ``ttl_s`` per worker: a rotation signs
with the new secret within that time (the previous secret keeps signing alongside it until it is retired).
"""

from __future__ import annotations

import time

from dsched.libs import logs
from dsched.libs.settings import Settings
from dsched.libs.store.base import JobStore

logger = logs.get("worker")


class SigningSecrets:
    def __init__(self, store: JobStore, settings: Settings, ttl_s: float = 5.0) -> None:
        self.store = store
        self.settings = settings
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, list[str]]] = {}

    async def for_job(self, user_id: str, project_id: str) -> list[str] | None:
        configured = self.settings.signing_secrets.get(f"{user_id}/{project_id}")
        if configured:
            return configured
        stored = await self._tenant(user_id)
        return stored or self.settings.signing_secrets.get(user_id) or None

    async def _tenant(self, tenant: str) -> list[str]:
        now = time.monotonic()
        cached = self._cache.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            secrets = await self.store.get_signing_secrets(tenant)
        except NotImplementedError:
            secrets = []
        except Exception as exc:  # the store is down: keep signing with what we had
            logger.warning("signing_secrets_unavailable", tenant=tenant, error=type(exc).__name__)
            secrets = cached[1] if cached is not None else []
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[tenant] = (now + self.ttl_s, secrets)
        return secrets
