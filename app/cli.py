"""The ``dsched`` command.

dsched run all [--processes N] the five services (dev defaults: cmd: and loopback HTTP on) over N processes
                               (DSCHED_PROCESSES, default 2: the worker in a child, the rest here; N >= 3:
                               ingestion and coordinator here, writer and picker in a child, the worker in N - 2
                               children; 1: all here)
dsched run <service>[,...]     one or several of ingestion, writer, coordinator, picker, worker in one process
dsched db migrate              apply the CQL schema (Scylla store) idempotently
dsched db check                PRAGMA integrity_check on every embedded file of the data directory (exit 1 if any
                               is damaged)
dsched chaos [options]         the chaos suite (python -m dsched.chaos)
dsched jobs|runs|dlq|cluster   the HTTP client (app/client.py); dsched --version, dsched completion bash
dsched keys create|list|revoke API keys in the configured store (app/keys_cli.py)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine
from typing import Any

from pydantic import ValidationError

from dsched.app import client, keys_cli
from dsched.libs import logs
from dsched.libs.errors import BackendConfigError
from dsched.libs.settings import SERVICES, Settings
from dsched.libs.supervisor import ServiceFailed


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ValidationError as exc:
        err = exc.errors()[0]
        sys.exit(f"dsched: invalid configuration: DSCHED_{str(err['loc'][0]).upper()}: {err['msg']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chaos"]:  # its options belong to the chaos runner, not to this parser
        # The chaos suite is a tool above the app shell: run it as its own module rather than import it.
        os.execv(sys.executable, [sys.executable, "-m", "dsched.chaos", *argv[1:]])
    parser = argparse.ArgumentParser(prog="dsched", description="Distributed job scheduler")
    parser.add_argument("--version", action="version", version=f"dsched {client.version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run services")
    run.add_argument(
        "service",
        type=_services_arg,
        metavar="{all," + ",".join(SERVICES) + "}",
        help="all, one service, or several in one process joined by commas (e.g. writer,picker)",
    )
    run.add_argument(
        "--processes",
        type=int,
        help="run all: OS processes in all (1: one; 2: the worker in a child; N >= 3: writer and picker in a child, "
        "the worker in N - 2); DSCHED_PROCESSES",
    )
    db = sub.add_parser("db", help="store schema; integrity of the embedded files")
    db.add_argument("action", choices=["migrate", "check"])
    sub.add_parser("chaos", help="run the chaos suite (see docs/chaos.md)")
    keys_cli.add_parser(sub)
    client.add_commands(sub)  # jobs, runs, dlq, cluster, completion: the HTTP client (app/client.py)
    args = parser.parse_args(argv)
    if args.command in client.COMMANDS:
        sys.exit(client.run(args, parser))

    settings = _settings()
    logs.configure(settings.log_level.upper())
    try:
        if args.command == "run":
            if args.service == ["all"]:
                if args.processes is not None:
                    if args.processes < 1:
                        parser.error("--processes must be at least 1")
                    settings = settings.model_copy(update={"processes": args.processes})
                run_loop(_serve(settings.with_dev_defaults(), list(SERVICES), settings.processes))
            else:
                run_loop(_serve(settings, args.service))
        elif args.command == "db" and args.action == "check":
            sys.exit(_check(settings))
        elif args.command == "db":
            asyncio.run(_migrate(settings))
        elif args.command == "keys":
            sys.exit(keys_cli.run(settings, args))
    except (BackendConfigError, ServiceFailed) as exc:
        sys.exit(f"dsched: {exc}")
    except OSError as exc:  # e.g. the port is taken: one line, not a traceback
        sys.exit(f"dsched: cannot start: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass


def _services_arg(text: str) -> list[str]:
    if text == "all":
        return ["all"]
    names = text.split(",")
    unknown = [name for name in names if name not in SERVICES]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: all, or distinct services among {', '.join(SERVICES)}")
    return names


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a service on uvloop where it is installed (all but Windows), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def _serve(settings: Settings, services: list[str], processes: int = 1) -> None:
    from dsched.app import processes as layout
    from dsched.app.runner import serve

    if processes > 1:
        await serve(settings, services, layout.plan(processes)[1])
    else:
        await serve(settings, services)


def _check(settings: Settings) -> int:
    """``dsched db check``: one line per embedded SQLite file of the data directory; 1 if any is damaged."""
    from dsched.libs.sqlite import integrity_problems

    paths = sorted(settings.data_dir.glob("*.db"))
    if not paths:
        print(f"dsched: no embedded database files in {settings.data_dir}")
        return 0
    damaged = 0
    for path in paths:
        problems = integrity_problems(path)
        damaged += bool(problems)
        print(f"{path.name}: " + ("ok" if not problems else "DAMAGED"))
        for line in (line for problem in problems for line in problem.splitlines()):
            print(f"  {line}")
    return 1 if damaged else 0


async def _migrate(settings: Settings) -> None:
    if not settings.store_url.startswith("scylla://"):
        print("dsched: the embedded store creates its schema on start; nothing to migrate")
        return
    from dsched.libs.store.migrate import migrate

    applied = await migrate(settings.store_url, settings)
    print(f"dsched: applied {len(applied)} migration(s): {', '.join(applied) or 'none needed'}")


if __name__ == "__main__":
    main()
