"""Input bounds: what a job definition may contain. Enforced at the API edge (a 400 with a precise detail), so
an accepted job can always be stored, scheduled, retried and rendered; the services rely on them.

One constant per bound; the README's "Input bounds" table lists them.
"""

from __future__ import annotations

import os
from typing import Any

# Every instant of a job (first fire, each occurrence, each retry's due time) lies in [1970, 9999] UTC.
MIN_INSTANT_MS = 0  # 1970-01-01T00:00:00.000Z
MAX_INSTANT_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
# ``@every`` intervals: from one second to one (leap) year.
MIN_EVERY_S = 1
MAX_EVERY_S = 366 * 86_400
# Retry policy delays (``initial_s``, ``max_s``) and how long retrying may go on (``max_age_s``).
MAX_RETRY_DELAY_S = 7 * 86_400
MAX_RETRY_AGE_S = 366 * 86_400
MAX_RETRY_MULTIPLIER = 100.0
MAX_RETRIES = 100
# How late a run may still start (``max_lateness_s``) and how long one may take (``timeout_s``).
MAX_LATENESS_S = 366 * 86_400
MAX_TIMEOUT_S = 86_400
# Nesting of JSON request bodies (and HTTP job bodies inside them).
MAX_JSON_DEPTH = 32
# Outgoing HTTP requests of HTTP jobs.
MAX_HTTP_HEADERS = 64
MAX_HTTP_HEADER_BYTES = 8192  # one header's name + value
# Framing and hop-by-hop headers: set by the HTTP client itself, or meaningful for one connection only.
FORBIDDEN_HTTP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "expect",
    }
)
# The kernel's limit on one argv string (MAX_ARG_STRLEN = 32 pages = 128 KiB), its terminating NUL included:
# a ``cmd:`` runs as ``/bin/sh -c <command>``.
MAX_COMMAND_BYTES = 128 * 1024


def command_problem(command: str) -> str | None:
    """Why ``command`` can never run as ``/bin/sh -c <command>``, or None if it can.

    Refused: a NUL character (argv strings end at the first NUL), text that has no byte encoding for ``execve``
    (lone surrogates), and more than ``MAX_COMMAND_BYTES - 1`` bytes (E2BIG from ``execve``).
    """
    if "\x00" in command:
        return "the command contains a NUL character"
    try:
        size = len(os.fsencode(command))
    except UnicodeError:
        return "the command is not valid text (it contains unpaired surrogates)"
    if size >= MAX_COMMAND_BYTES:
        return f"the command is {size} bytes; the limit is {MAX_COMMAND_BYTES - 1} (the kernel's MAX_ARG_STRLEN)"
    return None


def json_depth_exceeds(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` (decoded JSON) nests deeper than ``limit``: a top-level object or array is depth 1.

    Level by level, and only containers are kept for the next level: a body's scalars cost one type check each
    (this runs on every submit, and a batch holds up to 1,000 bodies). Iterative: no recursion limit to hit."""
    level: list[dict[Any, object] | list[object]] = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        deeper: list[dict[Any, object] | list[object]] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            deeper += [child for child in children if isinstance(child, (dict, list))]
        level = deeper
    return False
