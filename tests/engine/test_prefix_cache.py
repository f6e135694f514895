"""Prefix caching must never hand one request's KV blocks to a request steered differently.

vLLM's block hashes cover ``cache_salt`` but not ``extra_args``: without the front end's
salt, an unsteered request would reuse the KV blocks a steered one wrote for the same prompt.
These tests go through the raw vLLM API (``LLM.generate`` with ``extra_args``, no salt).
"""

from __future__ import annotations

import numpy as np
import pytest

from support.helpers import Generation, generations, greedy

STORY = "Tell me a story about the Eiffel Tower, the ocean and dogs in the park. " * 20


@pytest.fixture(scope="module")
def long_prompt(tokenizer) -> list[int]:
    ids = tokenizer.encode(STORY, add_special_tokens=False)
    assert len(ids) > 256  # several full KV blocks
    return ids


def raw_generate(llm, prompt: list[int], max_tokens: int, steering=None, cache_salt: str | None = None) -> Generation:
    params = greedy(max_tokens, extra_args=None if steering is None else {"steering": steering})
    prompt_input = {"prompt_token_ids": prompt}
    if cache_salt is not None:
        prompt_input["cache_salt"] = cache_salt
    return generations(llm.llm.generate([prompt_input], params, use_tqdm=False))[0]


def test_steered_and_unsteered_never_share_kv_blocks(llm, long_prompt, gen_len):
    vector = np.random.default_rng(5).standard_normal(256).tolist()
    spec = {"vectors": [{"vector": vector, "layers": [1], "scale": 3.0}], "apply_to": "prompt"}
    llm.llm.reset_prefix_cache()
    clean = raw_generate(llm, long_prompt, gen_len)
    llm.llm.reset_prefix_cache()

    steered = raw_generate(llm, long_prompt, gen_len, spec)
    assert steered.num_cached_tokens == 0
    assert steered.token_ids != clean.token_ids  # the prompt's KV carries the steering

    after = raw_generate(llm, long_prompt, gen_len)
    assert after.num_cached_tokens == 0, "an unsteered request reused KV blocks written under steering"
    assert after.token_ids == clean.token_ids and after.logprobs == clean.logprobs

    again = raw_generate(llm, long_prompt, gen_len, spec)
    assert again.num_cached_tokens > 0, "identical steering should share its cache"
    assert again.token_ids == steered.token_ids

    other = raw_generate(llm, long_prompt, gen_len, {**spec, "vectors": [{"vector": vector, "layers": [1], "scale": 2.0}]})
    assert other.num_cached_tokens == 0

    salted = raw_generate(llm, long_prompt, gen_len, spec, cache_salt="tenant-a")
    assert salted.num_cached_tokens == 0  # the user's salt still separates tenants
    assert salted.token_ids == steered.token_ids
    assert raw_generate(llm, long_prompt, gen_len, spec, cache_salt="tenant-a").num_cached_tokens > 0


def test_re_registering_a_name_never_reuses_the_old_vectors_cache(llm, long_prompt, gen_len):
    generator = np.random.default_rng(11)
    first, second = (generator.standard_normal(256).astype(np.float32) for _ in range(2))
    spec = {"vectors": [{"name": "cache-test", "layers": [2], "scale": 3.0}]}
    llm.register_vector("cache-test", first, replace=True)
    old = raw_generate(llm, long_prompt, gen_len, spec)
    llm.register_vector("cache-test", second, replace=True)
    new = raw_generate(llm, long_prompt, gen_len, spec)
    assert new.num_cached_tokens == 0
    inline_second = raw_generate(llm, long_prompt, gen_len, {"vectors": [{"vector": second.tolist(), "layers": [2], "scale": 3.0}]})
    assert inline_second.num_cached_tokens > 0  # same content as the new name: shared
    assert new.token_ids == inline_second.token_ids != old.token_ids


def test_re_registering_does_not_change_a_request_in_flight(llm, prompt_ids, hf_model, gen_len):
    """A request keeps the vector it was admitted with, even when the name moves mid-generation."""
    from support.helpers import reference

    generator = np.random.default_rng(12)
    original, replacement = (generator.standard_normal(256).astype(np.float32) for _ in range(2))
    llm.register_vector("moving", original, replace=True)
    spec = {"vectors": [{"name": "moving", "layers": [1], "scale": 3.0}]}
    engine = llm.llm.llm_engine
    engine.add_request("in-flight", {"prompt_token_ids": prompt_ids[0]}, greedy(gen_len, extra_args={"steering": spec}))
    finished = []
    finished += engine.step()  # prefill (and the first token)
    llm.register_vector("moving", replacement, replace=True)
    while engine.has_unfinished_requests():
        finished += engine.step()
    got = generations([o for o in finished if o.finished])[0]
    inline_original = {"vectors": [{"vector": original.tolist(), "layers": [1], "scale": 3.0}]}
    assert got.token_ids == reference(hf_model, llm, prompt_ids[0], inline_original, gen_len).token_ids
    moved = reference(hf_model, llm, prompt_ids[0], spec, gen_len)  # resolves to the replacement now
    assert moved.token_ids != got.token_ids


@pytest.mark.parametrize("phase", ["prompt", "generated"])
def test_the_next_turn_of_a_phase_limited_request_never_reads_kv_of_the_other_phase(llm, long_prompt, hf_model, gen_len, phase):
    """Turn 1 caches KV for its answer's tokens steered as *generated*; in turn 2 the same
    tokens are *prompt*. With one namespace for both, turn 2 would read KV computed under the
    other phase. (CPU KV blocks hold 128 tokens: turn 1's answer completes the second block.)"""
    from support.helpers import assert_same_tokens_close_logprobs, reference

    vector = np.random.default_rng(21).standard_normal(256).tolist()
    spec = {"vectors": [{"vector": vector, "layers": [1], "scale": 8.0}], "apply_to": phase}
    llm.llm.reset_prefix_cache()
    first_prompt = long_prompt[:253]
    first = raw_generate(llm, first_prompt, gen_len, spec)
    second_prompt = first_prompt + first.token_ids + long_prompt[253:270]
    second = raw_generate(llm, second_prompt, gen_len, spec)
    fresh = raw_generate(llm, second_prompt, gen_len, spec, cache_salt=f"fresh-namespace-{phase}")
    assert fresh.num_cached_tokens == 0
    assert_same_tokens_close_logprobs(second, fresh)
    assert_same_tokens_close_logprobs(second, reference(hf_model, llm, second_prompt, spec, gen_len))
    again = raw_generate(llm, second_prompt, gen_len, spec)
    assert again.num_cached_tokens > 0, "identical requests (same spec, same prompt) should share their cache"
