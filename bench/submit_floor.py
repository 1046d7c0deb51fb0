"""The floor for single submits: a bare aiohttp server on uvloop, in its own process, whose ``POST /submit`` only
reads and parses the JSON body and answers 202 with a small JSON object (what any JSON API over aiohttp costs,
before validating, storing or logging anything). Run by :mod:`bench.submit` with ``--floor``, with the same
clients as dsched's submits.

    python -m dsched.bench.submit_floor --port PORT

Prints ``ready`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import orjson
from aiohttp import web

from dsched.app.cli import run_loop

_ids = itertools.count()


async def submit(request: web.Request) -> web.Response:
    body = orjson.loads(await request.read())
    if not isinstance(body, dict):
        return web.json_response({"error": "invalid_field", "detail": "body: a JSON object"}, status=400)
    answer = {"job_id": f"floor-{next(_ids)}", "status": "Submitted", "message": "Job submitted successfully"}
    return web.Response(body=orjson.dumps(answer), status=202, content_type="application/json")


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_post("/submit", submit)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()  # until the bench terminates this process
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run_loop(main(args.port))
