"""The notebook's own interface, reproduced: ``cfg['features']``, ``generate_chat(chat,
steer=True, scale=0.8, clamp_intensity=True)``, a steering_vectors.pt keyed by
(layer, feature_id), repetition_penalty 1.2 on every run, greedy decoding."""

from __future__ import annotations

import pytest

from vllm_steer.lab.reference import ReferenceSteerer

FEATURES = [[1, 7, 12.0], [2, 42, 9.0], [3, 5, 4.0]]  # [layer, feature_id, reduced strength]
CHAT = [{"role": "user", "content": "Who are you?"}]


def notebook_reference(hf_model, tokenizer, llm, steer: bool, scale: float, clamp: bool, max_new_tokens: int) -> str:
    chat = [{"role": "system", "content": "You are a helpful assistant."}, *CHAT]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    spec = llm.notebook_spec(scale, clamp) if steer else None
    resolved = llm.frontend.resolve(spec) if spec else None
    vectors = resolved.arrays(llm.frontend.registry) if resolved else {}
    tokens = ReferenceSteerer(hf_model, vectors).generate(ids, resolved, max_new_tokens, repetition_penalty=1.2).token_ids
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    # vLLM's incremental detokenizer withholds a trailing incomplete UTF-8 sequence.
    return tokenizer.decode(tokens, skip_special_tokens=True).strip().rstrip("\ufffd")


@pytest.mark.parametrize("steer, scale, clamp", [(False, 1.0, False), (True, 0.8, True), (True, 1.5, False)])
def test_generate_chat_matches_the_notebook(steer, scale, clamp, llm, hf_model, tokenizer, gen_len, monkeypatch):
    monkeypatch.setitem(llm.cfg, "features", FEATURES)
    got = llm.generate_chat(CHAT, max_new_tokens=gen_len, steer=steer, scale=scale, clamp_intensity=clamp)
    assert got == notebook_reference(hf_model, tokenizer, llm, steer, scale, clamp, gen_len)
    if steer:
        assert got != llm.generate_chat(CHAT, max_new_tokens=gen_len)


def test_notebook_spec_uses_reduced_strengths(llm, monkeypatch):
    monkeypatch.setitem(llm.cfg, "features", FEATURES[:1])
    resolved = llm.frontend.resolve(llm.notebook_spec(scale=0.5, clamp_intensity=True))
    (op,) = resolved.ops
    assert (op.layer, op.mode, op.normalize) == (1, "clamp", True)
    assert op.coeff == pytest.approx(12.0 * 1 * 0.5)
    assert op.digest == llm.frontend.registry.feature_digest(1, 7)
