"""Replicas behind a router: two independent servers (each its own engine) on one registry
directory behave as one registry, and a steered request means the same on either."""

from __future__ import annotations

import time

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
