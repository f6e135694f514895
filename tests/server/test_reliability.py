"""Load without cross-talk, faults, and more than one process, against the live server."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from vllm_steer.lab.launcher import stop_server
from benchmarks.soak import run as soak
from support.engines import API_KEY, serve

AUTH = {"authorization": f"Bearer {API_KEY}"}


def test_soak_no_cross_talk_no_leaks(server, runner):
    """Random mixes under concurrency: every completed response equals the request alone."""
    count, concurrency = (160, 48) if runner == "v1" else (48, 16)
    report = soak(server.url, server.model, count, concurrency, AUTH, server.pid, seed=3)
    assert report["mismatches"] == 0, report
    assert report["errors"] == {}, report
    assert report["completed"] + report["cancelled"] == count and report["cancelled"] > 0
    assert report["slots_in_use_after"] == [0], report
    assert report["rss_mib_after"] - report["rss_mib_before"] < 100, report


def test_registry_change_during_a_stream_does_not_touch_it(server, gen_len):
    original = np.random.default_rng(50).standard_normal(256).tolist()
    replacement = np.random.default_rng(51).standard_normal(256).tolist()
    url, tokens = server.url, gen_len + 8
    httpx.post(f"{url}/v1/steering/vectors", headers=AUTH, json={"name": "moving", "vector": original, "replace": True}, timeout=60).raise_for_status()
    request = {"model": server.model, "prompt": "Tell me a story", "max_tokens": tokens, "temperature": 0, "stream": True,
               "ignore_eos": True, "steering": {"vectors": [{"name": "moving", "layers": [1], "scale": 3.0}]}}
    text = ""
    with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, json=request, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if not text:  # the first chunk arrived: the request is running. Move the name.
                    httpx.post(f"{url}/v1/steering/vectors", headers=AUTH, timeout=60,
                               json={"name": "moving", "vector": replacement, "replace": True}).raise_for_status()
                text += json.loads(line[6:])["choices"][0]["text"] or " "
    alone = {**request, "stream": False, "steering": {"vectors": [{"vector": original, "layers": [1], "scale": 3.0}]}}
    expected = httpx.post(f"{url}/v1/completions", headers=AUTH, json=alone, timeout=300).json()["choices"][0]["text"]
    moved = httpx.post(f"{url}/v1/completions", headers=AUTH, json={**request, "stream": False}, timeout=300).json()["choices"][0]["text"]
    assert text.replace(" ", "") == expected.replace(" ", "") and moved != expected
    httpx.delete(f"{url}/v1/steering/vectors/moving", headers=AUTH, timeout=60)


def test_restart_reloads_the_registry_directory(server, tiny_model, feature_file, runner):
    """A server started on the same registry directory serves the same names and digests."""
    if runner != "v1":
        pytest.skip("the registry directory does not depend on the runner; checked once, on V1")
    # Register two vectors and delete one: the restarted server must serve exactly what is left
    # (without touching the shared server's own vectors, which other tests use).
    vectors = np.random.default_rng(60).standard_normal((2, 256)).tolist()
    created = httpx.post(f"{server.url}/v1/steering/vectors", headers=AUTH, json={"name": "kept", "vector": vectors[0]}, timeout=60).json()
    httpx.post(f"{server.url}/v1/steering/vectors", headers=AUTH, json={"name": "gone", "vector": vectors[1]}, timeout=60).raise_for_status()
    httpx.delete(f"{server.url}/v1/steering/vectors/gone", headers=AUTH, timeout=60).raise_for_status()
    try:
        before = httpx.get(f"{server.url}/v1/steering/vectors", headers=AUTH, timeout=60).json()["data"]
        process, url, _ = serve(tiny_model, feature_file, server.registry_dir)
        try:
            after = httpx.get(f"{url}/v1/steering/vectors", headers=AUTH, timeout=60).json()["data"]
            assert [(e["name"], e["digest"]) for e in after] == [(e["name"], e["digest"]) for e in before]
            assert created["digest"] in {e["digest"] for e in after} and "gone" not in {e["name"] for e in after}
            steered = {"model": str(tiny_model), "prompt": "Who are you?", "max_tokens": 6, "temperature": 0,
                       "steering": {"vectors": [{"name": "kept", "layers": [1], "scale": 3.0}]}}
            answers = [httpx.post(f"{u}/v1/completions", headers=AUTH, json=steered, timeout=120) for u in (server.url, url)]
            assert answers[0].json()["choices"][0]["text"] == answers[1].json()["choices"][0]["text"]
            assert answers[0].headers["x-vllm-steer-fingerprint"] == answers[1].headers["x-vllm-steer-fingerprint"]
        finally:
            stop_server(process, timeout=30)
    finally:
        httpx.delete(f"{server.url}/v1/steering/vectors/kept", headers=AUTH, timeout=60).raise_for_status()


def test_two_api_servers_see_every_registry_change(tiny_model, feature_file, tmp_path, runner):
    if runner != "v1":
        pytest.skip("API server processes are the same on both runners; checked once, on V1")
    process, url, log = serve(tiny_model, feature_file, tmp_path / "registry", "--api-server-count", "2")
    try:
        vector = np.random.default_rng(70).standard_normal(256).tolist()
        created = httpx.post(f"{url}/v1/steering/vectors", headers=AUTH, json={"name": "shared", "vector": vector}, timeout=60)
        assert created.status_code == 201, created.text
        steered = {"model": str(tiny_model), "prompt": "Who are you?", "max_tokens": 4, "temperature": 0,
                   "steering": {"vectors": [{"name": "shared", "layers": [1], "scale": 3.0}]}}
        # Connections spread over both API server processes: every one must know the name.
        for _ in range(16):
            with httpx.Client(headers=AUTH, timeout=120) as fresh:  # a new connection each time
                answer = fresh.post(f"{url}/v1/completions", json=steered)
                assert answer.status_code == 200, answer.text
                assert "shared" in {e["name"] for e in fresh.get(f"{url}/v1/steering/vectors").json()["data"]}
        assert httpx.delete(f"{url}/v1/steering/vectors/shared", headers=AUTH, timeout=60).status_code == 200
        for _ in range(16):
            with httpx.Client(headers=AUTH, timeout=120) as fresh:
                assert fresh.post(f"{url}/v1/completions", json=steered).status_code == 400
        # Two API server processes share the port; the kernel spreads new connections over
        # both, so 16 fresh connections all seeing each change means both processes did.
        labels = {line.split(" pid=")[0] for line in log.read_text().splitlines() if line.startswith("(ApiServer_")}
        assert labels == {"(ApiServer_0", "(ApiServer_1"}
    finally:
        stop_server(process, timeout=30)
