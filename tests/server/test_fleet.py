"""Replicas behind a router: two independent servers (each its own engine) on one registry
directory behave as one registry, and a steered request means the same on either."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

from benchmarks.fleet_soak import run as fleet_soak
from vllm_steer.core.spec import vector_digest
from vllm_steer.lab.launcher import stop_server
from vllm_steer.server.plugin import POLL_SECONDS
from support.engines import API_KEY, serve

AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def replica(server, tiny_model, feature_file, runner):
    """A second server on the session server's registry directory."""
    if runner != "v1":
        pytest.skip("replicas share the registry in their API servers, the same on both runners; checked once, on V1")
    process, url, _ = serve(tiny_model, feature_file, server.registry_dir, "--max-num-seqs", "8")
    yield url
    stop_server(process, timeout=30)


def complete(url: str, model: str, steering: dict | None) -> httpx.Response:
    body = {"model": model, "prompt": "Who are you?", "max_tokens": 8, "temperature": 0}
    if steering is not None:
        body["steering"] = steering
    return httpx.post(f"{url}/v1/completions", headers=AUTH, json=body, timeout=120)


def register(url: str, name: str, vector: list[float], replace: bool = False) -> dict:
    created = httpx.post(f"{url}/v1/steering/vectors", headers=AUTH, json={"name": name, "vector": vector, "replace": replace}, timeout=60)
    assert created.status_code in (200, 201), created.text
    return created.json()


def stored(registry_dir, vector: list[float]):
    """Where the registry directory keeps a vector's content."""
    return registry_dir / "objects" / f"{vector_digest(np.array(vector, np.float32)).removeprefix('sha256:')}.f32"


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=60).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ") or line.startswith(name + "{")))


def test_a_name_registered_on_one_replica_steers_the_same_on_another(server, replica):
    """Before the other replica's workers are given the vector, and after; then replaced and
    deleted on the first, which the second follows on its next request."""
    a, b, model = server.url, replica, server.model
    first, second = np.random.default_rng(280).standard_normal((2, 256)).tolist()
    steering = {"vectors": [{"name": "fleet", "layers": [1], "scale": 8.0}]}
    plain = complete(b, model, None).json()["choices"][0]["text"]
    register(a, "fleet", first)
    registered = time.monotonic()
    assert stored(server.registry_dir, first).exists()
    try:
        answers = [complete(url, model, steering) for url in (a, b)]  # b at once: its workers lack it
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        texts = [r.json()["choices"][0]["text"] for r in answers]
        inline = complete(b, model, {"vectors": [{"vector": first, "layers": [1], "scale": 8.0}]}).json()["choices"][0]["text"]
        assert texts[0] == texts[1] == inline != plain
        # The same steering content has the same fingerprint (and cache salt) everywhere.
        assert answers[0].headers["x-vllm-steer-fingerprint"] == answers[1].headers["x-vllm-steer-fingerprint"]
        # b's workers are given it by its next poll: the bound on a registry change reaching them.
        while metric(b, "vllm_steer_worker_vectors") < metric(a, "vllm_steer_worker_vectors"):
            assert time.monotonic() - registered < 3 * POLL_SECONDS + 10, "b's workers never got the vector"
            time.sleep(0.25)
        print(f"a registration reached the other replica's workers in {time.monotonic() - registered:.1f} s")
        assert complete(b, model, steering).json()["choices"][0]["text"] == texts[0]

        register(a, "fleet", second, replace=True)
        replaced = [complete(url, model, steering).json()["choices"][0]["text"] for url in (b, a)]
        assert replaced[0] == replaced[1] != texts[0]
    finally:
        assert httpx.delete(f"{a}/v1/steering/vectors/fleet", headers=AUTH, timeout=60).status_code == 200
    refused = complete(b, model, steering)
    assert refused.status_code == 400 and "unknown vector 'fleet'" in refused.text
    # The directory keeps only objects some name points at: both of fleet's are gone.
    assert not any(stored(server.registry_dir, v).exists() for v in (first, second))


def test_fleet_soak(server, replica):
    """Mixed traffic over both replicas while names are registered, replaced and deleted on
    either (benchmarks/fleet_soak.py; longer runs there)."""
    report = fleet_soak([server.url, replica], server.model, 48, 12, AUTH, seed=31)
    print(report)
    assert report["mismatches"] == 0 and report["errors"] == {}, report
    assert report["completed"] > 0 and report["registry_changes"].get("registered", 0) > 0, report
    assert report["registries_identical"], report
    assert len({tuple(vectors) for vectors in report["worker_vectors"]}) == 1, report
    assert report["slots_in_use_after"] == [[0], [0]], report


# ---- routing: the tested recipe ---------------------------------------------------------------
def affinity_key(body: dict) -> str:
    """A conversation's routing key: its steering field and its first message (or prompt). Every
    turn of a conversation has both, so it stays on one replica, whose prefix cache holds it.
    (Correctness does not depend on it: the cache salt keeps steered KV apart everywhere.)"""
    first = body["messages"][0].get("content") if body.get("messages") else body.get("prompt")
    return hashlib.sha256(json.dumps([body.get("steering"), first], sort_keys=True).encode()).hexdigest()


@contextmanager
def affinity_proxy(replicas: list[str]):
    """A minimal router in front of the replicas; yields its url and the replica of each request."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    routed = []

    async def forward(request):
        body = await request.json()
        replica = replicas[int(affinity_key(body), 16) % len(replicas)]
        routed.append(replica)
        async with httpx.AsyncClient(timeout=300) as client:
            answer = await client.post(replica + request.url.path, json=body, headers={"authorization": request.headers["authorization"]})
        kept = {key: value for key, value in answer.headers.items() if key.lower() in ("content-type", "x-vllm-steer-fingerprint")}
        return Response(answer.content, answer.status_code, headers=kept)

    app = Starlette(routes=[Route(path, forward, methods=["POST"]) for path in ("/v1/completions", "/v1/chat/completions")])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", routed
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_an_affinity_router_keeps_a_steered_conversation_on_its_cache(server, replica):
    """Both turns of a steered chat go to one replica, where the second reads the first's KV
    blocks from the prefix cache; the answers equal those of the other replica, cold."""
    a, model = server.url, server.model
    register(a, "routed", np.random.default_rng(281).standard_normal(256).tolist(), replace=True)
    steering = {"vectors": [{"name": "routed", "layers": [1], "scale": 3.0}]}
    first = [{"role": "user", "content": "Tell me a long story about the sea and the ships on it. " * 6}]

    def chat(url, messages):
        body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0, "steering": steering}
        answer = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["message"]["content"]

    try:
        with affinity_proxy([a, replica]) as (proxy, routed):
            one = chat(proxy, first)
            second = [*first, {"role": "assistant", "content": one}, {"role": "user", "content": "And then?"}]
            hits = metric(routed[0], "vllm:prefix_cache_hits_total")
            two = chat(proxy, second)
            assert routed[0] == routed[1]
            assert metric(routed[0], "vllm:prefix_cache_hits_total") - hits >= 16  # at least a block of turn one
        other = replica if routed[0] == a else a
        assert [chat(other, first), chat(other, second)] == [one, two]
    finally:
        httpx.delete(f"{a}/v1/steering/vectors/routed", headers=AUTH, timeout=60)
