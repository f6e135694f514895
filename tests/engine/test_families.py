"""Every family steers as Llama does: parity with its own transformers oracle (forward hooks on
``model.layers[L]``), isolation in a mixed batch and in the prefix cache, and unsteered output
bit-identical to stock vLLM. Llama itself is covered by the rest of the suite (test_engine,
test_prefix_cache, ...). Each family gets one engine, shared by its tests, on the session's
model runner. Family engines run eagerly and in the test process (vLLM's
``VLLM_ENABLE_V1_MULTIPROCESSING=0``): they start in seconds rather than a minute, and the
steering layer under torch.compile is covered by the Llama suite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from support.engines import CACHE, ENGINE_ARGS, scoped_environ
from support.helpers import Generation, assert_same_tokens_close_logprobs, reference, run
from vllm_steer.lab.tiny import RECIPES

# Every family tiny.py builds a checkpoint of, but Llama (the rest of the suite).
FAMILIES = [name for name in RECIPES if name != "llama"]
LAYERS = 3  # first, middle and last
FAMILY_ENGINE = {**ENGINE_ARGS, "max_num_seqs": 16, "enforce_eager": True}


def start(factory, path):
    with scoped_environ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        return factory(path)
STORY = "Tell me a story about the Eiffel Tower, the ocean and dogs in the park. " * 16


@dataclass
class Family:
    name: str
    path: object
    llm: object
    hf_model: object
    prompts: list[list[int]]
    directions: dict[str, list[float]]  # unit directions (random, and the last layer's mean stream)
    norms: list[float]  # mean stream norm after each layer: scales that matter in this family


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, runner):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_steer import SteeredLLM
    from vllm_steer.lab.tiny import build_tiny_model

    name = request.param
    path = build_tiny_model(CACHE / f"tiny-{name}", name, num_layers=LAYERS)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Eager attention: transformers' default (SDPA) skips Gemma 2's attention softcapping.
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in ("Who are you?", "Give me three business ideas about the ocean.", STORY)]
    with torch.no_grad():
        states = hf_model(torch.tensor([prompts[1]]), output_hidden_states=True).hidden_states
    generator = np.random.default_rng(11)

    def unit(array):
        return (np.asarray(array, np.float64) / np.linalg.norm(array)).astype(np.float32).tolist()

    directions = {f"random{i}": unit(generator.standard_normal(hf_model.config.hidden_size)) for i in range(3)}
    directions["mean_last"] = unit(states[LAYERS][0].mean(0).numpy())
    norms = [float(states[layer + 1][0].norm(dim=-1).mean()) for layer in range(LAYERS)]
    llm = start(lambda model: SteeredLLM(model, **FAMILY_ENGINE), path)
    yield Family(name, path, llm, hf_model, prompts, directions, norms)
    llm.shutdown()


def parity_cases(family: Family) -> dict[str, dict]:
    d, norm = family.directions, family.norms
    return {
        "add first layer": {"vectors": [{"vector": d["random0"], "layers": [0], "scale": norm[0]}]},
        "clamp middle layer": {"vectors": [{"vector": d["random1"], "layers": [1], "mode": "clamp", "scale": norm[1] / 2}]},
        "ablate last layer": {"vectors": [{"vector": d["mean_last"], "layers": [2], "mode": "ablate"}]},
        "prompt tokens only": {"vectors": [{"vector": d["random0"], "layers": [1], "scale": norm[1]}], "apply_to": "prompt"},
        "generated tokens only": {"vectors": [{"vector": d["random2"], "layers": [1], "scale": norm[1]}], "apply_to": "generated"},
        "several layers and modes": {
            "vectors": [
                {"vector": d["random2"], "layers": [0, 2], "scale": norm[0] / 2},
                {"vector": d["random1"], "layers": [2], "mode": "clamp", "scale": -norm[2] / 3},
                {"vector": d["mean_last"], "layers": [2], "mode": "ablate"},
            ]
        },
        # The component along the last layer's mean stream, capped well below where it is.
        "range last layer": {"vectors": [{"vector": d["mean_last"], "layers": [2], "mode": "range", "min": -norm[2] / 8, "max": norm[2] / 8}]},
    }


CASES = ["unsteered", *parity_cases(Family("", None, None, None, [], {k: [0.0] for k in ("random0", "random1", "random2", "mean_last")}, [1.0] * LAYERS))]


@pytest.fixture(scope="module")
def batch(family, gen_len) -> dict[str, tuple[dict | None, Generation]]:
    """Every case, and an unsteered request, in one batch: each must get what it gets alone."""
    specs = [None, *parity_cases(family).values()]
    outputs = run(family.llm, [family.prompts[1]] * len(specs), specs, gen_len)
    return dict(zip(CASES, zip(specs, outputs)))


@pytest.mark.parametrize("case", CASES)
def test_parity_with_the_familys_own_transformers_model(case, family, batch, gen_len):
    spec, got = batch[case]
    expected = reference(family.hf_model, family.llm, family.prompts[1], spec, gen_len)
    assert_same_tokens_close_logprobs(got, expected)
    if case != "unsteered":
        # Random Gemma checkpoints tend to repeat one token: then the logprobs tell.
        plain = batch["unsteered"][1]
        changed = got.token_ids != plain.token_ids or max(abs(a - b) for a, b in zip(got.logprobs, plain.logprobs)) > 1e-2
        assert changed, "this steering should change the output"


def test_steered_and_unsteered_never_share_kv_blocks(family, gen_len):
    long_prompt = family.prompts[2]
    assert len(long_prompt) > 256  # several full KV blocks
    spec = {"vectors": [{"vector": family.directions["random0"], "layers": [1], "scale": family.norms[1]}], "apply_to": "prompt"}
    family.llm.llm.reset_prefix_cache()
    clean = run(family.llm, [long_prompt], [None], gen_len)[0]
    steered = run(family.llm, [long_prompt], [spec], gen_len)[0]
    assert steered.num_cached_tokens == 0, "a steered request read KV blocks written without steering"
    assert_same_tokens_close_logprobs(steered, reference(family.hf_model, family.llm, long_prompt, spec, gen_len))
    again = run(family.llm, [long_prompt], [None], gen_len)[0]
    assert again.num_cached_tokens > 0, "identical unsteered requests should share their cache"
    assert again.token_ids == clean.token_ids and again.logprobs == clean.logprobs


def test_unsteered_output_is_bit_identical_to_stock_vllm(family, gen_len):
    """The steered class with nothing steered computes exactly what vLLM's own class does
    (the same batch on both, so both run the same kernels on the same shapes)."""
    from vllm import LLM

    from support.helpers import generations, greedy

    prompts = family.prompts[:2] * 2
    steered = run(family.llm, prompts, [None] * len(prompts), gen_len)
    stock = start(lambda model: LLM(model=str(model), **FAMILY_ENGINE), family.path)
    try:
        plain = generations(stock.generate([{"prompt_token_ids": p} for p in prompts], greedy(gen_len), use_tqdm=False))
    finally:
        stock.llm_engine.engine_core.shutdown()
    for mine, theirs in zip(steered, plain):
        assert mine.token_ids == theirs.token_ids and mine.logprobs == theirs.logprobs


def test_the_family_engine_runs_on_the_sessions_model_runner(family, batch, runner):
    assert [stats["runner"] for stats in family.llm.steering_stats()] == [runner]
