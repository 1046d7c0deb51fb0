"""Where a scheduler process's CPU goes: a py-spy ``--format raw`` profile summed per service and per function.

    py-spy record -p PID -r 50 -d 30 -f raw -o prof.raw --nonblocking
    python -m dsched.bench.profile_split prof.raw [--top 25]

Each sample is charged to the service whose code is the outermost project frame on its stack (``ingestion``,
``writer``, ``picker``, ``worker``, ``coordinator``); samples in SQLite helper threads go to ``sqlite threads``
(``libs/sqlite.py``), samples under aiohttp's HTTP server or client code with no service frame to
``http (aiohttp)``, the rest to ``event loop / other``. Also prints the functions with the most own samples.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

SERVICES = ("ingestion", "writer", "picker", "worker", "coordinator")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def service_of(frames: list[tuple[str, str]]) -> str:
    """The service a stack (outermost frame first) belongs to."""
    for _, file in frames:
        for service in SERVICES:
            if f"/{service}/" in file or file.startswith(f"{service}/"):
                return service
    files = " ".join(file for _, file in frames)
    if "libs/sqlite.py" in files or "concurrent/futures/thread.py" in files:
        return "sqlite threads"
    if "aiohttp" in files:
        return "http (aiohttp)"
    return "event loop / other"


def summarize(path: Path, top: int) -> str:
    per_service: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames: list[tuple[str, str]] = []
        for part in stack.split(";")[1:]:  # the first element names the thread
            match = FRAME.match(part)
            if match:
                frames.append((match["func"], match["file"]))
        if not frames:
            continue
        total += count
        per_service[service_of(frames)] += count
        func, file = frames[-1]
        own[f"{func} ({file.split('site-packages/')[-1].replace('/work/main/', '')})"] += count
    lines = [f"samples: {total}", "", "per service (share of CPU samples):"]
    for name, count in per_service.most_common():
        lines.append(f"  {name:<22} {100 * count / max(1, total):5.1f} %")
    lines += ["", f"top {top} functions by own samples:"]
    for name, count in own.most_common(top):
        lines.append(f"  {100 * count / max(1, total):5.1f} %  {name}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarize(args.profile, args.top))
