"""The OpenAPI schema and the liveness probe."""

import yaml


def test_healthz_answers_without_signing_in(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.content == b"ok"


def test_schema_is_openapi_3_and_covers_every_endpoint(client):
    response = client.get("/api/schema/")
    assert response.status_code == 200
    schema = yaml.safe_load(response.content)
    assert schema["openapi"].startswith("3.")
    paths = set(schema["paths"])
    for expected in [
        "/api/federations/",
        "/api/federations/{id}/rounds/",
        "/api/federations/{id}/ledger/",
        "/api/memberships/{id}/",
        "/api/sites/",
        "/api/sites/{id}/rotate-token/",
        "/api/rounds/{id}/abort/",
        "/api/agent/task/",
        "/api/agent/tasks/{id}/update/",
        "/api/agent/tasks/{id}/metrics/",
        "/api/versions/{id}/weights/",
    ]:
        assert expected in paths, f"{expected} missing from the schema"
