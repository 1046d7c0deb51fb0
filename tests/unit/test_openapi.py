from __future__ import annotations

from dsched.ingestion.openapi import spec
from dsched.ingestion.service import Ingestion
from dsched.libs.settings import Settings


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


def test_every_operation_has_an_id_and_documented_answers() -> None:
    document = spec()
    ids = []
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op.get("operationId"), f"{where}: no operationId (ingestion/openapi_responses.ANSWERS)"
            ids.append(op["operationId"])
            successes = [s for s in op["responses"] if s.startswith("2")]
            assert successes, f"{where}: no success answer"
            for status, response in op["responses"].items():
                assert response.get("content"), f"{where} {status}: no content type / schema"
                if status[0] in "45":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    } or (path, status) == ("/health", "503"), f"{where} {status}: errors are Error bodies"
    assert len(ids) == len(set(ids)), "operationIds are unique"


def test_the_document_is_valid_openapi() -> None:
    import schemathesis

    schema = schemathesis.openapi.from_dict(spec())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(ops) for ops in spec()["paths"].values())


def test_links_name_existing_operations_and_their_parameters() -> None:
    document = spec()
    params = {
        op["operationId"]: {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        for ops in document["paths"].values()
        for op in ops.values()
    }
    links = [
        link
        for ops in document["paths"].values()
        for op in ops.values()
        for response in op["responses"].values()
        for link in response.get("links", {}).values()
    ]
    assert len(links) >= 10
    for link in links:
        assert link["operationId"] in params, link
        assert set(link["parameters"]) == params[link["operationId"]], link
