"""Structured logs: one JSON line per event on stderr, bound to the service (and job_id/run_id where known)."""

from __future__ import annotations

import logging
import sys

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger

from dsched.libs import tracing


def _dumps(obj: object, default: object = None) -> str:
    return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def _trace_ids(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """``trace_id``/``span_id`` of the active span (only while tracing is on: one boolean test otherwise)."""
    if tracing.ENABLED:
        event.update(tracing.log_ids())
    return event


class _Stderr:
    """Writes each line to whatever ``sys.stderr`` is at that moment, not the stream of the first call: a
    logger cached by structlog must not keep writing to a stream that was replaced and closed (test capture,
    daemonizing)."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


def configure(level: str = "INFO") -> None:
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _trace_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=lambda *_: _Stderr(),
        cache_logger_on_first_use=True,
    )


def get(service: str) -> structlog.stdlib.BoundLogger:
    """A lazy logger: module-level loggers pick up :func:`configure` even when it runs after import."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(service=service)
    return logger
