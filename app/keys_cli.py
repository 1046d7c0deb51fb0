"""``dsched keys create|list|revoke``: API keys straight in the configured store (no server needed).

``create`` prints the key's details and, as its last line, the key itself: the only time it is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

from dsched.app.backends import Backends
from dsched.libs.apikeys import Role, create_key, load_pepper, normalize_key_id, parse_duration
from dsched.libs.settings import Settings


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="API keys (see README: Authentication)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key; its last line of output is the key")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--name", default="")
    create.add_argument("--expires-in", default=None, help="e.g. 30d, 12h, 90m (default: never)")
    listing = actions.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant", default=None)
    revoke = actions.add_parser("revoke", help="revoke a key by its prefix (dsk_<id>) or id")
    revoke.add_argument("prefix")


def _when(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    from dsched.ingestion.requests import USER_ID

    if args.action == "create":
        if not USER_ID.match(args.tenant):
            print("dsched: --tenant: 1-128 of A-Z a-z 0-9 . _ @ : + -")
            return 2
        try:
            seconds = parse_duration(args.expires_in) if args.expires_in else None
        except ValueError as exc:
            print(f"dsched: --expires-in: {exc}")
            return 2
    async with Backends.open(settings, {"store"}) as backends:
        store = backends.store
        if args.action == "create":
            record, key = await create_key(
                store, load_pepper(settings), tenant=args.tenant, role=Role(args.role), name=args.name,
                expires_in_s=seconds,
            )  # fmt: skip
            print(f"created key dsk_{record.key_id} tenant={record.tenant} role={record.role.value}")
            print(f"expires: {_when(record.expires_ms)}  (the key is shown once; store it now)")
            print(key)
        elif args.action == "list":
            rows = [("PREFIX", "TENANT", "ROLE", "NAME", "CREATED", "LAST USED", "EXPIRES", "REVOKED")]
            for k in await store.list_api_keys(args.tenant):
                rows.append(
                    (
                        f"dsk_{k.key_id}",
                        k.tenant,
                        k.role.value,
                        k.name or "-",
                        _when(k.created_ms),
                        _when(k.last_used_ms),
                        _when(k.expires_ms),
                        _when(k.revoked_ms),
                    )
                )
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for row in rows:
                print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        else:
            key_id = normalize_key_id(args.prefix)
            if not await store.revoke_api_key(key_id, time.time_ns() // 1_000_000):
                print(f"dsched: no key {args.prefix!r}")
                return 1
            print(f"revoked dsk_{key_id} (every instance refuses it within {settings.auth_cache_s:g} s)")
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_run(settings, args))
