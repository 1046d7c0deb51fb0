"""Work queue on Amazon SQS (or anything speaking its API: ElasticMQ, LocalStack, moto), via aiobotocore.

URL: ``sqs://queue-name[?endpoint=http://127.0.0.1:9324][&region=us-east-1]``

- No ``endpoint``: AWS itself, credentials from the standard chain (environment, profile, instance role).
  With an ``endpoint`` and no ``AWS_ACCESS_KEY_ID``/``AWS_PROFILE`` in the environment, dummy credentials
  ``test``/``test`` are used, which emulators accept. ``region`` defaults to ``$AWS_REGION``,
  ``$AWS_DEFAULT_REGION``, then ``us-east-1``.
- ``startup`` creates the queue and its dead-letter queue ``<name>-dlq`` if missing (standard queues, 14 days
  retention) and sets the queue's redrive policy to ``maxReceiveCount = settings.max_receives``: SQS itself
  moves a message received more than that many times to the DLQ. Only core API calls are used, so the same
  code runs on AWS and the emulators.

Differences from the embedded queue that callers must allow for:

- **Priority is ignored**: SQS has no ordering by priority (standard queues are not even FIFO); delivery
  order is best effort.
- **Delays are whole seconds, at most 900** (``DelaySeconds``): ``delay_s`` is rounded *down* so a message is
  never late; the consumer waits out the fraction. Longer delays are capped at 900 s (delivered early).
- **Visibility timeouts are whole seconds** (rounded up, at most 12 h in total per message).
- **Stale receipts**: ``ack``/``extend``/``nack`` never raise for a receipt that is no longer valid, but SQS
  (and moto) may still *apply* a receipt from an earlier delivery of the same message: acking a stale receipt
  can delete a message that has since been redelivered. The embedded queue ignores such receipts.
- ``counts`` is SQS's *approximate* numbers (eventually consistent on AWS).
- Bodies are bytes; SQS bodies are text, so a body that is not plain UTF-8 text is sent base64-encoded with
  the message attribute ``dsched-encoding``. One message (body + attributes) is at most 256 KiB.
- If the queue disappears (e.g. an emulator restarted), the next call recreates both queues and retries once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import re
from collections.abc import Awaitable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from botocore.exceptions import ClientError

from dsched.libs import logs
from dsched.libs.aws import create_client, default_region, error_code, start_client
from dsched.libs.errors import BackendConfigError
from dsched.libs.queue.base import MAX_BATCH, OutgoingMessage, QueueCounts, ReceivedMessage, WorkQueue
from dsched.libs.settings import Settings

__all__ = ["SqsQueue", "SqsSendError", "SqsUnavailable"]

T = TypeVar("T")

logger = logs.get("queue.sqs")

MAX_MESSAGE_BYTES = 256 * 1024  # per message and per batch call
MAX_DELAY_S = 900
MAX_VISIBILITY_S = 43_200
MAX_WAIT_S = 20
RETENTION_S = 14 * 24 * 3600  # SQS's maximum: a job waits in the queue (or the DLQ) as long as possible
SEND_CONCURRENCY = 8  # batch calls in flight at once for one send/ack/extend
SEND_ATTEMPTS = 5  # per batch, for entries SQS failed on its side
ENCODING_ATTR = "dsched-encoding"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,76}")  # 80 minus "-dlq"
# Characters SQS accepts in a body, minus \r (XML-based transports may turn \r\n into \n).
_SQS_TEXT = re.compile("[\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]+")
_MISSING_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}


class SqsUnavailable(ConnectionError):
    """The SQS endpoint could not be reached."""


class SqsSendError(RuntimeError):
    """SQS kept refusing some messages of a send after retries (or rejected them as invalid)."""


@dataclass(frozen=True, slots=True)
class _Entry:
    body: str
    attributes: dict[str, Any]
    delay_s: int
    size: int


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class SqsQueue(WorkQueue):
    def __init__(
        self,
        name: str,
        *,
        endpoint: str | None = None,
        region: str = "us-east-1",
        max_receives: int = 5,
    ) -> None:
        if not _NAME.fullmatch(name):
            raise BackendConfigError(
                f"SQS queue name {name!r}: 1-76 letters, digits, '-' or '_' (standard queues only)"
            )
        if max_receives < 1:
            raise BackendConfigError(f"SQS max_receives must be >= 1, got {max_receives}")
        self.name = name
        self.dlq_name = f"{name}-dlq"
        self.endpoint = endpoint
        self.region = region
        self.max_receives = max_receives
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._url = ""
        self._dlq_url = ""
        self._ensure_lock = asyncio.Lock()
        self._generation = 0  # bumped each time the queues are (re)created

    @classmethod
    def from_url(cls, url: str, settings: Settings) -> SqsQueue:
        """Parse ``sqs://name?endpoint=…&region=…`` (see the module docstring)."""
        parts = urlsplit(url)
        if parts.scheme != "sqs":
            raise BackendConfigError(f"SQS URL {url!r}: scheme must be sqs://")
        name = parts.netloc
        if not name or parts.path not in ("", "/"):
            raise BackendConfigError(f"SQS URL {url!r}: expected sqs://queue-name?endpoint=…&region=…")
        params = _query(url, parts.query, {"endpoint", "region"})
        return cls(
            name,
            endpoint=_endpoint(url, params.get("endpoint")),
            region=params.get("region") or default_region(),
            max_receives=settings.max_receives,
        )

    # -- lifecycle

    async def startup(self) -> None:
        """Open the client, create the queues if missing, set the redrive policy.

        Raises :class:`SqsUnavailable` (one line) if the endpoint cannot be reached.
        """

        async def setup(client: Any) -> None:
            self._client = client
            await self._ensure_queues()

        try:
            self._stack, self._client = await start_client(
                _create_client("sqs", self.endpoint, self.region),
                setup,
                what="SQS",
                endpoint=self.endpoint,
                region=self.region,
                unavailable=SqsUnavailable,
            )
        except BaseException:
            self._client = None
            raise

    async def shutdown(self) -> None:
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    async def _ensure_queues(self, generation: int | None = None) -> None:
        async with self._ensure_lock:
            if generation is not None and generation != self._generation:
                return  # another caller recreated them meanwhile
            self._dlq_url = await self._queue_url(self.dlq_name, {})
            dlq_arn = await self._queue_arn(self._dlq_url)
            redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(self.max_receives)})
            self._url = await self._queue_url(self.name, {"RedrivePolicy": redrive})
            # The queue may predate this process (or its max_receives): make the policy current.
            await self._client.set_queue_attributes(QueueUrl=self._url, Attributes={"RedrivePolicy": redrive})
            self._generation += 1

    async def _queue_url(self, name: str, attributes: dict[str, str]) -> str:
        try:
            reply = await self._client.get_queue_url(QueueName=name)
            return str(reply["QueueUrl"])
        except ClientError as exc:
            if error_code(exc) not in _MISSING_QUEUE:
                raise
        attrs = {"MessageRetentionPeriod": str(RETENTION_S), **attributes}
        reply = await self._client.create_queue(QueueName=name, Attributes=attrs)
        logger.info("sqs_queue_created", queue=name)
        return str(reply["QueueUrl"])

    async def _queue_arn(self, url: str) -> str:
        reply = await self._client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])
        return str(reply["Attributes"]["QueueArn"])

    async def _api(self, method: str, *, dlq: bool = False, **kwargs: Any) -> dict[str, Any]:
        """One API call on the queue (or its DLQ); if the queue has vanished, recreate both and retry once."""
        if self._client is None:
            raise RuntimeError(f"SQS queue {self.name} is not started")
        generation = self._generation
        try:
            reply: dict[str, Any] = await getattr(self._client, method)(
                QueueUrl=self._dlq_url if dlq else self._url, **kwargs
            )
            return reply
        except ClientError as exc:
            if error_code(exc) not in _MISSING_QUEUE:
                raise
        logger.warning("sqs_queue_missing", queue=self.name)
        await self._ensure_queues(generation)
        reply = await getattr(self._client, method)(QueueUrl=self._dlq_url if dlq else self._url, **kwargs)
        return reply

    # -- sending

    async def send(self, messages: Sequence[OutgoingMessage]) -> None:
        """Send in SendMessageBatch calls (≤10 messages, ≤256 KiB each), several in flight at once.

        Entries SQS fails on its side are retried; raises :class:`SqsSendError` if some still fail (the others
        are sent: a retry of the whole send may duplicate them, as at-least-once delivery allows).
        """
        if not messages:
            return
        entries = [_encode(m) for m in messages]
        batches: list[list[_Entry]] = []
        size = 0
        for entry in entries:
            if not batches or len(batches[-1]) == MAX_BATCH or size + entry.size > MAX_MESSAGE_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(entry)
            size += entry.size
        await self._fan_out([self._send_batch(batch) for batch in batches])

    async def _send_batch(self, batch: list[_Entry]) -> None:
        pending = {str(i): entry for i, entry in enumerate(batch)}
        failures: list[dict[str, Any]] = []
        for attempt in range(SEND_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.05 * 2**attempt)
            entries = [
                {
                    "Id": ident,
                    "MessageBody": entry.body,
                    "DelaySeconds": entry.delay_s,
                    **({"MessageAttributes": entry.attributes} if entry.attributes else {}),
                }
                for ident, entry in pending.items()
            ]
            reply = await self._api("send_message_batch", Entries=entries)
            failures = list(reply.get("Failed") or [])
            if not failures:
                return
            rejected = [f for f in failures if f.get("SenderFault")]
            if rejected:
                raise SqsSendError(f"SQS rejected {len(rejected)} message(s): {_describe(rejected)}")
            pending = {str(f["Id"]): pending[str(f["Id"])] for f in failures}
        raise SqsSendError(f"SQS failed {len(failures)} message(s) {SEND_ATTEMPTS} times: {_describe(failures)}")

    # -- receiving

    async def receive(self, max_messages: int, wait_s: float, visibility_s: float) -> list[ReceivedMessage]:
        """One ReceiveMessage: up to 10 messages, long-polling ``int(wait_s)`` s (max 20) for the first."""
        count = min(max_messages, MAX_BATCH)
        if count <= 0:
            return []
        reply = await self._api(
            "receive_message",
            MaxNumberOfMessages=count,
            WaitTimeSeconds=max(0, min(MAX_WAIT_S, int(wait_s))),
            VisibilityTimeout=_seconds_up(visibility_s, MAX_VISIBILITY_S),
            AttributeNames=["ApproximateReceiveCount"],
            MessageAttributeNames=[ENCODING_ATTR],
        )
        return [_decode(m) for m in reply.get("Messages") or []]

    async def ack(self, receipts: Sequence[str]) -> None:
        """DeleteMessageBatch in calls of 10; receipts SQS no longer knows are ignored."""
        await self._fan_out(
            [self._entries_call("delete_message_batch", batch, {}) for batch in _chunks(receipts, MAX_BATCH)]
        )

    async def extend(self, receipts: Sequence[str], visibility_s: float) -> None:
        """ChangeMessageVisibilityBatch to ``visibility_s`` (rounded up) from now; stale receipts ignored."""
        seconds = _seconds_up(visibility_s, MAX_VISIBILITY_S)
        await self._fan_out(
            [
                self._entries_call("change_message_visibility_batch", batch, {"VisibilityTimeout": seconds})
                for batch in _chunks(receipts, MAX_BATCH)
            ]
        )

    async def nack(self, receipts: Sequence[str], delay_s: float = 0.0) -> None:
        """Visible again after ``delay_s`` (rounded up): an extend to the delay. Stale receipts ignored."""
        await self.extend(receipts, delay_s)

    async def _entries_call(self, method: str, receipts: Sequence[str], extra: dict[str, Any]) -> None:
        pending = {str(i): receipt for i, receipt in enumerate(receipts)}
        for attempt in range(SEND_ATTEMPTS):
            if attempt:
                await asyncio.sleep(0.05 * 2**attempt)
            entries = [{"Id": ident, "ReceiptHandle": r, **extra} for ident, r in pending.items()]
            try:
                reply = await self._api(method, Entries=entries)
            except ClientError as exc:
                if error_code(exc) == "ReceiptHandleIsInvalid":
                    return  # a malformed handle fails the whole call on some servers: nothing to apply
                raise
            failures = list(reply.get("Failed") or [])
            # Sender faults are stale or invalid receipts (deleted, redelivered, not in flight): skip them.
            stale = [f for f in failures if f.get("SenderFault")]
            if stale:
                logger.debug("sqs_stale_receipts", call=method, failed=_describe(stale))
            pending = {str(f["Id"]): pending[str(f["Id"])] for f in failures if not f.get("SenderFault")}
            if not pending:
                return
        raise SqsSendError(f"SQS {method} kept failing for {len(pending)} receipt(s)")

    async def _fan_out(self, calls: list[Awaitable[None]]) -> None:
        """Run batch calls, ``SEND_CONCURRENCY`` at a time; all run, then the first error is raised."""
        if not calls:
            return
        gate = asyncio.Semaphore(SEND_CONCURRENCY)

        async def gated(call: Awaitable[None]) -> None:
            async with gate:
                await call

        results = await asyncio.gather(*(gated(c) for c in calls), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- inspection

    async def dead_letters(self, max_messages: int) -> list[ReceivedMessage]:
        """Peek at the DLQ: receive what is there, then make it visible again at once (nothing is removed).

        Messages stay hidden while paging (so each call returns new ones) and are un-hidden at the end. SQS
        counts each peek as a receive of the dead message. Best effort on AWS, like every SQS count.
        """
        if max_messages <= 0:
            return []
        # The approximate count only decides how long to poll: an empty DLQ costs one short poll.
        expected = (await self._attributes(dlq=True))["visible"]
        found: dict[str, ReceivedMessage] = {}
        try:
            while len(found) < max_messages:
                reply = await self._api(
                    "receive_message",
                    dlq=True,
                    MaxNumberOfMessages=min(MAX_BATCH, max_messages - len(found)),
                    WaitTimeSeconds=1 if expected > 0 else 0,
                    VisibilityTimeout=30,
                    AttributeNames=["ApproximateReceiveCount"],
                    MessageAttributeNames=[ENCODING_ATTR],
                )
                fresh = [_decode(m) for m in reply.get("Messages") or []]
                fresh = [m for m in fresh if m.message_id not in found]
                found.update((m.message_id, m) for m in fresh)
                if not fresh or len(found) >= expected:
                    break
        finally:
            receipts = [m.receipt for m in found.values()]
            with contextlib.suppress(Exception):
                await self._fan_out([self._dlq_visible(batch) for batch in _chunks(receipts, MAX_BATCH)])
        return list(found.values())[:max_messages]

    async def take_dead_letters(self, max_messages: int, visibility_s: float) -> list[ReceivedMessage]:
        """Receive from the DLQ (short poll), hidden for ``visibility_s``: until deleted, they come back later."""
        count = min(max_messages, MAX_BATCH)
        if count <= 0:
            return []
        reply = await self._api(
            "receive_message",
            dlq=True,
            MaxNumberOfMessages=count,
            WaitTimeSeconds=0,
            VisibilityTimeout=_seconds_up(visibility_s, MAX_VISIBILITY_S),
            AttributeNames=["ApproximateReceiveCount"],
            MessageAttributeNames=[ENCODING_ATTR],
        )
        return [_decode(m) for m in reply.get("Messages") or []]

    async def delete_dead_letters(self, receipts: Sequence[str]) -> None:
        """DeleteMessageBatch on the DLQ; stale receipts are ignored."""
        for batch in _chunks(receipts, MAX_BATCH):
            entries = [{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(batch)]
            await self._api("delete_message_batch", dlq=True, Entries=entries)

    async def _dlq_visible(self, receipts: Sequence[str]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": 0} for i, r in enumerate(receipts)]
        await self._api("change_message_visibility_batch", dlq=True, Entries=entries)

    async def counts(self) -> QueueCounts:
        main, dead = await asyncio.gather(self._attributes(dlq=False), self._attributes(dlq=True))
        return QueueCounts(
            visible=main["visible"], in_flight=main["in_flight"], dead=dead["visible"] + dead["in_flight"]
        )

    async def _attributes(self, *, dlq: bool) -> dict[str, int]:
        reply = await self._api(
            "get_queue_attributes",
            dlq=dlq,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
        attrs = reply.get("Attributes") or {}
        return {
            "visible": int(attrs.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
        }


# -- encoding


def _encode(message: OutgoingMessage) -> _Entry:
    """The SQS entry of a message: UTF-8 text as is, anything else base64 with an encoding attribute."""
    attributes: dict[str, Any] = {}
    try:
        text: str | None = message.body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or not _SQS_TEXT.fullmatch(text):
        encoding = "base64" if message.body else "empty"  # SQS refuses an empty body
        text = base64.b64encode(message.body).decode("ascii") if message.body else "-"
        attributes[ENCODING_ATTR] = {"DataType": "String", "StringValue": encoding}
    size = len(text.encode("utf-8")) + sum(
        len(name) + len(attr["DataType"]) + len(attr["StringValue"]) for name, attr in attributes.items()
    )
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"message of {size} bytes exceeds SQS's limit of {MAX_MESSAGE_BYTES} (offload payloads to blobs)"
        )
    delay = max(0, min(MAX_DELAY_S, int(message.delay_s)))
    return _Entry(body=text, attributes=attributes, delay_s=delay, size=size)


def _decode(message: dict[str, Any]) -> ReceivedMessage:
    body = str(message.get("Body", ""))
    encoding = ((message.get("MessageAttributes") or {}).get(ENCODING_ATTR) or {}).get("StringValue")
    if encoding == "base64":
        data = base64.b64decode(body)
    elif encoding == "empty":
        data = b""
    else:
        data = body.encode("utf-8")
    return ReceivedMessage(
        message_id=str(message["MessageId"]),
        receipt=str(message["ReceiptHandle"]),
        body=data,
        receive_count=int((message.get("Attributes") or {}).get("ApproximateReceiveCount", 1)),
    )


def _seconds_up(seconds: float, limit: int) -> int:
    return max(0, min(limit, math.ceil(seconds)))


def _describe(failures: list[dict[str, Any]]) -> str:
    first = failures[0]
    return f"{first.get('Code', '?')}: {first.get('Message', '')}".strip()


# -- AWS client plumbing (shared shape with libs.blobs.s3)


def _query(url: str, query: str, known: set[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in known:
            raise BackendConfigError(f"URL {url!r}: unknown parameter {name!r} (known: {', '.join(sorted(known))})")
        params[name] = value
    return params


def _endpoint(url: str, value: str | None) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BackendConfigError(f"URL {url!r}: endpoint must be http(s)://host:port, got {value!r}")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise BackendConfigError(f"URL {url!r}: bad port in endpoint {value!r}") from None
    return value.rstrip("/")


def _create_client(service: str, endpoint: str | None, region: str) -> Any:
    return create_client(service, endpoint, region, read_timeout=MAX_WAIT_S + 20)  # above the longest long poll
