"""What the SQS and S3 adapters share: client options, emulator credentials, start-up error mapping."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def default_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def create_client(service: str, endpoint: str | None, region: str, **config: Any) -> Any:
    """An aiobotocore client context manager. With an ``endpoint`` (ElasticMQ, LocalStack, moto) and no AWS
    credentials in the environment, the dummy ``test``/``test`` pair is used."""
    options: dict[str, Any] = {
        "connect_timeout": 5,
        "read_timeout": 60,
        "max_pool_connections": 50,
        "retries": {"mode": "standard", "max_attempts": 4},
        "warm_up_loader_caches": True,  # botocore loads its JSON models in a thread, not on the event loop
        **config,
    }
    kwargs: dict[str, Any] = {"region_name": region}
    if endpoint:
        kwargs["endpoint_url"] = endpoint
        if not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
            kwargs["aws_access_key_id"] = "test"
            kwargs["aws_secret_access_key"] = "test"
    return get_session().create_client(service, config=AioConfig(**options), **kwargs)


async def start_client(
    client_cm: Any,
    setup: Callable[[Any], Awaitable[None]],
    *,
    what: str,
    endpoint: str | None,
    region: str,
    unavailable: type[Exception],
) -> tuple[AsyncExitStack, Any]:
    """Open the client and run ``setup(client)``; an unreachable endpoint raises ``unavailable`` with one line."""
    stack = AsyncExitStack()
    try:
        client = await stack.enter_async_context(client_cm)
        await setup(client)
    except BaseException as exc:
        await stack.aclose()
        if isinstance(exc, BotoCoreError) and not isinstance(exc, ClientError):
            where = endpoint or f"AWS {region}"
            raise unavailable(f"{what} unreachable at {where}: {one_line(exc)}") from exc
        raise
    return stack, client
