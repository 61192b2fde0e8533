"""Property-based fuzzing of the server's OpenAPI schema (schemathesis, in-process ASGI): whatever the body,
the answer is never a 5xx, and every 4xx carries a JSON ``{"error": {...}}`` body."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, settings
from nestling.serve.app import create_app
from nestling.serve.runtime import Reasoner
from nestling.serve.settings import Settings
from serve_fakes import FakeEngine

schemathesis = pytest.importorskip("schemathesis")

APP = create_app(
    Settings(max_tokens_cap=64, default_max_tokens=32),
    reasoner=Reasoner(FakeEngine(), variant="fake-a", name="tiny", task="rg:basic_arithmetic"),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def test_the_schema_documents_every_endpoint():
    paths = set(json.loads(json.dumps(schema.raw_schema))["paths"])
    assert {"/v1/answer", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= paths


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors_and_json_client_errors(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert err["code"] == response.status_code and err["message"]
