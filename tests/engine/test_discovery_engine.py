"""Finding features through the engine: ``SteeredLLM.top_features`` captures the stream at the
SAE's layer (each token as the last of its own prefix for "mean" and "token") and encodes it
with the SAE's full encoder. Checked against a dense numpy encoding of the same captured
streams, and the captured streams against transformers, on the session's model runner."""

from __future__ import annotations

import json

import pytest
import torch
from support.discovery import D_SAE, LAYERS, assert_same, feature_saes, oracle

from support.engines import start_engine
from vllm_steer.discovery import finder
from vllm_steer.core.spec import SteeringError

CHAT = [{"role": "user", "content": "Tell me about the Eiffel Tower."}]


@pytest.fixture(scope="module")
def saes(hf_model, prompt_ids):
    return feature_saes(hf_model, prompt_ids)


@pytest.fixture(scope="module")
def feature_engine(tiny_model, feature_file, saes, runner):
    """Capture on, both SAEs loaded, in-process and eager (starts in seconds), for this module."""
    llm = start_engine(tiny_model, feature_file, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                       sae=[sae[0] for sae in saes.values()], enforce_eager=True, capture=True)
    yield llm
    llm.shutdown()


PROMPTS = ["The Eiffel Tower in Paris", "Who are you?", CHAT]


def captured(llm, layer, over):
    """The streams top_features encodes, captured here the same way (the same prefix requests)."""
    tokenizer = llm.llm.get_tokenizer()
    plan = finder.plan(tokenizer, finder.FeatureQuery.parse({"prompts": PROMPTS, "over": over}))
    rows = llm.capture([{"prompt_token_ids": p} for p in plan.prefixes()], [layer], use_tqdm=False)
    return plan, plan.streams([row[layer] for row in rows])


def test_each_token_captured_as_its_prefix_is_the_models_stream(feature_engine, hf_model):
    plan, streams = captured(feature_engine, LAYERS["topk"], "token")
    for ids, positions, stream in zip(plan.token_ids, plan.positions, streams):
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYERS["topk"] + 1][0]
        torch.testing.assert_close(torch.from_numpy(stream), expected[positions], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("over", ["last", "mean", "token"])
def test_top_features_equal_a_dense_encoding_of_the_captured_streams(feature_engine, saes, kind, over):
    _, encoder, b_enc, b_dec, threshold, sae_k = saes[kind]
    _, streams = captured(feature_engine, LAYERS[kind], over)
    got = feature_engine.top_features(PROMPTS, sae=LAYERS[kind], k=5, over=over)
    assert_same(got, oracle(streams, encoder, b_enc, b_dec, threshold, sae_k, over, 5))
    assert all(result.features or result.tokens for result in got)  # the synthetic features fire


def test_results_carry_labels_and_tokens(feature_engine, saes, tmp_path):
    path = tmp_path / "explanations.json"
    path.write_text(json.dumps([{"modelId": "tiny", "layer": "0-res", "index": str(i), "description": f"feature {i}"}
                                for i in range(D_SAE)]))
    (result,) = feature_engine.top_features([CHAT], sae=saes["relu"][0], k=3, over="token", explanations=path)
    tokenizer = feature_engine.llm.get_tokenizer()
    ids = finder.prompt_token_ids(tokenizer, CHAT)
    assert ids[0] == tokenizer.bos_token_id and [t.position for t in result.tokens] == list(range(1, len(ids)))
    assert [t.token for t in result.tokens] == [tokenizer.decode([i]) for i in ids[1:]]
    assert all(f.label == f"feature {f.feature}" for t in result.tokens for f in t.features)


def test_errors_name_the_field(feature_engine, saes, tmp_path):
    cases = [
        (dict(sae=1), "layer", "no SAE is loaded for layer 1; loaded: .*ae.pt \\(layer 0\\)"),
        (dict(sae=str(tmp_path / "missing.pt")), "sae", "SAE source not found"),
        (dict(sae=0, k=D_SAE + 1), "k", f"at most the SAE's {D_SAE} features"),
        (dict(sae=0, over="max"), "over", "'last', 'mean' or 'token'"),
        (dict(), "sae", "name the SAE with 'sae' or 'layer'"),
    ]
    for kwargs, field, message in cases:
        with pytest.raises(SteeringError, match=message) as info:
            feature_engine.top_features(PROMPTS[:1], **kwargs)
        assert info.value.field == field


def test_the_cli_prints_a_table(feature_engine, saes, tiny_model, tmp_path, monkeypatch, capsys):
    import vllm_steer
    from vllm_steer import cli

    path = tmp_path / "explanations.jsonl"
    path.write_text("\n".join(json.dumps({"modelId": "tiny", "layer": "2-res", "index": i, "description": f"label {i}"})
                              for i in range(D_SAE)))
    monkeypatch.setattr(vllm_steer, "SteeredLLM", lambda *args, **kwargs: feature_engine)  # this module's engine
    monkeypatch.setattr(feature_engine, "shutdown", lambda: None)
    cli.main(["features", "--model", str(tiny_model), "--sae", saes["topk"][0], "--prompt", "Who are you?",
              "--top", "3", "--explanations", str(path)])
    (expected,) = feature_engine.top_features([[{"role": "user", "content": "Who are you?"}]], sae=LAYERS["topk"], k=3)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:3] == ["'Who are you?' (last)", "# | feature | activation | label", "--+-" + lines[2][4:]]
    assert [[cell.strip() for cell in line.split(" | ")[1:4:2]] for line in lines[3:]] == [[str(f.feature), f"label {f.feature}"] for f in expected.features]


def test_an_engine_without_a_tokenizer_finds_features_of_token_ids(tiny_model, feature_file, saes, feature_engine,
                                                                   prompt_ids, tokenizer):
    """``skip_tokenizer_init``: token-id prompts need no tokenizer (the model config's BOS id
    is left out of "mean"), and give what the engine with a tokenizer gives, without token
    texts; text prompts are refused naming the prompt."""
    llm = start_engine(tiny_model, feature_file, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, sae=[saes["relu"][0]],
                       enforce_eager=True, capture=True, skip_tokenizer_init=True)
    try:
        prompts = [[tokenizer.bos_token_id, *prompt_ids[3]], prompt_ids[1]]
        got = llm.top_features(prompts, sae=0, k=4, over="token")
        expected = feature_engine.top_features(prompts, sae=0, k=4, over="token")
        assert [t.position for t in got[0].tokens] == list(range(1, len(prompts[0])))  # BOS left out
        for mine, theirs in zip(got, expected, strict=True):
            assert [(t.position, [f.feature for f in t.features]) for t in mine.tokens] == \
                   [(t.position, [f.feature for f in t.features]) for t in theirs.tokens]
            assert all(t.token is None for t in mine.tokens) and all(t.token for t in theirs.tokens)
        with pytest.raises(SteeringError, match="need the tokenizer.*skip_tokenizer_init.*give token ids") as info:
            llm.top_features([prompt_ids[0], "The Eiffel Tower"], sae=0)
        assert info.value.field == "prompts[1]"
    finally:
        llm.shutdown()
