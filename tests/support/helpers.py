"""Small helpers shared by the engine tests."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_steer.lab.reference import ReferenceSteerer

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


# ---- memory -------------------------------------------------------------------------------------
MEMORY_PROBE = """
import json, sys

def private_memory():
    # Anonymous resident memory: what the process itself holds (touched pages of a
    # memory-mapped file are page cache, counted as RssFile).
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) * 1024 for line in file if line.startswith("RssAnon:"))
"""
MEMORY_MEASURE = """
before = private_memory()
result = run()
grew = private_memory() - before
before = private_memory()
whole = b"x" * CHECK_BYTES  # the measurement must see this much new memory
print(json.dumps({"grew": grew, "seen": private_memory() - before, "result": result}))
"""
CHECK_BYTES = 64 << 20


def memory_growth(code: str) -> tuple[int, object]:
    """The anonymous resident memory that ``code``'s ``run()`` adds, and run()'s (JSON) result,
    measured in a fresh interpreter: in a long test process the allocator hands back pages
    freed earlier, so what a call reads need not show as new memory. Skips the calling test
    where this machine's /proc does not see 64 MiB of new memory (some sandboxes report a
    stale RssAnon), so the test cannot pass without measuring."""
    import json
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    import pytest

    repo = Path(__file__).resolve().parents[2]
    script = MEMORY_PROBE + f"CHECK_BYTES = {CHECK_BYTES}\n" + textwrap.dedent(code) + MEMORY_MEASURE
    # glibc's allocator as a long-running process has it: once large blocks have been freed its
    # mmap threshold rises to 32 MiB, and a freed block under it stays on the heap (resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
    done = subprocess.run([sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    if measured["seen"] <= CHECK_BYTES // 2:
        pytest.skip(f"RssAnon grew by {measured['seen']} bytes when {CHECK_BYTES} bytes were written: "
                    "this machine's /proc cannot measure what a call brings into memory")
    return measured["grew"], measured["result"]

