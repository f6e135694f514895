"""Schema fuzzing of the HTTP API (schemathesis against the server's own OpenAPI document,
whose generation requests carry the ``steering`` field): no request gets a 5xx, and the
server keeps answering."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from support.engines import API_KEY

AUTH = {"authorization": f"Bearer {API_KEY}"}
FUZZED = r"^/v1/(steering/vectors|chat/completions|completions)"


@pytest.fixture(scope="module")
def api_schema(server, runner):
    if runner != "v1":
        pytest.skip("the HTTP layer is the same on both runners; fuzzed once, on V1")
    document = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    chat = document["components"]["schemas"]
    assert "steering" in chat[next(k for k in chat if k.startswith("ChatCompletionRequest"))]["properties"]
    before = {e["name"] for e in httpx.get(f"{server.url}/v1/steering/vectors", headers=AUTH, timeout=30).json()["data"]}
    yield schemathesis.openapi.from_url(f"{server.url}/openapi.json").include(path_regex=FUZZED)
    # Leave the registry as the fuzzing found it, for the tests that follow.
    after = httpx.get(f"{server.url}/v1/steering/vectors", headers=AUTH, timeout=30).json()["data"]
    for name in {e["name"] for e in after} - before:
        httpx.delete(f"{server.url}/v1/steering/vectors/{name}", headers=AUTH, timeout=30)


@schemathesis.hook
def map_body(context, body):
    # Keep generations short: the point is the HTTP layer, not the model.
    if isinstance(body, dict):
        if "max_tokens" in body:
            body["max_tokens"] = 4
        body.pop("max_completion_tokens", None)
    return body


def test_no_request_gets_a_5xx(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/steering/vectors", "/v1/chat/completions", "/v1/completions"}
    for operation in operations:

        @settings(max_examples=30, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def fuzz(case):
            response = case.call(headers=AUTH, timeout=120)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"

        fuzz()


def test_the_server_still_answers_after_fuzzing(server):
    response = httpx.post(
        f"{server.url}/v1/completions", headers=AUTH, timeout=120,
        json={"model": server.model, "prompt": "Who are you?", "max_tokens": 2, "steering": {"features": [[1, 7, 3.0]]}},
    )
    assert response.status_code == 200 and response.headers["x-vllm-steer-fingerprint"] != "none"
