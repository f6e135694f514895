"""Speculative decoding (n-gram drafts, which vLLM's CPU build runs): the target model is
steered on every token it verifies, so steered greedy output is the same with and without
speculation. (A draft *model* is not steered: vLLM builds it without our overrides; only its
acceptance rate suffers, never the output.)"""

from __future__ import annotations

import numpy as np
import pytest

from support.engines import ENGINE_ARGS, scoped_environ
from support.helpers import assert_same_tokens_close_logprobs, run

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def speculating(tiny_model, feature_file, runner):
    if runner == "v2":
        pytest.skip("V2's speculative-decoding Triton kernels fail in Triton's CPU interpreter ('mask has unsupported dtype')")
    from vllm_steer import SteeredLLM

    with scoped_environ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        llm = SteeredLLM(tiny_model, vectors=[feature_file], **{**ENGINE_ARGS, "enforce_eager": True}, speculative_config=NGRAM, disable_log_stats=False)
    yield llm
    llm.shutdown()


def accepted_drafts(llm) -> int:
    return sum(int(metric.value) for metric in llm.llm.get_metrics() if metric.name == "vllm:spec_decode_num_accepted_tokens")


def test_steered_greedy_output_is_the_same_with_ngram_speculation(speculating, llm, prompt_ids, gen_len):
    repetitive = prompt_ids[0] * 3  # n-gram drafts come from repeated text
    vector = np.random.default_rng(8).standard_normal(256).tolist()
    specs = [
        None,
        {"vectors": [{"vector": vector, "layers": [1], "scale": 4.0}]},
        {"vectors": [{"vector": vector, "layers": [2], "mode": "clamp", "scale": 20.0}], "apply_to": "generated"},
        {"features": [[1, 7, 10.0]], "clamp": True},
    ]
    length = 3 * gen_len
    before = accepted_drafts(speculating)
    drafted = run(speculating, [repetitive] * len(specs), specs, length)
    assert accepted_drafts(speculating) > before, "no draft token was accepted: the test would not exercise speculation"
    plain = run(llm, [repetitive] * len(specs), specs, length)
    for got, expected in zip(drafted, plain):
        assert_same_tokens_close_logprobs(got, expected)
