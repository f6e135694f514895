"""``POST /v1/steering/features`` on ``vllm-steer serve --sae ... --capture``: the features of
the server's own captured streams, and 400s whose ``param`` names the field."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from support.discovery import LAYERS, feature_saes

from support.engines import API_KEY
from vllm_steer.lab.launcher import start_server, stop_server
from vllm_steer.discovery import top_features_of_streams
from vllm_steer.vectors import load_sae

PROMPTS = ["The Eiffel Tower in Paris", "Who are you?"]


@pytest.fixture(scope="module")
def saes(hf_model, prompt_ids):
    return feature_saes(hf_model, prompt_ids)


@pytest.fixture(scope="module")
def features_server(tiny_model, feature_file, saes, tmp_path_factory, runner):
    """An eager server with the ReLU SAE at layer 0 and, at layer 3, a TopK SAE whose k it
    cannot know (so it cannot encode), for this module only."""
    no_k = tmp_path_factory.mktemp("no_k") / "layer3.sae.pt"
    no_k.write_bytes(open(saes["topk"][0], "rb").read())
    log = tmp_path_factory.mktemp("features_server") / "server.log"
    process, url = start_server([
        "--model", str(tiny_model), "--vectors", str(feature_file), "--sae", saes["relu"][0], "--sae", str(no_k),
        "--capture", "--enforce-eager", "--api-key", API_KEY, "--max-model-len", "1024", "--max-num-seqs", "16",
        "--kv-cache-memory-bytes", str(1 << 27), "--seed", "0",
    ], log, timeout=300)
    yield url
    stop_server(process, timeout=30)


def post(url, body, key=API_KEY):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/steering/features", json=body, headers=headers, timeout=120)


def test_features_of_prompts_are_those_of_the_models_streams(features_server, saes, hf_model, tokenizer):  # noqa: F811
    response = post(features_server, {"prompts": PROMPTS, "layer": LAYERS["relu"], "k": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["object"], body["layer"], body["over"], body["k"]) == ("steering.features", 0, "last", 4)
    with torch.no_grad():  # transformers' stream at the last token; the server's agrees to ~1e-5
        streams = [hf_model(torch.tensor([tokenizer.encode(p)]), output_hidden_states=True).hidden_states[1][0, -1].numpy()
                   for p in PROMPTS]
    expected = top_features_of_streams(streams, load_sae(saes["relu"][0]), 4)
    for got, want in zip(body["data"], expected, strict=True):
        assert [f["feature"] for f in got["features"]] == [f.feature for f in want.features]
        np.testing.assert_allclose([f["activation"] for f in got["features"]], [f.activation for f in want.features], atol=1e-3)


def test_a_conversation_per_token(features_server, saes, tokenizer):  # noqa: F811
    messages = [{"role": "user", "content": "Who are you?"}]
    response = post(features_server, {"messages": messages, "sae": saes["relu"][0], "over": "token", "k": 2})
    assert response.status_code == 200, response.text
    (result,) = response.json()["data"]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)
    assert [t["position"] for t in result["tokens"]] == list(range(1, len(ids)))  # without the BOS token


@pytest.mark.parametrize("body, param, message", [
    ({"prompts": PROMPTS, "layer": 1}, "layer", "no SAE is loaded for layer 1"),
    ({"prompts": PROMPTS, "layer": 3}, "layer", "no threshold array and no k"),
    ({"prompts": PROMPTS}, "sae", "name the SAE with 'sae' or 'layer'"),
    ({"prompts": PROMPTS, "layer": 0, "k": 0}, "k", "greater than or equal to 1"),
    ({"prompts": [], "layer": 0}, "prompts", "at least one prompt"),
    ({"prompts": ["x" * 2000], "layer": 0, "over": "mean"}, "prompts", "at most 1024 per request"),
])
def test_bad_requests_are_400s_naming_the_field(features_server, body, param, message):
    response = post(features_server, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_the_api_key_guards_it(features_server):
    assert post(features_server, {"prompts": PROMPTS, "layer": 0}, key=None).status_code == 401
