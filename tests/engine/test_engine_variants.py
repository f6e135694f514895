"""The same steering under other engine configurations: eager vs torch.compile with a tiny
chunked-prefill budget, tensor parallelism and pipeline parallelism."""

from __future__ import annotations

import numpy as np
import pytest

from support.helpers import assert_same_tokens_close_logprobs, reference, run

STORY = "Tell me a story about the Eiffel Tower, the ocean and dogs in the park. " * 6


@pytest.fixture(scope="module")
def batch(tokenizer, prompt_ids):
    generator = np.random.default_rng(21)
    vectors = [generator.standard_normal(256).tolist() for _ in range(2)]
    long_prompt = tokenizer.encode(STORY, add_special_tokens=False)
    specs = [
        {"vectors": [{"vector": vectors[0], "layers": [0, 2], "scale": 2.5}], "apply_to": "prompt"},
        None,
        {"vectors": [{"vector": vectors[1], "layers": [1], "mode": "clamp", "scale": 25.0}, {"name": "L3/F5", "layers": [3], "scale": 30.0, "normalize": True}]},
        {"features": [[2, 42, 6.0]], "clamp": True, "apply_to": "generated"},
    ]
    return [long_prompt, prompt_ids[1], long_prompt, prompt_ids[2]], specs


def test_eager_with_small_chunked_prefill_budget_matches_compiled(engines, batch, hf_model, gen_len):
    prompts, specs = batch
    compiled = run(engines(), prompts, specs, gen_len)
    # 16 tokens per step: the long prompts are prefilled in many chunks, mixed with decodes.
    # (test_capture's engine: capture on changes nothing here, and one start fewer.)
    eager = run(engines(enforce_eager=True, max_num_batched_tokens=16, max_num_seqs=4, capture=True), prompts, specs, gen_len)
    for index, (a, b) in enumerate(zip(compiled, eager)):
        assert_same_tokens_close_logprobs(b, a)
        assert_same_tokens_close_logprobs(b, reference(hf_model, engines(), prompts[index], specs[index], gen_len))


@pytest.mark.parametrize("parallel", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_two_processes_match_one(parallel, engines, batch, gen_len):
    """Tensor parallel 2 and pipeline parallel 2 on the two cores, compiled, capture on."""
    prompts, specs = batch
    single = run(engines(), prompts, specs, gen_len)
    split = engines(**{parallel: 2}, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, capture=True)
    for a, b in zip(single, run(split, prompts, specs, gen_len)):
        assert_same_tokens_close_logprobs(b, a)
