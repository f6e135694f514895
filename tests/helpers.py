"""Small helpers shared by the engine tests."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_steer.reference import ReferenceSteerer

PROMPTS = [
    "Tell me a story about dogs in the park.",
    "Who are you?",
    "Give me three business ideas about the ocean and cooking.",
    "The Eiffel Tower in Paris",
]


@dataclass
class Generation:
    token_ids: list[int]
    logprobs: list[float]
    num_cached_tokens: int = 0


def greedy(max_tokens: int, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True, **kwargs)


def generations(outputs) -> list[Generation]:
    result = []
    for output in outputs:
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
        result.append(Generation(tokens, logprobs, output.num_cached_tokens or 0))
    return result


def run(llm, prompt_ids: list[list[int]], specs, max_tokens: int, **params) -> list[Generation]:
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
    return generations(llm.generate(prompts, greedy(max_tokens, **params), steering=specs, use_tqdm=False))


def reference(hf_model, llm, prompt_ids: list[int], spec, max_tokens: int) -> Generation:
    """The notebook's method (transformers + forward hooks) on the same weights and vectors."""
    resolved = llm.frontend.resolve(spec) if spec is not None else None
    vectors = resolved.arrays(llm.frontend.registry) if resolved is not None else {}
    output = ReferenceSteerer(hf_model, vectors).generate(prompt_ids, resolved, max_tokens)
    return Generation(output.token_ids, output.logprobs)


def assert_same_tokens_close_logprobs(got: Generation, expected: Generation, tolerance: float = 1e-4) -> None:
    assert got.token_ids == expected.token_ids
    worst = max(abs(a - b) for a, b in zip(got.logprobs, expected.logprobs))
    assert worst <= tolerance, f"logprobs differ by {worst}"


def slots_in_use(llm) -> list[int]:
    """Steering slots held on each worker once finished requests are released. vLLM tells
    workers about finished requests with the next step, so run one unsteered token first."""
    run(llm, [[1, 2, 3]], [None], 1)
    return [stats["slots_in_use"] for stats in llm.steering_stats()]
