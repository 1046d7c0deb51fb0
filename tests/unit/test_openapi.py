from __future__ import annotations

from ingestion.openapi import spec
from ingestion.service import Ingestion
from libs.settings import Settings


def test_every_route_is_described() -> None:
    app = Ingestion(log=None, store=None, blobs=None, settings=Settings.from_env())  # type: ignore[arg-type]
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    described = {(method, path) for path, ops in spec()["paths"].items() for method in ops}
    assert served == described


def test_submit_schema_comes_from_the_validating_model() -> None:
    submit = spec()["components"]["schemas"]["SubmitRequest"]
    assert {"project_id", "payload"} <= set(submit["required"])
    assert {"cron_schedule", "timezone", "retry", "execution", "overlap", "misfire", "priority"} <= set(
        submit["properties"]
    )
