"""vLLM's data parallelism (``--data-parallel-size 2``, its internal load balancer: one API
server front, two engines, a core each): steering, the registry, discovery and the soak on
every rank."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from benchmarks.soak import run as soak
from support.discovery import LAYERS, feature_saes
from support.engines import API_KEY
from vllm_steer.lab.launcher import start_server, stop_server

AUTH = {"authorization": f"Bearer {API_KEY}"}
PROMPTS = ["Who are you?", "Tell me a story", "The ocean is", "Paris is a city", "One two three", "Hello there",
           "What is love", "Dogs are"]


@pytest.fixture(scope="module")
def dp_server(tiny_model, feature_file, hf_model, prompt_ids, tmp_path_factory, runner):
    if runner != "v1":
        pytest.skip("data parallelism is the engines' and API server's, the same on both runners; checked once, on V1")
    relu_sae = feature_saes(hf_model, prompt_ids)["relu"][0]
    root = tmp_path_factory.mktemp("dp_server")
    process, url = start_server([
        "--model", str(tiny_model), "--vectors", str(feature_file), "--sae", relu_sae, "--capture",
        "--registry-dir", str(root / "registry"), "--data-parallel-size", "2", "--enforce-eager",
        "--api-key", API_KEY, "--max-model-len", "512", "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(1 << 27),
    ], root / "server.log", timeout=600, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})  # a core per rank
    yield url, process.pid
    stop_server(process, timeout=30)


def worker_stats(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/steering/stats", headers=AUTH, timeout=60).json()["workers"]


def texts(url: str, model: str, specs: list[dict | None]) -> list[str]:
    """All at once, so the load balancer spreads them over both ranks."""
    async def one(client, spec):
        body = {"model": model, "prompt": "Who are you?", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        if spec is not None:
            body["steering"] = spec
        answer = await client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["text"]

    async def every():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300) as client:
            return await asyncio.gather(*(one(client, spec) for spec in specs))

    return asyncio.run(every())


def test_every_rank_holds_the_registry_and_steers_alike(dp_server, tiny_model):
    url, _ = dp_server
    model = str(tiny_model)
    before = worker_stats(url)
    assert len(before) == 2, before  # both ranks' workers answer, not only the first engine's
    vector = np.random.default_rng(290).standard_normal(256).tolist()
    created = httpx.post(f"{url}/v1/steering/vectors", headers=AUTH, json={"name": "ranks", "vector": vector}, timeout=60)
    assert created.status_code == 201, created.text
    try:
        assert [w["vectors"] for w in worker_stats(url)] == [w["vectors"] + 1 for w in before]
        named = {"vectors": [{"name": "ranks", "layers": [1], "scale": 4.0}]}
        inline = {"vectors": [{"vector": vector, "layers": [1], "scale": 4.0}]}
        # A condition that always holds steers the generated tokens; one that never does, nothing.
        held = {**named, "condition": {"layer": 1, "vector": vector, "threshold": -1e9}}
        generated = {**named, "apply_to": "generated"}
        never = {**named, "condition": {"layer": 1, "vector": vector, "threshold": 1e9}}
        answers = texts(url, model, [named] * 4 + [inline] * 4 + [held] * 3 + [generated] * 3 + [never] * 3 + [None] * 3)
        steered, gated, unsteered = set(answers[:8]), set(answers[8:14]), set(answers[14:])
        assert len(steered) == len(gated) == len(unsteered) == 1, answers
        assert steered != unsteered and gated != unsteered
    finally:
        assert httpx.delete(f"{url}/v1/steering/vectors/ranks", headers=AUTH, timeout=60).status_code == 200
    assert [w["vectors"] for w in worker_stats(url)] == [w["vectors"] for w in before]
    assert [w["slots_in_use"] for w in worker_stats(url)] == [0, 0]


def test_discovery_collects_captures_from_every_rank(dp_server):
    """Prompts sent at once land on both ranks; each one's features equal its own alone."""
    url, _ = dp_server

    async def features(client, prompts):
        answer = await client.post("/v1/steering/features", json={"prompts": prompts, "layer": LAYERS["relu"], "k": 3})
        assert answer.status_code == 200, answer.text
        return [[f["feature"] for f in found["features"]] for found in answer.json()["data"]]

    async def every():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300) as client:
            alone = [(await features(client, [prompt]))[0] for prompt in PROMPTS]
            spread = await asyncio.gather(*(features(client, [prompt]) for prompt in PROMPTS * 2))
            return alone, [found[0] for found in spread], await features(client, PROMPTS)

    alone, spread, together = asyncio.run(every())
    assert spread == alone * 2 and together == alone


def test_soak_across_ranks(dp_server, tiny_model):
    url, pid = dp_server
    report = soak(url, str(tiny_model), 64, 16, AUTH, pid, seed=29)
    assert report["mismatches"] == 0 and report["errors"] == {}, report
    assert report["slots_in_use_after"] == [0, 0], report
    metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=60).text
    assert 'vllm_steer_requests_total{steering="steered"}' in metrics
