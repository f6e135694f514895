"""The OpenAI-compatible server end to end: the official ``openai`` SDK (and raw HTTP where
the SDK would refuse to send something) against ``vllm-steer serve`` on a local port."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from support.engines import API_KEY

HEADER = "x-vllm-steer-fingerprint"
CHAT = [{"role": "user", "content": "Who are you?"}]
NOTEBOOK = {"features": [[1, 7, 12.0], [2, 42, 9.0]], "scale": 0.8, "clamp": True}


def random_vector(seed: int) -> list[float]:
    return np.random.default_rng(seed).standard_normal(256).tolist()


def chat(server, steering=None, gen=8, **kwargs):
    """(text, fingerprint header) of a greedy chat completion."""
    extra = {"steering": steering} if steering is not None else None
    raw = server.client().chat.completions.with_raw_response.create(
        model=server.model, messages=CHAT, max_tokens=gen, temperature=0, extra_body=extra, **kwargs
    )
    return raw.parse().choices[0].message.content, raw.headers[HEADER]


def post(server, path: str, payload=None, content: bytes | None = None, key: str | None = API_KEY, method: str = "POST"):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    body = content if content is not None else (json.dumps(payload).encode() if payload is not None else None)
    return httpx.request(method, f"{server.url}{path}", content=body, headers=headers, timeout=120)


def test_chat_steered_unsteered_and_the_fingerprint_header(server, gen_len):
    plain, plain_fingerprint = chat(server, gen=gen_len)
    steered, fingerprint = chat(server, NOTEBOOK, gen=gen_len)
    assert plain_fingerprint == "none" and len(fingerprint) == 32
    assert steered != plain
    assert chat(server, NOTEBOOK, gen=gen_len) == (steered, fingerprint)
    # The same steering sent through vllm_xargs (a JSON string) is the same steering.
    raw = server.client().chat.completions.with_raw_response.create(
        model=server.model, messages=CHAT, max_tokens=gen_len, temperature=0, extra_body={"vllm_xargs": {"steering": json.dumps(NOTEBOOK)}}
    )
    assert (raw.parse().choices[0].message.content, raw.headers[HEADER]) == (steered, fingerprint)


def test_streaming_equals_non_streaming(server, gen_len):
    expected, fingerprint = chat(server, NOTEBOOK, gen=gen_len)
    with server.client().chat.completions.with_streaming_response.create(
        model=server.model, messages=CHAT, max_tokens=gen_len, temperature=0, stream=True, extra_body={"steering": NOTEBOOK}
    ) as response:
        assert response.headers[HEADER] == fingerprint
        text = "".join(chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices)
    assert text == expected


def test_completions_with_n_2_and_logprobs(server, gen_len):
    steering = {"vectors": [{"vector": random_vector(1), "layers": [1, 2], "scale": 3.0}]}
    client = server.client()

    def sample(spec):  # n > 1 needs sampling; a seed makes it repeatable
        return client.completions.create(
            model=server.model, prompt="Tell me a story", max_tokens=gen_len, temperature=1.0, seed=7, n=2, logprobs=1,
            extra_body={"ignore_eos": True, **({"steering": spec} if spec else {})},
        )

    steered, again, plain = sample(steering), sample(steering), sample(None)
    assert len(steered.choices) == 2
    assert [c.text for c in again.choices] == [c.text for c in steered.choices]
    assert [c.text for c in plain.choices] != [c.text for c in steered.choices]
    for choice in steered.choices:
        assert len(choice.logprobs.token_logprobs) == gen_len
        assert all(math.isfinite(lp) and lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_32_concurrent_mixed_requests_each_equal_alone(server, gen_len):
    from openai import AsyncOpenAI

    specs = [None, NOTEBOOK, {"vectors": [{"vector": random_vector(2), "layers": [1], "scale": 3.0}]},
             {"vectors": [{"vector": random_vector(3), "layers": [2], "mode": "clamp", "scale": 20.0}], "apply_to": "generated"}]
    prompts = ["Tell me a story", "Who are you?", "The ocean", "Paris"]
    jobs = [(prompts[i % 4], specs[(i // 4) % 4]) for i in range(32)]

    async def complete(client, prompt, spec):
        result = await client.completions.create(
            model=server.model, prompt=prompt, max_tokens=gen_len, temperature=0, extra_body={"steering": spec} if spec else None
        )
        return result.choices[0].text

    async def all_at_once():
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(complete(client, p, s) for p, s in jobs))

    together = asyncio.run(all_at_once())
    client = server.client()
    alone = {}
    for prompt, spec in jobs:
        key = (prompt, json.dumps(spec))
        if key not in alone:
            alone[key] = client.completions.create(
                model=server.model, prompt=prompt, max_tokens=gen_len, temperature=0, extra_body={"steering": spec} if spec else None
            ).choices[0].text
    assert together == [alone[(p, json.dumps(s))] for p, s in jobs]


def test_registry_register_list_use_replace_delete(server, gen_len):
    first, second = random_vector(10), random_vector(11)
    created = post(server, "/v1/steering/vectors", {"name": "mood", "vector": first})
    assert created.status_code == 201, created.text
    assert created.json()["dimension"] == 256 and created.json()["digest"].startswith("sha256:")
    listed = post(server, "/v1/steering/vectors", method="GET").json()["data"]
    assert {"mood", "L1/F7", "L2/F42", "L3/F5"} <= {entry["name"] for entry in listed}
    spec = {"vectors": [{"name": "mood", "layers": [1], "scale": 3.0}]}
    before, fingerprint = chat(server, spec, gen=gen_len)
    again = post(server, "/v1/steering/vectors", {"name": "mood", "vector": second})
    assert again.status_code == 400 and "already exists" in again.json()["error"]["message"]
    replaced = post(server, "/v1/steering/vectors", {"name": "mood", "vector": second, "replace": True})
    assert replaced.status_code == 201 and replaced.json()["digest"] != created.json()["digest"]
    after, new_fingerprint = chat(server, spec, gen=gen_len)
    assert new_fingerprint != fingerprint
    inline = chat(server, {"vectors": [{"vector": second, "layers": [1], "scale": 3.0}]}, gen=gen_len)
    assert (after, new_fingerprint) == inline
    # Changes are kept in the registry directory (shared by API servers, kept on restart).
    stored = json.loads((server.registry_dir / "names.json").read_text())
    assert stored["mood"]["digest"] == replaced.json()["digest"]
    deleted = post(server, "/v1/steering/vectors/mood", method="DELETE")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    gone = post(server, "/v1/chat/completions", {"model": server.model, "messages": CHAT, "max_tokens": 2, "steering": spec})
    assert gone.status_code == 400 and "unknown vector 'mood'" in gone.json()["error"]["message"]
    assert gone.json()["error"]["param"] == "steering.vectors[0].name"
    assert post(server, "/v1/steering/vectors/mood", method="DELETE").status_code == 404


def test_registry_layered_file_and_feature_sources(server, gen_len, tmp_path):
    layered = post(server, "/v1/steering/vectors", {"name": "ctrl", "layers": {"1": random_vector(20), "2": random_vector(21)}})
    assert layered.status_code == 201 and layered.json()["layers"] == [1, 2]
    text, _ = chat(server, {"vectors": [{"name": "ctrl", "scale": 2.0}]}, gen=gen_len)
    by_hand, _ = chat(server, {"vectors": [{"vector": random_vector(20), "layers": [1], "scale": 2.0},
                                           {"vector": random_vector(21), "layers": [2], "scale": 2.0}]}, gen=gen_len)
    assert text == by_hand
    save_file({"kind": np.asarray(random_vector(22), np.float32)}, str(server.vector_dir / "kind.safetensors"))
    from_file = post(server, "/v1/steering/vectors", {"name": "kind", "file": str(server.vector_dir / "kind.safetensors")})
    assert from_file.status_code == 201, from_file.text
    save_file({"evil": np.ones(256, np.float32)}, str(tmp_path / "evil.safetensors"))
    outside = post(server, "/v1/steering/vectors", {"name": "evil", "file": str(tmp_path / "evil.safetensors")})
    assert outside.status_code == 400 and "only files inside" in outside.json()["error"]["message"]
    (server.vector_dir / "link.safetensors").symlink_to(tmp_path / "evil.safetensors")
    linked = post(server, "/v1/steering/vectors", {"name": "evil", "file": str(server.vector_dir / "link.safetensors")})
    assert linked.status_code == 400 and "only files inside" in linked.json()["error"]["message"]
    feature = post(server, "/v1/steering/vectors", {"name": "tower", "feature": [2, 42]})
    assert feature.status_code == 201 and feature.json()["digest"] == next(
        e["digest"] for e in post(server, "/v1/steering/vectors", method="GET").json()["data"] if e["name"] == "L2/F42")
    for name in ("ctrl", "kind", "tower"):
        assert post(server, f"/v1/steering/vectors/{name}", method="DELETE").status_code == 200


BAD = [
    ("malformed JSON", b'{"model": "m", "messages": [', 400, None),
    ("wrong type", {"steering": {"vectors": [{"name": "L1/F7", "layers": [1]}], "scale": "big"}}, 400, "steering.scale"),
    ("wrong dimension", {"steering": {"vectors": [{"vector": [1.0, 2.0], "layers": [1]}]}}, 400, "steering.vectors[0].vector"),
    ("NaN", b'{"model": "M", "messages": [], "steering": {"vectors": [{"vector": [NaN], "layers": [1]}]}}', 400, "steering.vectors[0].vector"),
    ("unknown name", {"steering": {"vectors": [{"name": "nope", "layers": [1]}]}}, 400, "steering.vectors[0].name"),
    ("bad base64", {"steering": {"vectors": [{"vector_b64": "***", "layers": [1]}]}}, 400, "steering.vectors[0].vector_b64"),
    ("unknown field", {"steering": {"vectors": [{"name": "L1/F7", "layers": [1]}], "strength": 2}}, 400, "steering.strength"),
    ("layer out of range", {"steering": {"features": [[7, 1, 1.0]]}}, 400, "steering.features[0]"),
    ("both forms", {"steering": NOTEBOOK, "vllm_xargs": {"steering": json.dumps(NOTEBOOK)}}, 400, "steering"),
]


@pytest.mark.parametrize("case, body, status, param", BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_a_clear_4xx_and_the_server_answers_on(case, body, status, param, server):
    if isinstance(body, dict):
        body = {"model": server.model, "messages": CHAT, "max_tokens": 2, **body}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = post(server, "/v1/chat/completions", content=content.replace(b'"M"', json.dumps(server.model).encode()))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert chat(server, NOTEBOOK, gen=2)[1] != "none"  # and the next good request is served


def test_limits_answer_413_and_400(server):
    huge = json.dumps({"model": server.model, "prompt": "x", "steering": {"vectors": [{"vector": [0.5] * 900_000, "layers": [1]}]}}).encode()
    too_large = post(server, "/v1/completions", content=huge)
    assert too_large.status_code == 413 and "exceeds" in too_large.json()["error"]["message"]
    # The registry API's bodies too (they used to be read whole, whatever their size).
    huge_vector = json.dumps({"name": "huge", "vector": [0.5] * 900_000}).encode()
    too_large = post(server, "/v1/steering/vectors", content=huge_vector)
    assert too_large.status_code == 413 and "exceeds" in too_large.json()["error"]["message"]
    assert "huge" not in {e["name"] for e in post(server, "/v1/steering/vectors", method="GET").json()["data"]}
    bad = post(server, "/v1/steering/vectors", {"name": "short", "vector": [1.0, 2.0]})
    assert bad.status_code == 400 and "hidden size is 256" in bad.json()["error"]["message"]
    nan = post(server, "/v1/steering/vectors", content=b'{"name": "nan", "vector_b64": "AADAfw=="}')
    assert nan.status_code == 400
    names = []
    for index in range(20):
        response = post(server, "/v1/steering/vectors", {"name": f"fill{index}", "vector": random_vector(index)})
        if response.status_code != 201:
            assert response.status_code == 400 and "holds its limit of 16 vectors" in response.json()["error"]["message"]
            break
        names.append(f"fill{index}")
    else:
        pytest.fail("the registry limit was never reached")
    for name in names:
        post(server, f"/v1/steering/vectors/{name}", method="DELETE")
    assert chat(server, gen=2)[1] == "none"


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_api_key_guards_steering_and_generation_routes(server, key):
    assert post(server, "/v1/steering/vectors", method="GET", key=key).status_code == 401
    assert post(server, "/v1/steering/vectors", {"name": "x", "vector": random_vector(0)}, key=key).status_code == 401
    assert post(server, "/v1/steering/vectors/L1/F7", method="DELETE", key=key).status_code == 401
    assert post(server, "/v1/steering/stats", method="GET", key=key).status_code == 401
    assert post(server, "/v1/chat/completions", {"model": server.model, "messages": CHAT, "steering": NOTEBOOK}, key=key).status_code == 401
    assert post(server, "/v1/completions", {"model": server.model, "prompt": "x", "steering": NOTEBOOK}, key=key).status_code == 401
    assert post(server, "/v1/completions", {"model": server.model, "prompt": "x"}, key=key).status_code == 401
    assert "L1/F7" in {e["name"] for e in post(server, "/v1/steering/vectors", method="GET").json()["data"]}


def test_metrics_count_steering(server):
    chat(server, NOTEBOOK, gen=2)
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    steered = [line for line in text.splitlines() if line.startswith('vllm_steer_requests_total{steering="steered"}')]
    assert steered and float(steered[0].split()[-1]) >= 1
    assert any(line.startswith("vllm_steer_registry_vectors ") for line in text.splitlines())
    assert "vllm_steer_step_distinct_configs" in text
    # Requests that run without the steering they asked for are counted (0 here: none did).
    assert any(line.startswith("vllm_steer_unapplied_requests_total ") for line in text.splitlines())
    workers = post(server, "/v1/steering/stats", method="GET").json()["workers"]
    assert all(worker["unapplied_requests"] == 0 for worker in workers)


def test_the_server_runs_on_the_selected_runner(server, runner):
    assert ("Using V2 Model Runner" in server.log.read_text()) == (runner == "v2")
